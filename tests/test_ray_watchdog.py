"""The sampling job's watchdog: a SIGKILLed job's Ray processes are shut down, a clean exit leaves them alone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import psutil
import pytest

JOB = textwrap.dedent("""
    import subprocess, sys, time
    from openrlhf_irl.utils.ray_watchdog import start_watchdog
    session = sys.argv[1]
    # a stand-in for raylet (names the session) and one for ray::DashboardAgent (renamed, only a known child)
    named = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "--session-name=" + session],
                             start_new_session=True)
    agent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    dog = start_watchdog(session)
    print(named.pid, agent.pid, flush=True)
    if sys.argv[2] == "release":
        dog.release()
        sys.exit(0)
    time.sleep(120)
""")


@pytest.mark.parametrize("ending", ["sigkill", "release"])
def test_watchdog(ending):
    session = f"session_test_{os.getpid()}_{ending}"
    job = subprocess.Popen([sys.executable, "-c", JOB, session, ending], stdout=subprocess.PIPE, text=True)
    pids = [int(x) for x in job.stdout.readline().split()]
    procs = [psutil.Process(pid) for pid in pids]
    try:
        if ending == "sigkill":
            job.send_signal(signal.SIGKILL)
            job.wait()
            _, alive = psutil.wait_procs(procs, timeout=20)
            assert not alive
        else:
            assert job.wait(timeout=30) == 0
            _, alive = psutil.wait_procs(procs, timeout=2)
            assert len(alive) == 2  # a clean exit: the job's own shutdown is trusted, nothing is killed
    finally:
        for p in procs:
            try:
                p.kill()
            except psutil.Error:
                pass
        job.kill()


def test_no_watchdog_without_a_session():
    from openrlhf_irl.utils.ray_watchdog import start_watchdog

    assert start_watchdog(None) is None and start_watchdog("not-a-session") is None
