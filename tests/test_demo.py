"""`openrlhf-irl demo --quick`: the whole chain runs (OpenRLHF trainers, Ray sampling, AfD datasets, both reward
models, Best-of-N) and the report has every row, curve and file."""

from __future__ import annotations

import json
import os

import pytest

from conftest import assert_ok, run_python


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    proc = run_python(["-m", "openrlhf_irl", "demo", "--quick", "--output-dir", str(out), "--seed", "1"], timeout=900)
    assert_ok(proc)
    report = json.loads((out / "report.json").read_text())
    rows = {r["row"]: r for r in report["rows"]}
    for name in ("initial policy", "MLE SFT", "IQ-Learn SFT", "demonstrations (noisy expert)"):
        assert name in rows and 0.0 <= rows[name]["golden"] <= 1.0
        assert {"distinct_1", "distinct_2", "self_bleu"} <= rows[name].keys()
    ns = report["config"]["bon_ns"]
    for scorer in ("rm_bt", "rm_afd", "log_ratio"):
        for n in ns:
            assert f"Best-of-{n} ({scorer})" in rows
        assert set(report["curves"][scorer]) == {str(n) for n in ns}
    # the oracle curve can only rise with N, and bounds every scorer's curve
    oracle = [report["curves"]["oracle (golden)"][str(n)] for n in ns]
    assert oracle == sorted(oracle)
    for scorer in ("rm_bt", "rm_afd", "log_ratio"):
        assert all(report["curves"][scorer][str(n)] <= o + 1e-9 for n, o in zip(ns, oracle))
    # Best-of-1 is the policy itself whatever the scorer
    assert len({report["curves"][s][str(ns[0])] for s in ("rm_bt", "rm_afd", "log_ratio")}) == 1
    for name in ("report.md", "best_of_n.png", "policies.png", "data/afd_pairs.jsonl", "data/afd_labels.jsonl",
                 "samples/init.jsonl", "samples/sft.jsonl"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "best_of_n.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert "| IQ-Learn SFT" in md and "Best-of-" in md
    # the AfD reward models are OpenRLHF reward models: they load through OpenRLHF's own loader
    check = ("from openrlhf_irl import compat; compat.activate()\n"
             "from openrlhf.models import get_llm_for_sequence_regression\n"
             "import sys\n"
             "for path in sys.argv[1:]:\n"
             "    m = get_llm_for_sequence_regression(path, 'reward', attn_implementation='eager')\n"
             "    print('loaded', type(m).__name__)\n")
    loaded = run_python(["-c", check, str(out / "models" / "rm_bt"), str(out / "models" / "rm_afd")])
    assert_ok(loaded)
    assert loaded.stdout.count("loaded") == 2
    # the samples carry the sampling job's schema, one record per (prompt, sample_index)
    samples = [json.loads(line) for line in (out / "samples" / "init.jsonl").read_text().splitlines()]
    assert {"prompt", "response", "policy", "sample_index", "finished", "logprob"} <= samples[0].keys()
    assert len({(s["prompt"], s["sample_index"]) for s in samples}) == len(samples)
    assert os.path.getsize(out / "data" / "afd_pairs.jsonl") > 0

    # the Best-of-N CLI on the demo's policies and reward model, with the golden reward as a module:function
    bon = out / "bon_cli"
    proc = run_python(["-m", "openrlhf_irl.cli.best_of_n", "--policy", str(out / "models" / "sft_mle"),
                       "--log-ratio-init", str(out / "models" / "init"), "--reward-model", str(out / "models" / "rm_afd"),
                       "--golden", "openrlhf_irl.demo.task:golden_reward", "--prompts", str(out / "data" / "eval_prompts.jsonl"),
                       "--input-template", "{}\n", "--n", "1,2,4", "--max-new-tokens", "12", "--num-actors", "2",
                       "--max-prompts", "4", "--output-dir", str(bon)], timeout=600)
    assert_ok(proc)
    result = json.loads((bon / "best_of_n.json").read_text())
    assert result["n_prompts"] == 4 and set(result["curves"]) == {"rm:rm_afd", "log_ratio", "oracle (golden)"}
    assert (bon / "best_of_n.png").stat().st_size > 0
    selected = [json.loads(line) for line in (bon / "selected.jsonl").read_text().splitlines()]
    assert len(selected) == 2 * 3 * 4  # scorers x N values x prompts
