"""The benchmark scripts and vLLM's import probe put torch's, DeepSpeed's and triton's build caches where the CLIs do
(the package's cache), so they leave nothing in $TMPDIR: ``import deepspeed`` or ``import vllm`` alone creates
``$TMPDIR/torchinductor_<user>``."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import REPO

PROBE = """
import runpy, sys
sys.argv = [sys.argv[1], "--help"]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit:
    pass
import deepspeed  # what the benchmark goes on to import through openrlhf and the generation pool
"""


@pytest.mark.parametrize("script", ["sampling.py", "iq_vs_mle.py"])
def test_a_benchmark_leaves_nothing_in_tmpdir(script, tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    env["TMPDIR"] = str(tmp)
    proc = subprocess.run([sys.executable, "-c", PROBE, str(REPO / "benchmarks" / script)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in tmp.iterdir()) == []


def test_the_vllm_probe_leaves_nothing_in_tmpdir(tmp_path):
    """``resolve_backend("auto")`` from a bare process (a user's script) probes vLLM in a child process."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    env["TMPDIR"] = str(tmp)
    code = "from openrlhf_irl.compat.vllm_probe import vllm_status; print(vllm_status())"
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=str(REPO), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "(True, " in proc.stdout or "cannot run" in proc.stdout or "not installed" in proc.stdout, proc.stdout
    assert sorted(p.name for p in tmp.iterdir()) == []
