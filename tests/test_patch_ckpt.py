"""Checkpoint rotation (``--ckpt.max_num 1``) under a kill during the save: OpenRLHF 0.11.2 deletes the old
checkpoint first and the resume fails; our trainers' ``write_then_retire`` and ``patches/0006`` keep it.

Each case runs ``tests/helpers/ckpt_rotation.py`` in a subprocess: OpenRLHF's real ``DeepspeedStrategy.save_ckpt``
and ``load_ckpt`` on a real DeepSpeed engine (CPU, gloo, one rank), a save interrupted at its first write, a load,
then one more save that rotates. The patched case uses the ``patched_openrlhf`` copy of ``test_patches.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.openrlhf_checkout import LAUNCHER_VARS, PATCH_DIR, free_port, installed_openrlhf, run_git

WORKER = Path(__file__).resolve().parent / "helpers" / "ckpt_rotation.py"
PATCH = PATCH_DIR / "0006-checkpoint-rotation-write-then-retire.patch"


def _run(mode: str, save_dir: Path, pythonpath: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and k != "DS_ACCELERATOR"}
    env.update(CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    if pythonpath:
        env.update(PYTHONPATH=os.pathsep.join([pythonpath, *filter(None, [os.environ.get("PYTHONPATH")])]),
                   OPENRLHF_IRL_COMPAT="0")
    proc = subprocess.run([sys.executable, str(WORKER), mode, str(save_dir), str(free_port())], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_patch_applies_alone_to_pristine_openrlhf(tmp_path):
    import shutil

    shutil.copytree(installed_openrlhf(), tmp_path / "openrlhf", ignore=shutil.ignore_patterns("__pycache__"))
    check = run_git(["apply", "--check", "--verbose", str(PATCH)], tmp_path)
    assert check.returncode == 0, check.stderr
    text = PATCH.read_text()
    assert text.startswith("From ") and "Subject: [PATCH 6/6]" in text and "diff --git a/openrlhf/" in text


@pytest.mark.slow
def test_stock_rotation_loses_the_only_checkpoint(tmp_path):
    got = _run("stock", tmp_path / "ckpt")
    assert got["dirs_before"] == ["global_step2"]
    assert got["dirs_after_crash"] == ["global_step3"]  # the complete one was deleted before the save
    assert got["loaded"] is not True and "AssertionError" in str(got["loaded"])


@pytest.mark.slow
def test_our_trainers_write_then_retire(tmp_path):
    got = _run("ours", tmp_path / "ckpt")
    assert got["dirs_before"] == ["global_step2"]  # max_num=1 still holds after a successful save
    assert got["dirs_after_crash"] == ["global_step2", "global_step3"]
    assert got["loaded"] is True  # the resume finds global_step2 and its weights
    assert got["dirs_after_rotation"] == ["global_step4"]  # the partial global_step3 is retired too


@pytest.mark.slow
def test_patched_openrlhf_writes_then_retires(patched_openrlhf, tmp_path):
    got = _run("patched", tmp_path / "ckpt", str(patched_openrlhf))
    assert got["dirs_before"] == ["global_step2"]
    assert got["dirs_after_crash"] == ["global_step2", "global_step3"]
    assert got["loaded"] is True
    assert got["dirs_after_rotation"] == ["global_step4"]


def test_retire_old_checkpoints_policy(tmp_path):
    """The eviction order (no metric, then worst metric, then oldest; best* protected; the new one kept)."""
    from openrlhf_irl.utils.checkpoint import retire_old_checkpoints

    metrics = {"a": None, "b": 0.5, "c": 0.1, "new": None, "best_x": None}
    for i, name in enumerate(metrics):
        (tmp_path / name).mkdir()
        os.utime(tmp_path / name, (1000 + i, 1000 + i))
    read = lambda p: metrics[os.path.basename(p)]  # noqa: E731
    retire_old_checkpoints(str(tmp_path), "new", 2, 1000, read, log=lambda *a: None)
    assert sorted(os.listdir(tmp_path)) == ["b", "best_x", "new"]  # a (no metric), then c (worse metric) went
    retire_old_checkpoints(str(tmp_path), "new", 0, 1000, read, log=lambda *a: None)
    assert sorted(os.listdir(tmp_path)) == ["best_x", "new"]
