"""IQ-Learn trainer: its loss inside OpenRLHF's loop equals the references; end-to-end runs under DeepSpeed."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from helpers import assert_ok, counting_records, mean_response_nll, run_python, saved_dtypes, sft_flags
from openrlhf_irl import compat

compat.activate()

from openrlhf.models import Actor, SFTLoss  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from openrlhf_irl.losses.iq_sft import IQConfig  # noqa: E402
from openrlhf_irl.trainers.iq_learn import IQLearnTrainer  # noqa: E402
from helpers.iq_batches import bare_trainer, sft_batch  # noqa: E402
from helpers.loss_api import iq_learn_loss  # noqa: E402


def loss_and_grads(actor, fn):
    actor.zero_grad()
    loss = fn()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in actor.parameters()]


def test_td_weight_zero_is_openrlhf_sft_loss_with_its_normalisers(actor_and_tok):
    actor, tok = actor_and_tok
    inputs, attn, loss_mask = sft_batch(tok, counting_records(4))
    mask = loss_mask[:, :-1]
    norms = dict(dp_size=2, batch_num_tokens=mask.sum() * 1.5, global_batch_size=torch.tensor(6.0))

    def openrlhf_loss():
        logp, _ = actor(inputs, attention_mask=attn, return_output=True, return_logprobs=True)
        return SFTLoss()(logp, mask, **norms)

    trainer = bare_trainer(actor, tok, td_weight=0.0)

    def iq_loss():
        fwd, _ = trainer.policy_forward(inputs, attention_mask=attn, return_output=True, return_logprobs=True)
        return trainer.loss_fn(fwd, mask, **norms)

    ref, ref_grads = loss_and_grads(actor, openrlhf_loss)
    got, got_grads = loss_and_grads(actor, iq_loss)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    for g, r in zip(got_grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_trainer_loss_equals_reference_loss_on_a_batch_with_eos_and_truncation(actor_and_tok, gamma):
    """--irl.truncation drop: the cut row's last token has no TD term, as in ``iq_learn_loss``."""
    actor, tok = actor_and_tok
    inputs, attn, loss_mask = sft_batch(tok, counting_records(4, seed=5), truncate_last_to=12)
    mask = loss_mask[:, :-1].bool()
    labels = inputs[:, 1:]
    assert labels[-1][mask[-1]][-1] != tok.eos_token_id  # the truncated row ends without EOS
    trainer = bare_trainer(actor, tok, td_weight=0.5, gamma=gamma, mle_weight=0.7, truncation="drop")
    with torch.no_grad():
        fwd = trainer.policy_forward(inputs, attention_mask=attn)
        got = trainer.loss_fn(fwd, mask)
        logits = actor(inputs, attention_mask=attn, return_output=True)["logits"][:, :-1]
        ref, ref_stats = iq_learn_loss(logits, labels, mask, mask & (labels == tok.eos_token_id),
                                       td_weight=0.5, gamma=gamma, mle_weight=0.7)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    stats = trainer.iq_loss.pop_stats()  # entropy over all response tokens (fewer than the 256 sampled for logging)
    for key in ("nll", "td", "value", "reward", "entropy"):
        assert stats[key] == pytest.approx(ref_stats[key], rel=1e-5, abs=1e-6), key


def test_fused_trainer_forward_matches_plain_loss_and_gradients(actor_and_tok):
    actor, tok = actor_and_tok
    inputs, attn, loss_mask = sft_batch(tok, counting_records(4, seed=7), truncate_last_to=10)
    mask = loss_mask[:, :-1]
    plain = bare_trainer(actor, tok, td_weight=0.3)
    fused = bare_trainer(actor, tok, td_weight=0.3, fused_loss=True, fused_chunk_size=7)
    ref, ref_grads = loss_and_grads(actor, lambda: plain.loss_fn(plain.policy_forward(inputs, attn), mask))
    got, got_grads = loss_and_grads(actor, lambda: fused.loss_fn(fused.policy_forward(inputs, attn), mask))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(got_grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    assert plain.iq_loss.pop_stats().keys() == fused.iq_loss.pop_stats().keys() >= {"nll", "td", "value", "reward",
                                                                                   "entropy", "td_weight"}


def test_td_warmup_is_linear_in_optimizer_steps():
    cfg = IQConfig(td_weight=0.4, td_warmup_steps=10)
    assert [cfg.td_weight_at(s) for s in (0, 5, 10, 50)] == [0.0, 0.2, 0.4, 0.4]


def test_online_samples_are_teacher_forcing_tensors(actor_and_tok):
    from openrlhf_irl.generation.policy_samples import sample_completions

    actor, tok = actor_and_tok
    prompts = [torch.tensor(tok("User: count from 3\nAssistant: ")["input_ids"]), torch.tensor([5, 6])]
    torch.manual_seed(0)
    out = sample_completions(actor.model.eval(), tok, prompts, n=3, max_new_tokens=6)
    actor.model.train()
    seq, attn, mask = out["sequences"], out["attention_mask"], out["loss_mask"]
    assert seq.shape[0] == 6 and mask.shape == (6, seq.shape[1] - 1)
    width = len(prompts[0])
    for i in range(6):
        labels = seq[i, 1:][mask[i]]
        assert 1 <= len(labels) <= 6
        eos = (labels == tok.eos_token_id).nonzero()
        assert len(eos) == 0 or (len(eos) == 1 and int(eos[0]) == len(labels) - 1)  # nothing after EOS
        assert attn[i, width:].sum() == len(labels)
        assert seq[i, width - len(prompts[i // 3]):width].tolist() == prompts[i // 3].tolist()


def test_iq_dataset_keeps_truncated_responses_non_terminal(tiny_model):
    import datasets

    from openrlhf_irl.datasets.iq_sft import IQSFTDataset

    tok = AutoTokenizer.from_pretrained(tiny_model)
    records = [{"prompt": "count from 1", "response": "1 2"},
               {"prompt": "count from 5", "response": " ".join(str(i) for i in range(5, 60))}]
    for mode in ("bootstrap", "drop", "eos"):
        keep = mode != "eos"
        args = SimpleNamespace(data=SimpleNamespace(input_key="prompt", output_key="response",
                                                    apply_chat_template=False, tokenizer_chat_template=None),
                               irl=SimpleNamespace(truncation=mode))
        ds = IQSFTDataset(datasets.Dataset.from_list(records), tok, 24, SimpleNamespace(args=args, print=print),
                          input_template="User: {}\nAssistant: ", num_processors=1)
        short_ids = ds[0][0][0]
        long_ids = ds[1][0][0]
        assert short_ids[-1] == tok.eos_token_id
        assert len(long_ids) == 24
        full = tok("User: count from 5\nAssistant: " + records[1]["response"], add_special_tokens=False)["input_ids"]
        assert (long_ids[-1] == full[23]) if keep else (long_ids[-1] == tok.eos_token_id)


def test_packing_is_refused_with_a_clear_message(tiny_model):
    args = SimpleNamespace(logger=SimpleNamespace(wandb=SimpleNamespace(key=None), tensorboard_dir=None),
                           model=SimpleNamespace(aux_loss_coef=0), ds=SimpleNamespace(packing_samples=True),
                           irl=SimpleNamespace(td_weight=0.1))
    strategy = SimpleNamespace(args=args, stage=2, is_rank_0=lambda: True)
    with pytest.raises(ValueError, match="packing_samples"):
        IQLearnTrainer(model=SimpleNamespace(forward=None), strategy=strategy, optim=None, train_dataloader=None,
                       eval_dataloader=None, scheduler=None, tokenizer=AutoTokenizer.from_pretrained(tiny_model))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["offline_fused", "online_zero3", "lora_checkpointing_fused"])
def test_irl_iq_trains_under_deepspeed_and_reloads(tiny_model, sft_data, tmp_path, mode):
    out = str(tmp_path / mode)
    extra = ["--trainer", "irl_iq", "--irl.td_weight", "0.1", "--irl.td_warmup_steps", "2", "--eval.dataset", sft_data]
    if mode == "offline_fused":
        extra += ["--irl.fused_loss", "--irl.fused_chunk_size", "32"]
    elif mode == "lora_checkpointing_fused":
        extra += ["--irl.fused_loss", "--ds.lora.rank", "16", "--ds.lora.alpha", "32",
                  "--model.gradient_checkpointing_enable", "--adam.lr", "1e-2"]
    else:
        extra += ["--irl.online_mix", "0.1", "--irl.n_samples", "2", "--irl.max_new_tokens", "6",
                  "--irl.online_refresh_steps", "2", "--irl.chi2_on_policy"]
    flags = sft_flags(tiny_model, sft_data, out)
    if mode == "online_zero3":
        flags[flags.index("--ds.zero_stage") + 1] = "3"
        flags[flags.index("--train.max_epochs") + 1] = "3"  # the value term on policy samples slows the NLL drop
    proc = run_python(["-m", "openrlhf_irl.cli.train_sft", *flags, *extra])
    assert_ok(proc)
    assert "[irl_iq eval" in proc.stdout and "td=" in proc.stdout
    if mode == "online_zero3":
        assert "iq_online_term" in proc.stderr + proc.stdout
    records = counting_records()
    before, after = mean_response_nll(tiny_model, records), mean_response_nll(out, records)
    # LoRA adapters on a randomly initialised model learn slowly (OpenRLHF's own SFT with the same adapters reaches
    # the same NLL, about 0.91 of the start, in this budget)
    assert after < (0.95 if mode.startswith("lora") else 0.7) * before, (before, after)
    if mode == "offline_fused":
        assert saved_dtypes(out) == {torch.bfloat16}  # --ds.param_dtype bf16 (sft_flags); fp32: test_param_dtype.py
        assert_loads_as_ppo_actor(out)


def assert_loads_as_ppo_actor(path: str) -> None:
    """OpenRLHF's PPO builds its actor (and reference model) as ``Actor(path)``: that must give the saved weights."""
    from transformers import AutoModelForCausalLM

    actor = Actor(path, attn_implementation="eager", param_dtype="bf16")
    actor.model.float().eval()
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    ids = torch.tensor([tok("User: count from 7\nAssistant: 7 8 9 10")["input_ids"]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        actor_logprobs = actor(ids, attention_mask=mask, return_logprobs=True)
        logits = hf(ids, attention_mask=mask).logits.float()
    expected = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(actor_logprobs.float(), expected, rtol=1e-4, atol=1e-4)
