"""Run as a script (``python -m helpers.amx_probe MODE [MODEL]``, ``tests/`` on ``PYTHONPATH``): a fresh process that
reports, as one JSON line, what vLLM's AMX choices and Linux's AMX permission are after ``MODE``:

- ``plugin``: vLLM's general plugins are loaded (as every vLLM process does at start); no model runs.
- ``generate``: a bf16 vLLM engine runs in this process on ``MODEL`` and samples a few tokens.

With ``--small-altstack`` the main thread first installs a 4 KiB alternate signal stack, which makes Linux refuse
AMX permission to the whole process (the AMX signal frame does not fit), as a library with an old fixed-size
``SIGSTKSZ`` stack would."""

from __future__ import annotations

import ctypes
import json
import os
import sys

_LIBC = ctypes.CDLL(None, use_errno=True)
_SYS_ARCH_PRCTL, _ARCH_GET_XCOMP_PERM, _XTILEDATA = 158, 0x1022, 18


def amx_permitted() -> bool:
    """Whether this process may use the AMX tile data state (``arch_prctl(ARCH_GET_XCOMP_PERM)``)."""
    mask = ctypes.c_ulong(0)
    if _LIBC.syscall(_SYS_ARCH_PRCTL, _ARCH_GET_XCOMP_PERM, ctypes.byref(mask)) != 0:
        raise OSError(ctypes.get_errno(), "arch_prctl(ARCH_GET_XCOMP_PERM) failed")
    return bool(mask.value & (1 << _XTILEDATA))


class _StackT(ctypes.Structure):
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


_ALTSTACK = ctypes.create_string_buffer(4096)


def install_small_altstack() -> None:
    stack = _StackT(ctypes.cast(_ALTSTACK, ctypes.c_void_p), 0, len(_ALTSTACK))
    if _LIBC.sigaltstack(ctypes.byref(stack), None) != 0:
        raise OSError(ctypes.get_errno(), "sigaltstack failed")


def main(argv: list[str]) -> None:
    if "--small-altstack" in argv:
        install_small_altstack()
        argv = [a for a in argv if a != "--small-altstack"]
    mode = argv[0]
    report = {"permitted_at_start": amx_permitted()}
    os.environ.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", TORCHDYNAMO_DISABLE="1", VLLM_CPU_KVCACHE_SPACE="1")
    import torch

    if mode == "plugin":
        from vllm.plugins import load_general_plugins
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        load_general_plugins()
        report["attention_isa_bf16"] = _get_attn_isa(torch.bfloat16, 32)
    else:
        from vllm import LLM, SamplingParams

        llm = LLM(model=argv[1], dtype="bfloat16", enforce_eager=True, enable_chunked_prefill=False,
                  max_model_len=128, seed=0)
        out = llm.generate(["User: count from 3\nAssistant:"] * 2, SamplingParams(max_tokens=6, seed=1))
        report["tokens"] = [len(o.outputs[0].token_ids) for o in out]
    report["permitted"] = amx_permitted()
    report["amx_reported"] = torch.cpu._is_amx_tile_supported()
    print("AMX_PROBE " + json.dumps(report), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
