"""A JIT extension lock left by a killed process no longer hangs the next job (compat.extension_lock).

Seen in a full test run: a job killed while DeepSpeed loaded ``deepspeed_shm_comm`` left its ``lock`` file, and
every later DeepSpeed job of the run waited on it until its timeout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

OWNER = textwrap.dedent("""
    import sys, time
    from openrlhf_irl.compat.extension_lock import FlockBaton
    baton = FlockBaton(sys.argv[1])
    assert baton.try_acquire()
    print("owned", flush=True)
    time.sleep(300)
""")

WAITER = textwrap.dedent("""
    import sys
    from openrlhf_irl.compat import extension_lock
    from torch.utils import cpp_extension
    assert extension_lock.install()
    baton = cpp_extension.FileBaton(sys.argv[1])  # what torch's JIT load builds
    if sys.argv[2] == "acquire":
        print("acquired" if baton.try_acquire() else "busy", flush=True)
    else:
        baton.wait()
        print("done", flush=True)
""")


def _start_owner(lock: str) -> subprocess.Popen:
    owner = subprocess.Popen([sys.executable, "-c", OWNER, lock], stdout=subprocess.PIPE, text=True)
    assert owner.stdout.readline().strip() == "owned"
    return owner


def _age(lock: str, seconds: float = 30.0) -> None:
    then = time.time() - seconds
    os.utime(lock, (then, then))


def _waiter(lock: str, mode: str, timeout: float):
    return subprocess.run([sys.executable, "-c", WAITER, lock, mode], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("mode", ["wait", "acquire"])
def test_a_killed_owners_lock_is_recovered(tmp_path, mode):
    lock = str(tmp_path / "lock")
    owner = _start_owner(lock)
    owner.send_signal(signal.SIGKILL)
    owner.wait()
    assert os.path.exists(lock)  # what torch's own baton leaves: every later waiter would poll forever
    _age(lock)
    try:
        out = _waiter(lock, mode, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("the waiter hung on a dead owner's lock file")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ("done" if mode == "wait" else "acquired")
    assert os.path.exists(lock) == (mode == "acquire")  # taken over: still the lock file, now the waiter's


@pytest.mark.parametrize("mode", ["wait", "acquire"])
def test_a_live_owners_lock_is_respected_however_old(tmp_path, mode):
    lock = str(tmp_path / "lock")
    owner = _start_owner(lock)
    try:
        _age(lock)  # a long build: old, but its owner is alive
        if mode == "acquire":
            out = _waiter(lock, mode, timeout=60)
            assert out.returncode == 0 and out.stdout.strip() == "busy", out.stderr
        else:
            with pytest.raises(subprocess.TimeoutExpired):
                _waiter(lock, mode, timeout=8)
        assert os.path.exists(lock)
    finally:
        owner.kill()
        owner.wait()


def test_an_unheld_lock_is_taken_only_when_it_cannot_be_a_live_owners(tmp_path):
    """Between torch's O_EXCL create and the flock the file is unheld for an instant: a young file is waited for.
    An unmarked file may be a live torch process without this module building the op: waited for much longer."""
    from openrlhf_irl.compat.extension_lock import MARK, UNMARKED_STALE_AFTER_S, FlockBaton

    lock = tmp_path / "lock"
    lock.write_bytes(MARK)
    assert not FlockBaton(str(lock)).try_acquire()  # young
    _age(str(lock))
    baton = FlockBaton(str(lock))
    assert baton.try_acquire()  # marked, old, unheld: a dead owner of ours
    baton.release()
    assert not lock.exists()

    lock.write_bytes(b"")  # torch's own baton: an empty file, no flock
    _age(str(lock))
    assert not FlockBaton(str(lock)).try_acquire()  # 30 s old: perhaps still building
    _age(str(lock), UNMARKED_STALE_AFTER_S + 60)
    baton = FlockBaton(str(lock))
    assert baton.try_acquire()
    baton.release()


def test_release_then_acquire_round_trip(tmp_path):
    from openrlhf_irl.compat.extension_lock import FlockBaton

    lock = str(tmp_path / "lock")
    first, second = FlockBaton(lock), FlockBaton(lock)
    assert first.try_acquire() and not second.try_acquire()
    first.release()
    assert not os.path.exists(lock) and second.try_acquire()
    second.release()
