"""`openrlhf-irl demo --quick`: the whole chain runs (OpenRLHF trainers, Ray sampling, AfD datasets, both reward
models, Best-of-N), evaluates on held-out prompts only, and the report has every row with intervals and win rates."""

from __future__ import annotations

import json
import os
import re

import pytest

from helpers import REPO, assert_ok, run_python


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    # PPO over the demo's own AfD classifier checkpoint (the log-ratio route's rewards are checked exactly, and its
    # run time paid, in test_ppo_cpu.py)
    proc = run_python(["-m", "openrlhf_irl", "demo", "--quick", "--output-dir", str(out), "--seed", "1",
                       "--ppo-rewards", "BCE init-sft"], timeout=900)
    assert_ok(proc)
    report = json.loads((out / "report.json").read_text())
    from openrlhf_irl.compat.param_dtype import resolve

    assert report["param_dtype"] == {"dtype": resolve("auto").dtype, "reason": resolve("auto").reason}
    # every reward model checked on held-out prompts before its Best-of-N / PPO rows are read
    for name in ("BT init-sft", "BCE init-sft"):
        check = report["reward_models"][name]
        assert 0.0 <= check["heldout_accuracy"]["mean"] <= 1.0 and check["accuracy_sources"] == "sft over init"
        assert -1.0 <= check["spearman_golden"]["mean"] <= 1.0
    # the comparator: a BT model on golden-ordered MLE-SFT sample pairs, checked on held-out pairs of that kind
    check = report["reward_models"]["BT golden-pref"]
    assert 0.0 <= check["heldout_accuracy"]["mean"] <= 1.0
    assert check["accuracy_sources"] == "golden order of sft samples"
    assert -1.0 <= check["spearman_golden"]["mean"] <= 1.0
    # IQ-Learn's implicit reward (extract_reward) on the same held-out candidates, against the golden reward
    recovery = report["reward_models"]["IQ-Learn reward (td 0.05)"]
    assert -1.0 <= recovery["spearman_golden"]["mean"] <= 1.0 and recovery["heldout_accuracy"] is None
    iq_rewards = [json.loads(line) for line in (out / "samples" / "iq_reward.jsonl").read_text().splitlines()]
    candidates = [json.loads(line) for line in (out / "samples" / "bon_scored.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["response"]) for r in iq_rewards] == [(c["prompt"], c["response"]) for c in candidates
                                                                   if c["response"]]
    assert all(r["golden"] == c["golden"] for r, c in zip(iq_rewards, [c for c in candidates if c["response"]]))
    from openrlhf_irl.demo.task import golden_reward

    pairs = [json.loads(line) for line in (out / "data" / "golden-pref_bt.jsonl").read_text().splitlines()]
    sft_texts = {(s["prompt"], s["response"].rstrip()) for s in map(json.loads, (out / "samples" / "sft.jsonl").open())}
    assert pairs and all(golden_reward(r["prompt"], r["chosen"]) > golden_reward(r["prompt"], r["rejected"])
                         and {(r["prompt"], r["chosen"]), (r["prompt"], r["rejected"])} <= sft_texts for r in pairs)
    assert "## Reward models, checked on held-out prompts" in (out / "report.md").read_text()
    assert f"in **{report['param_dtype']['dtype']}** (auto: this CPU" in (out / "report.md").read_text()
    results = json.loads((out / "results.json").read_text())
    # the terminal (not a TTY here): a header, per stage a start line naming its log, a done line with its time and
    # a bar, a footer; everything else (OpenRLHF, DeepSpeed, Ray, progress bars) is in the stage's log
    stages = list(results["timings_s"])
    lines = proc.stdout.splitlines()
    assert len(stages) == 7 and len(lines) == 3 * len(stages) + 2, proc.stdout
    assert len(proc.stderr.splitlines()) <= 5, proc.stderr
    assert lines[0].startswith("openrlhf-irl demo (quick, seed 1, task sum): 7 stages") and lines[-1].endswith("report.md")
    logs = re.findall(r"^\[(\d)/7\] (.+) \(log: (.+)\)$", proc.stdout, re.M)
    assert [(int(i), name) for i, name, _ in logs] == list(enumerate(stages, 1))
    for (i, name, log), done, bar in zip(logs, lines[2::3], lines[3::3]):
        assert re.fullmatch(rf"\[{i}/7\] {re.escape(name)} \.{{3,}} (\d+\.\d s|\d+ m \d\d s)", done), done
        assert bar.startswith("[") and f"] {i}/7 stages, " in bar and bar.endswith(" elapsed"), bar
        assert os.path.join(str(out), "logs", os.path.basename(log)) == os.path.join(str(REPO), log)
        assert os.path.basename(log).startswith(f"{int(i):02d}-") and os.path.getsize(os.path.join(str(REPO), log)) > 0
    assert results["log_dir"] == str(out / "logs")
    assert "Train step of epoch" in (out / "logs" / "02-base-model-initial-policy.log").read_text()  # OpenRLHF tqdm
    assert "ppo" in (out / "logs" / "05-ppo-over-the-afd-rewards.log").read_text().lower()
    rows = {r["label"]: r for r in report["rows"].values()}
    for name in ("initial policy", "MLE SFT", "IQ-Learn SFT (td 0.05)", "demonstrations (noisy expert)"):
        assert name in rows and 0.0 <= rows[name]["golden"]["lo"] <= rows[name]["golden"]["mean"] <= \
            rows[name]["golden"]["hi"] <= 1.0
        assert {"win_sft", "win_demo", "self_bleu", "distinct_2"} <= rows[name].keys()
    assert rows["MLE SFT"]["win_sft"]["mean"] == 0.5  # the reference against itself
    assert "entropy" in rows["IQ-Learn SFT (td 0.05)"]
    # evaluation on held-out prompts only: none of them in any training data of the run
    held = {json.loads(line)["prompt"] for line in (out / "data" / "eval_prompts.jsonl").read_text().splitlines()}
    assert held and held == set(results["prompts"]["held_out"]) == set(results["rows"]["policy:sft_mle"]["golden"])
    for name in ("demos.jsonl", "train_prompts.jsonl", "afd_init-sft_bt.jsonl", "afd_init-sft_bce.jsonl",
                 "golden-pref_bt.jsonl"):
        seen = {json.loads(line)["prompt"] for line in (out / "data" / name).read_text().splitlines()}
        assert seen and seen.isdisjoint(held), name
    for name in ("init.jsonl", "sft.jsonl"):
        seen = {json.loads(line)["prompt"] for line in (out / "samples" / name).read_text().splitlines()}
        assert seen and seen.isdisjoint(held), name
    ns = report["config"]["bon_ns"]
    scorers = ("BT init-sft", "BCE init-sft", "BT golden-pref", "log-ratio")
    for scorer in scorers:
        for n in ns:
            assert f"bon:{scorer}:{n}" in report["rows"]
    # all-subsets rows: per prompt the candidates' golden values and their chances of selection (summing to 1)
    def expected(row_id, p):
        row = results["rows"][row_id]
        assert sum(row["weights"][p]) == pytest.approx(1.0)
        return sum(w * x for w, x in zip(row["weights"][p], row["golden"][p]))

    # per prompt the golden-ranked selection bounds every scorer's (same unfinished-last rule), and rises with N
    for n in ns:
        for scorer in scorers:
            assert all(expected(f"bon:{scorer}:{n}", p) <= expected(f"bon:oracle:{n}", p) + 1e-9 for p in held)
    curve = [report["rows"][f"bon:oracle:{n}"]["golden"]["mean"] for n in ns]
    assert curve == sorted(curve)
    # Best-of-1 is a uniformly drawn sample whatever the scorer: the mean golden of the prompt's candidates
    for p in held:
        assert len({round(expected(f"bon:{s}:1", p), 9) for s in (*scorers, "oracle")}) == 1
    for name in ("report.md", "best_of_n.png", "policies.png", "samples/init.jsonl", "samples/sft.jsonl"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "best_of_n.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    # --backend auto: OpenRLHF's vLLM engines where vLLM runs here (one engine for the run), transformers otherwise
    from openrlhf_irl.generation.ray_pool import resolve_backend

    backend = resolve_backend("auto")
    assert json.loads((out / "results.json").read_text())["backend"] == backend
    assert "| IQ-Learn SFT (td 0.05)" in md and "Best-of-N" in md and f"Sampling backend: **{backend}**" in md
    assert "held-out prompts" in md and "win vs SFT" in md
    # PPO over the AfD rewards: OpenRLHF's train_ppo_ray from MLE SFT, one run per reward, evaluated like every row
    assert not any(rid.startswith("policy:ppo_log") for rid in report["rows"])  # --ppo-rewards is followed
    for reward in ("BCE init-sft",):
        name = f"ppo_{reward.lower().replace(' ', '_')}"
        row = report["rows"][f"policy:{name}"]
        assert row["group"] == "ppo" and row["label"] == f"PPO ({reward})"
        assert 0.0 <= row["golden"]["lo"] <= row["golden"]["mean"] <= row["golden"]["hi"] <= 1.0
        assert set(results["rows"][f"policy:{name}"]["golden"]) == held
        run = results["ppo"][name]
        assert len(run["logs"]) == report["config"]["ppo_steps"] and all("reward" in s for s in run["logs"])
        assert any(c["comparison"] == f"PPO ({reward}) - MLE SFT" for c in report["comparisons"])
        trained_on = {json.loads(line)["prompt"] for line in (out / "ppo" / name / "run" / "prompts.jsonl").open()}
        assert trained_on and trained_on.isdisjoint(held)
    assert "## PPO over the AfD rewards" in md and "PPO over the AfD rewards (OpenRLHF train_ppo_ray)" in \
        report["timings_s"]
    # the AfD reward models are OpenRLHF reward models: they load through OpenRLHF's own loader
    check = ("from openrlhf_irl import compat; compat.activate()\n"
             "from openrlhf.models import get_llm_for_sequence_regression\n"
             "import sys\n"
             "for path in sys.argv[1:]:\n"
             "    m = get_llm_for_sequence_regression(path, 'reward', attn_implementation='eager')\n"
             "    print('loaded', type(m).__name__)\n")
    loaded = run_python(["-c", check, str(out / "models" / "rm_init-sft_bt"), str(out / "models" / "rm_init-sft_bce")])
    assert_ok(loaded)
    assert loaded.stdout.count("loaded") == 2
    # the samples carry the sampling job's schema, one record per (prompt, sample_index)
    samples = [json.loads(line) for line in (out / "samples" / "init.jsonl").read_text().splitlines()]
    assert {"prompt", "response", "policy", "sample_index", "finished", "logprob"} <= samples[0].keys()
    assert len({(s["prompt"], s["sample_index"]) for s in samples}) == len(samples)

    # the Best-of-N CLI on the demo's policies and reward model, with the golden reward as a module:function
    bon = out / "bon_cli"
    proc = run_python(["-m", "openrlhf_irl.cli.best_of_n", "--policy", str(out / "models" / "sft_mle"),
                       "--log-ratio-init", str(out / "models" / "init"), "--reward-model", str(out / "models" / "rm_init-sft_bce"),
                       "--golden", "openrlhf_irl.demo.task:golden_reward", "--prompts", str(out / "data" / "eval_prompts.jsonl"),
                       "--data.input_template", "{}\n", "--n", "1,2,4", "--rollout.max_new_tokens", "12", "--num-actors", "2",
                       "--max-prompts", "4", "--output-dir", str(bon)], timeout=600)
    assert_ok(proc)
    result = json.loads((bon / "best_of_n.json").read_text())
    assert result["n_prompts"] == 4 and set(result["curves"]) == {"rm:rm_init-sft_bce", "log_ratio", "oracle (golden)"}
    assert (bon / "best_of_n.png").stat().st_size > 0
    selected = [json.loads(line) for line in (bon / "selected.jsonl").read_text().splitlines()]
    assert len(selected) == 2 * 3 * 4  # scorers x N values x prompts


def test_demo_refuses_a_ppo_reward_it_does_not_train(capsys):
    from openrlhf_irl.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--quick", "--ppo-rewards", "BCE init-sft,BT sft-demo"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--ppo-rewards" in err and "'BT sft-demo'" in err


@pytest.mark.slow
@pytest.mark.parametrize("task", ["sort", "bigram"])
def test_quick_demo_on_the_tasks_with_held_out_prompts_of_the_training_distribution(tmp_path, task):
    """`demo --quick --task sort|bigram` (no PPO: its stage is the same for every task and is run above): every
    reward model, golden-pref and the IQ-Learn reward checked on held-out prompts, the task named in the report."""
    from openrlhf_irl.demo.tasks import load_task

    out = tmp_path / "demo"
    proc = run_python(["-m", "openrlhf_irl", "demo", "--quick", "--task", task, "--output-dir", str(out), "--seed", "2",
                       "--backend", "hf", "--ppo-rewards", "none"], timeout=900)
    assert_ok(proc)
    report = json.loads((out / "report.json").read_text())
    results = json.loads((out / "results.json").read_text())
    mod = load_task(task)
    assert report["config"]["task"] == task and results["task"] == {"name": task, "title": mod.TITLE}
    assert f"Task: **{task}**" in (out / "report.md").read_text()
    checks = report["reward_models"]
    assert {"BT init-sft", "BCE init-sft", "BT golden-pref", "log-ratio", "IQ-Learn reward (td 0.05)"} <= set(checks)
    for name in ("BT init-sft", "BCE init-sft", "BT golden-pref"):
        assert 0.0 <= checks[name]["heldout_accuracy"]["mean"] <= 1.0, name
    for name, check in checks.items():
        assert -1.0 <= check["spearman_golden"]["mean"] <= 1.0, name
    # bigram: IQ-Learn's reward also against the expert's own hidden reward (the reward-recovery criterion)
    hidden = checks["IQ-Learn reward (td 0.05)"].get("spearman_hidden")
    assert (hidden is not None and -1.0 <= hidden["mean"] <= 1.0) if task == "bigram" else hidden is None
    assert "criteria" in report and set(report["criteria"]["gates"]) == {"level", "headroom"}
    # held-out prompts: the task's own prompts, none in any training data of the run
    held = set(results["prompts"]["held_out"])
    assert len(held) == 16 and all(mod.parse_prompt(p) for p in held)
    for name in ("demos.jsonl", "train_prompts.jsonl", "afd_init-sft_bt.jsonl", "golden-pref_bt.jsonl"):
        assert {json.loads(line)["prompt"] for line in (out / "data" / name).open()}.isdisjoint(held), name
    corpus = [json.loads(line)["text"] for line in (out / "data" / "pretrain.jsonl").open()]
    assert not any(line.startswith(p + "\n") for line in corpus for p in held)
    # the golden reward in the rows is the task's own
    row = results["rows"]["policy:sft_mle"]
    for p in list(held)[:4]:
        assert row["golden"][p] == [mod.golden_reward(p, r) for r in row["responses"][p]]
