"""benchmarks/targets.py: what it counts as the measured time, whether a target is met, and its flag checks (the
real runs take half an hour; here the commands are stand-ins that print what pytest and the demo print)."""

from __future__ import annotations

import importlib.util
import sys

import pytest
from helpers import REPO


@pytest.fixture
def targets():
    spec = importlib.util.spec_from_file_location("targets", REPO / "benchmarks" / "targets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_test_counts_pytests_own_time_and_a_failure_never_meets_a_target(targets):
    said = "== 691 passed, 1 skipped, 2 warnings in 1314.20s (0:21:54) =="
    assert targets.test_seconds("collected\n" + said) == pytest.approx(1314.2)
    assert targets.test_seconds("3 failed in 9.0s") is None
    row = targets.run("test", [sys.executable, "-c", "print('5 passed in 12.50s')"])
    assert row["measured_s"] == 12.5 and row["met"] and row["test_s"] == 12.5
    assert row["output"] == "5 passed in 12.50s\n"  # the whole output, for the run's log beside the results
    slow = targets.run("test", [sys.executable, "-c", "print('5 passed in 1000.00s')"])
    assert slow["measured_s"] == 1000.0 and not slow["met"]  # over 15 minutes of tests
    failed = targets.run("quick", [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"])
    assert failed["returncode"] == 3 and not failed["met"] and "boom" in failed["tail"]
    md = targets.markdown({"cpu_model": "cpu", "date": "d", "cores": 2, "flags": ["avx2"], "dtype": "fp32",
                           "dtype_reason": "auto: no bf16"}, [row, slow, failed])
    assert "| test | 12 s | 900 s | yes |" in md and "| quick | " in md and "no (failed)" in md


def test_only_names_known_runs(targets, capsys):
    with pytest.raises(SystemExit) as exc:
        targets.main(["--only", "demo,nope"])
    assert exc.value.code == 2 and "--only" in capsys.readouterr().err


def test_a_partial_rerun_keeps_the_other_runs_rows_of_the_same_cpu_only(targets):
    env = {"cpu_model": "EPYC"}
    old = {"env": {"cpu_model": "EPYC"}, "rows": [{"name": "test", "measured_s": 1.0},
                                                 {"name": "quick", "measured_s": 2.0}]}
    new = [{"name": "quick", "measured_s": 3.0}, {"name": "demo", "measured_s": 4.0}]
    merged = targets.merge_rows(old, env, new)
    assert [(r["name"], r["measured_s"]) for r in merged] == [("demo", 4.0), ("quick", 3.0), ("test", 1.0)]
    other_cpu = dict(old, env={"cpu_model": "Xeon"})
    assert [r["name"] for r in targets.merge_rows(other_cpu, env, new)] == ["demo", "quick"]
    assert [r["name"] for r in targets.merge_rows(None, env, new)] == ["demo", "quick"]


def test_the_demo_rows_keep_the_finished_stage_lines_only(targets):
    printed = ("openrlhf-irl demo (quick, seed 0, task sum): 7 stages\n"
               "[1/7] task (log: outputs/demo/logs/01-task.log)\n"
               "[1/7] task ................................ 0.4 s\n"
               "[########------------] 1/7 stages, 0.4 s elapsed\n"
               "[2/7] base model + initial policy ......... 1 m 05 s\n")
    row = targets.run("quick", [sys.executable, "-c", f"print({printed!r}, end='')"])
    assert row["stages"] == ["[1/7] task ................................ 0.4 s",
                             "[2/7] base model + initial policy ......... 1 m 05 s"]
    md = targets.markdown({"cpu_model": "cpu", "date": "d", "cores": 2, "flags": [], "dtype": "fp32",
                           "dtype_reason": "r"}, [row])
    assert "`quick` by stage:" in md and "[2/7] base model + initial policy ......... 1 m 05 s" in md
