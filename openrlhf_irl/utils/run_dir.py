"""One private temporary directory per process for what Ray and vLLM would otherwise leave in /tmp and ~/.cache."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
import time

_RUN_DIR: dict[str, str] = {}


def private_run_dir() -> str:
    """Created on first use and removed when the process exits (short: Ray's socket paths live under it)."""
    if "path" not in _RUN_DIR:
        path = tempfile.mkdtemp(prefix="oirl_")
        _RUN_DIR["path"] = path
        atexit.register(_remove, path)
    return _RUN_DIR["path"]


def _remove(path: str) -> None:
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():  # Ray's own exit hook may run after this one: stop it first
        ray.shutdown()
    for _ in range(25):  # processes Ray is still stopping may write a last log line: retry briefly
        shutil.rmtree(path, ignore_errors=True)
        time.sleep(0.2)
        if not os.path.exists(path):
            return
