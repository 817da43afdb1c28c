"""openrlhf_irl.utils.stage_log: a stage's output at the file-descriptor level goes to its log file (this process,
a child process, Python logging), the terminal gets the stage line, a failure shows the log's tail and path."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import time
import sys

import pytest

from openrlhf_irl.utils.stage_log import StageProgress, fmt_duration, log_name, stage_output, tail_lines


def _noisy(tag: str) -> None:
    """Write to fd 1 and fd 2 every way a stage does."""
    print(f"{tag}-print")
    print(f"{tag}-stderr-print", file=sys.stderr)
    os.write(1, f"{tag}-fd1\n".encode())
    os.write(2, f"{tag}-fd2\n".encode())
    subprocess.run(["sh", "-c", f"echo {tag}-child-out; echo {tag}-child-err >&2"], check=True)
    logger = logging.getLogger(f"stage_log_test_{tag}")
    handler = logging.StreamHandler(sys.stderr)  # a handler holding the sys.stderr object, as libraries' do
    logger.addHandler(handler)
    try:
        logger.warning(f"{tag}-logging")
    finally:
        logger.removeHandler(handler)


@contextlib.contextmanager
def real_streams():
    """sys.stdout / sys.stderr writing to fds 1 and 2 as in a real process (pytest's capture objects write to its
    capture files directly, so the redirection would not see them)."""
    old = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = (open(fd, "w", closefd=False, buffering=1) for fd in (1, 2))
    try:
        yield
    finally:
        sys.stdout.flush(), sys.stderr.flush()
        sys.stdout, sys.stderr = old


NOISE = ("print", "stderr-print", "fd1", "fd2", "child-out", "child-err", "logging")


def test_stage_output_sends_every_fd_write_to_the_log(tmp_path, capfd):
    log = tmp_path / "logs" / "01-x.log"
    with real_streams():
        with stage_output(str(log)) as path:
            _noisy("s")
        print("after")
    out, err = capfd.readouterr()
    assert path == str(log)
    text = log.read_text()
    for kind in NOISE:
        assert f"s-{kind}" in text, kind
        assert f"s-{kind}" not in out + err, kind
    assert out == "after\n" and err == ""


def test_stage_progress_prints_the_stage_line_and_bar_on_the_terminal(tmp_path, capfd):
    with real_streams():
        progress = StageProgress(["alpha", "beta"])
        with progress.stage("alpha", str(tmp_path / "logs" / log_name(1, "alpha")), label="[1/2] alpha"):
            _noisy("a")
    out, err = capfd.readouterr()
    assert not progress.tty  # captured: not a TTY, so plain lines
    lines = out.splitlines()
    assert len(lines) == 3 and err == ""
    assert lines[0].startswith("[1/2] alpha (log: ") and lines[0].endswith("01-alpha.log)")
    assert lines[1].startswith("[1/2] alpha ...") and lines[1].endswith(" s")
    assert lines[2].startswith("[##########----------] 1/2 stages, ") and lines[2].endswith(" elapsed")
    assert "\r" not in out
    assert all(f"a-{k}" not in out for k in NOISE)
    assert "a-child-err" in (tmp_path / "logs" / "01-alpha.log").read_text()
    with real_streams():
        with progress.stage("beta", str(tmp_path / "logs" / log_name(2, "beta")), label="[2/2] beta"):
            pass
    assert "2/2 stages" in capfd.readouterr().out


def test_failure_shows_the_log_tail_and_path_and_propagates(tmp_path, capfd):
    log = tmp_path / "logs" / "02-boom.log"
    with real_streams(), pytest.raises(RuntimeError, match="kaput"):
        with StageProgress(["boom"]).stage("boom", str(log)):
            for i in range(30):
                print(f"line {i}")
            subprocess.run(["sh", "-c", "echo child-said-goodbye >&2"], check=True)
            raise RuntimeError("kaput")
    out, err = capfd.readouterr()
    assert "boom" in out and "failed after" in out and "line " not in out
    assert f"--- full log: {log}" in err and "child-said-goodbye" in err
    assert "| line 29\n" in err and "| line 11\n" in err and "| line 10\n" not in err  # the tail: 20 lines
    assert "line 0" in log.read_text()


def test_nested_redirection_shows_a_failure_once(tmp_path, capfd):
    outer, inner = tmp_path / "run.log", tmp_path / "inner.log"
    with real_streams(), pytest.raises(ValueError):
        with stage_output(str(outer)):
            print("between stages")
            with stage_output(str(inner)):
                print("inside the stage")
                raise ValueError("x")
    out, err = capfd.readouterr()
    assert out == "" and err.count("--- full log:") == 1 and "inside the stage" in err and "inner.log" in err
    assert outer.read_text() == "between stages\n"


def test_verbose_redirects_nothing(tmp_path, capfd):
    log = tmp_path / "logs" / "01-v.log"
    with real_streams():
        with stage_output(str(log), verbose=True) as path:
            _noisy("v")
    out, err = capfd.readouterr()
    assert path is None and not log.exists()
    for kind in ("print", "fd1", "child-out"):
        assert f"v-{kind}" in out
    for kind in ("stderr-print", "fd2", "child-err", "logging"):
        assert f"v-{kind}" in err


def test_tail_lines_keeps_the_last_drawing_of_a_progress_bar(tmp_path):
    log = tmp_path / "x.log"
    log.write_text("a\n 10%|#\r 50%|#####\r100%|##########\nb\n\n")
    assert tail_lines(str(log), 2) == ["100%|##########", "b"]
    assert tail_lines(str(tmp_path / "missing.log")) == []


def test_names_durations_and_estimate():
    assert log_name(3, "AfD samples and reward models") == "03-afd-samples-and-reward-models.log"
    assert log_name(6, "PPO over the AfD rewards (OpenRLHF train_ppo_ray)") == "06-ppo-over-the-afd-rewards.log"
    assert [fmt_duration(s) for s in (41.23, 112, 3725)] == ["41.2 s", "1 m 52 s", "1 h 02 m"]
    progress = StageProgress(["a", "b", "a", "b"], bar_width=4)
    progress.skip({"a": 10.0, "b": 50.0}, "seed 0: reused")
    assert progress.bar().startswith("[##--] 2/4 stages, ") and progress.bar().endswith("about 1 m 00 s left")


def test_on_a_tty_the_running_line_counts_in_place(tmp_path, capfd):
    with real_streams():
        progress = StageProgress(["slow"])
        progress.tty = True  # as on a terminal
        with progress.stage("slow", str(tmp_path / "01-slow.log"), label="[1/1] slow"):
            time.sleep(1.3)
            print("hidden")
    out, _ = capfd.readouterr()
    line, bar = out.split("\n")[:2]
    assert line.startswith("[1/1] slow ...") and line.count("\r") >= 2 and line.rsplit("\r", 1)[1].startswith(
        "[1/1] slow ...")
    assert "hidden" not in out and bar.startswith("[####################] 1/1 stages")


def _fake_stages(monkeypatch, fail: bool = False):
    """The demo's stage loop over two cheap stages that write to fds 1 and 2 the ways real ones do."""
    from openrlhf_irl.demo.pipeline import Demo, Stage

    def second():
        _noisy("second")
        if fail:
            raise RuntimeError("stage two broke")

    monkeypatch.setattr(Demo, "stages", lambda self: [Stage("first stage", lambda: _noisy("first")),
                                                      Stage("second stage (detail)", second)])


def test_experiment_prints_stage_lines_and_writes_stage_logs(tmp_path, capfd, monkeypatch):
    import openrlhf_irl.demo.report as report
    from openrlhf_irl.demo.experiment import run_experiment

    _fake_stages(monkeypatch)
    monkeypatch.setattr(report, "build_report", lambda *a, **k: print("report-table") or {"ok": True})
    with real_streams():
        assert run_experiment(str(tmp_path), [0, 1], scale="quick", backend="hf", command="x") == {"ok": True}
    out, err = capfd.readouterr()
    lines = out.splitlines()
    assert len(lines) == 2 + 2 * 2 * 3 and err == ""  # header, footer; per stage: start, done, bar
    assert lines[1] == f"seed 0 [1/2] first stage (log: {tmp_path}/seed_0/logs/01-first-stage.log)"
    assert lines[2].startswith("seed 0 [1/2] first stage ....") and lines[-2].startswith("[####################] 4/4")
    assert "about" in lines[6] and lines[6].endswith(" left")  # after seed 0, an estimate for seed 1
    assert not any(f"-{k}" in out for k in NOISE) and "report-table" not in out
    for s in (0, 1):
        for name, tag in (("01-first-stage.log", "first"), ("02-second-stage.log", "second")):
            text = (tmp_path / f"seed_{s}" / "logs" / name).read_text()
            assert all(f"{tag}-{k}" in text for k in NOISE)
        results = json.loads((tmp_path / f"seed_{s}" / "results.json").read_text())
        assert results["log_dir"] == str(tmp_path / f"seed_{s}" / "logs")
        assert set(results["timings_s"]) == {"first stage", "second stage (detail)"}
    assert "report-table" in (tmp_path / "logs" / "run.log").read_text()
    with real_streams():  # a rerun reuses both seeds: one line and a bar each
        run_experiment(str(tmp_path), [0, 1], scale="quick", backend="hf", command="x")
    assert capfd.readouterr().out.count("reusing") == 2


def test_demo_stage_failure_shows_its_log_and_propagates(tmp_path, capfd, monkeypatch):
    from openrlhf_irl.demo.pipeline import run_demo

    _fake_stages(monkeypatch, fail=True)
    with real_streams(), pytest.raises(RuntimeError, match="stage two broke"):
        run_demo(str(tmp_path), quick=True, backend="hf")
    out, err = capfd.readouterr()
    assert out.splitlines()[-2].startswith("[2/2] second stage (detail) ....") and "failed after" in out
    assert err.count("--- full log:") == 1 and "02-second-stage.log" in err and "second-child-err" in err
    assert not any(f"first-{k}" in out + err for k in NOISE)


def test_demo_verbose_shows_everything(tmp_path, capfd, monkeypatch):
    import openrlhf_irl.demo.report as report
    from openrlhf_irl.demo.pipeline import run_demo

    _fake_stages(monkeypatch)
    monkeypatch.setattr(report, "build_report", lambda *a, **k: print("report-table") or {})
    with real_streams():
        run_demo(str(tmp_path), quick=True, backend="hf", verbose=True)
    out, err = capfd.readouterr()
    assert "first-fd1" in out and "second-child-err" in err and "report-table" in out and "[2/2] second" in out
    assert not (tmp_path / "logs").exists()
