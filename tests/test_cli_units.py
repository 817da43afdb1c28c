"""Issue #23, class 3: a run's files are one unit. Through the real CLIs (in process, or in a subprocess that is
SIGKILLed at a chosen point): a kill leaves the previous unit whole or nothing that looks complete, and the rerun
completes and removes what the killed run left; a second job writing into the same folder is refused with one line;
a stale result is never shown beside a new one (prepare_hh_rlhf, best_of_n, the demo's report)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, TESTS, write_jsonl
from openrlhf_irl.utils.output_guard import MARKER, STAGING

# Runs a CLI's main(argv) (or one atomic_write_jsonl) with one hook, given as JSON in argv[1]:
#   kill_change: {"dir", "names", "at"}  SIGKILL before the at-th os.replace onto / os.unlink of dir/<name>
#   kill_writing / stall_writing: NAME   SIGKILL / print "stalled" and sleep, while writing line 2 of NAME
#   fake_samples: {"records", "kill"}    the sampling CLI writes these records into its --output (then SIGKILL)
DRIVER = r'''
import json, os, signal, sys, time
spec = json.loads(sys.argv[1])

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if "kill_change" in spec:
    hook, seen = spec["kill_change"], [0]
    def counted(fn):
        def wrapper(*args, **kw):
            path = os.path.realpath(str(args[-1]))
            if os.path.dirname(path) == os.path.realpath(hook["dir"]) and os.path.basename(path) in hook["names"]:
                seen[0] += 1
                if seen[0] == hook["at"]:
                    die()
            return fn(*args, **kw)
        return wrapper
    os.replace, os.unlink = counted(os.replace), counted(os.unlink)

if "kill_writing" in spec or "stall_writing" in spec:
    from openrlhf_irl.utils import jsonl
    real_dump = jsonl._dump_line
    def dump(record, path="<jsonl>", line_no=None):
        name = os.path.basename(str(path))
        if line_no == 2 and name == spec.get("kill_writing"):
            die()
        if line_no == 2 and name == spec.get("stall_writing"):
            print("stalled", flush=True)
            time.sleep(120)
        return real_dump(record, path, line_no)
    jsonl._dump_line = dump

if "fake_samples" in spec:
    from openrlhf_irl.cli import sample
    def fake_main(argv):
        out = argv[argv.index("--output") + 1]
        with open(out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in spec["fake_samples"]["records"])
        if spec["fake_samples"]["kill"]:
            die()
        return 0
    sample.main = fake_main

if "write" in spec:
    from openrlhf_irl.utils.jsonl import atomic_write_jsonl
    atomic_write_jsonl(spec["write"], [{"i": i} for i in range(5)])
    sys.exit(0)
import importlib
sys.exit(importlib.import_module(spec["module"]).main(spec["argv"]))
'''


def driver(spec: dict, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(TESTS), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps(spec)], cwd=str(REPO), env=env, text=True,
                            **popen)


def run_driver(spec: dict) -> int:
    proc = driver(spec, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode in (0, -signal.SIGKILL), f"exit {proc.returncode}\n{out[-2000:]}\n{err[-4000:]}"
    return proc.returncode


def started(proc: subprocess.Popen, word: str) -> None:
    line = proc.stdout.readline().strip()
    assert line == word, f"expected {word!r}, got {line!r}"


def hold_lock(directory: Path) -> subprocess.Popen:
    """Another process holding the output directory's flock (as a running job of these CLIs does)."""
    proc = subprocess.Popen([sys.executable, "-c", "import fcntl,os,sys,time; fd=os.open(sys.argv[1], os.O_RDONLY); "
                             "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(120)",
                             str(directory)], stdout=subprocess.PIPE, text=True)
    started(proc, "locked")
    return proc


def stop(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait()


def files(root: Path) -> dict:
    """Every file under ``root`` (hidden ones and those in the staging folder included) and its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def one_error_line(err: str, needle: str) -> None:
    assert err.count("\n") == 1 and err.startswith("error: ") and needle in err, err


# ------------------------------------------------------------------------------------------- prepare_hh_rlhf

HH = [{"chosen": f"\n\nHuman: question {i}?\n\nAssistant: answer {i}.", "rejected": "\n\nHuman: q\n\nAssistant: no"}
      for i in range(4)]
HH_UNIT = ("demos.jsonl", "prompts.jsonl")


def hh_unit(out: Path) -> dict:
    return {name: (out / name).read_bytes() if (out / name).exists() else None for name in HH_UNIT}


@pytest.fixture
def hh(tmp_path, capsys):
    """An output folder holding an earlier run's unit (one record); the new input has four."""
    from openrlhf_irl.cli.prepare_hh_rlhf import main

    old_input = write_jsonl(tmp_path / "old.jsonl", HH[:1])
    new_input = write_jsonl(tmp_path / "hh.jsonl", HH)
    out = tmp_path / "out"
    assert main(["--input", str(old_input), "--output-dir", str(out)]) == 0
    capsys.readouterr()
    argv = ["--input", str(new_input), "--output-dir", str(out)]
    return main, out, argv, hh_unit(out)


def assert_clean_new_unit(main, out: Path, argv: list, old: dict) -> None:
    """The rerun completes: the new unit whole, nothing else left (no staging folder, no temp file)."""
    assert main(argv) == 0
    new = hh_unit(out)
    assert all(new.values()) and new["demos.jsonl"] != old["demos.jsonl"]
    assert len(new["demos.jsonl"].splitlines()) == 4 and len(new["prompts.jsonl"].splitlines()) == 4
    assert sorted(os.listdir(out)) == sorted([MARKER, *HH_UNIT])


def test_hh_killed_while_writing_its_second_file_keeps_the_old_unit(hh):
    main, out, argv, old = hh
    spec = {"module": "openrlhf_irl.cli.prepare_hh_rlhf", "argv": argv, "kill_writing": "prompts.jsonl"}
    assert run_driver(spec) == -signal.SIGKILL
    assert hh_unit(out) == old  # not the new demonstrations beside the old prompts
    left = [name for name in files(out) if name.endswith(".tmp")]
    assert left, "the killed run should have left its half-written temp file"
    assert_clean_new_unit(main, out, argv, old)  # and the rerun removes it


@pytest.mark.parametrize("at", [1, 2, 3, 4])
def test_hh_killed_at_each_step_of_moving_the_unit_in(hh, at):
    """The commit removes the old files (prompts first) and moves the new ones in (prompts last): a kill at any of
    these four steps leaves the old unit, the new one, or no prompts.jsonl (which no reader takes as complete)."""
    main, out, argv, old = hh
    spec = {"module": "openrlhf_irl.cli.prepare_hh_rlhf", "argv": argv,
            "kill_change": {"dir": str(out), "names": list(HH_UNIT), "at": at}}
    assert run_driver(spec) == -signal.SIGKILL
    state = hh_unit(out)
    if state != old:
        assert state["prompts.jsonl"] is None, f"kill at step {at}: a mixed unit {state}"
    assert_clean_new_unit(main, out, argv, old)


def test_hh_second_run_into_the_same_folder_is_refused(hh, capsys):
    main, out, argv, old = hh
    first = driver({"module": "openrlhf_irl.cli.prepare_hh_rlhf", "argv": argv, "stall_writing": "demos.jsonl"},
                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        started(first, "stalled")  # the first job is writing its unit
        before = files(out)
        second = ["--input", str(out.parent / "old.jsonl"), "--output-dir", str(out)]
        assert main(second) == 2
        one_error_line(capsys.readouterr().err, "another job is writing")
        assert files(out) == before and hh_unit(out) == old
    finally:
        stop(first)
    assert_clean_new_unit(main, out, argv, old)  # the killed first job's staging is removed by the rerun


def test_atomic_writer_removes_the_temp_a_killed_writer_left_and_nothing_else(tmp_path):
    """Every CLI writes through atomic_writer: the next write of a file removes the temp file a SIGKILLed write of
    it left, but not a live writer's (it holds an flock on its temp file) nor a file of the user's."""
    from openrlhf_irl.utils.jsonl import TEMP_SUFFIX, atomic_write_jsonl

    target = tmp_path / "scores.jsonl"
    assert run_driver({"write": str(target), "kill_writing": "scores.jsonl"}) == -signal.SIGKILL
    dead = [p.name for p in tmp_path.iterdir() if p.name.endswith(TEMP_SUFFIX)]
    assert len(dead) == 1 and not target.exists()
    live = driver({"write": str(target), "stall_writing": "scores.jsonl"}, stdout=subprocess.PIPE)
    try:
        started(live, "stalled")
        users = tmp_path / ".scores.jsonl.mine.tmp"
        users.write_text("the user's")
        assert atomic_write_jsonl(target, [{"i": 0}]) == 1
        temps = {p.name for p in tmp_path.iterdir() if p.name.endswith(TEMP_SUFFIX)}
        assert dead[0] not in temps and len(temps) == 1  # the dead writer's gone, the live writer's kept
        assert users.read_text() == "the user's"
    finally:
        stop(live)


# ------------------------------------------------------------------------------------------------- best_of_n

BON_UNIT = ("scored.jsonl", "selected.jsonl", "best_of_n.png", "best_of_n.json")


def bon_samples(tag: str) -> list:
    return [{"prompt": p, "response": f"{tag} {p} {'12' * s}", "sample_index": s, "finished": True,
             "policy": "policy"} for p in ("count from 3", "count from 7") for s in range(2)]


@pytest.fixture
def bon(tiny_model, tmp_path, monkeypatch, capsys):
    """A best_of_n folder holding an earlier run's results (its sampler stood in by one writing fixed records)."""
    from openrlhf_irl.cli import best_of_n, sample

    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "count from 3"}, {"prompt": "count from 7"}])
    out = tmp_path / "bon"
    argv = ["--policy", tiny_model, "--prompts", str(prompts), "--output-dir", str(out), "--n", "1,2",
            "--log-ratio-init", tiny_model, "--golden", "helpers.golden_digits:digit_count", "--backend", "hf"]

    def fake(records, code=0):
        def main(sample_argv):
            if code == 0:
                write_jsonl(Path(sample_argv[sample_argv.index("--output") + 1]), records)
            return code
        monkeypatch.setattr(sample, "main", main)

    fake(bon_samples("old"))
    assert best_of_n.main(argv) == 0
    assert all((out / name).exists() for name in BON_UNIT)
    capsys.readouterr()
    return best_of_n.main, fake, out, argv


def test_best_of_n_overwrite_killed_leaves_no_old_curves_beside_new_samples(bon):
    main, fake, out, argv = bon
    spec = {"module": "openrlhf_irl.cli.best_of_n", "argv": argv + ["--overwrite"],
            "fake_samples": {"records": bon_samples("new"), "kill": True}}
    assert run_driver(spec) == -signal.SIGKILL
    assert b"new count" in (out / "samples.jsonl").read_bytes()
    assert [name for name in BON_UNIT if (out / name).exists()] == []  # no curve of the old samples
    fake(bon_samples("new"))
    assert main(argv + ["--overwrite"]) == 0
    assert all((out / name).exists() for name in BON_UNIT) and not (out / STAGING).exists()
    assert b"new count" in (out / "scored.jsonl").read_bytes()


def test_best_of_n_refused_sampling_keeps_the_previous_results(bon):
    """Results are set aside while sampling runs and come back when the samples did not change."""
    main, fake, out, argv = bon
    before = files(out)
    fake([], code=2)  # the sampling CLI refuses (e.g. samples written with other settings)
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and files(out) == before


def test_best_of_n_second_run_into_the_same_folder_is_refused(bon, capsys):
    main, fake, out, argv = bon
    first = driver({"module": "openrlhf_irl.cli.best_of_n", "argv": argv, "stall_writing": "scored.jsonl",
                    "fake_samples": {"records": bon_samples("first"), "kill": False}},
                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        started(first, "stalled")
        before = files(out)
        assert main(argv) == 2
        one_error_line(capsys.readouterr().err, "another job is writing")
        assert files(out) == before
    finally:
        stop(first)


# ------------------------------------------------------------------------------------------------------ demo

def test_demo_rerun_that_stops_never_leaves_the_old_report(tmp_path, monkeypatch):
    """A rerun with another seed takes the previous report out before its first stage writes; a stage that fails
    (a stand-in for a stop) leaves the new data and no report."""
    from openrlhf_irl.demo import pipeline
    from openrlhf_irl.utils.output_guard import mark_dir

    root = tmp_path / "demo"
    mark_dir(str(root), "openrlhf-irl demo")
    for name in pipeline.RESULT_FILES:
        (root / name).write_text("seed 0")
    (root / "data").mkdir()
    (root / "data" / "demos.jsonl").write_text("seed 0\n")

    def task():
        (root / "data" / "demos.jsonl").write_text("seed 1\n")

    def stopped():
        raise RuntimeError("stopped")

    monkeypatch.setattr(pipeline.Demo, "stages",
                        lambda self: [pipeline.Stage("task", task), pipeline.Stage("stopped", stopped)])
    demo = pipeline.Demo(pipeline.DemoConfig.make(str(root), seed=1, quick=True), verbose=True)
    with pytest.raises(RuntimeError, match="stopped"):
        demo.run()
    assert (root / "data" / "demos.jsonl").read_text() == "seed 1\n"
    assert [name for name in pipeline.RESULT_FILES if (root / name).exists()] == []
    assert not (root / STAGING).exists()


def test_demo_second_run_into_the_same_folder_is_refused(tmp_path, monkeypatch, capsys):
    from openrlhf_irl.demo import pipeline

    root = tmp_path / "demo"
    root.mkdir()
    monkeypatch.setattr(pipeline.Demo, "run", lambda self: pytest.fail("the second demo ran"))
    holder = hold_lock(root)
    try:
        with pytest.raises(SystemExit) as e:
            pipeline.run_demo(str(root), seed=1, quick=True)
        assert e.value.code == 2
        one_error_line(capsys.readouterr().err, "another job is writing")
    finally:
        stop(holder)


def test_experiment_rerun_that_stops_never_leaves_the_old_top_level_report(tmp_path, monkeypatch):
    """The experiment's own report (beside its seed_<s>/ folders) goes out of sight before the first seed runs."""
    from openrlhf_irl.demo import experiment, pipeline
    from openrlhf_irl.utils.output_guard import mark_dir

    root = tmp_path / "exp"
    mark_dir(str(root), "openrlhf-irl experiment")
    for name in pipeline.RESULT_FILES:
        (root / name).write_text("seeds 0-2")

    def stopped():
        raise RuntimeError("stopped")

    monkeypatch.setattr(pipeline.Demo, "stages", lambda self: [pipeline.Stage("stopped", stopped)])
    with pytest.raises(RuntimeError, match="stopped"):
        experiment.run_experiment(str(root), [5], scale="quick", verbose=True)
    assert [name for name in pipeline.RESULT_FILES if (root / name).exists()] == []
    assert not (root / STAGING).exists()


def test_experiment_second_run_into_the_same_folder_is_refused(tmp_path, monkeypatch):
    from openrlhf_irl.demo import experiment, pipeline
    from openrlhf_irl.utils.output_guard import OutputConflict

    root = tmp_path / "exp"
    root.mkdir()
    (root / "report.md").write_text("the running job's")
    monkeypatch.setattr(pipeline.Demo, "run_stages", lambda self: pytest.fail("the second experiment ran"))
    holder = hold_lock(root)
    try:
        with pytest.raises(OutputConflict, match="another job is writing"):
            experiment.run_experiment(str(root), [1], scale="quick", verbose=True)
        assert (root / "report.md").read_text() == "the running job's"
    finally:
        stop(holder)


def _sigterm_self() -> None:
    os.kill(os.getpid(), signal.SIGTERM)
    for _ in range(100):  # the Python handler runs between bytecodes
        pass


def test_sigterm_unwinds_like_ctrl_c_and_the_cli_says_so(capsys):
    """SIGTERM inside a CLI raises in the main thread, so its finally blocks (engines, Ray, shared memory) run; the
    CLI then says it was stopped by SIGTERM and exits 143. The previous handler is back afterwards."""
    from openrlhf_irl.cli.common import cli_main
    from openrlhf_irl.utils.signals import Terminated, reclaim_sigterm, sigterm_unwinds

    cleaned = []
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated):
        with sigterm_unwinds():
            try:
                _sigterm_self()
            finally:
                cleaned.append("engines closed")
    assert cleaned == ["engines closed"] and signal.getsignal(signal.SIGTERM) == before
    # a library that replaces the handler inside (ray.init does) is overruled by reclaim_sigterm
    with pytest.raises(Terminated):
        with sigterm_unwinds():
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # if reclaiming failed: no raise, the test fails
            reclaim_sigterm()
            _sigterm_self()
    reclaim_sigterm()  # outside: nothing to reclaim, the handler stays as it was
    assert signal.getsignal(signal.SIGTERM) == before

    @cli_main("demo-cli", resume_hint="rerun it")
    def main(argv=None):
        try:
            _sigterm_self()
        finally:
            cleaned.append("again")
        return 0

    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 143 and cleaned[-1] == "again"
    assert capsys.readouterr().err.strip() == "interrupted: demo-cli stopped by SIGTERM; rerun it"
    assert signal.getsignal(signal.SIGTERM) == before
