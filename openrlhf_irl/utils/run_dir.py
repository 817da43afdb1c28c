"""One private temporary directory per process for what Ray and vLLM would otherwise leave in /tmp and ~/.cache.

The directory (``$TMPDIR/oirl_*``) is removed when its process exits. A process killed with SIGKILL (or by the OOM
killer) cannot remove it, so each directory holds a lock file, ``flock``-ed by its process for as long as it lives
(the kernel drops the lock when the process dies): the next job that makes its own run directory removes those
``oirl_*`` directories of this user whose lock file nobody holds and that are older than :data:`STALE_AFTER_S`.
A directory without the lock file (not made here) is never touched.
"""

from __future__ import annotations

import atexit
import fcntl
import os
import shutil
import sys
import tempfile
import time

__all__ = ["private_run_dir", "remove_dead_run_dirs", "PREFIX", "LOCK_NAME"]

PREFIX = "oirl_"
LOCK_NAME = ".openrlhf-irl-run.lock"
STALE_AFTER_S = 60.0
_RUN_DIR: dict = {}


def private_run_dir() -> str:
    """Created on first use and removed when the process exits (short: Ray's socket paths live under it)."""
    if "path" not in _RUN_DIR:
        remove_dead_run_dirs()
        path = tempfile.mkdtemp(prefix=PREFIX)
        fd = os.open(os.path.join(path, LOCK_NAME), os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)  # held until this process ends, however it ends
        _RUN_DIR.update(path=path, lock_fd=fd)
        atexit.register(_remove, path)
    return _RUN_DIR["path"]


def remove_dead_run_dirs(parent: str | None = None, stale_after_s: float = STALE_AFTER_S) -> list[str]:
    """Remove the run directories under ``parent`` (default: the temp dir) left by processes that died without
    their exit hook: ours (the lock file is there), this user's, older than ``stale_after_s``, lock not held."""
    parent = parent or tempfile.gettempdir()
    removed = []
    try:
        names = [n for n in os.listdir(parent) if n.startswith(PREFIX)]
    except OSError:
        return removed
    for name in names:
        path = os.path.join(parent, name)
        lock = os.path.join(path, LOCK_NAME)
        try:
            st = os.lstat(path)
            if not os.path.isdir(path) or os.path.islink(path) or st.st_uid != os.getuid():
                continue
            if time.time() - st.st_mtime < stale_after_s or not os.path.isfile(lock):
                continue
            fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # its process is alive
            os.close(fd)
            continue
        try:
            shutil.rmtree(path, ignore_errors=True)
        finally:
            os.close(fd)
        if not os.path.exists(path):
            removed.append(path)
    return removed


def _remove(path: str) -> None:
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():  # Ray's own exit hook may run after this one: stop it first
        ray.shutdown()
    for _ in range(25):  # processes Ray is still stopping may write a last log line: retry briefly
        shutil.rmtree(path, ignore_errors=True)
        time.sleep(0.2)
        if not os.path.exists(path):
            return
