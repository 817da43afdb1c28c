"""Is a reward model worth using? Two checks on held-out prompts, before its Best-of-N or PPO numbers are read.

* ``heldout_accuracy``: on held-out prompts' responses of the two sources the model was trained to tell apart
  (e.g. SFT samples against initial-policy samples for ``init-sft``), the share of (positive, negative) pairs of the
  same prompt that it scores in the right order, ties counted half; per prompt, then the mean over prompts.
  0.5 is chance. For a model trained on golden-ordered pairs (``golden-pref``) the held-out pairs are of that kind
  too: :func:`golden_order_accuracy`, same-prompt samples of unequal golden reward, right when the score orders them
  as the golden reward does.
* ``spearman_golden``: on held-out samples of one policy (the Best-of-N candidates), the Spearman correlation of its
  score with the golden reward within each prompt, averaged over the prompts where neither is constant. What
  Best-of-N needs: a model can separate its training sources well (high accuracy) and still not rank one policy's
  samples by quality (correlation near 0), and then Best-of-N stays flat.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

from openrlhf_irl.utils.metrics import spearman

__all__ = ["pairwise_accuracy", "heldout_accuracy", "golden_order_accuracy", "mean_within_prompt_spearman"]


def pairwise_accuracy(pos: Sequence[float], neg: Sequence[float]) -> float:
    """Share of (p, n) pairs with p > n, ties half."""
    if not pos or not neg:
        raise ValueError("pairwise_accuracy needs scores on both sides")
    total = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return total / (len(pos) * len(neg))


def heldout_accuracy(pos: Mapping[str, Sequence[float]], neg: Mapping[str, Sequence[float]]) -> tuple[float, int]:
    """``(mean over prompts of pairwise_accuracy, number of prompts)`` over the prompts with scores on both sides."""
    prompts = [p for p in pos if pos[p] and neg.get(p)]
    if not prompts:
        return float("nan"), 0
    return sum(pairwise_accuracy(pos[p], neg[p]) for p in prompts) / len(prompts), len(prompts)


def golden_order_accuracy(scores: Mapping[str, Sequence[float]], golden: Mapping[str, Sequence[float]]
                          ) -> tuple[float, int]:
    """``(mean over prompts of the share of pairs ordered right, number of prompts)``: per prompt, every pair of
    responses with unequal golden reward counts 1 when the scores order it the same way, 1/2 when they tie, else 0;
    prompts without such a pair are left out."""
    shares = []
    for prompt, s in scores.items():
        g = golden[prompt]
        if len(g) != len(s):
            raise ValueError(f"golden_order_accuracy: {len(s)} scores but {len(g)} golden values for {prompt!r}")
        pairs = [(i, j) for i in range(len(g)) for j in range(i + 1, len(g)) if g[i] != g[j]]
        if pairs:
            right = sum(0.5 if s[i] == s[j] else float((s[i] > s[j]) == (g[i] > g[j])) for i, j in pairs)
            shares.append(right / len(pairs))
    if not shares:
        return float("nan"), 0
    return sum(shares) / len(shares), len(shares)


def mean_within_prompt_spearman(scores: Mapping[str, Sequence[float]], golden: Mapping[str, Sequence[float]]
                                ) -> tuple[float, int]:
    """``(mean over prompts of spearman(scores, golden), number of prompts used)``; prompts where either side is
    constant (no ranking to compare) are left out."""
    values = [spearman(scores[p], golden[p]) for p in scores]
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return float("nan"), 0
    return sum(values) / len(values), len(values)
