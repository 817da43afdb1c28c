"""Run OpenRLHF 0.11.2 on machines without CUDA.

OpenRLHF assumes CUDA in three places (see ``patches/0002-*.patch`` for the upstream fix):
flash-attn imports at module top, ``DeepspeedStrategy.setup_distributed`` (``torch.cuda.set_device``,
NCCL, a "cuda" device mesh) and a handful of ``torch.cuda`` calls in the strategy's helpers.
:func:`activate` bridges them at run time. It is a no-op when CUDA is present, when
``OPENRLHF_IRL_COMPAT=0``, or for an OpenRLHF version it was not written for.

A DeepSpeed op's build lock left by a killed process is recovered by :mod:`.extension_lock`.

``--ds.param_dtype fp32``/``auto`` (bf16 only where the CPU computes it natively) is :mod:`.param_dtype`.

Its vLLM engine path (engines on a CPU Ray cluster, the weight push) is bridged by :mod:`.vllm_cpu`: the
driver side here, the engine side through the ``vllm.general_plugins`` entry point (:mod:`.vllm_plugin`), which
also has every vLLM process on an AMX CPU ask Linux for the AMX state before vLLM's AMX kernels run (:mod:`.vllm_amx`).
"""

from __future__ import annotations

import logging
import os
from functools import wraps

import torch

from openrlhf_irl.utils.distributed import free_port

from .versions import SUPPORTED

SUPPORTED_OPENRLHF_VERSIONS = SUPPORTED["openrlhf"][1]  # the table in .versions (OpenRLHF and vLLM)
ENV_SWITCH = "OPENRLHF_IRL_COMPAT"

_log = logging.getLogger(__name__)
_state = {"active": False}


def is_active() -> bool:
    return _state["active"]


def _openrlhf_version() -> str | None:
    from .versions import installed

    return installed("openrlhf")


def needed() -> bool:
    """True when this machine has no CUDA and the layer is enabled for the installed OpenRLHF."""
    if os.environ.get(ENV_SWITCH, "1") == "0" or torch.cuda.is_available():
        return False
    ver = _openrlhf_version()
    if ver not in SUPPORTED_OPENRLHF_VERSIONS:
        _log.warning("openrlhf_irl.compat not activated: openrlhf %s is installed; the CPU layer supports openrlhf "
                     "%s", ver, " or ".join(SUPPORTED_OPENRLHF_VERSIONS))
        return False
    return True


def activate() -> bool:
    """Install the CPU layer once (idempotent). Returns whether it is active. A JIT extension lock that a killed
    process left no longer hangs later jobs (:mod:`.extension_lock`), with or without CUDA."""
    if _state["active"]:
        return True
    if os.environ.get(ENV_SWITCH, "1") != "0":
        from . import extension_lock

        extension_lock.install()
    if not needed():
        return False
    from . import flash_attn_standin, param_dtype

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from .vllm_cpu import DRIVER_PATCHES, install_import_hooks

    flash_attn_standin.install()
    _make_cuda_device_calls_harmless()
    _patch_strategy()
    param_dtype.patch_convert_to_torch_dtype()  # --ds.param_dtype fp32 (the parser side: param_dtype.accepting_fp32)
    install_import_hooks(DRIVER_PATCHES)  # applied when OpenRLHF's vLLM modules are imported
    _state["active"] = True
    return True


def _make_cuda_device_calls_harmless() -> None:
    # Without CUDA these calls raise; OpenRLHF uses them for placement and syncs, which mean "the CPU" here.
    torch.cuda.set_device = lambda device: None
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.empty_cache = lambda: None


def init_cpu_process_group(timeout=None) -> None:
    """Start torch.distributed on gloo (single process when no launcher set the rendezvous variables)."""
    import deepspeed
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port("127.0.0.1")))
    kwargs = {"dist_backend": "gloo", "auto_mpi_discovery": False}
    if timeout is not None:
        kwargs["timeout"] = timeout
    deepspeed.init_distributed(**kwargs)


def _patch_strategy() -> None:
    from torch.distributed.device_mesh import init_device_mesh

    import openrlhf.utils.deepspeed.deepspeed as ds_module

    strategy_cls = ds_module.DeepspeedStrategy
    if getattr(strategy_cls, "_openrlhf_irl_cpu", False):
        return

    @wraps(init_device_mesh)
    def cpu_device_mesh(device_type, *args, **kwargs):
        return init_device_mesh("cpu" if device_type == "cuda" else device_type, *args, **kwargs)

    ds_module.init_device_mesh = cpu_device_mesh

    setup_distributed = strategy_cls.setup_distributed

    @wraps(setup_distributed)
    def setup_distributed_cpu(self, *args, **kwargs):
        init_cpu_process_group(kwargs.get("timeout", args[0] if args else None))
        return setup_distributed(self, *args, **kwargs)

    get_ds_train_config = strategy_cls.get_ds_train_config

    @wraps(get_ds_train_config)
    def get_ds_train_config_cpu(self, *args, **kwargs):
        config = get_ds_train_config(self, *args, **kwargs)
        optimizer = config.get("optimizer")
        if optimizer and "adam" in optimizer.get("type", "").lower():
            # DeepSpeed's FusedAdam needs a CUDA build; torch's AdamW is the CPU equivalent.
            optimizer.setdefault("params", {})["torch_adam"] = True
        return config

    strategy_cls.setup_distributed = setup_distributed_cpu
    strategy_cls.get_ds_train_config = get_ds_train_config_cpu
    strategy_cls._openrlhf_irl_cpu = True
