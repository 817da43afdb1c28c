"""OpenRLHF 0.11.2's Ray PPO flow (``openrlhf.cli.train_ppo_ray``) on a machine without CUDA.

What the vLLM engine side needs is in :mod:`.vllm_cpu`; this module covers the rest of the flow
(docs/cpu_layer.md#ppo-on-cpu; ``patches/0005-*`` is the upstream fix):

* the placement groups and ``RayActorGroup`` ask Ray for ``GPU`` resources: :func:`ray_init_kwargs` starts the local
  Ray instance with as many *logical* GPUs as the flow reserves (:func:`required_gpus`; one DeepSpeed process
  each), because with too few Ray waits forever without an error;
* ``NaiveReplayBuffer.__init__`` builds ``torch.device(f"cuda:{torch.cuda.current_device()}")``;
* ``PolicyModelActor.broadcast_to_vllm`` passes ``torch.cuda.current_stream()`` (the gloo group needs none), the EMA
  update moves weights to ``"cuda"``, and the actors call ``torch.cuda.{current_device,empty_cache,synchronize}``
  (made harmless by :func:`openrlhf_irl.compat.activate`);
* DeepSpeed's CPU accelerator JIT-builds its ops into ``TORCH_EXTENSIONS_DIR`` and triton writes to ``TRITON_HOME``,
  both under HOME by default: :func:`worker_env` points them at a cache inside the repository's ``outputs/``.

Every PPO model lives in a Ray actor process that OpenRLHF creates, so the patches must run *there*, not only in
the driver. Ray's ``runtime_env={"worker_process_setup_hook": "<module>.<function>"}`` (Ray 2.55; it travels as an
environment variable merged into every actor's ``env_vars``) calls :func:`setup_worker` when each worker process
starts, before any actor is created in it: this reaches every actor of the job, including the ones OpenRLHF
creates with its own ``runtime_env``. The vLLM worker subprocesses are reached by the vLLM plugin instead.
"""

from __future__ import annotations

import os
import uuid
from functools import wraps
from pathlib import Path

import torch

from openrlhf_irl import compat
from openrlhf_irl.utils.reaper import RUN_TAG_ENV  # the job's tag (its processes' clean-up is in utils.reaper)
from openrlhf_irl.utils.cache_dir import CACHE_ENV, build_cache_env
from openrlhf_irl.utils.cache_dir import cache_dir as package_cache_dir

from .vllm_cpu import install_import_hooks, patch_methods

SETUP_HOOK = "openrlhf_irl.compat.ray_ppo.setup_worker"
EXTRA_HOOK_ENV = "OPENRLHF_IRL_WORKER_HOOK"  # "module.function": a user's own worker setup hook, run after ours


def needed() -> bool:
    return compat.needed()


# ------------------------------------------------------------------------------------------------ in each worker
def setup_worker() -> None:
    """Ray worker setup hook: the CPU layer for every PPO actor process (a no-op where CUDA is present), then the
    hook ``OPENRLHF_IRL_WORKER_HOOK`` names, if any."""
    if compat.activate():
        install()
    extra = os.environ.get(EXTRA_HOOK_ENV)
    if extra:  # Ray takes one setup hook per job: ours, which then runs the user's
        from ray._common.utils import load_class

        load_class(extra)()


def install() -> None:
    """The PPO-specific CPU patches (on top of :func:`openrlhf_irl.compat.activate`)."""
    if not getattr(torch.cuda.current_stream, "_openrlhf_irl", False):
        def current_stream(device=None):  # the gloo broadcast group takes (and ignores) a stream
            return None

        current_stream._openrlhf_irl = True
        torch.cuda.current_stream = current_stream
    install_import_hooks(PPO_PATCHES)


def _replay_buffer_init_cpu(init, self, *args, **kwargs):
    current_device = torch.cuda.current_device
    torch.cuda.current_device = lambda: 0  # only formatted into the device string replaced below
    try:
        init(self, *args, **kwargs)
    finally:
        torch.cuda.current_device = current_device
    self.target_device = torch.device("cpu")


def patch_replay_buffer(module) -> None:
    """``NaiveReplayBuffer.__init__``: its target device is the CPU (it would build ``"cuda:cpu"``)."""
    patch_methods(module.NaiveReplayBuffer, "_openrlhf_irl_cpu", __init__=_replay_buffer_init_cpu)


def _moving_average_cpu(moving_average, self, model, model_ema, beta=0.992, device="cpu"):
    return moving_average(self, model, model_ema, beta, "cpu" if str(device).startswith("cuda") else device)


def patch_strategy_ema(module) -> None:
    """``DeepspeedStrategy.moving_average(..., device="cuda")`` from the PPO actor: the CPU."""
    patch_methods(module.DeepspeedStrategy, "_openrlhf_irl_cpu_ema", moving_average=_moving_average_cpu)


def _save_model_safe(save_model, self, model, tokenizer, output_dir, **kwargs):
    from openrlhf_irl.utils.checkpoint import guarded_save

    return guarded_save(self, lambda *a, **k: save_model(self, *a, **k))(model, tokenizer, output_dir, **kwargs)


def patch_strategy_save(module) -> None:
    """``DeepspeedStrategy.save_model`` in the PPO actors (the final actor/critic save): weights checked finite, the
    model written to a staging folder and moved in, so a failed save leaves the earlier model whole
    (:func:`openrlhf_irl.utils.checkpoint.guarded_save`, what train_sft/train_rm get through the launcher)."""
    patch_methods(module.DeepspeedStrategy, "_openrlhf_irl_safe_save", save_model=_save_model_safe)


def patch_strategy(module) -> None:
    patch_strategy_ema(module)
    patch_strategy_save(module)


PPO_PATCHES = {
    "openrlhf.trainer.ppo_utils.replay_buffer": patch_replay_buffer,
    "openrlhf.utils.deepspeed.deepspeed": patch_strategy,
}


# ------------------------------------------------------------------- placement on a cluster without GPUs (driver)
# OpenRLHF 0.11.2 asks Ray for GPUs wherever it places a model: ``{"GPU": 1, "CPU": 1}`` bundles in
# ``train_ppo_ray.train`` (colocated models) and ``RayActorGroup`` (several processes per model), and
# ``num_gpus=num_gpus_per_actor`` for every actor. A local Ray started by :func:`ray_init_kwargs` gets logical GPUs
# for that; a cluster the job joins (``RAY_ADDRESS``, ``ray job submit``) is used as it is, so on a cluster without
# GPU resources the same placement asks for CPUs only (patch 0005's ``resource_bundle()`` / ``use_gpus()``): bundles
# without their ``GPU`` entry, actors with ``num_gpus=0`` (their ``num_cpus`` unchanged). A cluster that has GPUs
# gets OpenRLHF's placement unchanged. These run in the driver, the only process that places PPO's actors.
def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def gpu_free_bundles(bundles: list[dict]) -> list[dict]:
    return [{k: v for k, v in b.items() if k != "GPU"} or {"CPU": 1} for b in bundles]


def _placement_group_for_cluster(placement_group):
    if getattr(placement_group, "_openrlhf_irl_cpu", False):
        return placement_group

    @wraps(placement_group)
    def placement_group_for_cluster(bundles, *args, **kwargs):
        if not cluster_has_gpus():
            bundles = gpu_free_bundles(bundles)
        return placement_group(bundles, *args, **kwargs)

    placement_group_for_cluster._openrlhf_irl_cpu = True
    return placement_group_for_cluster


class _ActorClassForCluster:
    """An actor class whose ``.options(num_gpus=...)`` asks for no GPU on a cluster without GPUs."""

    def __init__(self, actor_cls):
        self._actor_cls = actor_cls

    def options(self, **kwargs):
        if kwargs.get("num_gpus") and not cluster_has_gpus():
            kwargs["num_gpus"] = 0
        return self._actor_cls.options(**kwargs)

    def __getattr__(self, name):
        if name == "_actor_cls":  # not set yet (a copy being built): no recursion through this method
            raise AttributeError(name)
        return getattr(self._actor_cls, name)


def patch_actor_group(module) -> None:
    """``openrlhf.trainer.ray.launcher``: ``RayActorGroup``'s own bundles and its actors. The group keeps its real
    actor class (it is sent to the PPO controller): the wrapper only stands in while its actors are created."""
    if getattr(module, "_openrlhf_irl_cpu_placement", False):
        return
    module.placement_group = _placement_group_for_cluster(module.placement_group)
    cls = module.RayActorGroup
    initiate = cls._initiate_actors

    @wraps(initiate)
    def _initiate_actors(self, *args, **kwargs):
        actor_cls = self.ray_actor_type
        self.ray_actor_type = _ActorClassForCluster(actor_cls)
        try:
            return initiate(self, *args, **kwargs)
        finally:
            self.ray_actor_type = actor_cls

    cls._initiate_actors = _initiate_actors
    module._openrlhf_irl_cpu_placement = True


def install_driver_placement() -> None:
    """The placement patches, in the driver: Ray's ``placement_group`` as ``train_ppo_ray`` imports it (it runs as
    ``__main__``, so only the function it imports can be reached) and ``RayActorGroup``."""
    import importlib

    pg_module = importlib.import_module("ray.util.placement_group")  # ``ray.util.placement_group`` is the function
    pg_module.placement_group = _placement_group_for_cluster(pg_module.placement_group)
    install_import_hooks({"openrlhf.trainer.ray.launcher": patch_actor_group})


# ---------------------------------------------------------------------------------------------------- the driver
def worker_env(cache_dir: str | os.PathLike | None = None, run_tag: str | None = None) -> dict[str, str]:
    """Environment for every Ray worker of a CPU PPO job (the user's own values win), tagged with ``run_tag``."""
    cache = Path(os.environ.get(CACHE_ENV) or cache_dir or package_cache_dir())
    env = {
        "DS_ACCELERATOR": "cpu",
        **build_cache_env(cache),
        # what train_ppo_ray passes when it starts Ray itself
        "TOKENIZERS_PARALLELISM": "true",
        "NCCL_DEBUG": "WARN",
        "RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": "1",
    }
    for key in list(env):
        if os.environ.get(key):
            env[key] = os.environ[key]
    env[RUN_TAG_ENV] = run_tag or os.environ.get(RUN_TAG_ENV) or uuid.uuid4().hex
    if os.environ.get(EXTRA_HOOK_ENV):
        env[EXTRA_HOOK_ENV] = os.environ[EXTRA_HOOK_ENV]
    return env


def _group_size(group) -> int:
    return group.num_nodes * group.num_gpus_per_node


def model_processes(args) -> dict[str, int]:
    """DeepSpeed processes ``train_ppo_ray`` starts per model (nested args, before its own post-processing)."""
    uses_critic = args.algo.advantage.estimator == "gae"
    return {
        "actor": _group_size(args.actor),
        "ref": _group_size(args.ref) if args.algo.kl.init_coef > 0 else 0,
        "critic": _group_size(args.critic) if uses_critic else 0,
        "reward": _group_size(args.reward) if not args.reward.remote_url else 0,
    }


def required_gpus(args) -> int:
    """Logical GPUs the flow reserves: one per DeepSpeed process, colocated groups sharing their placement group.

    The vLLM engines take none on CPU (:func:`openrlhf_irl.compat.vllm_cpu.patch_engine_placement`)."""
    n = model_processes(args)
    if args.train.colocate_all:
        return n["actor"]
    first = n["actor"] if args.train.colocate_actor_ref else n["actor"] + n["ref"]
    if n["critic"] and args.train.colocate_critic_reward:
        second = n["critic"]
    else:
        second = n["critic"] + n["reward"]
    return first + second


def engine_processes(args) -> int:
    return (args.vllm.num_engines or 0) * args.vllm.tensor_parallel_size


def ray_init_kwargs(args, env: dict[str, str]) -> dict:
    """``ray.init`` arguments for a local CPU cluster that can place every actor of the job."""
    from openrlhf_irl.utils.run_dir import private_run_dir

    gpus = required_gpus(args)
    cpus = gpus + engine_processes(args) + 2  # logical: one per bundle, the trainer and a spare
    return dict(address="local", num_cpus=cpus, num_gpus=gpus, include_dashboard=False,
                _temp_dir=os.path.join(private_run_dir(), "ray"),  # not /tmp/ray/session_*, removed at exit
                runtime_env={"worker_process_setup_hook": SETUP_HOOK, "env_vars": dict(env)})


def required_cpus(args) -> int:
    """Logical CPUs the job holds on a cluster: one per placement bundle or unplaced actor of the DeepSpeed
    models (:func:`required_gpus`: OpenRLHF asks for a CPU next to each GPU, and for the CPU alone on a cluster
    without GPUs), one per vLLM engine process (none of their own when they share the colocated group), plus one
    free to place the PPO controller (an actor that holds none once placed)."""
    colocated_engines = args.train.colocate_all and not args.train.async_enable
    return required_gpus(args) + (0 if colocated_engines else engine_processes(args)) + 1


def cluster_shortfall(args, total: dict, free: dict | None = None, memory_gib: float | None = None) -> str | None:
    """Why an existing Ray cluster (``RAY_ADDRESS``) cannot place the job, in one line, or None. ``total``: the
    cluster's resources (``ray.cluster_resources()``); ``free``: what is free now (``ray.available_resources()``,
    default ``total``); ``memory_gib``: the job's estimated resident memory, checked against Ray's ``memory``.

    A cluster with GPUs must have one per DeepSpeed process (OpenRLHF's placement, unchanged); one without any
    is placed on CPUs (:func:`install_driver_placement`), never given invented GPUs."""
    free = total if free is None else free
    gpus = required_gpus(args)
    have_gpus = total.get("GPU", 0)
    if have_gpus and free.get("GPU", 0) < gpus:
        return (f"the Ray cluster has {free.get('GPU', 0):g} of {have_gpus:g} GPUs free and this PPO job reserves "
                f"{gpus} (one per DeepSpeed process): Ray would wait forever")
    cpus = required_cpus(args)
    if free.get("CPU", 0) < cpus:
        return (f"the Ray cluster has {free.get('CPU', 0):g} of {total.get('CPU', 0):g} CPUs free and this PPO job "
                f"needs {cpus} (one per DeepSpeed process and vLLM engine process, one to place the PPO "
                f"controller): Ray would wait forever; add nodes or CPUs (`ray start --num-cpus`), or use fewer "
                "--*.num_gpus_per_node / --vllm.num_engines")
    if memory_gib is not None and free.get("memory", float("inf")) / 2**30 < memory_gib:
        return (f"the Ray cluster has {free.get('memory', 0) / 2**30:.1f} GiB of memory free and this PPO job needs "
                f"about {memory_gib:.1f} GiB: use fewer --*.num_gpus_per_node / --vllm.num_engines "
                "(OPENRLHF_IRL_SKIP_MEMORY_CHECK=1 skips this)")
    return None


def in_ray_job() -> bool:
    """This process is the driver of a job submitted with ``ray job submit`` (Ray put its config in the env)."""
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    return RAY_JOB_CONFIG_JSON_ENV_VAR in os.environ


def job_runtime_env() -> dict:
    """The runtime environment of the submitted job this process drives (``{}`` outside a job)."""
    import json

    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    raw = os.environ.get(RAY_JOB_CONFIG_JSON_ENV_VAR)
    return (json.loads(raw).get("runtime_env") or {}) if raw else {}


def cluster_init_kwargs(env: dict[str, str]) -> dict:
    """``ray.init`` arguments that join the cluster in ``RAY_ADDRESS`` with the CPU layer in every worker of the job.

    Inside a submitted job, Ray merges this runtime environment with the job's (``--runtime-env-json``), and refuses
    one that names the same field or variable. So the job's environment variables reach every worker as given
    (``env`` only adds the ones it lacks: :func:`worker_env` already took the user's values of its own) and our
    setup hook takes the job's place, the job's own hook running after ours (``OPENRLHF_IRL_WORKER_HOOK``)."""
    env = dict(env)
    runtime_env = {"worker_process_setup_hook": SETUP_HOOK, "env_vars": env}
    job = job_runtime_env()
    if job:
        job_vars = job.get("env_vars") or {}
        hook = job.get("worker_process_setup_hook")
        if hook and hook != SETUP_HOOK and EXTRA_HOOK_ENV not in job_vars:
            env[EXTRA_HOOK_ENV] = hook
        override = RUN_TAG_ENV in job_vars or (hook and hook != SETUP_HOOK)
        runtime_env["env_vars"] = {k: v for k, v in env.items() if k not in job_vars or k == RUN_TAG_ENV}
        if override:  # our hook and our run's tag over the job's (see :func:`job_run_tag`)
            os.environ["RAY_OVERRIDE_JOB_RUNTIME_ENV"] = "1"
    return dict(address=os.environ["RAY_ADDRESS"], runtime_env=runtime_env)


def job_run_tag() -> str | None:
    """The tag of this run's processes. Inside a submitted job a fresh one, always: the job's own processes (Ray's
    job supervisor, the entrypoint's shell) carry the job's environment, and a tag taken from it would mark them
    for the clean-up that kills the run's processes."""
    return uuid.uuid4().hex if in_ray_job() else None
