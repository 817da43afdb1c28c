"""Estimators with 95% intervals over prompts and seeds, and golden-reward win rates.

Data layout: ``groups[s][p]`` is one number per (seed s, prompt p), e.g. a prompt's mean golden reward over its
samples, or a prompt's win rate. The estimate is the mean over seeds of the mean over that seed's prompts
(every seed weighs the same, whatever its prompt count).

Interval with K >= 2 seeds: Student's t on the K per-seed means, ``m +- t_{K-1, 1 - alpha/2} * sd / sqrt(K)``.
Each seed is an independent run (its own data draws, initialisation and prompts), so its mean is one draw whose
spread holds both the seed-to-seed and the prompt-to-prompt variation; the t quantile keeps the interval honest with
few seeds, where a percentile bootstrap over K = 3 seed means covers the truth only about 75% of the time when
seed variation dominates (``tests/test_eval_stats.py`` simulates both).

With a single seed: a percentile bootstrap over its prompts (seed-to-seed variation is then not in the interval).
``hierarchical_bootstrap`` (seeds resampled, then prompts within each) remains available as ``method="bootstrap"``.

Win rate of A against B on one prompt (ties counted half), over every pair of A's and B's samples for it:
``W = mean_{i,j} ( 1[a_i > b_j] + 0.5 * 1[a_i == b_j] )`` (equality within ``tol``).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

__all__ = ["win_rate", "prompt_win_rates", "nested_mean", "hierarchical_bootstrap", "seed_t_interval", "summarize",
           "difference", "fmt_ci"]


def win_rate(a: Sequence[float], b: Sequence[float], tol: float = 1e-9) -> float:
    """Share of (a_i, b_j) pairs with a_i > b_j, ties (|a_i - b_j| <= tol) counted half."""
    if len(a) == 0 or len(b) == 0:
        raise ValueError("win_rate needs at least one value on each side")
    x = np.asarray(a, dtype=float)[:, None]
    y = np.asarray(b, dtype=float)[None, :]
    tie = np.abs(x - y) <= tol
    win = (x > y) & ~tie
    return float((win.sum() + 0.5 * tie.sum()) / (x.size * y.size))


def prompt_win_rates(cands: Mapping[str, Sequence[float]], refs: Mapping[str, Sequence[float]],
                     tol: float = 1e-9) -> dict[str, float]:
    """Per prompt, the win rate of the candidates' values against the references' for the same prompt.
    Every candidate prompt must have references."""
    missing = [p for p in cands if p not in refs or len(refs[p]) == 0]
    if missing:
        raise ValueError(f"no reference values for {len(missing)} prompt(s), e.g. {missing[0]!r}")
    return {p: win_rate(v, refs[p], tol) for p, v in cands.items()}


def _check(groups: Sequence[Sequence[float]]) -> list[np.ndarray]:
    arrays = [np.asarray(g, dtype=float) for g in groups]
    if not arrays or any(a.size == 0 for a in arrays):
        raise ValueError("need at least one seed, each with at least one prompt")
    if any(not np.all(np.isfinite(a)) for a in arrays):
        raise ValueError("values must be finite")
    return arrays


def nested_mean(groups: Sequence[Sequence[float]]) -> float:
    """Mean over seeds of the mean over prompts."""
    return float(np.mean([a.mean() for a in _check(groups)]))


def hierarchical_bootstrap(groups: Sequence[Sequence[float]], n_boot: int = 2000, seed: int = 0) -> np.ndarray:
    """``n_boot`` bootstrap replicates of :func:`nested_mean` (seeds resampled, then prompts within each)."""
    arrays = _check(groups)
    rng = np.random.default_rng(seed)
    k = len(arrays)
    seed_idx = rng.integers(0, k, size=(n_boot, k))
    # per original seed, the mean of one prompt-resample for every (replicate, slot): drawn lazily per seed
    out = np.zeros(n_boot)
    for s, a in enumerate(arrays):
        uses = seed_idx == s  # [n_boot, k] slots that drew seed s
        count = int(uses.sum())
        if count == 0:
            continue
        draws = a[rng.integers(0, a.size, size=(count, a.size))].mean(axis=1)
        contrib = np.zeros((n_boot, k))
        contrib[uses] = draws
        out += contrib.sum(axis=1)
    return out / k


def seed_t_interval(groups: Sequence[Sequence[float]], level: float = 0.95) -> tuple[float, float]:
    """Student's t interval on the per-seed means (K >= 2 seeds)."""
    from scipy.stats import t as student_t

    means = np.array([a.mean() for a in _check(groups)])
    if means.size < 2:
        raise ValueError("a t interval over seeds needs at least 2 seeds")
    half = float(student_t.ppf(0.5 + level / 2, means.size - 1) * means.std(ddof=1) / math.sqrt(means.size))
    return float(means.mean()) - half, float(means.mean()) + half


def summarize(groups: Sequence[Sequence[float]], n_boot: int = 2000, seed: int = 0, level: float = 0.95,
              method: str = "auto") -> dict:
    """``{"mean", "lo", "hi", "n_seeds", "n_prompts", "method"}``: the nested mean and its interval.

    ``method``: ``"t"`` (seed-level t interval, the default with >= 2 seeds), ``"bootstrap"`` (percentile interval
    of :func:`hierarchical_bootstrap`, the default with one seed: prompts only), or ``"auto"``."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    arrays = _check(groups)
    if method == "auto":
        method = "t" if len(arrays) >= 2 else "bootstrap"
    if method == "t":
        lo, hi = seed_t_interval(arrays, level)
    elif method == "bootstrap":
        reps = hierarchical_bootstrap(arrays, n_boot=n_boot, seed=seed)
        alpha = 1.0 - level
        lo, hi = (float(q) for q in np.quantile(reps, [alpha / 2, 1 - alpha / 2]))
    else:
        raise ValueError(f"method must be 'auto', 't' or 'bootstrap', got {method!r}")
    return {"mean": nested_mean(arrays), "lo": lo, "hi": hi, "n_seeds": len(arrays),
            "n_prompts": int(sum(a.size for a in arrays)), "method": method}


def difference(a: Sequence[Mapping[str, float]], b: Sequence[Mapping[str, float]]) -> list[list[float]]:
    """Paired per-(seed, prompt) differences a - b on the prompts both have, for an interval on a difference
    (the pairing removes the prompt-difficulty variance both rows share)."""
    if len(a) != len(b):
        raise ValueError(f"{len(a)} seeds vs {len(b)}")
    out = []
    for sa, sb in zip(a, b):
        common = [p for p in sa if p in sb]
        if not common:
            raise ValueError("no prompt in common")
        out.append([sa[p] - sb[p] for p in common])
    return out


def fmt_ci(s: Mapping[str, float], digits: int = 3) -> str:
    """``0.512 [0.47, 0.55]``; ``0.512 (1 seed)`` for a value without an interval (``lo`` None)."""
    if s is None or any(isinstance(s.get(k), float) and math.isnan(s[k]) for k in ("mean",)):
        return "-"
    if s.get("lo") is None:
        return f"{s['mean']:.{digits}f} (1 seed)"
    return f"{s['mean']:.{digits}f} [{s['lo']:.{digits - 1}f}, {s['hi']:.{digits - 1}f}]"
