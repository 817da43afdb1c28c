"""The demo's tasks, chosen by ``--task``: each a module with the same interface (``TaskConfig``, ``build_task``,
``pretrain_corpus``, ``expert_response``, ``golden_reward``, ``golden_reward_batch``, ``DEFAULT_NOISE``,
``VOCAB_SIZE``, ``TITLE``, ``SIZES``).

``SIZES`` holds the full-scale sizes a task was fixed at by ``openrlhf-irl size-task`` (empty: the demo's defaults).

* ``sum`` (:mod:`openrlhf_irl.demo.task`): 55 prompts in all; a held-out prompt asks for a target never trained on,
  so it is a stress test of generalising to new targets, not a sample of the training distribution.
* ``sort`` (:mod:`openrlhf_irl.demo.sort_task`): held-out prompts drawn from the training distribution, in a
  prompt space of 10^8 and more, on a character-level tokenizer.
* ``bigram`` (:mod:`openrlhf_irl.demo.bigram_task`): a hidden bigram reward that the expert samples from exactly,
  the best case for inverse RL; ``expert_habit`` adds a habit the reward ignores.
"""

from __future__ import annotations

import importlib
import random
from dataclasses import dataclass
from types import ModuleType
from typing import Callable

__all__ = ["TASKS", "TaskConfig", "load_task", "fresh_prompt_split", "careless_corpus"]


@dataclass
class TaskConfig:
    """What every task's ``TaskConfig`` has (each task sets its own ``expert_noise`` default, and may add fields)."""

    seed: int = 0
    n_train_prompts: int = 1000
    n_eval_prompts: int = 100
    demos_per_prompt: int = 1
    expert_noise: float = 0.0
    n_pretrain: int = 4000  # lines of pre-training text
    # > 0: evaluation prompts are held out of every training stage (pre-training, SFT, AfD sampling, reward models);
    # what is held out is the task's own rule (sum: this share of each k's targets; sort, bigram: fresh draws)
    held_out_fraction: float = 0.25


TASKS = {"sum": "openrlhf_irl.demo.task", "sort": "openrlhf_irl.demo.sort_task",
         "bigram": "openrlhf_irl.demo.bigram_task"}


def fresh_prompt_split(make_prompt: Callable[[random.Random], str], cfg: TaskConfig
                       ) -> tuple[list[str], list[str], random.Random]:
    """For tasks whose held-out prompts are fresh draws: ``n_train_prompts`` training prompts, then
    ``n_eval_prompts`` distinct evaluation prompts none equal to a training prompt, each from its own stream of
    ``cfg.seed``; and the demonstrations' generator."""
    rng = random.Random(cfg.seed)
    train = [make_prompt(rng) for _ in range(cfg.n_train_prompts)]
    seen, held = set(train), []
    hrng = random.Random(rng.getrandbits(64))
    while len(held) < cfg.n_eval_prompts:
        p = make_prompt(hrng)
        if p not in seen:
            seen.add(p)
            held.append(p)
    return train, held, random.Random(rng.getrandbits(64))


def careless_corpus(make_prompt: Callable[[random.Random], str], careless: Callable[[str, random.Random], str],
                    bare: Callable[[random.Random], str], cfg: TaskConfig, sep: str) -> list[str]:
    """``n_pretrain`` pre-training lines, deterministic in ``cfg.seed`` on a stream of their own: one in ten
    ``bare(rng)``, the others ``prompt + sep + careless(prompt, rng)`` on fresh prompts; with ``held_out_fraction``
    above 0 an evaluation prompt (:func:`fresh_prompt_split`) is drawn again."""
    held = set(fresh_prompt_split(make_prompt, cfg)[1]) if cfg.held_out_fraction > 0 else set()
    rng = random.Random(cfg.seed * 1_000_003 + 1)
    lines = []
    for i in range(cfg.n_pretrain):
        if i % 10 == 9:
            lines.append(bare(rng))
            continue
        p = make_prompt(rng)
        while p in held:
            p = make_prompt(rng)
        lines.append(f"{p}{sep}{careless(p, rng)}")
    return lines


def load_task(name: str) -> ModuleType:
    if name not in TASKS:
        raise ValueError(f"task {name!r} is not one of {', '.join(TASKS)}")
    return importlib.import_module(TASKS[name])
