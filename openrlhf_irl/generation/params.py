"""Backend-independent pieces of generation: sampling parameters, completions, prompt formatting, seeds."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence, Union

__all__ = ["SamplingParams", "Completion", "format_prompt", "derive_seed", "plan_requests"]


@dataclass
class SamplingParams:
    """How to sample. ``temperature == 0`` means greedy decoding (then all ``n`` samples are equal).

    ``top_p`` is nucleus sampling over the temperature-scaled distribution (no top-k: both backends
    sample from the full vocabulary, unlike transformers' default ``top_k=50``).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"SamplingParams.n must be an int >= 1, got {self.n!r}")
        if not self.temperature >= 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")


@dataclass
class Completion:
    """One sampled response.

    * ``prompt_index``/``sample_index``: which prompt (index into the caller's prompt list) and which of its ``n``
      samples this is.
    * ``text``: the response decoded without special tokens (so without the final EOS).
    * ``finished``: the model generated an EOS token within ``max_new_tokens`` (``False`` = cut by the length limit).
    * ``logprob``: ``sum_t log pi(y_t | x, y_<t)`` over ``token_ids`` at temperature 1 (the model's own distribution,
      not the temperature/top-p-warped sampling distribution). The EOS token is included when ``finished``.
      See the backend for how it is computed (HF: teacher-forced rescoring; vLLM: the engine's raw logprobs).
    * ``token_ids``: the sampled token ids, ending with the EOS id when ``finished``.
    """

    prompt_index: int
    sample_index: int
    text: str
    finished: bool
    logprob: float
    token_ids: List[int] = field(default_factory=list)


def format_prompt(
    tokenizer: Any,
    raw_prompt: Union[str, List[dict]],
    *,
    apply_chat_template: bool = False,
    input_template: Optional[str] = None,
) -> str:
    """Turn a dataset prompt into the text the model continues, as OpenRLHF's datasets do.

    * ``apply_chat_template``: a string is one user message (a list is taken as the messages), rendered with the
      tokenizer's chat template and ``add_generation_prompt=True``; ``input_template`` is then ignored, as in
      ``openrlhf.datasets.prompts_dataset.preprocess_data``.
    * else ``input_template.format(raw_prompt)`` when a template (with a ``{}`` slot) is given;
    * else the raw prompt unchanged.

    Tokenize the result with ``add_special_tokens=False`` (OpenRLHF's convention: the template carries any BOS).
    """
    if apply_chat_template:
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("apply_chat_template was requested but the tokenizer has no chat template")
        messages = [{"role": "user", "content": raw_prompt}] if isinstance(raw_prompt, str) else list(raw_prompt)
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not isinstance(raw_prompt, str):
        raise ValueError(f"a prompt must be a string unless apply_chat_template is set, got {type(raw_prompt).__name__}")
    if input_template:
        return input_template.format(raw_prompt)
    return raw_prompt


def derive_seed(seed: int, *parts: int) -> int:
    """A 63-bit seed derived from ``seed`` and integer ``parts``, stable across processes and platforms."""
    key = ",".join(str(int(p)) for p in (seed, *parts)).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def plan_requests(
    num_prompts: int, n: int, skip: Optional[Sequence] = None
) -> List[List[int]]:
    """Per prompt, the sample indices in ``range(n)`` that are not in ``skip`` (a set of ``(prompt_index,
    sample_index)``)."""
    skip = set(skip or ())
    return [[s for s in range(n) if (i, s) not in skip] for i in range(num_prompts)]
