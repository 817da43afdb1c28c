"""Shut down the local Ray instance a job started, even when the job is killed with SIGKILL.

:func:`start_watchdog` spawns a small process (in its own session, so a kill of the job's process group
spares it) that holds the read end of a pipe from the job. When the job ends normally it writes ``done`` first
and the watchdog exits; when the pipe closes without it (the job died), the watchdog terminates every process
whose command line names the job's Ray session (``session_<date>_<pid>``: GCS, raylet, workers) and every
descendant the job had when the watchdog started (the Ray agents rename themselves ``ray::DashboardAgent``,
``ray::RuntimeEnvAgent`` and outlive a killed driver), then kills what is left after a grace period.
"""

from __future__ import annotations

import subprocess
import sys
from typing import IO, Optional, Sequence, Tuple

__all__ = ["start_watchdog", "current_ray_session", "kill_session_processes", "terminate_then_kill"]

_SCRIPT = """
import sys
from openrlhf_irl.utils.ray_watchdog import kill_session_processes
data = sys.stdin.buffer.read()
if not data.endswith(b"done"):
    kill_session_processes(sys.argv[1], [tuple(map(float, p.split(":"))) for p in sys.argv[2:]])
"""


def current_ray_session() -> Optional[str]:
    """The session name (``session_...``) of the Ray instance this process is connected to, None if unknown."""
    try:
        import os

        import ray

        node = ray._private.worker.global_worker.node
        return os.path.basename(node.get_session_dir_path().rstrip("/"))
    except Exception:  # pragma: no cover - Ray internals moved: no watchdog rather than no job
        return None


def kill_session_processes(session: str, known: Sequence[Tuple[float, float]] = (), grace_s: float = 5.0) -> int:
    """Terminate (then kill) the processes whose command line contains ``session`` and the ``known``
    ``(pid, create_time)`` ones still alive (the create time guards against a reused pid); returns how many."""
    import os

    import psutil

    me = os.getpid()
    started = {int(pid): t for pid, t in known}
    procs = []
    for proc in psutil.process_iter(["pid", "cmdline", "create_time"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or ())
        except (psutil.Error, TypeError):
            continue
        pid = proc.info["pid"]
        if pid == me:
            continue
        if session in cmdline or (pid in started and abs(started[pid] - proc.info["create_time"]) < 0.01):
            procs.append(proc)
    return terminate_then_kill(procs, grace_s)


def terminate_then_kill(procs, grace_s: float = 5.0) -> int:
    """SIGTERM every ``psutil.Process`` in ``procs``, SIGKILL those alive after ``grace_s``; returns how many."""
    import psutil

    for proc in procs:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=grace_s)
    return len(procs)


class Watchdog:
    """Handle of a running watchdog; :meth:`release` tells it the job ended cleanly."""

    def __init__(self, proc: subprocess.Popen, pipe: IO[bytes]) -> None:
        self.proc, self.pipe = proc, pipe

    def release(self) -> None:
        try:
            self.pipe.write(b"done")
            self.pipe.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover
            self.proc.kill()


def start_watchdog(session: Optional[str]) -> Optional[Watchdog]:
    """Watch the Ray ``session`` on behalf of this process; None when there is nothing to watch."""
    if not session or not session.startswith("session_"):
        return None
    import psutil

    known = []
    for child in psutil.Process().children(recursive=True):
        try:
            known.append(f"{child.pid}:{child.create_time()}")
        except psutil.Error:
            pass
    proc = subprocess.Popen([sys.executable, "-c", _SCRIPT, session, *known], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            close_fds=True)
    return Watchdog(proc, proc.stdin)
