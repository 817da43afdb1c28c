"""The criteria of ``docs/experiment.md`` ("Criteria for the next report"), read mechanically from the seeds' results.

Every outcome is computed from paired per-seed differences with a Student's t interval over the seeds
(:func:`openrlhf_irl.eval.stats.summarize`); "beyond noise" means the 95% interval excludes 0. A claim is read only
when both gates pass; otherwise its outcome is "cannot tell on this task (gate)", with its numbers still shown.

Input: ``per_seed`` = one :func:`openrlhf_irl.demo.report.row_metrics` dict per seed (``{row: {metric: {prompt:
value}}}``), ``reward_models`` = :func:`openrlhf_irl.demo.report.reward_model_checks`, and the rows' metadata.
"""

from __future__ import annotations

from openrlhf_irl.eval.stats import difference, fmt_ci, summarize

SUPPORTED, REFUTED, CANNOT_TELL, GATED = "supported", "refuted", "cannot tell", "cannot tell on this task (gate)"
LEVEL_BAND = (0.3, 0.5)
MIN_SEEDS = 5  # the criteria's "5 seeds or more": with fewer, every claim reads "cannot tell" (its rows kept)
BON_CHECK_NS = (4, 8, 16)
AFD_VARIANT = "init-sft"
GOLDEN_PREF = "BT golden-pref"
MLE = "policy:sft_mle"


def _paired(per_seed: list[dict], a: str, b: str, metric: str = "golden") -> dict | None:
    """Mean and interval of ``a - b`` paired per (seed, prompt); None when a seed lacks either row."""
    if not all(a in m and b in m and metric in m[a] and metric in m[b] for m in per_seed):
        return None
    return summarize(difference([m[a][metric] for m in per_seed], [m[b][metric] for m in per_seed]))


def _above(s: dict | None) -> bool:
    return s is not None and s.get("lo") is not None and s["lo"] > 0


def _below(s: dict | None) -> bool:
    return s is not None and s.get("hi") is not None and s["hi"] < 0


def _seed_mean(m: dict, row: str, metric: str) -> float | None:
    values = m.get(row, {}).get(metric)
    return sum(values.values()) / len(values) if values else None


def interpolate_curve(points: list[tuple[float, float]], x: float) -> float | None:
    """The golden value of the piecewise-linear curve through ``(self_bleu, golden)`` points at self-BLEU ``x``,
    between the two points that bracket ``x``; None when no pair brackets it (the point lies off the curve)."""
    pts = sorted(points)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def gates(per_seed: list[dict]) -> dict:
    """Level: MLE SFT's mean golden in the band. Headroom: the oracle's Best-of-16 minus Best-of-1 beyond noise."""
    level = summarize([list(m[MLE]["golden"].values()) for m in per_seed]) if all(MLE in m for m in per_seed) else None
    headroom = _paired(per_seed, "bon:oracle:16", "bon:oracle:1")
    return {"level": {"value": level, "passed": level is not None and LEVEL_BAND[0] <= level["mean"] <= LEVEL_BAND[1]},
            "headroom": {"value": headroom, "passed": _above(headroom)}}


def afd_best_of_n(per_seed: list[dict], reward_models: dict) -> dict:
    """Supported: an init-sft model (BT or BCE) lifts Best-of-N over Best-of-1 beyond noise at N = 4, 8 and 16, and
    its mean ``spearman_golden`` is above 0.3. Refuted: golden-pref's Best-of-16 lifts beyond noise while every
    init-sft model's lift at every N includes 0 or lies below it (sharper when such a model has held-out accuracy
    above 0.8 and Spearman in [-0.1, 0.1]). Cannot tell: golden-pref's Best-of-16 does not lift."""
    ns = sorted({int(r.split(":")[2]) for m in per_seed for r in m if r.startswith("bon:") and r.count(":") == 2})
    lifts, models = {}, {}
    for kind in ("BT", "BCE", "golden"):
        scorer = GOLDEN_PREF if kind == "golden" else f"{kind} {AFD_VARIANT}"
        curve = {n: _paired(per_seed, f"bon:{scorer}:{n}", f"bon:{scorer}:1") for n in ns if n > 1}
        if any(v is not None for v in curve.values()):
            lifts[scorer] = curve
            models[scorer] = reward_models.get(scorer, {})
    golden_lift = lifts.get(GOLDEN_PREF, {}).get(16)
    afd = {s: c for s, c in lifts.items() if s != GOLDEN_PREF}

    def spearman(s):
        return (models[s].get("spearman_golden") or {}).get("mean")

    supported = [s for s, c in afd.items() if all(_above(c.get(n)) for n in BON_CHECK_NS)
                 and (spearman(s) or 0) > 0.3]
    # refuted needs both init-sft models, every N > 1 present in every seed, and none lifting
    complete = {f"BT {AFD_VARIANT}", f"BCE {AFD_VARIANT}"} <= set(afd) and all(
        c.get(n) is not None for c in afd.values() for n in ns if n > 1)
    flat = complete and all(not _above(v) for c in afd.values() for v in c.values())
    sharper = [s for s in afd if ((models[s].get("heldout_accuracy") or {}).get("mean") or 0) > 0.8
               and spearman(s) is not None and -0.1 <= spearman(s) <= 0.1]
    if supported:
        outcome, why = SUPPORTED, f"{', '.join(supported)}: lift beyond noise at N = 4, 8, 16 and Spearman > 0.3"
    elif not afd or golden_lift is None:
        outcome, why = CANNOT_TELL, "the run has no init-sft or golden-pref Best-of-N rows"
    elif _above(golden_lift) and flat:
        outcome, why = REFUTED, ("golden-pref lifts at N = 16 while no init-sft model lifts at any N"
                                 + (f"; sharper: {', '.join(sharper)} separate their sources (held-out accuracy "
                                    "> 0.8) without ranking quality (|Spearman| <= 0.1)" if sharper else ""))
    elif not _above(golden_lift):
        outcome, why = CANNOT_TELL, "golden-pref does not lift at N = 16 either"
    else:
        outcome, why = CANNOT_TELL, "golden-pref lifts; an init-sft model lifts at some N but not at all of 4, 8, 16 " \
                                    "with Spearman > 0.3"
    return {"outcome": outcome, "why": why, "lifts": lifts, "reward_models": models}


def afd_ppo(per_seed: list[dict], rows: dict) -> dict:
    """Supported: PPO over an AfD reward model beats MLE SFT beyond noise. Refuted: PPO over golden-pref does, PPO
    over the AfD model does not. Cannot tell: neither does."""
    diffs = {}
    for rid, row in rows.items():
        if rid.startswith("policy:ppo_") and row.get("ppo_reward"):
            diffs[row["ppo_reward"]] = _paired(per_seed, rid, MLE)
    diffs = {r: d for r, d in diffs.items() if d is not None}
    afd = {r: d for r, d in diffs.items() if AFD_VARIANT in r or "init-demo" in r or "sft-demo" in r}
    golden = diffs.get(GOLDEN_PREF)
    if not afd:
        outcome, why = CANNOT_TELL, "no PPO run over an AfD reward model"
    elif any(_above(d) for d in afd.values()):
        outcome, why = SUPPORTED, ", ".join(r for r, d in afd.items() if _above(d)) + " beats MLE SFT beyond noise"
    elif golden is not None and _above(golden):
        outcome, why = REFUTED, "PPO over golden-pref beats MLE SFT beyond noise; over the AfD model it does not"
    else:
        outcome, why = CANNOT_TELL, "neither the AfD model nor golden-pref beats MLE SFT beyond noise" + (
            "" if golden is not None else " (no golden-pref PPO run)")
    return {"outcome": outcome, "why": why, "minus_mle": diffs}


def iq_quality_diversity(per_seed: list[dict], rows: dict) -> dict:
    """Per seed and IQ-Learn td_weight: its golden at T = 1 minus MLE's temperature curve (per-seed mean golden
    against per-seed mean self-BLEU, linear between the two temperatures that bracket the IQ point's self-BLEU).
    Supported: one td_weight above the curve beyond noise. Refuted: every td_weight below it beyond noise. A td_weight
    whose point no two temperatures bracket in some seed has no gap (off the curve: cannot tell for it)."""
    from openrlhf_irl.eval.stats import seed_t_interval

    mle_rows = [r for r, row in rows.items() if row.get("policy") == "sft_mle" and r.startswith(MLE)]
    iq_rows = sorted(r for r, row in rows.items() if str(row.get("policy", "")).startswith("sft_iq")
                     and row.get("temperature", 1.0) == 1.0 and row.get("demo_fraction", 1.0) == 1.0)
    per_td = {}
    for rid in iq_rows:
        gaps = []
        for m in per_seed:
            curve = [(_seed_mean(m, r, "self_bleu"), _seed_mean(m, r, "golden")) for r in mle_rows]
            curve = [p for p in curve if None not in p]
            x, y = _seed_mean(m, rid, "self_bleu"), _seed_mean(m, rid, "golden")
            on_curve = interpolate_curve(curve, x) if x is not None and len(curve) >= 2 else None
            if on_curve is not None:
                gaps.append(y - on_curve)
        entry = {"seeds_bracketed": len(gaps), "seeds": len(per_seed)}
        if len(gaps) == len(per_seed) >= 2:
            lo, hi = seed_t_interval([[g] for g in gaps])
            entry["gap"] = {"mean": sum(gaps) / len(gaps), "lo": lo, "hi": hi, "n_seeds": len(gaps), "method": "t"}
        per_td[rows[rid]["label"]] = entry
    gaps = [e.get("gap") for e in per_td.values()]
    if not per_td or len(mle_rows) < 2:
        outcome, why = CANNOT_TELL, "the run has no IQ-Learn rows or no MLE temperature curve"
    elif any(_above(g) for g in gaps):
        outcome, why = SUPPORTED, "above MLE's temperature curve beyond noise: " + ", ".join(
            label for label, e in per_td.items() if _above(e.get("gap")))
    elif all(_below(g) for g in gaps):
        outcome, why = REFUTED, "every td_weight lies below MLE's temperature curve beyond noise"
    else:
        outcome, why = CANNOT_TELL, "no td_weight is above the curve beyond noise, not all are below it"
    return {"outcome": outcome, "why": why, "gap_to_mle_curve": per_td}


def iq_fewer_demos(per_seed: list[dict], rows: dict) -> dict:
    """Supported: on a subset, IQ-Learn minus MLE (same optimizer steps) beyond noise and positive. Refuted: beyond
    noise and negative on every subset (at least two). Cannot tell: anything else."""
    diffs = {}
    for rid, row in rows.items():
        frac = row.get("demo_fraction", 1.0)
        if str(row.get("policy", "")).startswith("sft_iq") and frac < 1 and row.get("temperature", 1.0) == 1.0:
            diffs[f"{frac:.0%}"] = _paired(per_seed, rid, f"policy:sft_mle_{frac:g}")
    diffs = {k: v for k, v in diffs.items() if v is not None}
    if not diffs:
        outcome, why = CANNOT_TELL, "no demonstration-subset rows"
    elif any(_above(d) for d in diffs.values()):
        outcome, why = SUPPORTED, "IQ-Learn above MLE beyond noise on " + ", ".join(
            k for k, d in diffs.items() if _above(d))
    elif len(diffs) >= 2 and all(_below(d) for d in diffs.values()):
        outcome, why = REFUTED, "IQ-Learn below MLE beyond noise on every subset"
    else:
        outcome, why = CANNOT_TELL, "no subset shows IQ-Learn above MLE beyond noise, not all show it below"
    return {"outcome": outcome, "why": why, "iq_minus_mle": diffs}


def iq_reward_recovery(reward_models: dict, task: str) -> dict:
    """``bigram`` only. Supported: the interval of the per-prompt Spearman correlation of ``extract_reward``'s sum with
    the hidden bigram score (the expert's reward ``r(y)``, ``spearman_hidden``) lies above 0.3. Refuted: its interval
    includes 0 and its mean is below 0.1. The correlation with the golden reward is kept beside it."""
    name = next((n for n in reward_models if n.startswith("IQ-Learn reward")), None)
    entry = (reward_models.get(name) or {}) if name else {}
    rho, golden = entry.get("spearman_hidden"), entry.get("spearman_golden")
    if task != "bigram":
        return {"outcome": "not read", "why": "read on bigram only", "spearman_hidden": rho, "spearman_golden": golden}
    if rho is None or rho.get("lo") is None:
        return {"outcome": CANNOT_TELL, "why": "fewer than 2 seeds with a value", "spearman_hidden": rho,
                "spearman_golden": golden}
    if rho["lo"] > 0.3:
        outcome, why = SUPPORTED, "interval above 0.3"
    elif rho["lo"] <= 0 <= rho["hi"] and rho["mean"] < 0.1:
        outcome, why = REFUTED, "interval includes 0 and mean below 0.1"
    else:
        outcome, why = CANNOT_TELL, "neither"
    return {"outcome": outcome, "why": why, "spearman_hidden": rho, "spearman_golden": golden}


def _hold(claims: dict, outcome: str, reason: str) -> None:
    """Replace every read claim's outcome by ``outcome``, keeping what its rows alone say."""
    for c in claims.values():
        if c["outcome"] != "not read":
            c["computed_outcome"] = c["outcome"]
            c["outcome"] = outcome
            c["why"] = f"{reason}; the rows alone would read '{c['computed_outcome']}' ({c['why']})"


def read_criteria(per_seed: list[dict], rows: dict, reward_models: dict, task: str) -> dict:
    """Gates and every claim's outcome; claims on a task that fails a gate are GATED (their numbers kept)."""
    g = gates(per_seed)
    claims = {"AfD, Best-of-N": afd_best_of_n(per_seed, reward_models),
              "AfD, PPO": afd_ppo(per_seed, rows),
              "IQ-Learn, quality against diversity": iq_quality_diversity(per_seed, rows),
              "IQ-Learn, fewer demonstrations": iq_fewer_demos(per_seed, rows),
              "IQ-Learn, reward recovery": iq_reward_recovery(reward_models, task)}
    if len(per_seed) < MIN_SEEDS:
        _hold(claims, CANNOT_TELL, f"{len(per_seed)} seed(s), fewer than the {MIN_SEEDS} the criteria require")
    elif not (g["level"]["passed"] and g["headroom"]["passed"]):
        failed = [k for k in ("level", "headroom") if not g[k]["passed"]]
        _hold(claims, GATED, f"gate failed: {', '.join(failed)}")
    return {"gates": g, "claims": claims}


def criteria_md(read: dict) -> list[str]:
    g = read["gates"]
    level, head = g["level"], g["headroom"]
    out = ["## The criteria of docs/experiment.md, read from these rows", "",
           f"- Gate, level: MLE SFT golden on the held-out prompts {fmt_ci(level['value']) if level['value'] else '-'}"
           f" (band {LEVEL_BAND[0]}-{LEVEL_BAND[1]}): {'passed' if level['passed'] else 'failed'}.",
           f"- Gate, headroom: oracle Best-of-16 minus Best-of-1 {fmt_ci(head['value']) if head['value'] else '-'}: "
           f"{'passed' if head['passed'] else 'failed'}.", ""]
    for name, c in read["claims"].items():
        out.append(f"- **{name}: {c['outcome']}.** {c['why']}.")
    return out + [""]
