"""A copy of the installed ``openrlhf`` with the series in ``patches/`` applied (``test_patches``,
``test_patch_ckpt``, ``test_patch_vllm``), and what running it in a subprocess needs."""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
from pathlib import Path

from .runs import REPO

PATCH_DIR = REPO / "patches"
PATCHES = sorted(PATCH_DIR.glob("*.patch"))

# Rendezvous variables a launcher (torchrun, deepspeed) would set; stripped from the parent environment.
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def installed_openrlhf() -> Path:
    spec = importlib.util.find_spec("openrlhf")
    assert spec is not None and spec.submodule_search_locations, "openrlhf is not installed"
    return Path(list(spec.submodule_search_locations)[0])


def run_git(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    # GIT_CEILING_DIRECTORIES: never let git treat an enclosing repository as the target.
    env = {**os.environ, "GIT_CEILING_DIRECTORIES": str(cwd.parent)}
    return subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True)


def patched_copy(root: Path) -> Path:
    """A copy of the installed openrlhf package under ``root`` with every patch applied in order; returns ``root``."""
    shutil.copytree(installed_openrlhf(), root / "openrlhf", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for patch in PATCHES:
        check = run_git(["apply", "--check", "--verbose", str(patch)], root)
        assert check.returncode == 0, f"{patch.name} does not apply cleanly:\n{check.stderr}"
        applied = run_git(["apply", str(patch)], root)
        assert applied.returncode == 0 and not applied.stderr.strip(), f"{patch.name}:\n{applied.stderr}"
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
