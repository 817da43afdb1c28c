"""The trainer's fused loss (single pass by default) against its plain loss: OpenRLHF's normalisers, cut rows,
evaluation, a soft-capped tied Gemma-2 head; and IQ-Learn at ZeRO-3 on two ranks (the fused loss was refused there):
fused and plain runs of OpenRLHF's train_sft give the same checkpoint within bf16 tolerance."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from helpers import assert_ok, counting_records, run_python, sft_flags
from openrlhf_irl import compat

compat.activate()

from openrlhf.models import Actor  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma2Config  # noqa: E402

from helpers.iq_batches import FixedSampler, bare_trainer, sft_batch  # noqa: E402


def loss_and_grads(actor, fn):
    actor.zero_grad(set_to_none=True)
    loss = fn()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in actor.parameters()]


def run(trainer, inputs, attn, mask, **norms):
    return trainer.loss_fn(trainer.policy_forward(inputs, attn), mask, **norms)


@pytest.mark.parametrize("truncation", ["bootstrap", "drop"])
def test_single_pass_equals_plain_and_two_pass_with_openrlhf_normalisers(actor_and_tok, truncation):
    actor, tok = actor_and_tok
    inputs, attn, loss_mask = sft_batch(tok, counting_records(4, seed=11), truncate_last_to=11)
    mask = loss_mask[:, :-1]
    norms = dict(dp_size=2, batch_num_tokens=mask.sum() * 1.5, global_batch_size=torch.tensor(6.0))
    cfg = dict(td_weight=0.4, gamma=0.9, mle_weight=0.8, truncation=truncation)
    plain = bare_trainer(actor, tok, **cfg)
    single = bare_trainer(actor, tok, fused_loss=True, fused_chunk_size=5, **cfg)
    two_pass = bare_trainer(actor, tok, fused_loss=True, fused_chunk_size=5, fused_single_pass=False, **cfg)
    assert run(single, inputs, attn, mask).grad_fn.name().startswith("LinearIQObjective")  # the default path

    ref, ref_grads = loss_and_grads(actor, lambda: run(plain, inputs, attn, mask, **norms))
    ref_stats = plain.iq_loss.pop_stats()
    for trainer in (single, two_pass):
        trainer.iq_loss.pop_stats()
        got, got_grads = loss_and_grads(actor, lambda: run(trainer, inputs, attn, mask, **norms))
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
        for g, r in zip(got_grads, ref_grads):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
        stats = trainer.iq_loss.pop_stats()
        for key in ("nll", "td", "value", "reward", "entropy"):
            assert stats[key] == pytest.approx(ref_stats[key], rel=1e-5, abs=1e-6), key

    # evaluation (no grad): same value
    actor.eval()
    with torch.no_grad():
        torch.testing.assert_close(run(single, inputs, attn, mask), run(plain, inputs, attn, mask), rtol=1e-5,
                                   atol=1e-6)
    actor.train()


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_online_single_pass_equals_plain_online_loss(actor_and_tok, gamma):
    """Online IQ-Learn with the fused loss: the online term's expert and policy weights folded into the single-pass
    op (policy samples with EOS-ended and cut rows) give the plain online loss's value, gradients and stats."""
    actor, tok = actor_and_tok
    inputs, attn, loss_mask = sft_batch(tok, counting_records(3, seed=13), truncate_last_to=12)
    mask = loss_mask[:, :-1]
    norms = dict(dp_size=2, batch_num_tokens=mask.sum() * 1.25, global_batch_size=torch.tensor(5.0))
    cfg = dict(td_weight=0.7, gamma=gamma, online_mix=0.3)
    results = {}
    for name, extra in (("plain", {}), ("single", dict(fused_loss=True, fused_chunk_size=6)),
                        ("two_pass", dict(fused_loss=True, fused_chunk_size=6, fused_single_pass=False))):
        trainer = bare_trainer(actor, tok, sampler=FixedSampler(tok, n=2), **cfg, **extra)
        loss, g = loss_and_grads(actor, lambda: run(trainer, inputs, attn, mask, **norms))
        results[name] = (loss, g, trainer.iq_loss.pop_stats())
    ref, ref_grads, ref_stats = results["plain"]
    assert abs(ref_stats["online_term"]) > 1e-3  # the online term is there
    for name in ("single", "two_pass"):
        got, got_grads, stats = results[name]
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        for g, r in zip(got_grads, ref_grads):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
        assert stats.keys() == ref_stats.keys()
        for key in ref_stats:
            assert stats[key] == pytest.approx(ref_stats[key], rel=1e-4, abs=1e-5), key


def test_trainer_fused_loss_on_a_soft_capped_tied_gemma2_head():
    """Issue 12 point 5 at the trainer: before, the fused path used hidden @ W.T and missed Gemma-2's soft-cap."""
    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=2, head_dim=32, final_logit_softcapping=3.0,
                          pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=64)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").float()
    assert model.config.tie_word_embeddings
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(40.0)
    actor = Actor(model)
    actor.packing_samples = False
    actor.train()
    gen = torch.Generator().manual_seed(1)
    inputs = torch.randint(3, 64, (3, 10), generator=gen)
    attn = torch.ones_like(inputs)
    attn[0, 8:] = 0
    inputs[0, 7] = 2  # EOS, then padding
    mask = torch.zeros(3, 9)
    mask[0, 2:7] = 1
    mask[1, 3:9] = 1
    mask[2, 1:9] = 1
    tok = SimpleNamespace(eos_token_id=2)
    plain = bare_trainer(actor, tok, td_weight=0.5)
    fused = bare_trainer(actor, tok, td_weight=0.5, fused_loss=True, fused_chunk_size=4)
    ref, ref_grads = loss_and_grads(actor, lambda: run(plain, inputs, attn, mask))
    got, got_grads = loss_and_grads(actor, lambda: run(fused, inputs, attn, mask))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(got_grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


# ---- ZeRO-3, two ranks ---------------------------------------------------------------------------------------------
def write_model(tiny_model: str, out: Path, tied: bool) -> str:
    """The tiny model's tokenizer with a model whose lm_head is large enough (2,048 x 64) for ZeRO-3 to partition
    it (DeepSpeed keeps parameters under 1e5 elements whole); rows past the tokenizer are never used."""
    from transformers import LlamaConfig

    tok = AutoTokenizer.from_pretrained(tiny_model)
    config = LlamaConfig(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         tie_word_embeddings=tied)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def state(path):
    from safetensors.torch import load_file

    return {k: v.float() for k, v in load_file(str(Path(path) / "model.safetensors")).items()}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["offline_tied", "online_untied"])
def test_iq_learn_zero3_two_ranks_fused_equals_plain(tiny_model, sft_data, tmp_path, mode):
    model = write_model(tiny_model, tmp_path / "model", tied=mode.endswith("_tied"))
    outs = {}
    for loss in ("plain", "fused"):
        out = str(tmp_path / loss)
        flags = sft_flags(model, sft_data, out, "--train.max_epochs", "1", "--trainer", "irl_iq",
                          "--irl.td_weight", "0.3")
        flags[flags.index("--ds.zero_stage") + 1] = "3"
        flags[flags.index("--train.micro_batch_size") + 1] = "2"
        flags[flags.index("--adam.lr") + 1] = "1e-3"
        if mode.startswith("online"):
            flags += ["--irl.online_mix", "0.2", "--irl.n_samples", "1", "--irl.max_new_tokens", "4",
                      "--irl.online_refresh_steps", "2", "--irl.sampler", "hf"]
        if loss == "fused":
            flags += ["--irl.fused_loss", "--irl.fused_chunk_size", "16"]
        proc = run_python(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "openrlhf_irl.cli.train_sft", *flags], timeout=600)
        assert_ok(proc)
        outs[loss] = state(out)
    start = state(model)
    plain, fused = outs["plain"], outs["fused"]
    assert plain.keys() == fused.keys()
    moved = sum(float((plain[k] - start[k]).norm() ** 2) for k in plain) ** 0.5
    apart = sum(float((plain[k] - fused[k]).norm() ** 2) for k in plain) ** 0.5
    print(f"[zero3 {mode}] |plain - start| = {moved:.4f}, |plain - fused| = {apart:.4f}")
    assert moved > 0.05, moved  # training did move the weights
    # bf16 training: the two losses round differently, and Adam amplifies tiny gradient differences a little
    assert apart < 0.1 * moved, (apart, moved)
    head = "lm_head.weight" if "lm_head.weight" in plain else "model.embed_tokens.weight"
    assert float((plain[head] - fused[head]).norm()) < 0.1 * float((plain[head] - start[head]).norm())
