"""Best-of-N selection on hand-built candidates, golden loading, and the CLI's argument checks."""

from __future__ import annotations

import pytest

from openrlhf_irl.afd.best_of_n import best_of_n_curve, load_golden, oracle_curve, parse_ns
from openrlhf_irl.cli.best_of_n import main

GROUPS = [
    # prompt A: the scorer prefers sample 1 (golden .9), then sample 3 (golden .2) is never better by score
    [{"s": 0.1, "golden": 0.5}, {"s": 0.7, "golden": 0.9}, {"s": 0.3, "golden": 1.0}, {"s": 0.2, "golden": 0.2}],
    # prompt B: the best by score appears only at N=4
    [{"s": 0.0, "golden": 0.1}, {"s": -1.0, "golden": 0.8}, {"s": -2.0, "golden": 0.3}, {"s": 5.0, "golden": 0.6}],
]


def test_best_of_n_uses_the_first_n_samples_in_order():
    assert best_of_n_curve(GROUPS, [1, 2, 4], "s") == pytest.approx({1: (0.5 + 0.1) / 2, 2: (0.9 + 0.1) / 2,
                                                                       4: (0.9 + 0.6) / 2})
    assert oracle_curve(GROUPS, [1, 2, 4]) == pytest.approx({1: 0.3, 2: 0.85, 4: 0.9})
    with pytest.raises(ValueError, match="fewer than 8"):
        best_of_n_curve(GROUPS, [8], "s")


def test_golden_from_module_function_and_bad_spec():
    golden = load_golden("openrlhf_irl.demo.task:golden_reward")
    assert golden(["add 2 numbers to make 5"], ["1 + 4 = 5"]) == [pytest.approx(1.0)]
    with pytest.raises(ValueError, match="module:function"):
        load_golden("not-a-dir-nor-function")


def test_parse_ns_and_cli_requires_a_scorer(tmp_path, capsys):
    assert parse_ns("8,1, 2,2") == [1, 2, 8]
    with pytest.raises(ValueError):
        parse_ns("0,2")
    assert main(["--policy", "p", "--prompts", "x", "--output-dir", str(tmp_path)]) == 2
    assert "at least one scorer" in capsys.readouterr().err
