"""Diversity of a policy's samples, per prompt: within-prompt self-BLEU, distinct-n, per-token entropy.

Per-token entropy of the sampling distribution along the policy's own samples, teacher forced: for response token
t of a sample (the EOS included when the sample ended), ``H_t = -sum_a p_t(a) log p_t(a)`` with
``p_t = softmax(logits_t / temperature)`` (top-p 1: the distribution actually sampled from). A prompt's value is
``sum of H_t over its samples' tokens / their token count``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from openrlhf_irl.generation.scoring import response_logits
from openrlhf_irl.utils.metrics import distinct_n, self_bleu

__all__ = ["entropy_sums", "prompt_text_diversity"]


@torch.no_grad()
def entropy_sums(model: Any, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], *,
                 temperature: float = 1.0, batch_size: int = 32, pad_token_id: int = 0) -> list[tuple[float, int]]:
    """Per row ``(sum_t H_t, number of response tokens)``; right-padded batches, fp32 softmax."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(response_ids)} responses")
    out: list[tuple[float, int]] = [(0.0, 0)] * len(prompt_ids)
    rows = [i for i in range(len(prompt_ids)) if len(response_ids[i]) > 0]
    for i, logits in response_logits(model, prompt_ids, response_ids, rows, batch_size=batch_size,
                                     pad_token_id=pad_token_id):
        logp = torch.log_softmax(logits.float() / temperature, dim=-1)
        h = -(logp.exp() * logp).sum(-1)
        out[i] = (float(h.double().sum()), len(response_ids[i]))
    return out


def prompt_text_diversity(responses: Sequence[str]) -> dict[str, float]:
    """Self-BLEU (lower = more diverse), distinct-1 and distinct-2 among one prompt's responses."""
    return {"self_bleu": self_bleu(list(responses)), "distinct_1": distinct_n(responses, 1),
            "distinct_2": distinct_n(responses, 2)}
