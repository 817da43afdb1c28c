"""The experiment's criteria (docs/experiment.md) read from hand-built per-seed rows: each outcome flips when the
numbers behind it flip."""

import pytest

from openrlhf_irl.demo.criteria import (
    CANNOT_TELL,
    GATED,
    REFUTED,
    SUPPORTED,
    afd_best_of_n,
    afd_ppo,
    gates,
    interpolate_curve,
    iq_fewer_demos,
    iq_quality_diversity,
    iq_reward_recovery,
    read_criteria,
)

PROMPTS = ("p0", "p1", "p2", "p3")
SEEDS = 5


def _const(value: float, seed: int, jitter: float = 0.01) -> dict:
    """Per-prompt values around ``value``; each seed shifted a little so intervals have width."""
    return {p: value + jitter * ((seed + i) % 3 - 1) for i, p in enumerate(PROMPTS)}


def _seeds(make) -> list[dict]:
    return [make(s) for s in range(SEEDS)]


def _bon(seed: int, lifts: dict[str, float], oracle_lift: float = 0.3) -> dict:
    m = {}
    for scorer, lift in {**lifts, "oracle": oracle_lift}.items():
        for n in (1, 2, 4, 8, 16):
            m[f"bon:{scorer}:{n}"] = {"golden": _const(0.4 + (lift * n / 16 if n > 1 else 0), seed)}
    m["policy:sft_mle"] = {"golden": _const(0.4, seed)}
    return m


def test_interpolate_curve_by_hand():
    pts = [(0.4, 0.3), (0.2, 0.5), (0.6, 0.1)]
    assert interpolate_curve(pts, 0.3) == pytest.approx(0.4)
    assert interpolate_curve(pts, 0.55) == pytest.approx(0.15)
    assert interpolate_curve(pts, 0.7) is None
    assert interpolate_curve(pts, 0.1) is None


def test_gates_level_band_and_headroom():
    g = gates(_seeds(lambda s: _bon(s, {})))
    assert g["level"]["passed"] and g["level"]["value"]["mean"] == pytest.approx(0.4, abs=0.01)
    assert g["headroom"]["passed"] and g["headroom"]["value"]["lo"] > 0
    low = _seeds(lambda s: {**_bon(s, {}, oracle_lift=0.0), "policy:sft_mle": {"golden": _const(0.2, s)}})
    g = gates(low)
    assert not g["level"]["passed"] and not g["headroom"]["passed"]


GOOD_RM = {"heldout_accuracy": {"mean": 0.7}, "spearman_golden": {"mean": 0.5, "lo": 0.4, "hi": 0.6}}
SOURCE_ONLY_RM = {"heldout_accuracy": {"mean": 0.95}, "spearman_golden": {"mean": 0.02, "lo": -0.05, "hi": 0.09}}


def test_afd_best_of_n_supported_refuted_cannot_tell():
    lifting = _seeds(lambda s: _bon(s, {"BT init-sft": 0.2, "BCE init-sft": 0.0, "BT golden-pref": 0.2}))
    models = {"BT init-sft": GOOD_RM, "BCE init-sft": GOOD_RM}
    read = afd_best_of_n(lifting, models)
    assert read["outcome"] == SUPPORTED and "BT init-sft" in read["why"] and "BCE" not in read["why"]
    assert read["lifts"]["BT init-sft"][16]["mean"] == pytest.approx(0.2)
    # the same lift with a reward model that does not rank quality: not supported
    assert afd_best_of_n(lifting, {"BT init-sft": SOURCE_ONLY_RM})["outcome"] == CANNOT_TELL

    flat = _seeds(lambda s: _bon(s, {"BT init-sft": 0.0, "BCE init-sft": -0.1, "BT golden-pref": 0.2}))
    read = afd_best_of_n(flat, {"BT init-sft": SOURCE_ONLY_RM, "BCE init-sft": GOOD_RM})
    assert read["outcome"] == REFUTED and "sharper: BT init-sft" in read["why"]

    nobody = _seeds(lambda s: _bon(s, {"BT init-sft": 0.0, "BCE init-sft": 0.0, "BT golden-pref": 0.0}))
    read = afd_best_of_n(nobody, models)
    assert read["outcome"] == CANNOT_TELL and "golden-pref does not lift" in read["why"]


def test_afd_best_of_n_refutes_only_with_both_init_sft_models_at_every_n():
    models = {"BT init-sft": GOOD_RM, "BCE init-sft": GOOD_RM}
    bt_only = _seeds(lambda s: _bon(s, {"BT init-sft": 0.0, "BT golden-pref": 0.2}))
    assert afd_best_of_n(bt_only, models)["outcome"] == CANNOT_TELL
    gap = _seeds(lambda s: _bon(s, {"BT init-sft": 0.0, "BCE init-sft": 0.0, "BT golden-pref": 0.2}))
    del gap[2]["bon:BT init-sft:16"]  # one seed lacks a row: its lift is unknown, not flat
    assert afd_best_of_n(gap, models)["outcome"] == CANNOT_TELL
    # a model without a Spearman value is not called "sharper"
    flat = _seeds(lambda s: _bon(s, {"BT init-sft": 0.0, "BCE init-sft": 0.0, "BT golden-pref": 0.2}))
    read = afd_best_of_n(flat, {"BT init-sft": {"heldout_accuracy": {"mean": 0.9}}, "BCE init-sft": GOOD_RM})
    assert read["outcome"] == REFUTED and "sharper" not in read["why"]
    # supported needs no golden-pref rows
    lifting = _seeds(lambda s: _bon(s, {"BT init-sft": 0.2, "BCE init-sft": 0.0}))
    assert afd_best_of_n(lifting, models)["outcome"] == SUPPORTED


def test_afd_ppo_outcomes():
    rows = {"policy:ppo_a": {"ppo_reward": "BCE init-sft"}, "policy:ppo_b": {"ppo_reward": "BT golden-pref"},
            "policy:sft_mle": {}}

    def per_seed(afd: float, golden: float):
        return _seeds(lambda s: {"policy:sft_mle": {"golden": _const(0.4, s)},
                                 "policy:ppo_a": {"golden": _const(0.4 + afd, s)},
                                 "policy:ppo_b": {"golden": _const(0.4 + golden, s)}})

    assert afd_ppo(per_seed(0.1, 0.0), rows)["outcome"] == SUPPORTED
    read = afd_ppo(per_seed(-0.1, 0.1), rows)
    assert read["outcome"] == REFUTED and read["minus_mle"]["BCE init-sft"]["hi"] < 0
    assert afd_ppo(per_seed(0.0, 0.0), rows)["outcome"] == CANNOT_TELL


def _qd_seed(seed: int, iq_bleu: float, iq_golden: float) -> dict:
    curve = {"policy:sft_mle@T0.7": (0.6, 0.5), "policy:sft_mle": (0.4, 0.4), "policy:sft_mle@T1.3": (0.2, 0.3)}
    m = {r: {"self_bleu": _const(b, seed, 0.0), "golden": _const(g, seed, 0.0)} for r, (b, g) in curve.items()}
    # the IQ point moves a little per seed; the curve does not
    m["policy:sft_iq_td0.1"] = {"self_bleu": _const(iq_bleu, seed, 0.0),
                                "golden": _const(iq_golden + 0.01 * (seed % 2), seed, 0.0)}
    return m


QD_ROWS = {"policy:sft_mle@T0.7": {"policy": "sft_mle", "temperature": 0.7},
           "policy:sft_mle": {"policy": "sft_mle", "temperature": 1.0},
           "policy:sft_mle@T1.3": {"policy": "sft_mle", "temperature": 1.3},
           "policy:sft_iq_td0.1": {"policy": "sft_iq_td0.1", "temperature": 1.0, "demo_fraction": 1.0,
                                   "label": "IQ td 0.1"}}


def test_iq_quality_diversity_against_the_interpolated_curve():
    # self-BLEU 0.3 lies between T=1 (0.4, 0.4) and T=1.3 (0.2, 0.3): the curve gives 0.35
    read = iq_quality_diversity(_seeds(lambda s: _qd_seed(s, 0.3, 0.45)), QD_ROWS)
    gap = read["gap_to_mle_curve"]["IQ td 0.1"]["gap"]
    assert read["outcome"] == SUPPORTED and gap["mean"] == pytest.approx(0.104)
    assert iq_quality_diversity(_seeds(lambda s: _qd_seed(s, 0.3, 0.25)), QD_ROWS)["outcome"] == REFUTED
    off = iq_quality_diversity(_seeds(lambda s: _qd_seed(s, 0.1, 0.9)), QD_ROWS)  # more diverse than any T
    assert off["outcome"] == CANNOT_TELL and off["gap_to_mle_curve"]["IQ td 0.1"]["seeds_bracketed"] == 0
    # on the curve in 2 seeds (and far above it), off it in the others: no gap, so not supported
    partly = iq_quality_diversity(_seeds(lambda s: _qd_seed(s, 0.3 if s < 2 else 0.1, 0.9)), QD_ROWS)
    entry = partly["gap_to_mle_curve"]["IQ td 0.1"]
    assert partly["outcome"] == CANNOT_TELL and entry["seeds_bracketed"] == 2 and "gap" not in entry


def test_iq_fewer_demos_outcomes():
    rows = {f"policy:sft_iq_td0.05_{f:g}": {"policy": f"sft_iq_td0.05_{f:g}", "demo_fraction": f} for f in (0.1, 0.3)}

    def per_seed(d10: float, d30: float):
        return _seeds(lambda s: {"policy:sft_mle_0.1": {"golden": _const(0.2, s)},
                                 "policy:sft_mle_0.3": {"golden": _const(0.3, s)},
                                 "policy:sft_iq_td0.05_0.1": {"golden": _const(0.2 + d10, s)},
                                 "policy:sft_iq_td0.05_0.3": {"golden": _const(0.3 + d30, s)}})

    assert iq_fewer_demos(per_seed(0.05, 0.0), rows)["outcome"] == SUPPORTED
    assert iq_fewer_demos(per_seed(-0.05, -0.05), rows)["outcome"] == REFUTED
    assert iq_fewer_demos(per_seed(-0.05, 0.0), rows)["outcome"] == CANNOT_TELL


def test_iq_reward_recovery_reads_bigram_only():
    def models(mean, lo, hi):
        return {"IQ-Learn reward (td 0.05)": {"spearman_hidden": {"mean": mean, "lo": lo, "hi": hi},
                                              "spearman_golden": {"mean": 0.0, "lo": -0.1, "hi": 0.1}}}

    assert iq_reward_recovery(models(0.5, 0.35, 0.65), "bigram")["outcome"] == SUPPORTED
    assert iq_reward_recovery(models(0.5, 0.25, 0.75), "bigram")["outcome"] == CANNOT_TELL
    assert iq_reward_recovery(models(0.05, -0.1, 0.2), "bigram")["outcome"] == REFUTED
    assert iq_reward_recovery(models(0.5, 0.35, 0.65), "sort")["outcome"] == "not read"


def test_a_failed_gate_holds_every_claim_and_keeps_what_the_rows_say():
    per_seed = _seeds(lambda s: {**_bon(s, {"BT init-sft": 0.2}), "policy:sft_mle": {"golden": _const(0.1, s)}})
    read = read_criteria(per_seed, {}, {"BT init-sft": GOOD_RM}, "sort")
    assert not read["gates"]["level"]["passed"]
    claim = read["claims"]["AfD, Best-of-N"]
    assert claim["outcome"] == GATED and claim["computed_outcome"] == SUPPORTED  # what the rows alone say
    assert read["claims"]["IQ-Learn, reward recovery"]["outcome"] == "not read"
    lifting = _seeds(lambda s: _bon(s, {"BT init-sft": 0.2}))
    assert read_criteria(lifting, {}, {"BT init-sft": GOOD_RM}, "sort")["claims"]["AfD, Best-of-N"]["outcome"] == \
        SUPPORTED
    four = read_criteria(lifting[:4], {}, {"BT init-sft": GOOD_RM}, "sort")["claims"]["AfD, Best-of-N"]
    assert four["outcome"] == CANNOT_TELL and four["computed_outcome"] == SUPPORTED  # below the 5 seeds required
