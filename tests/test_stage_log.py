"""openrlhf_irl.utils.stage_log: a stage's output at the file-descriptor level goes to its log file (this process,
a child process, Python logging), the terminal gets the stage line, a failure shows the log's tail and path."""

from __future__ import annotations

import contextlib
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
