"""extract_reward CLI: rewards telescope to log pi + V(s_0) (gamma=1), correlations, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import write_jsonl
from openrlhf_irl.cli.extract_reward import main


def _rows(path):
    return [json.loads(line) for line in open(path)]


def test_rewards_telescope_and_correlations_are_reported(tiny_model, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    records = [{"prompt": f"count from {a}", "response": r, "score": s}
               for a in (3, 9) for r, s in ((f"{a} {a + 1}", 1.0), ("7 7 7", 0.0), (f"{a}", 0.5))]
    records.append({"prompt": "count from 4", "response": "4 5 6", "score": 0.2, "finished": False})
    data = write_jsonl(tmp_path / "pairs.jsonl", records)
    out, report = tmp_path / "rewards.jsonl", tmp_path / "report.json"
    assert main(["--model", tiny_model, "--data", str(data), "--output", str(out), "--report", str(report),
                 "--reference-key", "score", "--input-template", "User: {}\nAssistant: ", "--batch-size", "3"]) == 0
    rows = _rows(out)
    assert len(rows) == len(records)

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    for row in rows[:-1]:
        prompt_ids = tok(f"User: {row['prompt']}\nAssistant: ", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            v0 = torch.logsumexp(model(torch.tensor([prompt_ids])).logits[0, -1].float(), -1)
        assert row["tokens"][-1] == tok.eos_token and row["terminal"]
        assert row["reward"] == pytest.approx(row["log_prob"] + float(v0), abs=1e-4)  # telescoping, gamma = 1
    cut = rows[-1]
    assert not cut["terminal"] and cut["tokens"][-1] != tok.eos_token and cut["token_rewards"][-1] == 0.0

    rep = json.load(open(report))
    # gamma = 1: within a prompt the reward ranks exactly like the likelihood
    assert rep["reward"]["within_prompts_mean"] == pytest.approx(rep["log_prob"]["within_prompts_mean"])
    assert rep["reward"]["prompts_with_within_correlation"] == 2
    assert "across prompts" in capsys.readouterr().out


def test_bad_reference_value_names_file_line_and_field(tiny_model, tmp_path, capsys):
    data = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "response": "b", "score": 1},
                                                {"prompt": "a", "response": "c", "score": "high"}])
    assert main(["--model", tiny_model, "--data", str(data), "--output", str(tmp_path / "o.jsonl"),
                 "--reference-key", "score"]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl" in err and "line 2" in err and "'score'" in err
    assert not (tmp_path / "o.jsonl").exists()
