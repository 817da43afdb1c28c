"""AMX permission for vLLM 0.29's CPU kernels (the facts and the test: docs/cpu_layer.md, "AMX permission").

vLLM runs AMX tile instructions where the CPUID flag says AMX (``torch.cpu._is_amx_tile_supported()``) without ever
asking Linux for the AMX state, which Linux requires per process (else SIGILL). :func:`ensure_amx_permission` asks
at the start of each vLLM process (:mod:`.vllm_plugin`); if Linux refuses, vLLM is told the CPU has no AMX.
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
    if torch.cpu._init_amx():  # arch_prctl(ARCH_REQ_XCOMP_PERM): also succeeds when granted before
        return GRANTED
    torch.cpu._is_amx_tile_supported = _no_amx
    torch.cpu._is_amx_fp16_supported = _no_amx
    _log.warning("Linux refused this process the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM); vLLM's CPU kernels "
                 "run without AMX here instead of dying with SIGILL")
    return REFUSED


def _no_amx() -> bool:
    return False
