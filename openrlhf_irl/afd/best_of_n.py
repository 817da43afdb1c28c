"""Best-of-N extrapolation: keep the highest-scoring of N samples, report the golden reward against N.

For each prompt the candidates are the policy's samples in sample order; Best-of-N uses the first N of them, so
the curve over N = 1, 2, 4, ... re-uses one set of N_max samples. N = 1 is the policy itself.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Sequence

Scorer = Callable[[Sequence[str], Sequence[str]], list[float]]


def load_golden(spec: str, **reward_model_kwargs) -> Scorer:
    """A golden reward from ``module:function`` (``f(prompt, response) -> float``) or a reward-model directory."""
    if os.path.isdir(spec):
        from openrlhf_irl.models.reward import RewardScorer

        return RewardScorer(spec, **reward_model_kwargs).score
    module, sep, name = spec.partition(":")
    if not sep:
        raise ValueError(f"golden reward {spec!r}: expected a reward-model directory or 'module:function'")
    fn = getattr(importlib.import_module(module), name)
    return lambda prompts, responses: [float(fn(p, r)) for p, r in zip(prompts, responses)]


def best_of_n_curve(groups: Sequence[Sequence[dict]], ns: Sequence[int], score_key: str,
                    golden_key: str = "golden") -> dict[int, float]:
    """Mean golden reward of the candidate with the highest ``score_key`` among the first N, for each N."""
    curve = {}
    for n in ns:
        picked = [max(cands[:n], key=lambda c: c[score_key])[golden_key] for cands in groups if len(cands) >= n]
        if len(picked) != len(groups):
            raise ValueError(f"N={n}: {len(groups) - len(picked)} prompts have fewer than {n} samples")
        curve[n] = sum(picked) / len(picked)
    return curve


def oracle_curve(groups: Sequence[Sequence[dict]], ns: Sequence[int], golden_key: str = "golden") -> dict[int, float]:
    """Upper bound: Best-of-N ranked by the golden reward itself."""
    return best_of_n_curve(groups, ns, golden_key, golden_key)


def group_by_prompt(records: Sequence[dict]) -> list[list[dict]]:
    """Candidates per prompt (first-seen prompt order), each list in sample order."""
    groups: dict[str, list[dict]] = {}
    for rec in sorted(records, key=lambda r: r["sample_index"]):
        groups.setdefault(rec["prompt"], []).append(rec)
    return list(groups.values())


def score_and_select(records: list[dict], scorers: dict[str, Callable[[list[dict]], list[float]]],
                     ns: Sequence[int], golden: Scorer | None = None) -> dict:
    """Add a column per scorer (and ``golden``) to ``records``; Best-of-N curves and selections for each N.

    Returns ``{"groups", "selected": {scorer: {N: [record per prompt]}}, "curves": {scorer: {N: golden}}}``
    (curves only with a golden reward; they then include the golden-ranked oracle).
    """
    for name, score in scorers.items():
        for rec, value in zip(records, score(records)):
            rec[name] = value
    if golden is not None:
        for rec, value in zip(records, golden([r["prompt"] for r in records], [r["response"] for r in records])):
            rec["golden"] = value
    groups = group_by_prompt(records)
    selected = {name: {n: [max(g[:n], key=lambda c: c[name]) for g in groups] for n in ns} for name in scorers}
    result = {"groups": groups, "selected": selected}
    if golden is not None:
        result["curves"] = {name: best_of_n_curve(groups, ns, name) for name in scorers}
        result["curves"]["oracle (golden)"] = oracle_curve(groups, ns)
    return result


def plot_curves(curves: dict[str, dict[int, float]], path: str, *, title: str = "Best-of-N",
                baselines: dict[str, float] | None = None) -> None:
    """Golden reward against N (log2 axis), one line per scorer, dashed horizontal lines for baselines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from openrlhf_irl.utils.jsonl import atomic_writer

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        xs = sorted(curve)
        ax.plot(xs, [curve[x] for x in xs], marker="o", label=name)
    for name, value in (baselines or {}).items():
        ax.axhline(value, linestyle="--", linewidth=1, color="gray")
        ax.annotate(name, (1, value), textcoords="offset points", xytext=(2, 3), fontsize=8, color="dimgray")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("N (samples per prompt)")
    ax.set_ylabel("golden reward of the selected response")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_writer(path, mode="wb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)


def parse_ns(text: str) -> list[int]:
    ns = sorted({int(x) for x in text.split(",") if x.strip()})
    if not ns or ns[0] < 1:
        raise ValueError(f"--n expects positive integers such as 1,2,4,8, got {text!r}")
    return ns

