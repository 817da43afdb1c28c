"""Multi-turn rows and truncated responses (issue 12, points 4 and 6), and non-finite losses (issue 13): the trainer's
loss and gradient against the per-token loop of ``iq_reference`` on rows built by the real dataset."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from helpers import assert_ok, counting_records, run_python, sft_flags, write_jsonl
from helpers.iq_batches import (TEMPLATE, bare_trainer, conversations, grads, model_logits, multiturn_batch,
                                sft_batch)
from helpers.iq_reference import offline_loss
from openrlhf_irl import compat

compat.activate()

import datasets  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from openrlhf_irl.datasets.iq_sft import IQSFTDataset  # noqa: E402
from openrlhf_irl.losses.iq_sft import NonFiniteLoss, PolicyForward, forward_terms  # noqa: E402

def segments(mask_row):
    """[(first, last)] shifted positions of each run of response tokens."""
    out, start = [], None
    cols = mask_row.tolist() + [False]
    for t, m in enumerate(cols):
        if m and start is None:
            start = t
        if not m and start is not None:
            out.append((start, t - 1))
            start = None
    return out


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_multiturn_td_bootstraps_from_the_next_assistant_segment(actor_and_tok, gamma):
    actor, tok = actor_and_tok
    inputs, attn, loss_mask = multiturn_batch(tok, conversations())
    mask = loss_mask[:, :-1].bool()
    labels = inputs[:, 1:]
    eos = tok.eos_token_id
    for b in range(len(inputs)):
        segs = segments(mask[b])
        assert len(segs) == 2
        # each assistant turn ends with EOS (the template's end of turn); user tokens are not in the mask
        assert all(int(labels[b, last]) == eos for _, last in segs)
        assert tok.decode(labels[b, segs[0][0]:segs[0][1]]).strip() == conversations()[b]["messages"][1]["content"]
        assert attn[b, segs[1][1] + 2:].sum() == 0  # the final EOS is the row's last real token

    trainer = bare_trainer(actor, tok, td_weight=0.6, gamma=gamma)
    actor.zero_grad()
    fwd = trainer.policy_forward(inputs, attention_mask=attn)
    got = trainer.loss_fn(fwd, mask)
    got.backward()
    got_grads = grads(actor)
    actor.zero_grad()
    ref = offline_loss(model_logits(actor, inputs, attn), inputs, attn, mask, eos, td_weight=0.6, gamma=gamma)
    ref.backward()
    torch.testing.assert_close(got.detach(), ref.detach(), rtol=1e-5, atol=1e-5)
    for g, r in zip(got_grads, grads(actor)):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)

    with torch.no_grad():
        _, terms, _, v = forward_terms(trainer.policy_forward(inputs, attention_mask=attn), mask, eos,
                                       trainer.iq_config, 0.6)
    for b in range(len(inputs)):
        (s1, e1), (s2, e2) = segments(mask[b])
        # the first turn's EOS is not terminal: its target is V where the second assistant turn starts
        assert terms.td_mask[b, e1] and float(terms.next_values[b, e1]) == pytest.approx(float(v[b, s2]), abs=1e-6)
        assert float(terms.next_values[b, e2]) == 0.0 and terms.td_mask[b, e2]  # the last one ends the episode


def test_multiturn_row_cut_inside_a_user_turn_has_no_target_from_user_tokens(actor_and_tok):
    """(OpenRLHF drops multi-turn rows whose last prompt exceeds max_len; a row cut this way can still come from
    other data paths.) The first turn's last token is followed by user tokens only: no TD term."""
    actor, tok = actor_and_tok
    inputs, attn, loss_mask = multiturn_batch(tok, conversations()[:1])
    mask = loss_mask[:, :-1].bool()
    (s1, e1), (s2, _) = segments(mask[0])
    cut = e1 + 1 + (s2 - e1) // 2 + 1  # keep tokens up to the middle of the user turn
    inputs, attn, mask = inputs[:, :cut], attn[:, :cut], mask[:, : cut - 1]
    assert len(segments(mask[0])) == 1
    trainer = bare_trainer(actor, tok, td_weight=0.6)
    with torch.no_grad():
        _, terms, _, _ = forward_terms(trainer.policy_forward(inputs, attention_mask=attn), mask,
                                       tok.eos_token_id, trainer.iq_config, 0.6)
    assert not terms.td_mask[0, e1] and float(terms.rewards[0, e1]) == 0.0  # neither terminal nor bootstrapped
    assert terms.td_mask[0, s1:e1].all()


@pytest.mark.parametrize("truncation", ["bootstrap", "drop"])
def test_truncated_response_bootstrap_or_drop(actor_and_tok, truncation):
    """A row cut by max_len (the longest of the batch, so its next state is the last column)."""
    actor, tok = actor_and_tok
    records = counting_records(3, seed=9)
    records[2]["response"] = " ".join(str(i) for i in range(10, 40))
    inputs, attn, loss_mask = sft_batch(tok, records, truncate_last_to=20)
    mask = loss_mask[:, :-1].bool()
    assert int(attn[2].sum()) == inputs.shape[1] and int(inputs[2, -1]) != tok.eos_token_id
    trainer = bare_trainer(actor, tok, td_weight=0.8, gamma=0.95, truncation=truncation)
    actor.zero_grad()
    got = trainer.loss_fn(trainer.policy_forward(inputs, attention_mask=attn), mask)
    got.backward()
    got_grads = grads(actor)
    actor.zero_grad()
    logits = model_logits(actor, inputs, attn)
    ref = offline_loss(logits, inputs, attn, mask, tok.eos_token_id, td_weight=0.8, gamma=0.95,
                       truncation=truncation)
    ref.backward()
    torch.testing.assert_close(got.detach(), ref.detach(), rtol=1e-5, atol=1e-5)
    for g, r in zip(got_grads, grads(actor)):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    other = offline_loss(logits.detach(), inputs, attn, mask, tok.eos_token_id, td_weight=0.8, gamma=0.95,
                         truncation="drop" if truncation == "bootstrap" else "bootstrap")
    assert abs(float(other) - float(got.detach())) > 1e-4  # the two modes really differ on this batch


def _nan_forward(tok, requires_grad=True):
    inputs, attn, loss_mask = sft_batch(tok, counting_records(2, seed=1))
    logits = torch.randn(*inputs.shape, len(tok), requires_grad=requires_grad)
    mask = loss_mask[:, :-1].bool()
    rows, cols = mask.nonzero(as_tuple=True)
    with torch.no_grad():
        bad = logits.clone()
        bad[rows[2], cols[2], 5] = float("inf")
    bad.requires_grad_(requires_grad)
    return PolicyForward(inputs, inputs[:, 1:], logits=bad, attention_mask=attn), mask


def test_non_finite_loss_stops_with_step_and_stat(actor_and_tok):
    actor, tok = actor_and_tok
    trainer = bare_trainer(actor, tok, td_weight=0.1)
    fwd, mask = _nan_forward(tok)
    with pytest.raises(NonFiniteLoss) as err:
        trainer.loss_fn(fwd, mask)
    msg = str(err.value)
    assert "optimizer step 0" in msg and "nll=inf" in msg and "--irl.skip_nonfinite" in msg
    assert "\n" not in msg


def test_skip_nonfinite_gives_zero_gradient_and_counts(actor_and_tok):
    actor, tok = actor_and_tok
    trainer = bare_trainer(actor, tok, td_weight=0.1, skip_nonfinite=True)
    for _ in range(2):
        fwd, mask = _nan_forward(tok)
        loss = trainer.loss_fn(fwd, mask)
        loss.backward()
        assert float(loss) == 0.0 and torch.count_nonzero(fwd.logits.grad) == 0
    assert trainer.iq_loss.pop_stats()["nonfinite_skipped"] == 1.5  # mean of the counts logged (1, 2)
    assert trainer.iq_loss.skipped == 2


def test_multiturn_template_off_token_boundary_is_refused(actor_and_tok):
    """The tiny tokenizer's own template puts 'Assistant: ' (trailing space) before each reply: tokenised on its
    own, the prefix ends in a bare space that the whole conversation merges into the reply's first token, so
    OpenRLHF's masks would shift onto the next user token."""
    _, tok = actor_and_tok
    bad = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ 'User: ' + m['content'] + '\\n' }}"
           "{% else %}{{ 'Assistant: ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
           "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}")
    args = SimpleNamespace(data=SimpleNamespace(input_key="messages", output_key=None, apply_chat_template=True,
                                                tokenizer_chat_template=bad),
                           irl=SimpleNamespace(truncation="bootstrap"))
    with pytest.raises(Exception, match="token boundary"):
        IQSFTDataset(datasets.Dataset.from_list(conversations()[:1]), tok, 64,
                     SimpleNamespace(args=args, print=print), num_processors=1, multiturn=True)
    tok.chat_template = TEMPLATE


@pytest.mark.slow
def test_multiturn_and_truncated_rows_train_through_the_cli(tiny_model, tmp_path):
    """train_sft --trainer irl_iq --data.multiturn under DeepSpeed, some conversations cut inside their last
    assistant turn; the saved model gives the second turns a lower NLL than the initial one."""
    import os

    records = []
    for i, r in enumerate(counting_records(32, seed=6)):
        a = int(r["prompt"].split()[-1])
        last = " ".join(str(a + 2 + j) for j in range(3 if i % 4 else 30))  # every 4th is cut by max_len
        records.append({"messages": [{"role": "user", "content": r["prompt"]},
                                     {"role": "assistant", "content": f"{a} {a + 1}"},
                                     {"role": "user", "content": "go on"},
                                     {"role": "assistant", "content": last}]})
    data = write_jsonl(tmp_path / "conv.jsonl", records)
    out = str(tmp_path / "out")
    proc = run_python([
        "-m", "openrlhf_irl.cli.train_sft", "--trainer", "irl_iq", "--irl.td_weight", "0.1",
        "--model.model_name_or_path", tiny_model, "--data.dataset", str(data), "--data.input_key", "messages",
        "--data.multiturn", "--data.apply_chat_template", "--data.tokenizer_chat_template", TEMPLATE,
        "--data.max_len", "40", "--train.micro_batch_size", "4", "--train.batch_size", "8",
        "--train.max_epochs", "2", "--ds.zero_stage", "2", "--ds.attn_implementation", "eager",
        "--ds.param_dtype", "bf16", "--adam.lr", "3e-3", "--lr_warmup_ratio", "0", "--ckpt.output_dir", out,
        "--ckpt.path", out + "_ckpt", "--logger.logging_steps", "1",
    ])
    assert_ok(proc)
    assert os.path.exists(os.path.join(out, "config.json"))
    from transformers import AutoModelForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_model)
    inputs, attn, loss_mask = multiturn_batch(tok, records[1:4])
    mask = loss_mask[:, :-1].bool()

    def nll(path):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            logp = torch.log_softmax(model(inputs, attention_mask=attn).logits[:, :-1].float(), -1)
        return float(-logp.gather(-1, inputs[:, 1:, None]).squeeze(-1)[mask].mean())

    assert nll(out) < 0.85 * nll(tiny_model)  # 8 optimizer steps: 5.73 -> 4.30 when written


@pytest.mark.slow
def test_non_finite_loss_stops_the_cli_run_with_one_line(tiny_model, sft_data, tmp_path):
    """A model whose final norm holds a NaN: the first micro-batch's loss is NaN and the run stops at once."""
    from transformers import AutoModelForCausalLM

    broken = str(tmp_path / "broken")
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    model.save_pretrained(broken)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(broken)
    out = str(tmp_path / "out")
    proc = run_python(["-m", "openrlhf_irl.cli.train_sft", *sft_flags(broken, sft_data, out), "--trainer", "irl_iq"])
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if "non-finite loss" in line]
    assert lines and "optimizer step 0" in lines[0] and "nll=nan" in lines[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
