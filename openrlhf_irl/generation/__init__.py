"""Generation backends for sampling jobs: transformers (CPU/GPU), vLLM engines (GPU), a Ray pool of either; the
online IQ-Learn samplers with their engine weight push; and teacher-forced scoring (``log pi(y|x)`` and the
training-free AfD reward ``log pi_SFT - log pi_init``).

Heavy modules (transformers, Ray, vLLM) are imported on first use of their names.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from .params import Completion, SamplingParams, derive_seed, format_prompt, plan_requests

_LAZY = {
    "HFGenerator": ".hf",
    "load_causal_lm": ".loading",
    "load_tokenizer": ".loading",
    "VLLMGenerator": ".vllm",
    "GenerationPool": ".ray_pool",
    "ensure_ray": ".ray_session",
    "resolve_backend": ".ray_pool",
    "sequence_logprobs": ".scoring",
    "token_logprob_sums": ".scoring",
    "LogRatioScorer": ".scoring",
    "PolicySampler": ".online",
    "HFPolicySampler": ".online",
    "VLLMPolicySampler": ".online",
    "build_policy_sampler": ".online",
    "EngineWeightSync": ".weight_sync",
    "policy_weights": ".weight_sync",
}

__all__ = ["SamplingParams", "Completion", "format_prompt", "derive_seed", "plan_requests", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
