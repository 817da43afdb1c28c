"""The report over seeds (openrlhf_irl.demo.report) on hand-built seed results: every number against a plain loop;
and the experiment's reuse of finished seeds (openrlhf_irl.demo.experiment)."""

import json

import pytest

from openrlhf_irl.demo.pipeline import DemoConfig
from openrlhf_irl.demo.report import aggregate, build_report, row_metrics
from openrlhf_irl.demo import experiment as E


def _seed(seed, shift):
    """Two held-out prompts; MLE SFT is the SFT reference, an IQ-Learn row, a Best-of-N row, the demonstrator."""
    p, q = f"add 2 numbers to make {5 + seed}", f"add 3 numbers to make {9 + seed}"
    mle = {p: [0.2, 0.4], q: [0.0, 1.0]}
    iq = {p: [0.4 + shift, 0.4], q: [1.0, 1.0]}
    demo = {p: [0.5, 0.5], q: [0.5, 0.9]}
    rows = {
        "policy:sft_mle": {"label": "MLE SFT", "group": "policy", "policy": "sft_mle", "temperature": 1.0,
                           "td_weight": 0.0, "demo_fraction": 1.0, "golden": mle,
                           "responses": {p: ["1 + 4 = 5", "2 + 3 = 5"], q: ["1 + 2 + 6 = 9", "1 + 2 + 6 = 9"]},
                           "entropy": {p: [3.0, 6], q: [1.0, 4]}},
        "policy:sft_iq_td0.05": {"label": "IQ-Learn SFT (td 0.05)", "group": "policy", "policy": "sft_iq_td0.05",
                                 "temperature": 1.0, "td_weight": 0.05, "demo_fraction": 1.0, "golden": iq,
                                 "responses": {p: ["a b", "a c"], q: ["x", "y"]}, "entropy": {p: [2.0, 4], q: [2.0, 4]}},
        "bon:BT init-sft:2": {"label": "Best-of-2 (BT init-sft)", "group": "bon", "scorer": "BT init-sft", "N": 2,
                              "golden": {p: [0.4], q: [1.0]}, "responses": {p: ["1 + 4 = 5"], q: ["x"]}},
        "bon:oracle:2": {"label": "Best-of-2 (oracle: golden)", "group": "oracle", "scorer": "oracle", "N": 2,
                         "golden": {p: [0.9], q: [1.0]}},
        "demonstrations": {"label": "demonstrations (noisy expert)", "group": "policy", "golden": demo,
                           "responses": {p: ["2 + 3 = 5", "1 + 4 = 5"], q: ["2 + 3 + 4 = 9", "1 + 3 + 5 = 9"]}},
    }
    return {"seed": seed, "rows": rows, "refs": {"sft": mle, "demo": demo}, "backend": "hf",
            "prompts": {"train": [], "held_out": [p, q]}, "timings_s": {"task": 0.1}}


def _win(a, b):
    return sum(1.0 if x > y else 0.5 if x == y else 0.0 for x in a for y in b) / (len(a) * len(b))


def test_row_metrics_by_plain_loops():
    res = _seed(0, 0.0)
    m = row_metrics(res)
    p, q = res["prompts"]["held_out"]
    iq = m["policy:sft_iq_td0.05"]
    assert iq["golden"] == {p: pytest.approx(0.4), q: 1.0}
    assert iq["win_sft"][p] == _win([0.4, 0.4], [0.2, 0.4]) == 0.75
    assert iq["win_demo"][q] == _win([1.0, 1.0], [0.5, 0.9]) == 1.0
    assert iq["entropy"] == {p: 0.5, q: 0.5}
    assert m["policy:sft_mle"]["win_sft"] == {p: 0.5, q: 0.5}  # the reference against itself
    assert m["policy:sft_mle"]["entropy"] == {p: 0.5, q: 0.25}  # token-weighted: sum H / tokens
    assert m["policy:sft_mle"]["self_bleu"][q] == pytest.approx(1.0)  # two identical answers
    assert "self_bleu" not in m["bon:BT init-sft:2"]  # one response per prompt: no within-prompt diversity
    assert m["bon:BT init-sft:2"]["win_sft"][p] == _win([0.4], [0.2, 0.4]) == 0.75
    assert m["bon:oracle:2"]["win_sft"][q] == _win([1.0], [0.0, 1.0]) == 0.75


def test_row_metrics_of_a_selection_distribution():
    """A Best-of-N row with per-prompt weights (each candidate's chance of selection): the golden mean and the win
    rates are the weighted ones, by hand."""
    res = _seed(0, 0.0)
    p, q = res["prompts"]["held_out"]
    res["rows"]["bon:BT init-sft:2"].update(golden={p: [0.2, 0.6], q: [1.0]}, weights={p: [0.25, 0.75], q: [1.0]})
    m = row_metrics(res)["bon:BT init-sft:2"]
    assert m["golden"] == {p: pytest.approx(0.25 * 0.2 + 0.75 * 0.6), q: 1.0}
    # against MLE's [0.2, 0.4] on p: 0.2 wins 0.25 (one tie), 0.6 wins 1.0
    assert m["win_sft"][p] == pytest.approx(0.25 * _win([0.2], [0.2, 0.4]) + 0.75 * _win([0.6], [0.2, 0.4]))
    assert m["win_sft"][p] == pytest.approx(0.25 * 0.25 + 0.75)


def test_aggregate_over_seeds_and_paired_comparison():
    seeds = [_seed(0, 0.0), _seed(1, 0.2)]
    rows, comps = aggregate(seeds, n_boot=300)
    # nested mean: per seed the mean over prompts, then the mean over seeds
    seed_means = [(0.4 + 1.0) / 2, ((0.6 + 0.4) / 2 + 1.0) / 2]
    assert rows["policy:sft_iq_td0.05"]["golden"]["mean"] == pytest.approx(sum(seed_means) / 2)
    assert rows["policy:sft_iq_td0.05"]["golden"]["n_seeds"] == 2
    lo, hi = rows["policy:sft_iq_td0.05"]["golden"]["lo"], rows["policy:sft_iq_td0.05"]["golden"]["hi"]
    # two seeds: a t interval on the seed means, t_{1, 0.975} = 12.706 times their standard error
    half = 12.7062 * abs(seed_means[0] - seed_means[1]) / 2
    assert (lo, hi) == pytest.approx((sum(seed_means) / 2 - half, sum(seed_means) / 2 + half), abs=1e-3)
    (c,) = comps
    assert c["a"] == "policy:sft_iq_td0.05" and c["b"] == "policy:sft_mle"
    # paired differences per (seed, prompt): seed 0: .4-.3, 1-.5; seed 1: .5-.3, 1-.5
    assert c["golden"]["mean"] == pytest.approx(((0.1 + 0.5) / 2 + (0.2 + 0.5) / 2) / 2)
    assert c["golden"]["lo"] > 0  # every difference is positive
    assert "self_bleu" in c and "entropy" in c


def test_build_report_files(tmp_path):
    cfg = DemoConfig(output_dir=str(tmp_path), n_boot=200)
    report = build_report(str(tmp_path), cfg, [_seed(0, 0.0), _seed(1, 0.1)], title="t")
    md = (tmp_path / "report.md").read_text()
    assert "held-out prompts" in md and "Sampling backend: **hf**" in md
    assert "| IQ-Learn SFT (td 0.05) |" in md and "win vs SFT" in md and "N=2" in md
    assert report["backend"] == "hf" and report["seeds"] == [0, 1] and report["n_eval_prompts"] == 4
    stored = json.loads((tmp_path / "report.json").read_text())
    assert stored["rows"]["bon:BT init-sft:2"]["win_demo"]["mean"] == pytest.approx(
        sum((_win([0.4], [0.5, 0.5]) + _win([1.0], [0.5, 0.9])) / 2 for _ in range(2)) / 2)
    for name in ("best_of_n.png", "policies.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_states_the_dtype_that_ran_and_why(tmp_path):
    cfg = DemoConfig(output_dir=str(tmp_path), n_boot=50)
    fp32 = {"dtype": "fp32", "reason": "auto: this CPU has no avx512_bf16 or amx_bf16, so bf16 would be emulated"}
    seeds = [dict(_seed(0, 0.0), param_dtype=fp32), dict(_seed(1, 0.1), param_dtype=fp32)]
    assert build_report(str(tmp_path), cfg, seeds, title="t")["param_dtype"] == fp32
    assert "vLLM engines in **fp32** (auto: this CPU has no avx512_bf16" in (tmp_path / "report.md").read_text()
    seeds[1]["param_dtype"] = {"dtype": "bf16", "reason": "auto: this CPU has native bf16"}
    assert build_report(str(tmp_path), cfg, seeds, title="t")["param_dtype"]["dtype"] == "mixed"
    assert build_report(str(tmp_path), cfg, [_seed(0, 0.0)], title="t")["param_dtype"]["dtype"] == "not recorded"


def test_experiment_reuses_only_seeds_with_the_same_settings(tmp_path):
    cfg = E.experiment_config(str(tmp_path), quick=True, backend="hf")
    assert cfg.afd_variants and cfg.temperatures and cfg.demo_subsets and cfg.spin
    full = E.experiment_config(str(tmp_path), sweeps="all")
    assert set(full.afd_variants) == {"init-sft", "init-demo", "sft-demo"} and max(full.bon_ns) == 64
    assert tuple(full.td_weights) == (0.01, 0.05, 0.1, 0.3) and full.demo_subsets == (0.1, 0.3)
    assert "BT golden-pref" in full.ppo_rewards and full.golden_pref  # the comparator in PPO as in Best-of-N
    assert full.sweep_iq_temperatures and full.afd_samples_per_prompt == 16
    small = E.experiment_config(str(tmp_path), scale="small", sweeps="all")
    assert small.hidden_size < full.hidden_size and small.td_weights == full.td_weights
    assert small.afd_variants == full.afd_variants and small.bon_ns == full.bon_ns and small.spin
    with pytest.raises(ValueError):
        E.experiment_config(str(tmp_path), scale="huge")
    with pytest.raises(ValueError, match="sweeps"):
        E.experiment_config(str(tmp_path), sweeps="some")


def test_the_criteria_sweeps_hold_what_the_criteria_read_and_about_4000_afd_pairs(tmp_path):
    from openrlhf_irl.demo.task import split_prompts

    distinct = {"sum": len(split_prompts(3)[0]), "sort": 500, "bigram": 1000}  # sum: 40 prompts under 1000 demos
    assert distinct["sum"] == 40 == len(split_prompts(0)[0])
    for task, per_prompt in (("sum", 100), ("sort", 8), ("bigram", 4)):
        cfg = E.experiment_config(str(tmp_path), task=task)  # the default sweeps
        assert distinct[task] * cfg.afd_samples_per_prompt == pytest.approx(E.AFD_PAIRS, rel=0.01)
        assert cfg.afd_samples_per_prompt == per_prompt
        assert cfg.afd_variants == ("init-sft",) and cfg.golden_pref and not cfg.spin
        assert set(cfg.ppo_rewards) == {"BCE init-sft", "BT golden-pref"} and max(cfg.bon_ns) == 16
        assert cfg.temperatures == (0.7, 1.0, 1.3) and not cfg.sweep_iq_temperatures
        assert cfg.td_weights == (0.01, 0.05, 0.1, 0.3) and cfg.demo_subsets == (0.1, 0.3)
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"config": E._jsonable(cfg), "seed": 0}))
    assert E._finished(str(path), cfg)["seed"] == 0
    from dataclasses import replace

    assert E._finished(str(path), replace(cfg, sft_epochs=cfg.sft_epochs + 1)) is None
    path.write_text("{torn")
    assert E._finished(str(path), cfg) is None


def test_experiment_cli_rejects_bad_seeds(capsys):
    from openrlhf_irl.__main__ import main

    with pytest.raises(SystemExit):
        main(["experiment", "--seeds", "0,0"])
    assert "--seeds" in capsys.readouterr().err


def _with_ppo(res, golden_shift):
    """A seed result with a PPO row (group ``ppo``) and its run's OpenRLHF log, as the demo's PPO stage writes them."""
    p, q = res["prompts"]["held_out"]
    res["rows"]["policy:ppo_log-ratio"] = {
        "label": "PPO (log-ratio)", "group": "ppo", "policy": "ppo_log-ratio", "temperature": 1.0,
        "ppo_reward": "log-ratio", "golden": {p: [0.3 + golden_shift, 0.5], q: [0.5, 1.0]},
        "responses": {p: ["1 + 4 = 5", "3 + 2 = 5"], q: ["1 + 2 + 6 = 9", "2 + 2 + 5 = 9"]},
        "entropy": {p: [2.0, 6], q: [1.0, 4]}}
    res["ppo"] = {"ppo_log-ratio": {"reward": "log-ratio", "seconds": 61.5,
                                    "logs": [{"reward": -0.25, "policy_loss": 0.1}, {"reward": 0.125}]}}
    return res


def test_report_has_the_ppo_rows_their_comparison_and_run_log(tmp_path):
    seeds = [_with_ppo(_seed(0, 0.0), 0.0), _with_ppo(_seed(1, 0.2), 0.2)]
    rows, comps = aggregate(seeds, n_boot=300)
    ppo = rows["policy:ppo_log-ratio"]
    assert ppo["group"] == "ppo"
    # per seed: mean over prompts of the per-prompt means; then over seeds
    assert ppo["golden"]["mean"] == pytest.approx(((0.4 + 0.75) / 2 + (0.5 + 0.75) / 2) / 2)
    (c,) = [c for c in comps if c["a"] == "policy:ppo_log-ratio"]
    assert c["b"] == "policy:sft_mle" and c["comparison"] == "PPO (log-ratio) - MLE SFT"
    # paired per (seed, prompt) against MLE SFT (p: .3, q: .5 in both seeds)
    assert c["golden"]["mean"] == pytest.approx(((0.4 - 0.3 + 0.75 - 0.5) / 2 + (0.5 - 0.3 + 0.75 - 0.5) / 2) / 2)
    build_report(str(tmp_path), DemoConfig(output_dir=str(tmp_path), n_boot=200), seeds, title="t")
    md = (tmp_path / "report.md").read_text()
    assert "## PPO over the AfD rewards" in md and "| PPO (log-ratio) |" in md
    assert "seed 1, log-ratio: 2 PPO steps in 61.5 s (start-up included); training reward -0.250 at step 1, " \
           "0.125 at step 2" in md
    assert "PPO over the same rewards, one sample per prompt" in md  # next to Best-of-N
    assert (tmp_path / "best_of_n.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_config_refuses_a_ppo_reward_it_does_not_train():
    DemoConfig(ppo_rewards=("BT init-sft", "log-ratio"))
    with pytest.raises(ValueError, match="ppo_rewards: 'BCE init-demo'"):
        DemoConfig(ppo_rewards=("BCE init-demo",))
    with pytest.raises(ValueError, match="ppo_steps"):
        DemoConfig(ppo_steps=0)
    assert not DemoConfig(ppo_rewards=()).ppo_rewards


def test_subset_runs_get_the_full_runs_optimizer_steps():
    from openrlhf_irl.demo.pipeline import matched_epochs, optimizer_steps

    # 1000 demonstrations, batch 32 = micro-batch 32: 31 steps an epoch (the last 8 dropped), 16 epochs = 496 steps
    assert optimizer_steps(16, 1000, 32, 32) == 496
    assert optimizer_steps(1, 1000, 32, 8) == 31  # 125 micro-batches, 4 per step: 31 steps
    # 10%: 100 demonstrations, 3 steps an epoch -> 165 epochs (495 steps); 30%: 300, 9 an epoch -> 55 (495)
    assert matched_epochs(16, 1000, 100, 32, 32) == 165 and matched_epochs(16, 1000, 300, 32, 32) == 55
    assert matched_epochs(16, 1000, 1000, 32, 32) == 16  # the full set: unchanged
    with pytest.raises(ValueError, match="less than one optimizer step"):
        matched_epochs(16, 1000, 20, 32, 32)


def test_task_choice_reaches_the_config():
    sort = DemoConfig.make("out", quick=True, task="sort")
    assert (sort.task, sort.vocab_size, sort.expert_noise) == ("sort", 259, 0.32)  # the sort task's defaults
    plain = DemoConfig.make("out", quick=True)
    assert (plain.task, plain.vocab_size, plain.expert_noise) == ("sum", 300, 0.4)
    assert DemoConfig.make("out", task="sort", expert_noise=0.1).expert_noise == 0.1  # an explicit choice wins
    bigram = DemoConfig.make("out", quick=True, task="bigram", expert_habit=True)
    assert (bigram.vocab_size, bigram.expert_noise, bigram.expert_habit) == (400, 0.7, True)
    with pytest.raises(ValueError, match="only the bigram task has an expert habit"):
        DemoConfig.make("out", task="sort", expert_habit=True)
    with pytest.raises(ValueError, match="not one of sum, sort, bigram"):
        DemoConfig.make("out", task="unknown")
    assert E.experiment_config("out", quick=True, task="sort").task == "sort"
    # a sized task's full-scale sizes (fixed by size-task before any comparison), under explicit overrides
    full_sort = DemoConfig.make("out", task="sort")
    assert (full_sort.n_train_prompts, full_sort.sft_epochs) == (500, 8)
    assert DemoConfig.make("out", task="sort", sft_epochs=3).sft_epochs == 3
    assert DemoConfig.make("out", quick=True, task="sort").n_train_prompts == 160  # quick keeps its own sizes
    assert (E.experiment_config("out", task="sort").sft_epochs, E.experiment_config("out").sft_epochs) == (8, 8)
    assert E.experiment_config("out", task="sort").n_train_prompts == 500
