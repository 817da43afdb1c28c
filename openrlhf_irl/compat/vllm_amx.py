"""AMX permission for vLLM's CPU kernels (vLLM 0.29.0, x86 CPUs with AMX).

Linux lets a process use the AMX tile registers only after it asked for them
(``arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)``); a thread that executes a tile instruction before that is
killed with SIGILL. vLLM chooses its AMX kernels from the CPUID flag alone (``torch.cpu._is_amx_tile_supported()``:
the bf16 attention's ``amx`` ISA, the small-GEMM kernels) and never asks. In a bf16 engine the permission comes as a
side effect: oneDNN asks on its first ISA check, which the first bf16 linear layer of the first forward makes
(``at::native::cpublas::brgemm``), just before the first attention. Where the request fails (Linux refuses it while any thread of
the process has an alternate signal stack too small for the AMX state, e.g. one sized by the old 8 KiB
``SIGSTKSZ``), oneDNN falls back quietly and vLLM's attention then dies with SIGILL.

:func:`ensure_amx_permission` makes the request up front, in every vLLM process (through :mod:`.vllm_plugin`, before any
model runs). If Linux refuses, vLLM is told the CPU has no AMX (the two ``torch.cpu`` probes it reads return False in
that process), so it picks its AVX-512 kernels instead of dying. The upstream fix is for vLLM's CPU platform to call
``torch.cpu._init_amx()`` before choosing an AMX kernel.
"""

from __future__ import annotations

import logging

import torch

_log = logging.getLogger(__name__)

GRANTED, REFUSED, NO_AMX = "granted", "refused", "no-amx"


def ensure_amx_permission() -> str:
    """Ask Linux for the AMX tile state for this process. Returns :data:`GRANTED` (now or earlier), :data:`NO_AMX`
    (the CPU has no AMX: nothing to do) or :data:`REFUSED` (vLLM is then told the CPU has no AMX)."""
    if not torch.cpu._is_amx_tile_supported():
        return NO_AMX
    if torch.cpu._init_amx():  # torch: ARCH_GET_XCOMP_PERM, then ARCH_REQ_XCOMP_PERM if not yet granted
        return GRANTED
    torch.cpu._is_amx_tile_supported = _no_amx
    torch.cpu._is_amx_fp16_supported = _no_amx
    _log.warning("Linux refused this process the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM); vLLM's CPU kernels "
                 "run without AMX here instead of dying with SIGILL")
    return REFUSED


def _no_amx() -> bool:
    return False
