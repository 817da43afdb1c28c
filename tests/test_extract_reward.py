"""extract_reward CLI: scores the exact rows training sees (issue 12 point 7), telescoping at gamma = 1,
correlations, and bad input refused before anything is written (issue 13)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from helpers import counting_records, write_jsonl
from helpers.iq_reference import row_steps
from openrlhf_irl import compat
from openrlhf_irl.cli.extract_reward import main

compat.activate()

TEMPLATE = "User: {}\nAssistant: "


def _rows(path):
    return [json.loads(line) for line in open(path)]


def training_batch(tok, records, max_len, truncation="bootstrap"):
    """The rows ``train_sft --trainer irl_iq`` feeds its loss: IQSFTDataset + its collate, as OpenRLHF builds them."""
    import datasets

    from openrlhf_irl import compat

    compat.activate()
    from openrlhf_irl.datasets.iq_sft import IQSFTDataset

    args = SimpleNamespace(data=SimpleNamespace(input_key="prompt", output_key="response", apply_chat_template=False,
                                                tokenizer_chat_template=None),
                           irl=SimpleNamespace(truncation=truncation))
    rows = [{"prompt": r["prompt"], "response": r["response"]} for r in records]
    ds = IQSFTDataset(datasets.Dataset.from_list(rows), tok, max_len, SimpleNamespace(args=args, print=print),
                      input_template=TEMPLATE, num_processors=1)
    return ds.collate_fn([ds[i] for i in range(len(ds))])


@pytest.mark.parametrize("gamma,truncation", [(0.9, "bootstrap"), (1.0, "drop")])
def test_token_rewards_are_the_trainers_on_its_training_rows(tiny_model, tmp_path, gamma, truncation):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from openrlhf_irl.losses.iq_sft import IQConfig, PolicyForward, forward_terms

    records = counting_records(5, seed=13)
    records[1]["response"] = " ".join(str(i) for i in range(20, 45))  # cut by --data.max_len
    data = write_jsonl(tmp_path / "train.jsonl", records)
    out = tmp_path / "rewards.jsonl"
    assert main(["--model", tiny_model, "--data", str(data), "--output", str(out), "--data.input_template", TEMPLATE,
                 "--data.max_len", "24", "--gamma", str(gamma), "--truncation", truncation, "--batch-size", "2"]) == 0
    rows = _rows(out)

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    inputs, attn, loss_mask = training_batch(tok, records, 24, truncation)
    mask = loss_mask[:, :-1].bool()
    with torch.no_grad():
        logits = model(inputs, attention_mask=attn).logits.float()
        fwd = PolicyForward(inputs, inputs[:, 1:], logits=logits, attention_mask=attn)
        _, terms, _, _ = forward_terms(fwd, mask, tok.eos_token_id, IQConfig(gamma=gamma, truncation=truncation), 0.0)
    for b, row in enumerate(rows):
        assert row["tokens"] == tok.convert_ids_to_tokens(inputs[b, 1:][mask[b]].tolist())  # the tokens trained on
        expected = terms.rewards[b][mask[b]].tolist()
        assert row["token_rewards"] == pytest.approx(expected, abs=1e-4)
        # and an independent loop over the same row
        loop = [0.0 if r is None else float(r) for _, _, r, _ in
                row_steps(logits, inputs, attn, mask, b, tok.eos_token_id, gamma, truncation)]
        assert row["token_rewards"] == pytest.approx(loop, abs=1e-4)
    assert rows[1]["cut"] and not rows[1]["terminal"] and rows[0]["terminal"]
    assert (rows[1]["token_rewards"][-1] == 0.0) == (truncation == "drop")


def test_rewards_telescope_and_correlations_are_reported(tiny_model, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    records = [{"prompt": f"count from {a}", "response": r, "score": s}
               for a in (3, 9) for r, s in ((f"{a} {a + 1}", 1.0), ("7 7 7", 0.0), (f"{a}", 0.5))]
    records.append({"prompt": "count from 4", "response": "4 5 6", "score": 0.2, "finished": False})
    data = write_jsonl(tmp_path / "pairs.jsonl", records)
    out, report = tmp_path / "rewards.jsonl", tmp_path / "report.json"
    assert main(["--model", tiny_model, "--data", str(data), "--output", str(out), "--report", str(report),
                 "--reference-key", "score", "--batch-size", "3"]) == 0
    rows = _rows(out)
    assert len(rows) == len(records)

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    for row, rec in zip(rows[:-1], records):
        # s_0 is the state that emits the first trained token of the jointly tokenised row
        ids = tok(TEMPLATE.format(rec["prompt"]) + rec["response"] + " " + tok.eos_token,
                  add_special_tokens=False)["input_ids"]
        first = len(ids) - len(row["tokens"]) - 1
        with torch.no_grad():
            v0 = torch.logsumexp(model(torch.tensor([ids])).logits[0, first].float(), -1)
        assert row["tokens"][-1] == tok.eos_token and row["terminal"]
        assert row["reward"] == pytest.approx(row["log_prob"] + float(v0), abs=1e-4)  # telescoping, gamma = 1
    cut = rows[-1]
    assert not cut["terminal"] and cut["cut"] and cut["tokens"][-1] != tok.eos_token

    rep = json.load(open(report))
    # gamma = 1: within a prompt the reward ranks exactly like the likelihood
    assert rep["reward"]["within_prompts_mean"] == pytest.approx(rep["log_prob"]["within_prompts_mean"])
    assert rep["reward"]["prompts_with_within_correlation"] == 2
    assert "across prompts" in capsys.readouterr().out


BAD = [
    ({"score": "high"}, ["--reference-key", "score"], "line 2, field 'score': expected a finite number, got 'high'"),
    ({"score": float("inf")}, ["--reference-key", "score"], "line 2, field 'score': expected a finite number"),
    ({"score": float("nan")}, ["--reference-key", "score"], "line 2, field 'score': expected a finite number"),
    ({"finished": "no"}, [], "line 2, field 'finished': expected true or false, got 'no'"),
    ({"response": None}, [], "line 2, field 'response': response is null"),
    ({"response": 5}, [], "line 2, field 'response': expected a string, got int"),
    ({"prompt": {"a": 1}}, [], "line 2, field 'prompt': expected a string, got dict"),
    ({}, ["--gamma", "nan"], "argument --gamma: must be a finite number in [0, 1]"),
    ({}, ["--gamma", "inf"], "argument --gamma: must be a finite number in [0, 1]"),
    ({}, ["--gamma", "1.5"], "argument --gamma: must be a finite number in [0, 1]"),
    ({}, ["--batch-size", "-1"], "argument --batch-size: must be >= 1"),
    ({}, ["--batch-size", "0"], "argument --batch-size: must be >= 1"),
    ({}, ["--data.max_len", "2"], "argument --data.max_len: must be >= 3"),
    ({"prompt": "word " * 40}, ["--data.max_len", "24"], "line 2, field 'prompt': the prompt leaves no room"),
]


@pytest.mark.parametrize("change,flags,message", BAD, ids=[m for _, _, m in BAD])
def test_bad_input_is_refused_and_the_existing_output_is_untouched(tiny_model, tmp_path, capsys, change, flags,
                                                                   message):
    data = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "response": "b", "score": 1},
                                                {"prompt": "a", "response": "c", "score": 0, **change}])
    from openrlhf_irl.utils.output_guard import mark_file

    out = tmp_path / "o.jsonl"
    out.write_text("previous results\n")
    mark_file(str(out), "openrlhf_irl.cli.extract_reward")  # an earlier run's output: it may be replaced
    try:
        code = main(["--model", tiny_model, "--data", str(data), "--output", str(out), *flags])
    except SystemExit as exc:  # argparse
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert out.read_text() == "previous results\n"


def test_output_that_is_the_input_is_refused(tiny_model, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b"}])
    before = data.read_text()
    assert main(["--model", tiny_model, "--data", str(data), "--output", str(data)]) == 2
    assert "is the same file as --data" in capsys.readouterr().err and data.read_text() == before
    (tmp_path / "empty_model").mkdir()
    assert main(["--model", str(tmp_path / "empty_model"), "--data", str(data), "--output",
                 str(tmp_path / "o.jsonl")]) == 2
    assert "not a model directory (no config.json)" in capsys.readouterr().err


def test_multiturn_rows_are_scored_as_the_trainer_scores_them(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from openrlhf_irl.losses.iq_sft import IQConfig, PolicyForward, forward_terms
    from helpers.iq_batches import TEMPLATE as CHAT, conversations, multiturn_batch

    records = conversations()
    data = write_jsonl(tmp_path / "conv.jsonl", records)
    out = tmp_path / "rewards.jsonl"
    assert main(["--model", tiny_model, "--data", str(data), "--output", str(out), "--data.input_key", "messages",
                 "--data.multiturn", "--data.tokenizer_chat_template", CHAT, "--data.max_len", "64",
                 "--gamma", "0.9"]) == 0
    rows = _rows(out)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    inputs, attn, loss_mask = multiturn_batch(tok, records)
    mask = loss_mask[:, :-1].bool()
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    with torch.no_grad():
        fwd = PolicyForward(inputs, inputs[:, 1:], logits=model(inputs, attention_mask=attn).logits.float(),
                            attention_mask=attn)
        _, terms, _, _ = forward_terms(fwd, mask, tok.eos_token_id, IQConfig(gamma=0.9), 0.0)
    for b, row in enumerate(rows):
        assert row["tokens"] == tok.convert_ids_to_tokens(inputs[b, 1:][mask[b]].tolist())
        assert row["token_rewards"] == pytest.approx(terms.rewards[b][mask[b]].tolist(), abs=1e-4)
        assert row["terminal"] and row["tokens"].count(tok.eos_token) == 2  # both turns; only the last ends it
