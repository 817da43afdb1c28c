"""Synthetic "sort" task: held-out prompts from the training distribution, in a prompt space far larger than any
training set.

Prompt:   ``sort: cbdacfb``
Response: ``abcdf.``

A prompt is a random string of 8-14 symbols from the alphabet :data:`ALPHABET` (10 letters); the answer is its
distinct symbols in sorted order, closed by ``.`` (after which the model must stop: EOS). There are 10^8 to 10^14
prompts, so training prompts (a few hundred or thousand) cover a vanishing share of them and held-out prompts are
fresh draws from the same distribution (any that equals a training prompt is drawn again), as the papers' test
splits are. Every symbol is one token: the demo trains the tokenizer with no merges (:data:`VOCAB_SIZE`, the 256
bytes and 3 special tokens), a character-level tokenizer.

Golden reward (in [0, 1], never raises). ``answer`` is the response up to its first ``.`` (all of it when there is
none), ``target`` the right answer::

    quality = 1 - levenshtein(answer, target) / max(len(answer), len(target))
    s_end   = 1    if the response ends right after the "."
              0.75 if more text follows the "." (the model did not stop)
              0.5  if there is no "."
    reward  = quality * s_end

The noisy expert writes the right answer with independent local slips: at each position of it, with probability
``noise`` one slip, a swap with the next symbol, a drop or a duplicate (a third each). At the default
:data:`DEFAULT_NOISE` its mean golden reward is about 0.7 (measured in ``tests/test_sort_task.py``). It always
closes with ``.``. ``random_response`` (the pre-training answers) writes a random selection of the prompt's and
other symbols in random order, closed by ``.`` most of the time.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Optional, Union

from openrlhf_irl.demo.tasks import TaskConfig as BaseTaskConfig
from openrlhf_irl.demo.tasks import careless_corpus, fresh_prompt_split

__all__ = ["TaskConfig", "ALPHABET", "PROMPT_LENGTHS", "DEFAULT_NOISE", "VOCAB_SIZE", "TITLE", "SIZES", "format_prompt",
           "parse_prompt", "target_answer", "make_prompt", "levenshtein", "golden_reward", "golden",
           "golden_reward_batch", "expert_response", "random_response", "build_task", "pretrain_corpus"]

ALPHABET = "abcdefghij"
PROMPT_LENGTHS = (8, 14)  # inclusive
DEFAULT_NOISE = 0.32  # the expert's slip rate per answer position: mean golden about 0.70
VOCAB_SIZE = 259  # the 256 byte symbols + pad/bos/eos: byte-level BPE with no merges, one token per character
TITLE = "sort (held-out prompts from the training distribution)"
# The demo's full-scale sizes, fixed by `openrlhf-irl size-task` before any comparison (docs/experiment.md#task-sizes):
# MLE SFT's validation golden 0.452 (the gate: 0.3-0.5)
SIZES = {"n_train_prompts": 500, "sft_epochs": 8}
_PREFIX = "sort: "

RngLike = Union[random.Random, int, None]


def _rng(rng: RngLike) -> random.Random:
    return rng if isinstance(rng, random.Random) else random.Random(rng)


@dataclass
class TaskConfig(BaseTaskConfig):
    expert_noise: float = DEFAULT_NOISE
    n_eval_prompts: int = 64  # held-out prompts: fresh draws, none equal to a training prompt


# --------------------------------------------------------------------------- prompts and answers
def format_prompt(symbols: str) -> str:
    return _PREFIX + symbols


def parse_prompt(prompt: str) -> Optional[str]:
    """The symbols of a well-formed prompt, None otherwise."""
    if not prompt.startswith(_PREFIX):
        return None
    symbols = prompt[len(_PREFIX):]
    lo, hi = PROMPT_LENGTHS
    return symbols if lo <= len(symbols) <= hi and set(symbols) <= set(ALPHABET) else None


def target_answer(prompt: str) -> Optional[str]:
    symbols = parse_prompt(prompt)
    return None if symbols is None else "".join(sorted(set(symbols)))


def make_prompt(rng: RngLike = None) -> str:
    rng = _rng(rng)
    return format_prompt("".join(rng.choice(ALPHABET) for _ in range(rng.randint(*PROMPT_LENGTHS))))


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions, each 1)."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


# --------------------------------------------------------------------------- golden reward
def golden_reward(prompt: str, response: str) -> float:
    """Golden quality of ``response`` (generated text only) in [0, 1]; 0 for a malformed prompt; never raises."""
    try:
        target = target_answer(prompt)
        if target is None:
            return 0.0
        text = response.strip()
        answer, dot, rest = text.partition(".")
        answer = answer.strip()
        s_end = 0.5 if not dot else (0.75 if rest.strip() else 1.0)
        quality = 1.0 - levenshtein(answer, target) / max(len(answer), len(target))
        return float(min(1.0, max(0.0, quality * s_end)))
    except Exception:  # pragma: no cover - defensive: the reward must never raise
        return 0.0


golden = golden_reward  # alias: ``openrlhf_irl.demo.sort_task:golden``


def golden_reward_batch(prompts: list[str], responses: list[str]) -> list[float]:
    return [golden_reward(p, r) for p, r in zip(prompts, responses)]


# --------------------------------------------------------------------------- writers
def expert_response(prompt: str, rng: RngLike = None, noise: float = DEFAULT_NOISE) -> str:
    """The right answer with independent local slips (swap with the next symbol, drop, duplicate) at rate
    ``noise`` per position, closed by ``.``."""
    rng = _rng(rng)
    answer = list(target_answer(prompt) or "")
    out: list[str] = []
    i = 0
    while i < len(answer):
        if rng.random() < noise:
            slip = rng.randrange(3)
            if slip == 0 and i + 1 < len(answer):  # swap with the next symbol
                out += [answer[i + 1], answer[i]]
                i += 2
                continue
            if slip == 1:  # drop
                i += 1
                continue
            out += [answer[i], answer[i]]  # duplicate (and the swap's fallback at the last position)
            i += 1
            continue
        out.append(answer[i])
        i += 1
    return "".join(out) + "."


def random_response(prompt: str, rng: RngLike = None) -> str:
    """A careless answer: a few of the prompt's symbols and others, in random order, closed by ``.`` 80% of the
    time."""
    rng = _rng(rng)
    symbols = parse_prompt(prompt) or ALPHABET
    pool = list(symbols) + [rng.choice(ALPHABET) for _ in range(3)]
    answer = "".join(rng.choice(pool) for _ in range(rng.randint(2, 9)))
    return answer + ("." if rng.random() < 0.8 else "")


# --------------------------------------------------------------------------- datasets
def build_task(cfg: TaskConfig) -> dict[str, Any]:
    """Training prompts, held-out prompts (distinct fresh draws, none equal to a training prompt) and the expert's
    demonstrations, deterministic in ``cfg.seed``."""
    train, held, erng = fresh_prompt_split(make_prompt, cfg)
    demos = [{"prompt": p, "response": expert_response(p, erng, cfg.expert_noise)}
             for p in train for _ in range(cfg.demos_per_prompt)]
    return {"config": cfg, "train_prompts": train, "eval_prompts": held,
            "held_out_prompts": held if cfg.held_out_fraction > 0 else [], "demonstrations": demos}


def pretrain_corpus(cfg: TaskConfig, sep: str = " ") -> list[str]:
    """``"<prompt><sep><random_response>"`` lines on fresh prompts (fluent format, bad content), one in ten a bare
    symbol string; no held-out prompt (:func:`openrlhf_irl.demo.tasks.careless_corpus`)."""
    def bare(rng: random.Random) -> str:
        return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(*PROMPT_LENGTHS)))

    return careless_corpus(make_prompt, random_response, bare, cfg, sep)
