"""Synthetic "make a number" task for the embedded CPU demo.

Prompt:   ``add 4 numbers to make 17``
Response: ``2 + 4 + 5 + 6 = 17``

A prompt asks for ``k`` (2..5) positive whole numbers that add up to a target
``T``. There are many valid answers for every prompt; the best ones use exactly
``k`` numbers, all different, written in strictly ascending order, with the exact
sum, and close with ``= T`` (after which the model must stop: EOS).

Golden reward (continuous, in [0, 1], never raises). With ``n`` numbers parsed
from the text before the first ``=`` and ``m = max(n, k)``::

    s_sum   = exp(-|sum - T| / 3)         # 1, .72, .51, .37 for an error of 0, 1, 2, 3
    s_len   = exp(-|n - k| / 2)           # 1, .61, .37 for a count off by 0, 1, 2
    s_end   = 1    if the text ends right after "= T"
              0.75 if "= T" is followed by more text (the model did not stop)
              0.5  if there is no "= T" closing
    s_dist  = |distinct positive numbers| / m          # zeros / repeats count against
    s_order = strictly ascending adjacent pairs / (m - 1)
    s_lhs   = 1 if the left side reads "a + b + ... + z" else 0
    style   = 0.4 s_dist + 0.4 s_order + 0.2 s_lhs
    reward  = s_sum * s_len * s_end * (0.3 + 0.7 style)

Sum, count and closing gate everything (a wrong sum is a bad answer whatever its
style; "T = T" or never stopping are not shortcuts); the style terms grade
quality among near-correct answers. Every term is a monotone function of a
readable feature, so a reward model trained on (initial-policy samples vs. SFT
samples / demonstrations) can pick up the direction.

The noisy expert splits ``T`` into a random composition: parts may repeat, it
sorts them only half of the time, and with probability ``noise`` (default 0.4)
it slips on the sum (one part off by 1-2) and with probability ``noise / 2`` it
uses one number too many or too few. It always closes with ``= T``.

``random_response`` writes plausible-looking but careless answers (1-7 numbers
in 0..9, often repeated, random order, random closing total). The pre-training
corpus pairs prompts with such answers so the initial policy is fluent in the
format but bad. On every term the order is random < expert < best, so "more
demonstration-like than the initial policy" points towards higher golden reward
(the direction AfD / IQ-Learn exploit), and Best-of-N over a learned reward can
measurably beat the demonstrator.

Measured mean golden reward (seeded, 2000-4000 prompts): random 0.04, expert
0.68 at noise 0.4 (0.73 at 0.3, 0.64 at 0.5, 0.87 at 0), best 1.0. Best-of-16
over expert samples: 0.98 picking by golden reward, 0.83 by the style terms alone.
Held-out evaluation: :func:`split_prompts` sets aside a quarter of each k's targets (seeded); ``build_task``
and ``pretrain_corpus`` draw every training prompt from the rest and evaluation prompts from the held-out side
only, so a policy is scored on (k, T) combinations it never saw in pre-training, SFT, AfD sampling or reward-model
training.

Texts are short: with a 300-token byte-level BPE trained on ``pretrain_corpus``
prompts are <= 7 tokens, demonstrations <= 14 (mean ~8), random answers <= 16.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from typing import Any, Optional, Union

from openrlhf_irl.demo.tasks import TaskConfig as BaseTaskConfig

__all__ = [
    "DEFAULT_NOISE",
    "VOCAB_SIZE",
    "TITLE",
    "SIZES",
    "distinct_training_prompts",
    "TaskConfig",
    "K_RANGE",
    "MAX_TARGET",
    "format_prompt",
    "parse_prompt",
    "target_range",
    "all_prompts",
    "make_prompts",
    "split_prompts",
    "golden_reward",
    "golden",
    "golden_reward_batch",
    "reward_components",
    "expert_response",
    "best_response",
    "random_response",
    "build_task",
    "pretrain_corpus",
]

DEFAULT_NOISE = 0.4  # the expert's P(sum slip) (TaskConfig.expert_noise)
VOCAB_SIZE = 300  # the demo's byte-level BPE for this task
TITLE = "new-target stress test (sum: every held-out prompt asks for a target never trained on)"
SIZES: dict = {}  # the demo's own defaults (this task predates the sizing gate of docs/experiment.md)

K_RANGE = (2, 5)  # how many numbers a prompt asks for (inclusive)
MAX_TARGET = 30  # largest target in any prompt

_PROMPT_RE = re.compile(r"add\s+(\d{1,3})\s+numbers?\s+to\s+make\s+(\d{1,4})", re.IGNORECASE)
_LHS_RE = re.compile(r"^\s*\d+(\s*\+\s*\d+)*\s*$")
_CLOSE_RE = re.compile(r"^\s*(\d+)(.*)$", re.DOTALL)
_INT_RE = re.compile(r"\d+")
_BIG = 10**6  # cap on parsed integers (keeps float conversions safe)

RngLike = Union[random.Random, int, None]


def _rng(rng: RngLike) -> random.Random:
    if isinstance(rng, random.Random):
        return rng
    return random.Random(rng)


# --------------------------------------------------------------------------- config


@dataclass
class TaskConfig(BaseTaskConfig):
    expert_noise: float = DEFAULT_NOISE  # P(sum slip); P(count slip) = expert_noise / 2
    expert_sort_prob: float = 0.5  # the expert's "mediocre style": sorts half of the time


# --------------------------------------------------------------------------- prompts


def format_prompt(k: int, target: int) -> str:
    return f"add {k} numbers to make {target}"


def parse_prompt(prompt: str) -> Optional[tuple[int, int]]:
    """(k, target) of a prompt (searched anywhere in the string, so chat-templated
    prompts work), or None if it cannot be read."""
    if not isinstance(prompt, str):
        return None
    m = _PROMPT_RE.search(prompt)
    if m is None:
        return None
    k, t = int(m.group(1)), int(m.group(2))
    if k < 1 or t < 1:
        return None
    return k, t


def target_range(k: int) -> tuple[int, int]:
    """Targets used for ``k`` numbers: at least two different best answers exist,
    numbers stay small (<= MAX_TARGET)."""
    return k * (k + 1) // 2 + 2, min(MAX_TARGET, 5 * k + 6)


def all_prompts() -> list[str]:
    """Every prompt of the task (55 of them)."""
    out = []
    for k in range(K_RANGE[0], K_RANGE[1] + 1):
        lo, hi = target_range(k)
        out.extend(format_prompt(k, t) for t in range(lo, hi + 1))
    return out


def make_prompts(n: int, rng: RngLike = None, pool: Optional[list[str]] = None) -> list[str]:
    """``n`` prompts drawn (with replacement) uniformly over k, then over the target; with ``pool``, only prompts
    of the pool (uniformly over the k values present in it, then over its targets for that k)."""
    rng = _rng(rng)
    if pool is None:
        out = []
        for _ in range(n):
            k = rng.randint(*K_RANGE)
            out.append(format_prompt(k, rng.randint(*target_range(k))))
        return out
    by_k: dict[int, list[str]] = {}
    for p in pool:
        parsed = parse_prompt(p)
        if parsed is None:
            raise ValueError(f"not a task prompt: {p!r}")
        by_k.setdefault(parsed[0], []).append(p)
    if not by_k:
        raise ValueError("make_prompts: empty prompt pool")
    ks = sorted(by_k)
    return [rng.choice(by_k[rng.choice(ks)]) for _ in range(n)]


def distinct_training_prompts(n_train_prompts: int, held_out_fraction: float = 0.25) -> int:
    """How many distinct prompts ``n_train_prompts`` demonstrations cover: the task has few prompts, so the
    demonstrations repeat the training side of the split (its size does not depend on the seed)."""
    return min(n_train_prompts, len(split_prompts(0, held_out_fraction)[0]))


def split_prompts(seed: int, held_out_fraction: float = 0.25) -> tuple[list[str], list[str]]:
    """(training prompts, held-out prompts): for each k, ``round(held_out_fraction * targets)`` of its targets
    (at least one when the fraction is > 0), chosen at random with ``seed``, are held out. Disjoint, and
    together every prompt of the task."""
    if not 0.0 <= held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must be in [0, 1), got {held_out_fraction}")
    rng = random.Random(seed * 7_919 + 17)
    train, held = [], []
    for k in range(K_RANGE[0], K_RANGE[1] + 1):
        lo, hi = target_range(k)
        targets = list(range(lo, hi + 1))
        rng.shuffle(targets)
        n_held = int(held_out_fraction * len(targets) + 0.5)
        if held_out_fraction > 0:
            n_held = max(1, n_held)
        held.extend(format_prompt(k, t) for t in sorted(targets[:n_held]))
        train.extend(format_prompt(k, t) for t in sorted(targets[n_held:]))
    return train, held


# --------------------------------------------------------------------------- reward


def _to_int(s: str) -> int:
    return int(s) if len(s) <= 6 else _BIG


def reward_components(prompt: str, response: str) -> Optional[dict[str, float]]:
    """The named terms of the golden reward, or None when the prompt is unreadable
    or the response has no number at all (reward 0)."""
    parsed = parse_prompt(prompt)
    if parsed is None or not isinstance(response, str):
        return None
    k, target = parsed
    text = response
    if isinstance(prompt, str) and prompt and text.startswith(prompt):
        text = text[len(prompt):]
    text = text.strip()
    if "=" in text:
        lhs, rhs = text.split("=", 1)
        has_eq = True
    else:
        lhs, rhs, has_eq = text, "", False
    nums = [_to_int(s) for s in _INT_RE.findall(lhs)]
    if not nums:
        return None
    n, m = len(nums), max(len(nums), k)
    d = min(abs(sum(nums) - target), 1000)
    s_sum = math.exp(-d / 3.0)
    s_len = math.exp(-min(abs(n - k), 100) / 2.0)
    s_dist = len({x for x in nums if x > 0}) / m
    s_order = sum(a < b for a, b in zip(nums, nums[1:])) / (m - 1) if m > 1 else 1.0
    lhs_ok = 1.0 if _LHS_RE.match(lhs) is not None else 0.0
    close = _CLOSE_RE.match(rhs) if has_eq else None
    if close is None or len(close.group(1)) > 6 or int(close.group(1)) != target:
        s_end = 0.5  # no "= T" closing
    elif close.group(2).strip():
        s_end = 0.75  # "= T" and then more text: the model did not stop
    else:
        s_end = 1.0
    style = 0.4 * s_dist + 0.4 * s_order + 0.2 * lhs_ok
    return {
        "sum": s_sum,
        "len": s_len,
        "end": s_end,
        "distinct": s_dist,
        "order": s_order,
        "lhs_format": lhs_ok,
        "style": style,
        "reward": s_sum * s_len * s_end * (0.3 + 0.7 * style),
    }


def golden_reward(prompt: str, response: str) -> float:
    """Golden quality of ``response`` to ``prompt`` in [0, 1]; never raises.

    ``response`` is the generated text only (special tokens stripped); a response
    that repeats the prompt first is tolerated. Text after ``= T`` (the model did
    not stop) costs a quarter of the reward.
    """
    try:
        c = reward_components(prompt, response)
    except Exception:  # pragma: no cover - defensive: the reward must never raise
        return 0.0
    if c is None:
        return 0.0
    return float(min(1.0, max(0.0, c["reward"])))


golden = golden_reward  # alias: ``openrlhf_irl.demo.task:golden``


def golden_reward_batch(prompts: list[str], responses: list[str]) -> list[float]:
    return [golden_reward(p, r) for p, r in zip(prompts, responses)]


# --------------------------------------------------------------------------- writers


def _render(nums: list[int], target: int) -> str:
    return " + ".join(str(x) for x in nums) + f" = {target}"


def _composition(total: int, n: int, rng: random.Random) -> list[int]:
    """Uniformly random composition of ``total`` into ``n`` positive parts (random order)."""
    n = max(1, min(n, total))
    cuts = sorted(rng.sample(range(1, total), n - 1)) if n > 1 else []
    bounds = [0] + cuts + [total]
    return [b - a for a, b in zip(bounds, bounds[1:])]


def expert_response(
    prompt: str, rng: RngLike = None, noise: float = 0.4, sort_prob: float = 0.5
) -> str:
    """A demonstration: good, not the best (mean golden reward ~0.68 at noise 0.4)."""
    rng = _rng(rng)
    parsed = parse_prompt(prompt)
    if parsed is None:
        raise ValueError(f"not a task prompt: {prompt!r}")
    k, target = parsed
    n = k
    if rng.random() < noise / 2:
        n = max(1, k + rng.choice((-1, 1)))
    parts = _composition(target, n, rng)
    if rng.random() < noise:
        i = rng.randrange(len(parts))
        parts[i] = max(1, parts[i] + rng.choice((-2, -1, 1, 2)))
    if rng.random() < sort_prob:
        parts.sort()
    return _render(parts, target)


def best_response(prompt: str) -> str:
    """A reward-1.0 answer: 1, 2, ..., k-1 and the rest (distinct, ascending, exact)."""
    parsed = parse_prompt(prompt)
    if parsed is None:
        raise ValueError(f"not a task prompt: {prompt!r}")
    k, target = parsed
    head = list(range(1, k))
    last = target - sum(head)
    if last <= (head[-1] if head else 0):
        raise ValueError(f"no distinct ascending answer for {prompt!r}")
    return _render(head + [last], target)


def random_response(prompt: str, rng: RngLike = None) -> str:
    """A plausible-looking bad answer: right format, careless content."""
    rng = _rng(rng)
    n = rng.randint(1, 7)
    nums = [rng.randint(0, 9)]
    for _ in range(n - 1):
        nums.append(nums[-1] if rng.random() < 0.3 else rng.randint(0, 9))
    return _render(nums, rng.randint(3, MAX_TARGET))


# --------------------------------------------------------------------------- datasets


def build_task(cfg: TaskConfig) -> dict[str, Any]:
    """Train/eval prompts and expert demonstrations, deterministic in ``cfg.seed``.

    With ``held_out_fraction > 0`` (the default) training prompts are drawn from the training side of
    :func:`split_prompts` and evaluation prompts from its held-out side only, so no evaluation prompt is ever
    trained on; ``held_out_prompts`` lists every held-out prompt once.
    """
    rng = random.Random(cfg.seed)
    if cfg.held_out_fraction > 0:
        train_pool, held_pool = split_prompts(cfg.seed, cfg.held_out_fraction)
    else:
        train_pool = held_pool = None
    train = make_prompts(cfg.n_train_prompts, random.Random(rng.getrandbits(64)), pool=train_pool)
    evals = make_prompts(cfg.n_eval_prompts, random.Random(rng.getrandbits(64)), pool=held_pool)
    erng = random.Random(rng.getrandbits(64))
    demos = [
        {
            "prompt": p,
            "response": expert_response(p, erng, cfg.expert_noise, cfg.expert_sort_prob),
        }
        for p in train
        for _ in range(cfg.demos_per_prompt)
    ]
    return {
        "config": cfg,
        "train_prompts": train,
        "eval_prompts": evals,
        "held_out_prompts": list(held_pool or []),
        "demonstrations": demos,
    }


def pretrain_corpus(cfg: TaskConfig, sep: str = " ") -> list[str]:
    """Text for tokenizer training and brief pre-training of the initial policy:
    ``"<prompt><sep><random_response>"`` lines (fluent format, bad content), with a few
    bare number lists for digit coverage. Deterministic in ``cfg.seed``, on a seed
    stream separate from ``build_task``'s. Its prompts come from the training side of the
    held-out split only (the same split as ``build_task``'s)."""
    rng = random.Random(cfg.seed * 1_000_003 + 1)
    pool = split_prompts(cfg.seed, cfg.held_out_fraction)[0] if cfg.held_out_fraction > 0 else None
    lines = []
    for i in range(cfg.n_pretrain):
        if i % 10 == 9:
            n = rng.randint(1, 7)
            lines.append(_render([rng.randint(0, MAX_TARGET) for _ in range(n)],
                                 rng.randint(0, MAX_TARGET)))
        else:
            p = make_prompts(1, rng, pool=pool)[0]
            lines.append(f"{p}{sep}{random_response(p, rng)}")
    return lines
