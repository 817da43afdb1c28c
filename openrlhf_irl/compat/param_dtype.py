"""``--ds.param_dtype fp32`` and ``auto`` for OpenRLHF 0.11.2 (upstream fix: ``patches/0007-param-dtype-fp32.patch``).

On a CPU without bf16 instructions (no ``avx512_bf16`` or ``amx_bf16``) torch emulates bf16: a training step of the
demo's tiny Llama took 19x longer in bf16 than in fp32 on an AVX2-only EPYC (``docs/dtype.md``). OpenRLHF offers
only ``bf16`` and ``fp16``. This module adds, while OpenRLHF's CLIs run on a CPU machine:

* ``fp32`` as a choice of ``--ds.param_dtype``: DeepSpeed then trains in fp32 (it enables neither its ``bf16`` nor its
  ``fp16`` section), ``convert_to_torch_dtype`` maps it to ``torch.float32`` for the actor, reference and reward
  models, and vLLM engines run ``float32``;
* ``auto``, the default here: ``bf16`` where the CPU has native bf16 (or on CUDA), ``fp32`` otherwise (:func:`resolve`).
  An explicit choice always wins.

The resolved value is also exported as ``OPENRLHF_IRL_PARAM_DTYPE`` so that vLLM engines started later in the same
process (PPO rollouts, the online IQ-Learn sampler) run in the training dtype (:func:`engine_dtype`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
from dataclasses import dataclass
from functools import wraps

import torch

FLAG = "--ds.param_dtype"
DEST = "ds.param_dtype"
ENV = "OPENRLHF_IRL_PARAM_DTYPE"
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# OpenRLHF runs its vLLM engines in bfloat16 for bf16 and fp16 training alike; fp32 training gets fp32 engines.
VLLM_DTYPES = {"bf16": "bfloat16", "fp16": "bfloat16", "fp32": "float32"}
ADDED_CHOICES = ("fp32", "auto")


@dataclass(frozen=True)
class Resolved:
    dtype: str  # "bf16", "fp16" or "fp32"
    reason: str


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str] | None:
    """The instruction-set flags of the first CPU in ``cpuinfo``; None where the file cannot be read."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        return None
    return set()


def native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether the CPU computes bf16 natively (AVX512_BF16 or AMX); torch's capability where cpuinfo is missing."""
    flags = cpu_flags(cpuinfo)
    if flags is None:
        return "BF16" in torch.backends.cpu.get_cpu_capability().upper()
    return any(f in flags for f in NATIVE_BF16_FLAGS)


def resolve(choice: str, *, cuda: bool | None = None, cpuinfo: str = "/proc/cpuinfo") -> Resolved:
    """``choice`` (``auto``, ``bf16``, ``fp16`` or ``fp32``) as the dtype that runs, with the reason in words."""
    if choice != "auto":
        if choice not in TORCH_DTYPES:
            raise ValueError(f"{FLAG} {choice!r}: expected one of auto, {', '.join(TORCH_DTYPES)}")
        return Resolved(choice, f"{FLAG} {choice} (explicit)")
    if torch.cuda.is_available() if cuda is None else cuda:
        return Resolved("bf16", "auto: CUDA device")
    if native_bf16(cpuinfo):
        return Resolved("bf16", "auto: this CPU has native bf16 (avx512_bf16 or amx_bf16)")
    return Resolved("fp32", "auto: this CPU has no avx512_bf16 or amx_bf16, so bf16 would be emulated; fp32 instead")


def engine_dtype() -> str:
    """The dtype of vLLM engines started by this process: the resolved ``--ds.param_dtype`` of its run when one was
    parsed (:data:`ENV`), else :func:`resolve` ``("auto")``. Returned as ``bf16``/``fp16``/``fp32``."""
    chosen = os.environ.get(ENV)
    return resolve(chosen).dtype if chosen else resolve("auto").dtype


def vllm_dtype(dtype: str | None = None) -> str:
    """vLLM's name for the engines of a run trained in ``dtype`` (default: :func:`engine_dtype`)."""
    return VLLM_DTYPES[dtype or engine_dtype()]


def torch_dtype(dtype: str) -> torch.dtype:
    return TORCH_DTYPES[resolve(dtype).dtype]


# ------------------------------------------------------------------------------------------------ OpenRLHF's side
def patch_convert_to_torch_dtype() -> None:
    """``openrlhf.utils.utils.convert_to_torch_dtype`` also maps ``fp32`` (actor, reference and reward loaders import
    it from there at call time)."""
    import openrlhf.utils.utils as utils

    original = utils.convert_to_torch_dtype
    if getattr(original, "_openrlhf_irl_fp32", False):
        return

    @wraps(original)
    def convert_to_torch_dtype(param_dtype: str) -> torch.dtype:
        return torch.float32 if param_dtype == "fp32" else original(param_dtype)

    convert_to_torch_dtype._openrlhf_irl_fp32 = True
    utils.convert_to_torch_dtype = convert_to_torch_dtype


def _extend_choices(kwargs: dict) -> dict:
    choices = list(kwargs.get("choices") or ())
    kwargs["choices"] = choices + [c for c in ADDED_CHOICES if c not in choices]
    kwargs["default"] = "auto"
    kwargs["help"] = ("Model data type: bf16, fp16, fp32, or auto (bf16 where the CPU has native bf16 or on CUDA, "
                      "fp32 otherwise; the default)")
    return kwargs


def _resolve_namespace(namespace) -> None:
    choice = getattr(namespace, DEST, None)
    if choice is None:
        return
    resolved = resolve(choice)
    setattr(namespace, DEST, resolved.dtype)
    os.environ[ENV] = resolved.dtype
    _last["resolved"] = resolved


_last: dict = {"resolved": None}


def last_resolved() -> Resolved | None:
    """What the last parse under :func:`accepting_fp32` resolved ``--ds.param_dtype`` to, and why."""
    return _last["resolved"]


@contextlib.contextmanager
def accepting_fp32():
    """While active, a parser that defines ``--ds.param_dtype`` (OpenRLHF's CLIs) accepts ``fp32`` and ``auto``
    (the default), and its parse resolves ``auto`` (:func:`resolve`). Scoped to the OpenRLHF CLI run that needs it."""
    parser_cls = argparse.ArgumentParser
    add_argument, parse_known_args = parser_cls.add_argument, parser_cls.parse_known_args

    @wraps(add_argument)
    def add_argument_fp32(self, *names, **kwargs):
        if FLAG in names:
            kwargs = _extend_choices(dict(kwargs))
        return add_argument(self, *names, **kwargs)

    @wraps(parse_known_args)
    def parse_known_args_fp32(self, args=None, namespace=None):
        parsed, rest = parse_known_args(self, args, namespace)
        if any(FLAG in a.option_strings for a in self._actions):
            _resolve_namespace(parsed)
        return parsed, rest

    parser_cls.add_argument, parser_cls.parse_known_args = add_argument_fp32, parse_known_args_fp32
    try:
        yield
    finally:
        parser_cls.add_argument, parser_cls.parse_known_args = add_argument, parse_known_args
