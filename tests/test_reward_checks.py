"""The reward-model checks on held-out prompts (:mod:`openrlhf_irl.eval.reward_checks`) by hand, and their place in
the report."""

from __future__ import annotations

import math

import pytest

from openrlhf_irl.demo.report import reward_model_checks
from openrlhf_irl.eval.reward_checks import (golden_order_accuracy, heldout_accuracy, mean_within_prompt_spearman,
                                             pairwise_accuracy)


def test_pairwise_accuracy_by_hand():
    assert pairwise_accuracy([2.0, 0.0], [1.0]) == 0.5  # one right, one wrong
    assert pairwise_accuracy([1.0], [1.0, 0.0]) == (0.5 + 1.0) / 2  # a tie counts half
    assert pairwise_accuracy([3.0, 4.0], [1.0, 2.0]) == 1.0
    with pytest.raises(ValueError):
        pairwise_accuracy([], [1.0])


def test_heldout_accuracy_is_a_mean_over_prompts_with_both_sides():
    acc, n = heldout_accuracy({"a": [2.0], "b": [0.0, 0.0], "c": [5.0]}, {"a": [1.0], "b": [1.0], "d": [0.0]})
    assert (acc, n) == (pytest.approx((1.0 + 0.0) / 2), 2)
    assert math.isnan(heldout_accuracy({"a": [1.0]}, {"b": [0.0]})[0])


def test_golden_order_accuracy_by_hand():
    # prompt a: golden 0.1 < 0.5 < 0.9; scores order (0,1) right, (0,2) right, (1,2) wrong -> 2/3
    # prompt b: one pair of unequal golden, the scores tie -> 1/2; prompt c: every golden equal -> left out
    acc, n = golden_order_accuracy({"a": [1.0, 3.0, 2.0], "b": [5.0, 5.0, 0.0], "c": [1.0, 2.0]},
                                   {"a": [0.1, 0.5, 0.9], "b": [0.2, 0.7, 0.2], "c": [0.4, 0.4]})
    # b: pairs (0,1) tie in score -> 1/2; (1,2) 5 > 0 and 0.7 > 0.2 -> 1; (0,2) equal golden: not a pair
    assert (acc, n) == (pytest.approx((2 / 3 + 1.5 / 2) / 2), 2)
    assert golden_order_accuracy({"a": [0.0, 1.0]}, {"a": [1.0, 0.0]}) == (0.0, 1)  # reversed order: 0, not 1
    assert math.isnan(golden_order_accuracy({"c": [1.0, 2.0]}, {"c": [0.4, 0.4]})[0])
    with pytest.raises(ValueError):
        golden_order_accuracy({"a": [1.0]}, {"a": [1.0, 2.0]})


def test_within_prompt_spearman_skips_constant_prompts():
    rho, n = mean_within_prompt_spearman({"a": [1, 2, 3], "b": [3, 2, 1], "c": [1, 1, 1]},
                                         {"a": [0.1, 0.5, 0.9], "b": [0.1, 0.2, 0.3], "c": [0.1, 0.2, 0.3]})
    assert (rho, n) == (pytest.approx(0.0), 2)  # +1 and -1; the constant scorer on c says nothing
    rho, _ = mean_within_prompt_spearman({"a": [1, 2, 3, 4]}, {"a": [0.0, 0.3, 0.2, 1.0]})
    assert rho == pytest.approx(0.8)  # ranks 1 2 3 4 vs 1 3 2 4: 1 - 6 * 2 / (4 * 15)


def test_report_summarises_the_checks_over_seeds():
    seeds = [{"reward_checks": {"BT init-sft": {"heldout_accuracy": 0.7, "spearman_golden": 0.2,
                                                "accuracy_sources": "sft over init"},
                                "log-ratio": {"spearman_golden": None}}},
             {"reward_checks": {"BT init-sft": {"heldout_accuracy": 0.9, "spearman_golden": 0.4,
                                                "accuracy_sources": "sft over init"},
                                "log-ratio": {"spearman_golden": 0.1}}}]
    out = reward_model_checks(seeds)
    assert out["BT init-sft"]["heldout_accuracy"]["mean"] == pytest.approx(0.8)
    assert out["BT init-sft"]["heldout_accuracy"]["method"] == "t" and out["BT init-sft"]["accuracy_sources"]
    assert out["log-ratio"]["heldout_accuracy"] is None
    assert out["log-ratio"]["spearman_golden"]["mean"] == pytest.approx(0.1)  # the one seed with a value
    # one value has no interval: none is made up (a bootstrap over one value would give [0.1, 0.1])
    assert out["log-ratio"]["spearman_golden"]["lo"] is None and out["log-ratio"]["spearman_golden"]["n_seeds"] == 1
    from openrlhf_irl.eval.stats import fmt_ci

    assert fmt_ci(out["log-ratio"]["spearman_golden"]) == "0.100 (1 seed)"
    assert fmt_ci(out["BT init-sft"]["heldout_accuracy"]).startswith("0.800 [")
