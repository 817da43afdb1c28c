"""The `golden-pref` comparator: a Bradley-Terry reward model's pairs from one policy's samples, labelled by a
golden reward instead of by their source.

AfD's reward models learn from where a response came from (demonstration, SFT sample, initial-policy sample). The
comparator the AfD paper sets beside them learns from what a response is worth: two samples of the same prompt, the
one with the higher golden reward chosen. With it in the same Best-of-N and PPO tables, a flat AfD curve can be told
apart from a set-up where no reward model of this size and data could help (then `golden-pref` stays flat too).

Each prompt's samples are shuffled (deterministically per seed and prompt) and paired disjointly, first with second,
third with fourth, ...: every sample is in at most one pair, so ``n`` samples of a prompt give ``n // 2`` pairs at
most, as many comparisons as samples are needed for. Pairs of equal golden reward carry no preference and are left
out. Responses are stored as every other reward-model dataset of this package stores them
(:func:`~openrlhf_irl.datasets.response_text.normalize_response`).
"""

from __future__ import annotations

import random
from typing import Callable, Dict, Iterable, List, Tuple

from openrlhf_irl.datasets.response_text import normalize_response

__all__ = ["golden_preference_pairs"]


def golden_preference_pairs(samples: Iterable[dict], golden: Callable[[str, str], float], seed: int = 0
                            ) -> Tuple[List[dict], Dict[str, int]]:
    """``({"prompt", "chosen", "rejected"} records, counts)`` from sample records (``prompt``, ``response``).

    ``golden(prompt, response)`` scores the response as sampled (before normalisation); ``counts`` has
    ``samples``, ``prompts``, ``pairs`` and ``ties`` (pairs left out for equal golden reward)."""
    by_prompt: Dict[str, List[str]] = {}
    n_samples = 0
    for rec in samples:
        by_prompt.setdefault(rec["prompt"], []).append(rec["response"])
        n_samples += 1
    records, ties = [], 0
    for prompt, responses in by_prompt.items():
        order = list(responses)
        random.Random(f"{seed}\x00golden-pref\x00{prompt}").shuffle(order)
        for a, b in zip(order[0::2], order[1::2]):
            ga, gb = golden(prompt, a), golden(prompt, b)
            if ga == gb:
                ties += 1
                continue
            chosen, rejected = (a, b) if ga > gb else (b, a)
            records.append({"prompt": prompt, "chosen": normalize_response(chosen),
                            "rejected": normalize_response(rejected)})
    return records, {"samples": n_samples, "prompts": len(by_prompt), "pairs": len(records), "ties": ties}
