"""Push the training policy's weights into OpenRLHF's vLLM engines (``RolloutRayActor`` + ``WorkerWrap``).

The engine side is OpenRLHF's: ``init_process_group`` joins a group with DeepSpeed rank 0,
``update_weight(name, dtype, shape)`` receives one tensor by broadcast from rank 0 and ``update_weight_cuda_ipc``
opens a CUDA IPC handle of a tensor living on the same GPU; both hand ``(name, tensor)`` to vLLM's
``model.load_weights``. This module is the trainer side for an SFT process (OpenRLHF's own sender lives inside its
PPO Ray actor): it walks the parameters once per sync, gathering ZeRO-3 shards and folding LoRA adapters in, so
the engines always hold plain HF-named weights of the current policy.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.nn as nn

from openrlhf_irl.utils.distributed import free_port, rank_and_world

WEIGHT_SYNC_MODES = ("nccl", "cuda_ipc")


def resolve_weight_sync(mode: str) -> str:
    """``auto`` -> ``cuda_ipc`` with CUDA (engines colocated on the training GPUs), else ``nccl`` (the broadcast
    group: NCCL on GPUs, gloo on CPU through the CPU layer); other names pass through."""
    if mode == "auto":
        return "cuda_ipc" if torch.cuda.is_available() else "nccl"
    if mode == "cuda_ipc" and not torch.cuda.is_available():
        raise ValueError("--irl.vllm_weight_sync cuda_ipc needs CUDA GPUs shared with the engines; on this machine "
                         "use 'nccl' (a broadcast group: gloo on CPU) or 'auto'")
    return mode


def _gathered(params: Sequence[nn.Parameter], zero_stage: int):
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(params), enabled=zero_stage == 3)


def _lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a dependency of OpenRLHF
        return {}
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def _export_plan(model: nn.Module) -> list[tuple[str, nn.Parameter, Optional[nn.Module]]]:
    """``(exported name, parameter, owning LoRA layer or None)`` for every tensor :func:`policy_weights` yields."""
    model = getattr(model, "module", model)  # DeepSpeed engine
    if hasattr(model, "get_base_model"):  # peft.PeftModel
        model = model.get_base_model()
    lora = _lora_layers(model)
    plan = []
    for name, param in model.named_parameters():
        if ".lora_" in name or ".original_module." in name:
            continue
        owner, _, leaf = name.rpartition(".")
        layer_name = owner[: -len(".base_layer")] if owner.endswith(".base_layer") else None
        if layer_name in lora:
            plan.append((f"{layer_name}.{leaf}", param, lora[layer_name]))
        elif ".modules_to_save." in name:
            head, _, tail = name.partition(".modules_to_save.")
            plan.append((f"{head}.{tail.split('.', 1)[1]}", param, None))
        else:
            plan.append((name, param, None))
    return plan


def _lora_delta(layer: nn.Module) -> Optional[torch.Tensor]:
    if getattr(layer, "merged", False) or getattr(layer, "disable_adapters", False):
        return None
    deltas = [layer.get_delta_weight(a) for a in layer.active_adapters if a in layer.lora_A]
    return sum(deltas) if deltas else None


def policy_weights(model: nn.Module, *, zero_stage: int = 0, dtype: Optional[torch.dtype] = None
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, full tensor)`` of the HF model under ``model``, named as ``merge_and_unload()`` names them.

    * A PEFT model yields the base model's names; a LoRA layer's weight is ``W + get_delta_weight()`` (computed,
      the module is not modified) and the adapter matrices are not yielded.
    * Under ZeRO-3 each parameter (with a LoRA layer's adapters) is gathered while it is yielded: every rank must
      iterate, in the same order; ranks other than 0 may ignore the values.
    * Tensors are detached; ``dtype`` casts them to the engines' dtype.
    """
    yield from _export(_export_plan(model), zero_stage, dtype)


def _export(plan, zero_stage: int, dtype: Optional[torch.dtype]) -> Iterator[tuple[str, torch.Tensor]]:
    for name, param, layer in plan:
        gathered = [param] if layer is None else list(layer.parameters())
        with _gathered(gathered, zero_stage), torch.no_grad():
            tensor = param.detach()
            if layer is not None and name.endswith(".weight"):
                delta = _lora_delta(layer)
                if delta is not None:
                    tensor = tensor + delta.to(tensor.dtype)
            yield name, tensor.to(dtype) if dtype is not None else tensor


def openrlhf_broadcast_group(master_address: str, master_port: int, rank: int, world_size: int):
    """OpenRLHF's stateless group as its PPO actor builds it: vLLM's ``PyNcclCommunicator`` on the current GPU, or
    on CPU (through the CPU layer, :mod:`openrlhf_irl.compat.vllm_cpu`) a gloo group, as the engines build theirs."""
    from openrlhf.utils.distributed_util import stateless_init_process_group

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return stateless_init_process_group(master_address, master_port, rank, world_size, device)


def node_ip() -> str:
    import ray

    return ray.util.get_node_ip_address()


class EngineWeightSync:
    """Trainer side of the weight push to ``engines`` (Ray handles of OpenRLHF ``RolloutRayActor``s).

    ``mode="nccl"``: engines on GPUs of their own (or CPU engines); DeepSpeed rank 0 and every engine worker form
    one group (rank 0 = trainer, engine ``i`` worker ``k`` = ``1 + i * tp + k``) and rank 0 broadcasts each tensor;
    the last tensor of a push carries ``empty_cache=True`` (CPU engines apply the whole push then).
    ``mode="cuda_ipc"``: engines share the training GPUs; every rank exports an IPC handle of its copy and each
    engine worker opens the one on its own GPU (OpenRLHF's colocated path).

    ``group_factory(master_address, master_port, rank, world_size)`` builds the sender's group in nccl mode; it
    returns an object with ``broadcast(tensor, src=0, stream=None)``.
    """

    def __init__(self, engines: Sequence, *, tensor_parallel_size: int = 1, mode: str = "nccl",
                 engine_dtype: Optional[torch.dtype] = None, group_factory: Callable = openrlhf_broadcast_group,
                 reset_prefix_cache: bool = True):
        if mode not in WEIGHT_SYNC_MODES:
            raise ValueError(f"weight sync mode must be one of {WEIGHT_SYNC_MODES}, got {mode!r}")
        self.engines = list(engines)
        self.mode = mode
        if engine_dtype is None:  # the dtype this process starts its engines in (bf16, or fp32 where bf16 is emulated)
            from openrlhf_irl.compat.param_dtype import engine_dtype as run_dtype, torch_dtype

            engine_dtype = torch_dtype(run_dtype()) if not torch.cuda.is_available() else torch.bfloat16
        self.engine_dtype = engine_dtype
        self.reset_prefix_cache = reset_prefix_cache
        self._group = None
        if mode == "nccl" and rank_and_world()[0] == 0:
            import ray

            address, port = node_ip(), free_port()
            world_size = len(self.engines) * tensor_parallel_size + 1
            refs = [
                engine.init_process_group.remote(address, port, 1 + i * tensor_parallel_size, world_size,
                                                 "openrlhf_irl", "nccl", False)
                for i, engine in enumerate(self.engines)
            ]
            self._group = group_factory(address, port, 0, world_size)
            ray.get(refs)
        self._barrier()

    @staticmethod
    def _barrier() -> None:
        if torch.distributed.is_initialized():
            torch.distributed.barrier()

    def push(self, model: nn.Module, *, zero_stage: int = 0) -> int:
        """Send the current weights of ``model`` to every engine; collective over the training ranks.

        Returns the number of tensors sent.
        """
        import ray

        plan = _export_plan(model)
        total = len(plan)
        rank_0 = rank_and_world()[0] == 0
        if self.mode == "nccl" and not rank_0 and zero_stage != 3:
            self._barrier()  # only rank 0 sends, and nothing needs gathering
            return total
        cache_refs = [e.reset_prefix_cache.remote() for e in self.engines] if rank_0 and self.reset_prefix_cache else []
        for count, (name, tensor) in enumerate(_export(plan, zero_stage, self.engine_dtype), 1):
            last = count == total
            if self.mode == "cuda_ipc":
                self._push_ipc(name, tensor, last)
            elif rank_0:
                refs = [e.update_weight.remote(name, dtype=tensor.dtype, shape=tuple(tensor.shape), empty_cache=last)
                        for e in self.engines]
                stream = torch.cuda.current_stream() if tensor.is_cuda else None
                self._group.broadcast(tensor.contiguous(), src=0, stream=stream)
                ray.get(refs)
        if cache_refs:
            ray.get(cache_refs)
        self._barrier()
        return total

    def _push_ipc(self, name: str, tensor: torch.Tensor, last: bool) -> None:
        import ray
        from openrlhf.trainer.ray.utils import get_physical_gpu_id
        from torch.multiprocessing.reductions import reduce_tensor

        weight = tensor.clone()  # a private copy: gathered ZeRO-3 storage is released after the yield
        handles = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(handles, {get_physical_gpu_id(): reduce_tensor(weight)})
        if rank_and_world()[0] == 0:
            by_gpu = {gpu: handle for h in handles for gpu, handle in h.items()}
            ray.get([e.update_weight_cuda_ipc.remote(name, dtype=weight.dtype, shape=tuple(weight.shape),
                                                     ipc_handles=by_gpu, empty_cache=last) for e in self.engines])
        torch.distributed.barrier()
        torch.cuda.synchronize()
