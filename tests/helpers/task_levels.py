"""The mean golden reward of a demo task's expert and of its careless (pre-training) answers on fresh prompts."""

from __future__ import annotations

import random


def expert_and_careless(task, n_prompts: int, seed: int) -> tuple[list[float], list[float]]:
    """Golden rewards of one expert response and one careless response per prompt, ``n_prompts`` fresh prompts of
    ``task`` (a module of ``openrlhf_irl.demo.tasks`` with ``make_prompt``)."""
    rng = random.Random(seed)
    prompts = [task.make_prompt(rng) for _ in range(n_prompts)]
    expert = [task.golden_reward(p, task.expert_response(p, rng)) for p in prompts]
    careless = [task.golden_reward(p, task.random_response(p, rng)) for p in prompts]
    return expert, careless
