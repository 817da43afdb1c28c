"""Synthetic "bigram" task: the case inverse RL is made for, a reward the demonstrator optimises but never states.

Prompt:   ``after sun use fox and ink``
Response: ``owl fox red ink sea map cup hat jam pen .``

A response is 10 to 12 words from :data:`WORDS` (30 of them), closed by ``.``. The golden reward scores it with a
hidden matrix ``W`` of bigram scores (fixed by :data:`W_SEED`; it never enters any training data), a bonus for each
of the prompt's two named words that appears, and a closing term::

    r(y)    = sum_t W[w_{t-1}, w_t] + BONUS * (number of the two named words in y)     (w_0 = the prompt's first word)
    quality = clip((r(y) - r_mean(x)) / (r_max(x) - r_mean(x)), 0, 1)
    s_end   = 1 if y is 10-12 known words closed right after "."; 0.75 if text follows the "."; 0.5 without "."
              or with a length outside 10-12 (then only the words before the "." are scored, unknown words skipped)
    reward  = quality * s_end

``r_max(x)`` is the best score over every valid response (dynamic programming) and ``r_mean(x)`` the mean score of
a uniformly random valid one (closed form), so a random response scores about 0 and the best 1.

The expert samples exactly ``y ~ exp(r(y) / beta)`` over the valid responses (backward messages over the states
(position, last word, which named words were used), then forward sampling:
docs/tasks.md#bigram-the-reward-and-the-experts-exact-sampler; :func:`sequence_log_prob` is the same distribution,
checked against brute-force enumeration in the tests). At :data:`DEFAULT_NOISE` (= beta) its mean
golden reward is about 0.6. ``habit=True`` adds a systematic habit the reward ignores: the expert then prefers to
end on :data:`HABIT_WORD` (an extra ``HABIT_BONUS`` in its sampling score only). A reward model trained on such
demonstrations may learn the habit instead of the reward.

Prompts: 30 first words x 406 pairs of named words (12,180); held-out prompts are fresh draws, none equal to a
training prompt.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Optional, Sequence, Union

from openrlhf_irl.demo.tasks import TaskConfig as BaseTaskConfig
from openrlhf_irl.demo.tasks import careless_corpus, fresh_prompt_split

__all__ = ["TaskConfig", "WORDS", "LENGTHS", "BONUS", "W_SEED", "DEFAULT_NOISE", "VOCAB_SIZE", "TITLE", "SIZES",
           "HABIT_WORD", "HABIT_BONUS", "bigram_matrix", "format_prompt", "parse_prompt", "make_prompt", "score",
           "best_score", "mean_score", "golden_reward", "golden", "golden_reward_batch", "hidden_reward", "sequence_log_prob",
           "sample_words", "expert_response", "random_response", "build_task", "pretrain_corpus"]

WORDS = ("red", "sun", "cat", "sky", "run", "big", "old", "sea", "map", "ink", "owl", "fig", "jam", "pen", "cup",
         "hat", "box", "dog", "egg", "fox", "gem", "hen", "ice", "key", "log", "mud", "net", "oak", "pie", "rug")
LENGTHS = (10, 12)  # inclusive
BONUS = 2.0  # per named word that appears
W_SEED = 2024  # the hidden bigram scores: fixed for the task, never in any training data
DEFAULT_NOISE = 0.7  # the expert's temperature beta: mean golden about 0.6
VOCAB_SIZE = 400  # byte-level BPE: enough merges for each word to be one or two tokens
TITLE = "bigram (a hidden bigram reward the expert optimises; held-out prompts from the training distribution)"
# The demo's full-scale sizes, fixed by `openrlhf-irl size-task` before any comparison (docs/experiment.md#task-sizes):
# MLE SFT's validation golden 0.372 (the gate: 0.3-0.5)
SIZES = {"n_train_prompts": 1000, "sft_epochs": 8}
HABIT_WORD = "oak"
HABIT_BONUS = 3.0

RngLike = Union[random.Random, int, None]


def _rng(rng: RngLike) -> random.Random:
    return rng if isinstance(rng, random.Random) else random.Random(rng)


@dataclass
class TaskConfig(BaseTaskConfig):
    expert_noise: float = DEFAULT_NOISE  # beta
    n_eval_prompts: int = 64  # held-out prompts: fresh draws, none equal to a training prompt
    expert_habit: bool = False


@lru_cache(maxsize=None)
def bigram_matrix(vocab: Sequence[str] = WORDS, seed: int = W_SEED) -> tuple:
    """``W[i][j]``: the score of word j after word i, standard normal draws."""
    rng = random.Random(seed)
    return tuple(tuple(rng.gauss(0.0, 1.0) for _ in vocab) for _ in vocab)


# --------------------------------------------------------------------------- prompts
def format_prompt(first: str, a: str, b: str) -> str:
    return f"after {first} use {a} and {b}"


def parse_prompt(prompt: str) -> Optional[tuple[str, str, str]]:
    parts = prompt.split()
    if len(parts) != 6 or parts[0] != "after" or parts[2] != "use" or parts[4] != "and":
        return None
    first, a, b = parts[1], parts[3], parts[5]
    return (first, a, b) if {first, a, b} <= set(WORDS) and a != b else None


def make_prompt(rng: RngLike = None) -> str:
    rng = _rng(rng)
    a, b = sorted(rng.sample(WORDS, 2), key=WORDS.index)
    return format_prompt(rng.choice(WORDS), a, b)


# --------------------------------------------------------------------------- the reward and its dynamic programs
def score(first: str, named: tuple[str, str], words: Sequence[str], vocab: Sequence[str] = WORDS,
          bonus: float = BONUS) -> float:
    """``r(y)``: bigram scores along ``first, words...`` (unknown words skipped) plus the bonus per named word used."""
    w = bigram_matrix(tuple(vocab))
    index = {v: i for i, v in enumerate(vocab)}
    known = [index[x] for x in words if x in index]
    total, prev = 0.0, index[first]
    for i in known:
        total += w[prev][i]
        prev = i
    return total + bonus * sum(n in words for n in named)


def _messages(first: str, named: tuple[str, str], beta: float, vocab: Sequence[str], lengths: tuple[int, int],
              bonus: float, extra_end: Optional[tuple[int, float]] = None):
    """``logz[t][prev, flags]``: log of the sum, over every valid completion after ``t`` words ending in word
    ``prev`` with the named words ``flags`` (bit 0: the first, bit 1: the second) used, of
    ``exp(score of the rest / beta)``; the named-word bonus is paid at the stop. ``extra_end``: (word index, bonus)
    added when the response stops on that word (the habit). Returns (logz, next_flags) with ``next_flags[f, j]``
    the flags after word ``j``."""
    import numpy as np

    w = np.array(bigram_matrix(tuple(vocab)))
    n = len(vocab)
    named_idx = (vocab.index(named[0]), vocab.index(named[1]))
    hit = np.zeros(n, dtype=int)
    hit[named_idx[0]] |= 1
    hit[named_idx[1]] |= 2
    next_flags = np.array([[f | hit[j] for j in range(n)] for f in range(4)])
    stop = np.array([bonus * bin(f).count("1") for f in range(4)])[None, :].repeat(n, 0)  # [prev, flags]
    if extra_end is not None:
        stop[extra_end[0], :] += extra_end[1]
    lo, hi = lengths
    logz = [None] * (hi + 1)
    for t in range(hi, -1, -1):
        parts = []
        if lo <= t:
            parts.append(stop / beta)
        if t < hi:
            # go[prev, f] = logsumexp_j (W[prev, j] / beta + logz[t + 1][j, next_flags[f, j]])
            ahead = np.stack([logz[t + 1][np.arange(n), next_flags[f]] for f in range(4)], axis=1)  # [j, f]
            terms = w[:, :, None] / beta + ahead[None, :, :]  # [prev, j, f]
            m = terms.max(axis=1)
            parts.append(m + np.log(np.exp(terms - m[:, None, :]).sum(axis=1)))
        stacked = np.stack(parts)
        m = stacked.max(axis=0)
        logz[t] = m + np.log(np.exp(stacked - m).sum(axis=0))
    return logz, next_flags


def sequence_log_prob(prompt: str, words: Sequence[str], beta: float = DEFAULT_NOISE, vocab: Sequence[str] = WORDS,
                      lengths: tuple[int, int] = LENGTHS, bonus: float = BONUS, habit: bool = False) -> float:
    """``log p(words)`` under the expert's distribution ``exp(r(y) / beta) / Z`` (``-inf`` for an invalid one)."""
    first, a, b = _parse_any(prompt, vocab)
    if not (lengths[0] <= len(words) <= lengths[1]) or any(x not in vocab for x in words):
        return -math.inf
    vocab = tuple(vocab)
    extra = (vocab.index(HABIT_WORD), HABIT_BONUS) if habit else None
    logz, _ = _messages(first, (a, b), beta, vocab, lengths, bonus, extra)
    r = score(first, (a, b), words, vocab, bonus)
    if extra is not None and words[-1] == HABIT_WORD:
        r += HABIT_BONUS
    return r / beta - float(logz[0][vocab.index(first), 0])


def _parse_any(prompt: str, vocab: Sequence[str]) -> tuple[str, str, str]:
    parts = prompt.split()
    if len(parts) != 6 or not {parts[1], parts[3], parts[5]} <= set(vocab):
        raise ValueError(f"not a bigram prompt over this vocabulary: {prompt!r}")
    return parts[1], parts[3], parts[5]


@lru_cache(maxsize=65536)
def best_score(prompt: str, vocab: tuple = WORDS, lengths: tuple = LENGTHS, bonus: float = BONUS) -> float:
    """``r_max(x)``: the best score over valid responses (the same program as :func:`_messages`, max for sum)."""
    import numpy as np

    first, a, b = _parse_any(prompt, vocab)
    w = np.array(bigram_matrix(vocab))
    n = len(vocab)
    hit = np.zeros(n, dtype=int)
    hit[vocab.index(a)] |= 1
    hit[vocab.index(b)] |= 2
    next_flags = np.array([[f | hit[j] for j in range(n)] for f in range(4)])
    stop = np.array([bonus * bin(f).count("1") for f in range(4)])[None, :].repeat(n, 0)
    lo, hi = lengths
    best = [None] * (hi + 1)
    for t in range(hi, -1, -1):
        options = [stop] if lo <= t else []
        if t < hi:
            ahead = np.stack([best[t + 1][np.arange(n), next_flags[f]] for f in range(4)], axis=1)  # [j, f]
            options.append((w[:, :, None] + ahead[None, :, :]).max(axis=1))
        best[t] = np.max(np.stack(options), axis=0)
    return float(best[0][vocab.index(first), 0])


@lru_cache(maxsize=65536)
def mean_score(prompt: str, vocab: tuple = WORDS, lengths: tuple = LENGTHS, bonus: float = BONUS) -> float:
    """``r_mean(x)``: the mean score of a uniformly random valid response (length uniform on 10-12, words
    uniform): the first bigram's mean from the first word, then the mean of W per later bigram, plus the bonus
    times the chance that each named word appears."""
    first, _, _ = _parse_any(prompt, vocab)
    w = bigram_matrix(vocab)
    n = len(vocab)
    first_row = sum(w[vocab.index(first)]) / n
    overall = sum(map(sum, w)) / n ** 2
    span = range(lengths[0], lengths[1] + 1)
    total = 0.0
    for length in span:
        total += first_row + (length - 1) * overall + 2 * bonus * (1 - (1 - 1 / n) ** length)
    return total / len(span)


def golden_reward(prompt: str, response: str) -> float:
    """Golden quality in [0, 1] (see the module's docstring); 0 for a malformed prompt; never raises."""
    try:
        parsed = parse_prompt(prompt)
        if parsed is None:
            return 0.0
        first, a, b = parsed
        text = response.strip()
        body, dot, rest = text.partition(".")
        words = body.split()
        valid = LENGTHS[0] <= len(words) <= LENGTHS[1] and all(x in WORDS for x in words)
        s_end = 0.5 if not (dot and valid) else (0.75 if rest.strip() else 1.0)
        lo, hi = mean_score(prompt), best_score(prompt)
        quality = (score(first, (a, b), words) - lo) / (hi - lo)
        return float(min(1.0, max(0.0, quality)) * s_end)
    except Exception:  # pragma: no cover - defensive: the reward must never raise
        return 0.0


golden = golden_reward  # alias: ``openrlhf_irl.demo.bigram_task:golden``


def hidden_reward(prompt: str, response: str) -> float:
    """The expert's own reward ``r(y)`` (:func:`score`: hidden bigram scores plus the inclusion bonus) of the words
    before the first period, unclipped and without the golden reward's stop factor: what an inverse-RL reward
    should recover. NaN for a malformed prompt."""
    parsed = parse_prompt(prompt)
    if parsed is None:
        return float("nan")
    first, a, b = parsed
    return float(score(first, (a, b), response.strip().partition(".")[0].split()))


def golden_reward_batch(prompts: list[str], responses: list[str]) -> list[float]:
    return [golden_reward(p, r) for p, r in zip(prompts, responses)]


# --------------------------------------------------------------------------- writers
def sample_words(prompt: str, rng: RngLike = None, beta: float = DEFAULT_NOISE, vocab: Sequence[str] = WORDS,
                 lengths: tuple[int, int] = LENGTHS, bonus: float = BONUS, habit: bool = False) -> list[str]:
    """One exact draw of ``y ~ exp(r(y) / beta)`` (times ``exp(HABIT_BONUS / beta)`` on a stop at the habit word
    when ``habit``): at each step, stop or the next word in proportion to its share of the messages."""
    import numpy as np

    rng = _rng(rng)
    first, a, b = _parse_any(prompt, vocab)
    vocab = tuple(vocab)
    extra = (vocab.index(HABIT_WORD), HABIT_BONUS) if habit else None
    logz, next_flags = _messages(first, (a, b), beta, vocab, lengths, bonus, extra)
    w = np.array(bigram_matrix(vocab))
    prev, flags, out = vocab.index(first), 0, []
    for t in range(lengths[1] + 1):
        here = logz[t][prev, flags]
        weights = []
        if lengths[0] <= t:
            end = bonus * bin(flags).count("1") + (extra[1] if extra is not None and prev == extra[0] else 0.0)
            weights.append(math.exp(end / beta - here))
        if t < lengths[1]:
            ahead = logz[t + 1][np.arange(len(vocab)), next_flags[flags]]
            weights += list(np.exp(w[prev] / beta + ahead - here))
        choice = rng.choices(range(len(weights)), weights=weights)[0]
        if lengths[0] <= t:
            if choice == 0:
                return out
            choice -= 1
        prev, flags = choice, int(next_flags[flags, choice])
        out.append(vocab[choice])
    return out  # pragma: no cover - a stop is the only option after the last length


def expert_response(prompt: str, rng: RngLike = None, noise: float = DEFAULT_NOISE, habit: bool = False) -> str:
    """A demonstration: an exact sample of ``exp(r(y) / noise)``, closed by ``.``."""
    return " ".join(sample_words(prompt, rng, beta=noise, habit=habit)) + " ."


def random_response(prompt: str, rng: RngLike = None) -> str:
    """A careless answer: 5-14 uniformly drawn words, closed by ``.`` 80% of the time."""
    rng = _rng(rng)
    words = [rng.choice(WORDS) for _ in range(rng.randint(5, 14))]
    return " ".join(words) + (" ." if rng.random() < 0.8 else "")


# --------------------------------------------------------------------------- datasets
def build_task(cfg: TaskConfig) -> dict[str, Any]:
    """Training prompts, held-out prompts (distinct fresh draws, none equal to a training prompt) and the expert's
    demonstrations, deterministic in ``cfg.seed``."""
    train, held, erng = fresh_prompt_split(make_prompt, cfg)
    demos = [{"prompt": p, "response": expert_response(p, erng, cfg.expert_noise, habit=cfg.expert_habit)}
             for p in train for _ in range(cfg.demos_per_prompt)]
    return {"config": cfg, "train_prompts": train, "eval_prompts": held,
            "held_out_prompts": held if cfg.held_out_fraction > 0 else [], "demonstrations": demos}


def pretrain_corpus(cfg: TaskConfig, sep: str = " ") -> list[str]:
    """``"<prompt><sep><random_response>"`` lines on fresh prompts (fluent format, content blind to W), one in ten a
    bare word list; no held-out prompt (:func:`openrlhf_irl.demo.tasks.careless_corpus`)."""
    def bare(rng: random.Random) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))

    return careless_corpus(make_prompt, random_response, bare, cfg, sep)
