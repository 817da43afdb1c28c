"""utils.run_dir: a SIGKILLed job's private run directory is removed by the next job, a live one's never, nor
anything this package did not make."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

JOB = ("import sys, time; from openrlhf_irl.utils.run_dir import private_run_dir; "
       "print(private_run_dir(), flush=True); time.sleep(300)")


def _job(tmp):
    proc = subprocess.Popen([sys.executable, "-c", JOB], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "TMPDIR": str(tmp)})
    return proc, proc.stdout.readline().strip()


def _age(path):
    then = time.time() - 3600
    os.utime(path, (then, then))


def test_a_killed_jobs_run_dir_goes_a_live_ones_stays(tmp_path):
    from openrlhf_irl.utils.run_dir import LOCK_NAME, remove_dead_run_dirs

    killed, killed_dir = _job(tmp_path)
    live, live_dir = _job(tmp_path)
    foreign = tmp_path / "oirl_not_ours"  # same prefix, no lock file: not made here
    foreign.mkdir()
    try:
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        (tmp_path / os.path.basename(killed_dir) / "ray").mkdir()  # what a job leaves in it
        for path in (killed_dir, live_dir, foreign):
            _age(path)
        assert os.path.isfile(os.path.join(killed_dir, LOCK_NAME))
        assert remove_dead_run_dirs(str(tmp_path)) == [killed_dir]
        assert not os.path.exists(killed_dir)
        assert os.path.isdir(live_dir) and foreign.is_dir()
    finally:
        live.kill()
        live.wait()
    # killed too, without its exit hook: the next job's first call removes its (aged) directory
    out = subprocess.run([sys.executable, "-c", "from openrlhf_irl.utils import run_dir; "
                          "print(run_dir.private_run_dir())"],
                         capture_output=True, text=True, env={**os.environ, "TMPDIR": str(tmp_path)}, timeout=60)
    assert out.returncode == 0, out.stderr
    assert not os.path.exists(live_dir)
    assert not os.path.exists(out.stdout.strip())  # the new job's own directory, removed at its normal exit
    assert foreign.is_dir()


def test_a_young_dead_dir_is_left_for_later(tmp_path):
    """Between mkdtemp and the flock a directory has no holder for an instant: only old ones are removed."""
    from openrlhf_irl.utils.run_dir import LOCK_NAME, remove_dead_run_dirs

    young = tmp_path / "oirl_young"
    young.mkdir()
    (young / LOCK_NAME).write_text("")
    assert remove_dead_run_dirs(str(tmp_path)) == []
    _age(young)
    assert remove_dead_run_dirs(str(tmp_path)) == [str(young)]
