"""Best-of-N extrapolation: keep the highest-scoring of N samples, report the golden reward against N.

For each prompt the candidates are the policy's N_max samples. The curve value at N is the unbiased all-subsets
estimate of the expected golden reward of the best-scored of N samples drawn without replacement from the N_max:
with the candidates sorted by rank ascending (0-based position i) and golden rewards g_(i),

    E_N = sum_{i = N-1}^{N_max-1} C(i, N-1) / C(N_max, N) * g_(i)

(the best of a random N-subset is the candidate at position i exactly when the other N-1 members come from the i
below it). It averages over every N-subset instead of using the first N samples, so one set of N_max samples
gives a low-variance curve up to N = N_max. The standard error is the sample standard deviation of the per-prompt
estimates over sqrt(number of prompts). ``estimator="first"`` keeps the first-N-in-sample-order estimate.

Unfinished candidates (cut by the length limit, ``finished`` false) are treated the same for every scorer, the
log-ratio, the golden-ranked oracle included: ``unfinished="last"`` (default) ranks them below every finished
candidate (ordered among themselves by score), ``"score"`` ranks by score alone. Ties in score go to the
earlier sample.
"""

from __future__ import annotations

import importlib
import json
import math
import os
from collections.abc import Callable, Sequence

Scorer = Callable[[Sequence[str], Sequence[str]], list[float]]
UNFINISHED = ("last", "score")
ESTIMATORS = ("all_subsets", "first")


def golden_kind(path: str) -> str:
    """``"openrlhf"`` for a reward model saved by OpenRLHF's ``train_rm`` (its config has ``value_head_prefix``),
    ``"hf"`` for a plain ``...ForSequenceClassification``; ValueError for anything else."""
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"golden reward {path!r}: no readable config.json ({err})") from None
    if "value_head_prefix" in config:
        return "openrlhf"
    if any(str(a).endswith("ForSequenceClassification") for a in config.get("architectures") or ()):
        return "hf"
    raise ValueError(f"golden reward {path!r}: neither an OpenRLHF reward model (config value_head_prefix) nor a "
                     "sequence classifier (architectures ...ForSequenceClassification); name the convention "
                     "with hf:PATH or openrlhf:PATH")


def resolve_golden(spec: str) -> tuple[str, str]:
    """``(kind, target)`` of a ``--golden`` value without loading anything: ``hf``/``openrlhf`` with a model
    directory, or ``function`` with ``module:function``; ValueError naming the problem."""
    for prefix in ("hf:", "openrlhf:"):
        if spec.startswith(prefix):
            path = spec[len(prefix):]
            if not os.path.isfile(os.path.join(path, "config.json")):
                raise ValueError(f"golden reward {spec!r}: {path!r} is not a model directory (no config.json)")
            return prefix[:-1], path
    if os.path.isdir(spec):
        return golden_kind(spec), spec
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"golden reward {spec!r}: expected a reward-model directory, hf:PATH, openrlhf:PATH or "
                         "'module:function'")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"golden reward {spec!r}: cannot import it ({err})") from None
    if not callable(fn):
        raise ValueError(f"golden reward {spec!r}: {name} is not callable")
    return "function", spec


def load_golden(spec: str, **reward_model_kwargs) -> Scorer:
    """A golden reward: ``module:function`` (``f(prompt, response) -> float``), ``hf:PATH`` (a third-party sequence
    classifier scored its own way, :class:`~openrlhf_irl.models.reward.SequenceClassifierScorer`), ``openrlhf:PATH``
    (a reward model from OpenRLHF's ``train_rm``, :class:`~openrlhf_irl.models.reward.RewardScorer`), or a bare
    directory, whose config says which of the two it is. ``reward_model_kwargs`` go to ``RewardScorer``."""
    kind, target = resolve_golden(spec)
    if kind == "openrlhf":
        from openrlhf_irl.models.reward import RewardScorer

        return RewardScorer(target, **reward_model_kwargs).score
    if kind == "hf":
        from openrlhf_irl.models.reward import SequenceClassifierScorer

        batch = reward_model_kwargs.get("batch_size", 8)
        return SequenceClassifierScorer(target, device=reward_model_kwargs.get("device", "cpu"),
                                        batch_size=batch).score
    module, _, name = target.partition(":")
    fn = getattr(importlib.import_module(module), name)
    return lambda prompts, responses: [float(fn(p, r)) for p, r in zip(prompts, responses)]


def _ranked(cands: Sequence[dict], score_key: str, unfinished: str) -> list[dict]:
    """Candidates from worst to best: finished before unfinished (``"last"``), then score, ties to the earlier."""
    if unfinished not in UNFINISHED:
        raise ValueError(f"unfinished must be one of {UNFINISHED}, got {unfinished!r}")

    def key(j: int):
        c = cands[j]
        tier = 1 if unfinished == "score" or c.get("finished", True) else 0
        return (tier, c[score_key], -j)

    return [cands[j] for j in sorted(range(len(cands)), key=key)]


def pick(cands: Sequence[dict], score_key: str, unfinished: str = "last") -> dict:
    """The best candidate by the ranking of :func:`_ranked`."""
    return _ranked(cands, score_key, unfinished)[-1]


def subset_weights(m: int, n: int) -> list[float]:
    """P(the best of a uniform N-subset of M ranked items is the one at 0-based rank position i), i = 0..M-1."""
    total = math.comb(m, n)
    return [math.comb(i, n - 1) / total if i >= n - 1 else 0.0 for i in range(m)]


def selection_distribution(cands: Sequence[dict], n: int, score_key: str, unfinished: str = "last"
                           ) -> list[tuple[dict, float]]:
    """``[(candidate, P(it is the one selected))]`` when N of the prompt's candidates are drawn uniformly without
    replacement and the best-scored is kept (candidates with probability 0 left out; probabilities sum to 1)."""
    if n > len(cands):
        raise ValueError(f"N={n} but the prompt has only {len(cands)} samples")
    ranked = _ranked(cands, score_key, unfinished)
    return [(c, w) for w, c in zip(subset_weights(len(ranked), n), ranked) if w]


def expected_best(cands: Sequence[dict], n: int, score_key: str, value_key: str, unfinished: str = "last",
                  estimator: str = "all_subsets") -> float:
    """One prompt's estimate of E[value of the best-scored of N]: all N-subsets, or the first N samples."""
    if n > len(cands):
        raise ValueError(f"N={n} but the prompt has only {len(cands)} samples")
    if estimator == "first":
        return float(pick(cands[:n], score_key, unfinished)[value_key])
    if estimator != "all_subsets":
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    return sum(w * float(c[value_key]) for c, w in selection_distribution(cands, n, score_key, unfinished))


def best_of_n_stats(groups: Sequence[Sequence[dict]], ns: Sequence[int], score_key: str, golden_key: str = "golden",
                    unfinished: str = "last", estimator: str = "all_subsets") -> dict[int, dict]:
    """Per N: ``mean`` golden reward of the selection over prompts, its standard error ``se`` (None for one
    prompt), and ``unfinished`` = the expected number of prompts whose selected candidate is unfinished."""
    out = {}
    for n in ns:
        short = sum(len(c) < n for c in groups)
        if short:
            raise ValueError(f"N={n}: {short} prompts have fewer than {n} samples")
        values = [expected_best(c, n, score_key, golden_key, unfinished, estimator) for c in groups]
        flags = [[{**r, "_unf": 0.0 if r.get("finished", True) else 1.0} for r in c] for c in groups]
        unf = sum(expected_best(c, n, score_key, "_unf", unfinished, estimator) for c in flags)
        mean = sum(values) / len(values)
        se = None
        if len(values) > 1:
            var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
            se = math.sqrt(var / len(values))
        out[n] = {"mean": mean, "se": se, "unfinished": unf}
    return out


def best_of_n_curve(groups: Sequence[Sequence[dict]], ns: Sequence[int], score_key: str,
                    golden_key: str = "golden", unfinished: str = "last",
                    estimator: str = "all_subsets") -> dict[int, float]:
    """Mean golden reward of the best-scored of N, for each N (see :func:`best_of_n_stats`)."""
    stats = best_of_n_stats(groups, ns, score_key, golden_key, unfinished, estimator)
    return {n: s["mean"] for n, s in stats.items()}


def oracle_curve(groups: Sequence[Sequence[dict]], ns: Sequence[int], golden_key: str = "golden",
                 unfinished: str = "last", estimator: str = "all_subsets") -> dict[int, float]:
    """Upper bound: Best-of-N ranked by the golden reward itself."""
    return best_of_n_curve(groups, ns, golden_key, golden_key, unfinished, estimator)


def group_by_prompt(records: Sequence[dict]) -> list[list[dict]]:
    """Candidates per prompt (first-seen prompt order), each list in sample order; a repeated
    (prompt, sample_index) key is a ValueError (two jobs wrote one samples file)."""
    groups: dict[str, list[dict]] = {}
    seen = set()
    for rec in records:
        key = (rec["prompt"], rec["sample_index"])
        if key in seen:
            raise ValueError(f"repeated candidate (prompt, sample_index) = ({rec['prompt'][:40]!r}, "
                             f"{rec['sample_index']}): a samples file must hold each key once")
        seen.add(key)
        groups.setdefault(rec["prompt"], [])
    for rec in sorted(records, key=lambda r: r["sample_index"]):
        groups[rec["prompt"]].append(rec)
    return list(groups.values())


class ScoreError(ValueError):
    """A scorer (or the golden reward) returned something that is not one finite number per record."""


def check_scores(name: str, values, records: Sequence[dict]) -> list[float]:
    """``values`` as floats, one finite number per record, or :class:`ScoreError` naming the scorer and record."""
    values = list(values)
    if len(values) != len(records):
        raise ScoreError(f"{name}: returned {len(values)} scores for {len(records)} records")
    out = []
    for i, (value, rec) in enumerate(zip(values, records)):
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = None
        if number is None or isinstance(value, bool) or not math.isfinite(number):
            raise ScoreError(f"{name}: returned {value!r} for record {i} (prompt {rec.get('prompt')!r:.60}, "
                             f"sample_index {rec.get('sample_index')}); expected a finite number")
        out.append(number)
    return out


def score_and_select(records: list[dict], scorers: dict[str, Callable[[list[dict]], list[float]]],
                     ns: Sequence[int], golden: Scorer | None = None, *, unfinished: str = "last",
                     estimator: str = "all_subsets") -> dict:
    """Add a column per scorer (and ``golden``) to ``records``; Best-of-N curves and selections for each N.

    Returns ``{"groups", "selected": {scorer: {N: [record per prompt]}}, "unfinished_candidates": count,
    "curves": {scorer: {N: golden}}, "stats": {scorer: {N: {"mean", "se", "unfinished"}}}}`` (curves and stats
    only with a golden reward; they then include the golden-ranked oracle). ``selected`` holds the best of the
    first N samples (a concrete selection to read); the curves use ``estimator``.
    """
    for name, score in scorers.items():
        for rec, value in zip(records, check_scores(name, score(records), records)):
            rec[name] = value
    if golden is not None:
        values = golden([r["prompt"] for r in records], [r["response"] for r in records])
        for rec, value in zip(records, check_scores("golden", values, records)):
            rec["golden"] = value
    groups = group_by_prompt(records)
    selected = {name: {n: [pick(g[:n], name, unfinished) for g in groups] for n in ns} for name in scorers}
    result = {"groups": groups, "selected": selected,
              "unfinished_candidates": sum(not r.get("finished", True) for r in records)}
    if golden is not None:
        rankers = {**{name: name for name in scorers}, "oracle (golden)": "golden"}
        result["stats"] = {name: best_of_n_stats(groups, ns, key, "golden", unfinished, estimator)
                           for name, key in rankers.items()}
        result["curves"] = {name: {n: s["mean"] for n, s in stats.items()} for name, stats in result["stats"].items()}
    return result


def best_of_n_rows(result: dict, ns: Sequence[int], unfinished: str = "last") -> dict[str, dict]:
    """Report rows (``bon:<scorer>:<N>``, and ``bon:oracle:<N>`` ranked by the golden reward itself) from a
    :func:`score_and_select` result with golden values: per prompt, the golden values of the candidates an N-subset
    can select and their probabilities (``weights``), so a row's mean is the all-subsets estimate and its win rates
    the expected ones. Every ranker, the oracle included, puts unfinished candidates last (``unfinished``).
    ``responses`` holds the concrete best-of-the-first-N pick of each prompt."""
    rankers = {**{name: name for name in result["selected"]}, "oracle": "golden"}
    rows = {}
    for name, key in rankers.items():
        for n in ns:
            oracle = name == "oracle"
            row = {"label": f"Best-of-{n} (oracle: golden)" if oracle else f"Best-of-{n} ({name})",
                   "group": "oracle" if oracle else "bon", "scorer": name, "N": n, "golden": {}, "weights": {}}
            if not oracle:
                row["responses"] = {r["prompt"]: [r["response"]] for r in result["selected"][name][n]}
            for g in result["groups"]:
                dist = selection_distribution(g, n, key, unfinished)
                row["golden"][g[0]["prompt"]] = [float(c["golden"]) for c, _ in dist]
                row["weights"][g[0]["prompt"]] = [w for _, w in dist]
            rows[f"bon:{name}:{n}"] = row
    return rows


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


def parse_ns(text: str, n_max: int | None = None) -> list[int]:
    """Sorted unique N values from ``"1,2,4"``; with ``n_max`` the grid is cut at it and reaches it."""
    try:
        ns = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        ns = []
    if not ns or ns[0] < 1:
        raise ValueError(f"--n expects positive integers such as 1,2,4,8, got {text!r}")
    if n_max is not None:
        if n_max < 1:
            raise ValueError(f"--n-max must be >= 1, got {n_max}")
        ns = sorted({n for n in ns if n <= n_max} | {n_max})
    return ns

