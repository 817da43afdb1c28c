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
