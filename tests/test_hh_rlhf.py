"""HH-RLHF preparation keeps HH's exact text (the space after "Assistant:"), on real-shaped records."""

from __future__ import annotations

import json

import pytest

from openrlhf_irl.cli.prepare_hh_rlhf import main
from openrlhf_irl.datasets.hh_rlhf import load_hh_rlhf, split_conversation

# Shaped like Anthropic/hh-rlhf harmless-base and helpful-base records (multi-turn, "\n\nHuman: " / "\n\nAssistant: ")
HH = [
    {"chosen": "\n\nHuman: What are some cuss words in english?\n\nAssistant: Here's an incomplete list.\n\nHuman: "
               "What's your favorite one?\n\nAssistant: I haven't even thought about it.",
     "rejected": "\n\nHuman: What are some cuss words in english?\n\nAssistant: Here's an incomplete list.\n\nHuman: "
                 "What's your favorite one?\n\nAssistant: Ass."},
    {"chosen": "\n\nHuman: Can you recommend a good book?\n\nAssistant: Sure! \"The Left Hand of Darkness\" by "
               "Ursula K. Le Guin is a thoughtful classic.",
     "rejected": "\n\nHuman: Can you recommend a good book?\n\nAssistant: No."},
    {"chosen": "\n\nHuman: hi\n\nAssistant:  Two leading spaces and a trailing newline\n",
     "rejected": "\n\nHuman: hi\n\nAssistant: x"},
]


def test_prompt_plus_response_is_the_exact_hh_text(tmp_path):
    path = tmp_path / "hh.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in HH))
    records = load_hh_rlhf(str(path))
    for rec, hh in zip(records, HH):
        assert rec["prompt"] + rec["response"] == hh["chosen"]
        assert rec["prompt"].endswith("\n\nAssistant:")
    assert records[0]["response"] == " I haven't even thought about it."
    assert records[0]["prompt"].count("\n\nAssistant:") == 2  # the earlier turn stays in the prompt
    assert split_conversation(HH[1]["rejected"]) == ("\n\nHuman: Can you recommend a good book?\n\nAssistant:",
                                                      " No.")


def test_cli_writes_exact_text_and_counts(tmp_path, capsys):
    path = tmp_path / "hh.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in HH + HH[:1]))
    out = tmp_path / "out"
    assert main(["--input", str(path), "--output-dir", str(out), "--max-records", "2"]) == 0
    demos = [json.loads(line) for line in (out / "demos.jsonl").read_text().splitlines()]
    assert [d["prompt"] + d["response"] for d in demos] == [HH[0]["chosen"], HH[1]["chosen"]]
    assert main(["--input", str(path), "--output-dir", str(out)]) == 0
    assert len((out / "demos.jsonl").read_text().splitlines()) == 4
    assert len((out / "prompts.jsonl").read_text().splitlines()) == 3  # the repeated conversation counted once


@pytest.mark.parametrize("value", ["0", "-1"])
def test_cli_zero_or_negative_max_records_is_an_error(tmp_path, capsys, value):
    path = tmp_path / "hh.jsonl"
    path.write_text(json.dumps(HH[0]) + "\n")
    with pytest.raises(SystemExit) as e:
        main(["--input", str(path), "--output-dir", str(tmp_path / "o"), "--max-records", value])
    assert e.value.code == 2 and f"--max-records: must be >= 1, got {value}" in capsys.readouterr().err
