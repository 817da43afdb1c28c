"""Clean-up of vLLM's shared memory (``openrlhf_irl.utils.reaper``): only segments our own processes mapped are
removed, and only once nothing maps them; the sampling CLI on real vLLM engines leaves none behind."""

from __future__ import annotations

import contextlib
import mmap
import os
import subprocess
import sys
import time
import uuid

import psutil
import pytest
from helpers import REPO, interruptible, write_jsonl

from openrlhf_irl.utils.reaper import SHM_DIR, owned_shm_cleanup, remove_stale_shm, shm_mapped_by, shm_segments

pytestmark = pytest.mark.skipif(not os.path.isdir(SHM_DIR), reason="no /dev/shm")

# Creates /dev/shm/<name>, maps it, says so (<marker>.ready), holds it while <marker> exists, exits without unlinking
# it - as a killed vLLM engine does.
HOLDER = """
import mmap, os, sys, time
name, marker = sys.argv[1:3]
path = os.path.join("/dev/shm", name)
with open(path, "wb") as f:
    f.write(b"\\0" * 4096)
f = open(path, "r+b")
m = mmap.mmap(f.fileno(), 4096)
open(marker + ".ready", "w").close()
while os.path.exists(marker):
    time.sleep(0.05)
"""

# Starts HOLDER in a new session and exits: the holder is then no descendant of the test (another job's process).
FOREIGN = """
import subprocess, sys
p = subprocess.Popen([sys.executable, "-c", sys.argv[1], *sys.argv[2:]], start_new_session=True,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(p.pid)
"""


def wait_for(condition, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def segment_name() -> str:
    return f"psm_test{uuid.uuid4().hex[:10]}"


def start_holder(name: str, marker: str) -> subprocess.Popen:
    open(marker, "w").close()
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, name, marker])
    wait_for(lambda: os.path.exists(marker + ".ready"), what="the holder to map its segment")
    return proc


def unlink_quietly(*names: str) -> None:
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(SHM_DIR, name))


@pytest.mark.parametrize("ending", ["normal", "error", "ctrl-c"])
def test_segment_of_an_exited_child_is_removed(tmp_path, ending):
    name, marker = segment_name(), str(tmp_path / "hold")
    raised = {"normal": None, "error": RuntimeError, "ctrl-c": KeyboardInterrupt}[ending]
    child = None
    try:
        with pytest.raises(raised) if raised else contextlib.nullcontext():
            with owned_shm_cleanup(interval_s=0.1, wait_s=10.0) as shm:
                child = start_holder(name, marker)
                wait_for(lambda: name in shm.owned, what="the background sampling to record the segment")
                os.unlink(marker)  # the child exits (without unlinking); the clean-up must wait for it
                if raised:
                    raise raised("stop")
        assert not os.path.exists(os.path.join(SHM_DIR, name))
    finally:
        if child is not None:
            child.wait(timeout=10)
        unlink_quietly(name)


def test_a_segment_still_mapped_is_kept(tmp_path):
    name, marker = segment_name(), str(tmp_path / "hold")
    child = start_holder(name, marker)
    try:
        with owned_shm_cleanup(interval_s=0.1, wait_s=0.5) as shm:
            shm.note()
            assert name in shm.owned
        assert os.path.exists(os.path.join(SHM_DIR, name))  # the child still maps it
    finally:
        os.unlink(marker)
        child.wait(timeout=10)
        unlink_quietly(name)


def test_a_segment_our_processes_never_mapped_is_kept(tmp_path):
    """Another job's segment - mapped by a process that is not ours, then left unmapped - and a bare segment
    nothing ever mapped (another job creating it this instant) both stay."""
    foreign, bare, marker = segment_name(), segment_name(), str(tmp_path / "hold")
    with open(os.path.join(SHM_DIR, bare), "wb") as f:
        f.write(b"\0" * 4096)
    open(marker, "w").close()
    try:
        with owned_shm_cleanup(interval_s=0.1, wait_s=2.0) as shm:
            out = subprocess.run([sys.executable, "-c", FOREIGN, HOLDER, foreign, marker], capture_output=True,
                                 text=True, check=True)
            holder = psutil.Process(int(out.stdout))
            assert holder.pid not in {p.pid for p in psutil.Process().children(recursive=True)}
            wait_for(lambda: foreign in shm_mapped_by([holder.pid]), what="the foreign holder to map its segment")
            time.sleep(0.3)  # a few samples while it is mapped
            shm.note()
            assert foreign not in shm.owned and bare not in shm.owned
            os.unlink(marker)
            holder.wait(timeout=10)
        assert os.path.exists(os.path.join(SHM_DIR, foreign)) and os.path.exists(os.path.join(SHM_DIR, bare))
    finally:
        if os.path.exists(marker):
            os.unlink(marker)
        unlink_quietly(foreign, bare)


def test_remove_stale_shm_only_removes_unmapped_candidates():
    """Of the candidates, one still mapped (a process of another job attached to it) stays; a segment that is no
    candidate stays even when nothing maps it."""
    stale, live, other = (segment_name() for _ in range(3))
    paths = {n: os.path.join(SHM_DIR, n) for n in (stale, live, other)}
    for path in paths.values():
        with open(path, "wb") as f:
            f.write(b"\0" * 4096)
    handles = {n: open(paths[n], "r+b") for n in (stale, live)}
    maps = {n: mmap.mmap(h.fileno(), 4096) for n, h in handles.items()}
    try:
        owned = shm_mapped_by([os.getpid()])
        assert {stale, live} <= owned and other not in owned
        maps.pop(stale).close()  # the job's process is gone: nobody maps it any more
        handles.pop(stale).close()
        assert remove_stale_shm(owned) == [stale]
        assert not os.path.exists(paths[stale]) and os.path.exists(paths[live]) and os.path.exists(paths[other])
    finally:
        for m in maps.values():
            m.close()
        for h in handles.values():
            h.close()
        unlink_quietly(*paths)


@pytest.mark.slow
@pytest.mark.parametrize("ending", ["normal", "ctrl-c", "sigterm", "engine-dies"])
def test_sample_cli_on_engines_leaves_no_shared_memory(tiny_model, tmp_path, vllm_ready, ending):
    """Every segment the job's processes (driver, Ray, engine processes) mapped is gone after a normal exit, after a
    Ctrl-C (SIGINT to the job's process group, as a terminal sends it), after a SIGTERM to the job's own process
    only (``kill PID``, a scheduler's stop), once its engine processes are up, and after its engine's worker process
    dies of a fatal signal (SIGILL, as engines that died mid-job did): the job then says how to resume, and the
    worker's Python stack is in the job's log (``PYTHONFAULTHANDLER`` in the engines' environment).
    Judged by what the job's own processes were seen mapping: other jobs on the machine may create segments."""
    import signal

    # the engine-dies job is long enough (64 x 2 completions of up to 96 tokens) to be killed mid-generation
    n_prompts, new_tokens = (64, 96) if ending == "engine-dies" else (4, 8)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"count from {a}"} for a in range(1, n_prompts + 1)])
    cmd = [sys.executable, "-m", "openrlhf_irl.cli.sample", "--model", tiny_model, "--prompts", str(prompts),
           "--rollout.n_samples_per_prompt", "2", "--rollout.max_new_tokens", str(new_tokens), "--backend", "vllm",
           "--num-actors", "1",
           "--policy-name", "sft", "--output", str(tmp_path / "samples.jsonl")]
    before = shm_segments()
    seen, procs, interrupted, job = set(), {}, False, None
    try:
        # Known open problem (README, Tests): an engine now and then dies mid-job in a full suite run (twice in a row
        # here in one CI run, its worker killed by SIGILL); the job then exits 1 with "rerun to resume". Its segments
        # must be gone all the same; a normal ending reruns it as a user would, at most twice, and requires the last
        # run to succeed.
        for attempt in range(3 if ending == "normal" else 1):
            with open(tmp_path / "log.txt", "w") as log:
                # vLLM's multiprocessing executor (a VLLM::Worker process and a shared-memory queue to it): the
                # engines' default on CPU, the uni executor, maps no segment to leave (engine_env)
                job = subprocess.Popen(cmd, cwd=str(REPO), env={**os.environ, "PYTHONUNBUFFERED": "1",
                                                                "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}, stdout=log,
                                       preexec_fn=interruptible, stderr=subprocess.STDOUT, start_new_session=True)
            deadline = time.monotonic() + 600
            while job.poll() is None and time.monotonic() < deadline:
                with contextlib.suppress(psutil.Error, ProcessLookupError):
                    tree = [psutil.Process(job.pid), *psutil.Process(job.pid).children(recursive=True)]
                    procs.update((p.pid, p) for p in tree)
                    seen |= shm_mapped_by([p.pid for p in tree])
                    if ending != "normal" and not interrupted and seen and any(
                            p.name().startswith("VLLM::Worker") for p in tree) and (
                            ending != "engine-dies" or "sampling " in (tmp_path / "log.txt").read_text()):
                        if ending == "ctrl-c":
                            os.killpg(job.pid, signal.SIGINT)
                        elif ending == "sigterm":
                            os.kill(job.pid, signal.SIGTERM)
                        else:
                            os.kill(next(p.pid for p in tree if p.name().startswith("VLLM::Worker")), signal.SIGILL)
                        interrupted = True
                time.sleep(0.5)
            log = (tmp_path / "log.txt").read_text()
            deaths = [line for line in log.splitlines() if "died unexpectedly" in line or "exit code" in line]
            log_tail = "\n".join(deaths[-5:]) + "\n...\n" + log[-4000:]  # how an engine worker ended, if one did
            if ending == "normal" and attempt < 2 and job.poll() == 1 and "rerun to resume" in log:
                print(f"engine died mid-job, rerunning as the job says:\n{log_tail}")
                continue
            break
        if ending == "sigterm":  # the CLI unwound (its clean-up ran) rather than dying at once
            assert interrupted and job.poll() == 143 and "stopped by SIGTERM" in log, log_tail
        elif ending == "ctrl-c":
            assert interrupted and job.poll() not in (None, 0), log_tail
        elif ending == "engine-dies":
            assert interrupted and job.poll() == 1 and "rerun to resume" in log, log_tail
            assert "Fatal Python error: Illegal instruction" in log, log_tail
            out = tmp_path / "samples.jsonl"
            assert not out.exists() or len(out.read_text().splitlines()) < 2 * n_prompts, "killed after the job's end"
        else:
            assert job.poll() == 0, log_tail
        wait_for(lambda: not [p for p in procs.values() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE],
                 timeout=60, what="the job's processes to exit")
        assert seen, "the engines were never seen mapping a segment: nothing was checked"
        left = seen & shm_segments()
        assert not left - shm_mapped_by(None), (
            f"segments the job's processes mapped are left in {SHM_DIR}: {sorted(left)} "
            f"(new since the start: {sorted(shm_segments() - before)})")
    finally:
        if job is not None and job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
        remove_stale_shm(seen)  # what a failed run left
