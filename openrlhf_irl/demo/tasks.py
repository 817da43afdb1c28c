"""The demo's tasks, chosen by ``--task``: each a module with the same interface (``TaskConfig``, ``build_task``,
``pretrain_corpus``, ``expert_response``, ``golden_reward``, ``golden_reward_batch``, ``DEFAULT_NOISE``,
``VOCAB_SIZE``, ``TITLE``).

* ``sum`` (:mod:`openrlhf_irl.demo.task`): 55 prompts in all; a held-out prompt asks for a target never trained on,
  so it is a stress test of generalising to new targets, not a sample of the training distribution.
* ``sort`` (:mod:`openrlhf_irl.demo.sort_task`): held-out prompts drawn from the training distribution, in a
  prompt space of 10^8 and more, on a character-level tokenizer.
* ``bigram`` (:mod:`openrlhf_irl.demo.bigram_task`): a hidden bigram reward that the expert samples from exactly,
  the best case for inverse RL; ``expert_habit`` adds a habit the reward ignores.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

__all__ = ["TASKS", "TaskConfig", "load_task"]


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
    # what is held out is the task's own rule (sum: this share of each k's targets; sort: fresh draws)
    held_out_fraction: float = 0.25

TASKS = {"sum": "openrlhf_irl.demo.task", "sort": "openrlhf_irl.demo.sort_task",
         "bigram": "openrlhf_irl.demo.bigram_task"}


def load_task(name: str) -> ModuleType:
    if name not in TASKS:
        raise ValueError(f"task {name!r} is not one of {', '.join(TASKS)}")
    return importlib.import_module(TASKS[name])
