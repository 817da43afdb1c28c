"""OpenRLHF 0.11.2's Ray PPO flow (``openrlhf.cli.train_ppo_ray``) on a machine without CUDA.

What the vLLM engine side needs is in :mod:`.vllm_cpu`; this module covers the rest of the flow (REFERENCE
section 6, ``patches/0005-*`` is the upstream fix):

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

SETUP_HOOK = "openrlhf_irl.compat.ray_ppo.setup_worker"
EXTRA_HOOK_ENV = "OPENRLHF_IRL_WORKER_HOOK"  # "module.function": a user's own worker setup hook, run after ours
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CACHE = REPO_ROOT / "outputs" / ".cache"


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
    from .vllm_cpu import install_import_hooks

    if not getattr(torch.cuda.current_stream, "_openrlhf_irl", False):
        def current_stream(device=None):  # the gloo broadcast group takes (and ignores) a stream
            return None

        current_stream._openrlhf_irl = True
        torch.cuda.current_stream = current_stream
    install_import_hooks(PPO_PATCHES)


def patch_replay_buffer(module) -> None:
    """``NaiveReplayBuffer.__init__``: its target device is the CPU (it would build ``"cuda:cpu"``)."""
    cls = module.NaiveReplayBuffer
    if getattr(cls, "_openrlhf_irl_cpu", False):
        return
    init = cls.__init__

    @wraps(init)
    def __init__(self, *args, **kwargs):
        current_device = torch.cuda.current_device
        torch.cuda.current_device = lambda: 0  # only formatted into the device string replaced below
        try:
            init(self, *args, **kwargs)
        finally:
            torch.cuda.current_device = current_device
        self.target_device = torch.device("cpu")

    cls.__init__ = __init__
    cls._openrlhf_irl_cpu = True


def patch_strategy_ema(module) -> None:
    """``DeepspeedStrategy.moving_average(..., device="cuda")`` from the PPO actor: the CPU."""
    cls = module.DeepspeedStrategy
    if getattr(cls, "_openrlhf_irl_cpu_ema", False):
        return
    moving_average = cls.moving_average

    @wraps(moving_average)
    def moving_average_cpu(self, model, model_ema, beta=0.992, device="cpu"):
        return moving_average(self, model, model_ema, beta, "cpu" if str(device).startswith("cuda") else device)

    cls.moving_average = moving_average_cpu
    cls._openrlhf_irl_cpu_ema = True


PPO_PATCHES = {
    "openrlhf.trainer.ppo_utils.replay_buffer": patch_replay_buffer,
    "openrlhf.utils.deepspeed.deepspeed": patch_strategy_ema,
}


# ---------------------------------------------------------------------------------------------------- the driver
def worker_env(cache_dir: str | os.PathLike | None = None, run_tag: str | None = None) -> dict[str, str]:
    """Environment for every Ray worker of a CPU PPO job (the user's own values win), tagged with ``run_tag``."""
    cache = Path(os.environ.get("OPENRLHF_IRL_CACHE") or cache_dir or DEFAULT_CACHE)
    env = {
        "DS_ACCELERATOR": "cpu",
        "TORCH_EXTENSIONS_DIR": str(cache / "torch_extensions"),
        "TRITON_HOME": str(cache / "triton"),
        "TRITON_CACHE_DIR": str(cache / "triton" / "cache"),
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


def cluster_shortfall(args, resources: dict) -> str | None:
    """Why an existing Ray cluster (``RAY_ADDRESS``) cannot place the job, or None."""
    gpus = required_gpus(args)
    have = resources.get("GPU", 0)
    if have < gpus:
        return (f"the Ray cluster has {have:g} GPU resources and this PPO job reserves {gpus} (one per DeepSpeed "
                f"process): Ray would wait forever; start it with `ray start --num-gpus {gpus}` (logical on CPU)")
    return None
