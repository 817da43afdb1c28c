"""Diversity and correlation metrics (pure Python, no numpy/scipy/nltk needed).

- ``distinct_n``: unique n-grams / total n-grams over whitespace tokens.
- ``self_bleu``: mean sentence-BLEU of each text against all the others.
- ``spearman``: rank correlation with average ranks for ties.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

__all__ = ["distinct_n", "self_bleu", "spearman", "rankdata"]


def _ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-n: number of unique n-grams divided by the total number of n-grams,
    pooled over all texts (n-grams never cross text boundaries; whitespace tokens).
    0.0 when there is no n-gram at all."""
    if n < 1:
        raise ValueError("n must be >= 1")
    total = 0
    unique: set[tuple[str, ...]] = set()
    for t in texts:
        grams = _ngrams(str(t).split(), n)
        total += len(grams)
        unique.update(grams)
    return len(unique) / total if total else 0.0


def self_bleu(texts: Sequence[str], max_n: int = 4) -> float:
    """Self-BLEU: the mean over i of sentence-BLEU(hypothesis = text i, references =
    every other text), on whitespace tokens. Lower means more diverse.

    Sentence-BLEU is the geometric mean of the modified n-gram precisions p_1..p_max_n
    (uniform weights), times the brevity penalty. Counts are clipped by the largest
    count of that n-gram in any one reference. p_1 = clipped / total unsmoothed (a
    hypothesis with no matching unigram scores 0); for n > 1, add-one smoothing
    p_n = (clipped + 1) / (total + 1). Brevity penalty: r is the reference length
    closest to the hypothesis length c (ties: the shorter), BP = 1 if c > r else
    exp(1 - r / c). An empty hypothesis scores 0. With fewer than 2 texts: 0.0.

    Runs in O(total tokens * max_n): per n-gram it keeps the two largest counts
    over all texts, so "max over the other texts" needs no pass over the others.
    """
    if max_n < 1:
        raise ValueError("max_n must be >= 1")
    toks = [str(t).split() for t in texts]
    m = len(toks)
    if m < 2:
        return 0.0
    counts = [[Counter(_ngrams(tk, n)) for n in range(1, max_n + 1)] for tk in toks]
    # per order: gram -> (best count, index of best, second best count)
    top: list[dict[tuple[str, ...], tuple[int, int, int]]] = [{} for _ in range(max_n)]
    for i, per_n in enumerate(counts):
        for n_idx, cnt in enumerate(per_n):
            table = top[n_idx]
            for g, c in cnt.items():
                b1, i1, b2 = table.get(g, (0, -1, 0))
                if c > b1:
                    table[g] = (c, i, b1)
                elif c > b2:
                    table[g] = (b1, i1, c)
    lengths = Counter(len(tk) for tk in toks)

    scores = []
    for i, tk in enumerate(toks):
        c_len = len(tk)
        if c_len == 0:
            scores.append(0.0)
            continue
        log_p = 0.0
        zero = False
        for n_idx in range(max_n):
            cnt = counts[i][n_idx]
            total = sum(cnt.values())
            clipped = 0
            for g, c in cnt.items():
                b1, i1, b2 = top[n_idx][g]
                clipped += min(c, b2 if i1 == i else b1)
            if n_idx == 0:
                if clipped == 0:
                    zero = True
                    break
                log_p += math.log(clipped / total)
            else:
                log_p += math.log((clipped + 1) / (total + 1))
        if zero:
            scores.append(0.0)
            continue
        lengths[c_len] -= 1
        r = min((L for L, k in lengths.items() if k > 0), key=lambda L: (abs(L - c_len), L))
        lengths[c_len] += 1
        bp = 1.0 if c_len > r else math.exp(1.0 - r / c_len)
        scores.append(bp * math.exp(log_p / max_n))
    return sum(scores) / m


def rankdata(x: Sequence[float]) -> list[float]:
    """1-based ranks, ties get the average of the ranks they span."""
    order = sorted(range(len(x)), key=lambda i: x[i])
    ranks = [0.0] * len(x)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        avg = (i + j) / 2.0 + 1.0
        for k in range(i, j + 1):
            ranks[order[k]] = avg
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation: Pearson correlation of the average ranks.
    nan when fewer than 2 points or when either input is constant."""
    x, y = [float(v) for v in x], [float(v) for v in y]
    if len(x) != len(y):
        raise ValueError(f"length mismatch: {len(x)} vs {len(y)}")
    if len(x) < 2:
        return float("nan")
    rx, ry = rankdata(x), rankdata(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    if sxx == 0.0 or syy == 0.0:
        return float("nan")
    return max(-1.0, min(1.0, sxy / math.sqrt(sxx * syy)))
