"""Report of one or more seeds of the demo pipeline: every row as mean with a 95% interval (Student's t over the
per-seed means with 2+ seeds, a bootstrap over held-out prompts with one: :mod:`openrlhf_irl.eval.stats`), as a
terminal table, ``report.md``,
``report.json`` and PNG plots with error bars.

Per (seed, held-out prompt) a row gives:

* ``golden``: mean golden reward of the row's responses to the prompt;
* ``win_sft`` / ``win_demo``: win rate (ties half) of those responses against the MLE SFT policy's samples / the
  demonstrator's responses for the same prompt, over all pairs;
* ``self_bleu``, ``distinct_1``, ``distinct_2``: among the prompt's responses (rows with several per prompt);
* ``entropy``: per-token entropy of the sampling distribution along the samples (policies).

Comparisons (``IQ-Learn - MLE`` etc.) are paired: the interval is computed on per-(seed, prompt) differences.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, is_dataclass

from openrlhf_irl.demo.criteria import criteria_md, read_criteria
from openrlhf_irl.eval.diversity import prompt_text_diversity
from openrlhf_irl.eval.stats import difference, fmt_ci, prompt_win_rates, summarize

METRICS = {
    "golden": "golden",
    "win_sft": "win vs SFT",
    "win_demo": "win vs demo",
    "self_bleu": "self-BLEU in prompt",
    "distinct_2": "distinct-2 in prompt",
    "entropy": "entropy/token",
}
GROUP_TITLES = {
    "policy": "Policies (temperature 1)",
    "baseline": "Baselines",
    "ppo": "PPO over the AfD rewards (OpenRLHF train_ppo_ray, from MLE SFT)",
    "td_sweep": "IQ-Learn td_weight sweep (temperature 1)",
    "temperature": "Sampling temperature",
    "subset": "Demonstration subsets",
}


# --------------------------------------------------------------------------- per seed


def row_metrics(seed_result: dict) -> dict[str, dict[str, dict[str, float]]]:
    """``{row_id: {metric: {prompt: value}}}`` for one seed's results."""
    refs = seed_result["refs"]
    out = {}
    for rid, row in seed_result["rows"].items():
        golden, weights = row["golden"], row.get("weights")
        if weights:  # a distribution over the prompt's values (Best-of-N rows: each candidate's chance of selection)
            m = {"golden": {p: sum(w * x for w, x in zip(weights[p], v)) for p, v in golden.items()}}
            for key, ref in (("win_sft", "sft"), ("win_demo", "demo")):
                if refs.get(ref):
                    m[key] = {p: sum(w * prompt_win_rates({p: [x]}, refs[ref])[p] for w, x in zip(weights[p], v))
                              for p, v in golden.items()}
        else:
            m = {"golden": {p: sum(v) / len(v) for p, v in golden.items()}}
            if refs.get("sft"):
                m["win_sft"] = prompt_win_rates(golden, refs["sft"])
            if refs.get("demo"):
                m["win_demo"] = prompt_win_rates(golden, refs["demo"])
        responses = row.get("responses") or {}
        if responses and all(len(r) > 1 for r in responses.values()):
            div = {p: prompt_text_diversity(r) for p, r in responses.items()}
            for key in ("self_bleu", "distinct_1", "distinct_2"):
                m[key] = {p: d[key] for p, d in div.items()}
        if row.get("entropy"):
            m["entropy"] = {p: h / n for p, (h, n) in row["entropy"].items() if n > 0}
        out[rid] = m
    return out


# --------------------------------------------------------------------------- across seeds


def reward_model_checks(seed_results: list[dict]) -> dict:
    """Per scorer, ``heldout_accuracy`` and ``spearman_golden`` over the seeds (mean and interval of the per-seed
    values; None where no seed has a value), from each seed's ``reward_checks``. Each seed gives one value (a
    statistic over its prompts), so with one seed there is no interval: ``lo`` and ``hi`` are None."""
    names = {n for r in seed_results for n in r.get("reward_checks", {})}
    out = {}
    for name in sorted(names):
        entry = {}
        for metric in ("heldout_accuracy", "spearman_golden", "spearman_hidden"):
            values = [r["reward_checks"][name].get(metric) for r in seed_results if name in r.get("reward_checks", {})]
            values = [v for v in values if v is not None]
            if len(values) >= 2:
                entry[metric] = summarize([[v] for v in values])
            elif values:
                entry[metric] = {"mean": values[0], "lo": None, "hi": None, "n_seeds": 1, "method": "one seed"}
            else:
                entry[metric] = None
        sources = {r["reward_checks"][name].get("accuracy_sources") for r in seed_results
                   if name in r.get("reward_checks", {})} - {None}
        if sources:
            entry["accuracy_sources"] = sources.pop()
        out[name] = entry
    return out


def aggregate(seed_results: list[dict], n_boot: int = 2000) -> tuple[dict, list[dict]]:
    """Rows with a summary per metric, and the paired comparisons."""
    per_seed = [row_metrics(r) for r in seed_results]
    rows = {}
    for rid in seed_results[0]["rows"]:
        if not all(rid in m for m in per_seed):
            continue
        meta = {k: v for k, v in seed_results[0]["rows"][rid].items()
                if k not in ("golden", "weights", "responses", "entropy")}
        for metric in per_seed[0][rid]:
            if all(metric in m[rid] and m[rid][metric] for m in per_seed):
                meta[metric] = summarize([list(m[rid][metric].values()) for m in per_seed], n_boot=n_boot)
        rows[rid] = meta
    return rows, comparisons(rows, per_seed, n_boot)


def _pairs(rows: dict) -> list[tuple[str, str, str]]:
    """(name, row a, row b) for the differences the report states."""
    out = []
    mle = "policy:sft_mle"
    for rid, row in rows.items():
        if not rid.startswith("policy:") or rid == mle:
            continue
        temp = row.get("temperature", 1.0)
        policy = row.get("policy", "")
        if policy.startswith("sft_iq") and "demo_fraction" in row and row["demo_fraction"] < 1:
            base = f"policy:sft_mle_{row['demo_fraction']:g}"
            out.append((f"{row['label']} - MLE SFT, {row['demo_fraction']:.0%} of demos", rid, base))
        elif policy.startswith("sft_iq"):
            base = mle if temp == 1.0 else f"{mle}@T{temp:g}"
            out.append((f"{row['label']} - MLE SFT" + ("" if temp == 1.0 else f" @ T={temp:g}"), rid, base))
        elif policy == "spin_dpo" or policy.startswith("ppo_"):
            out.append((f"{row['label']} - MLE SFT", rid, mle))
    return [(n, a, b) for n, a, b in out if a in rows and b in rows]


def comparisons(rows: dict, per_seed: list[dict], n_boot: int) -> list[dict]:
    out = []
    for name, a, b in _pairs(rows):
        entry = {"comparison": name, "a": a, "b": b}
        for metric in ("golden", "self_bleu", "entropy"):
            if all(metric in m[a] and metric in m[b] for m in per_seed):
                entry[metric] = summarize(difference([m[a][metric] for m in per_seed],
                                                     [m[b][metric] for m in per_seed]), n_boot=n_boot)
        out.append(entry)
    return out


# --------------------------------------------------------------------------- text


def _cell(row: dict, key: str) -> str:
    return fmt_ci(row[key]) if key in row else "-"


def table(rows: list[dict], metrics=tuple(METRICS)) -> str:
    head = "| row | " + " | ".join(METRICS[m] for m in metrics) + " |"
    lines = [head, "|---|" + "---:|" * len(metrics)]
    for r in rows:
        lines.append(f"| {r['label']} | " + " | ".join(_cell(r, m) for m in metrics) + " |")
    return "\n".join(lines)


def bon_table(rows: dict, metric: str = "golden") -> str:
    bon = [r for r in rows.values() if r["group"] in ("bon", "oracle")]
    if not bon:
        return ""
    ns = sorted({r["N"] for r in bon})
    scorers = list(dict.fromkeys(r["scorer"] for r in bon))
    by = {(r["scorer"], r["N"]): r for r in bon}
    lines = ["| scorer | " + " | ".join(f"N={n}" for n in ns) + " |", "|---|" + "---:|" * len(ns)]
    for s in scorers:
        lines.append(f"| {s} | " + " | ".join(_cell(by[(s, n)], metric) if (s, n) in by else "-" for n in ns) + " |")
    return "\n".join(lines)


def _verdict(s: dict) -> str:
    if s["lo"] > 0:
        return "above zero: beyond noise"
    if s["hi"] < 0:
        return "below zero: beyond noise"
    return "interval contains 0: not distinguishable from noise"


def reading(rows: dict, comps: list[dict]) -> list[str]:
    """Sentences computed from the numbers (each claim states its interval)."""
    out = []
    init, mle, demo = rows.get("policy:init"), rows.get("policy:sft_mle"), rows.get("demonstrations")
    if init and mle and demo:
        out.append(f"SFT moves the policy from {fmt_ci(init['golden'])} (initial) to {fmt_ci(mle['golden'])} golden "
                   f"on held-out prompts; the demonstrator scores {fmt_ci(demo['golden'])}.")
    for c in comps:
        parts = [f"{m} {fmt_ci(c[m])} ({_verdict(c[m])})" for m in ("golden", "self_bleu") if m in c]
        out.append(f"{c['comparison']}: " + "; ".join(parts) + ".")
    bon = [r for r in rows.values() if r["group"] == "bon"]
    if bon and mle:
        best = max(bon, key=lambda r: r["golden"]["mean"])
        out.append(f"Best Best-of-N row: {best['label']} at {fmt_ci(best['golden'])} golden; win rate against the "
                   f"SFT sample {fmt_ci(best['win_sft'])}, against the demonstration {fmt_ci(best['win_demo'])}.")
        for scorer in dict.fromkeys(r["scorer"] for r in bon):
            curve = sorted((r for r in bon if r["scorer"] == scorer), key=lambda r: r["N"])
            top = max(curve, key=lambda r: r["golden"]["mean"])
            last = curve[-1]
            out.append(f"{scorer}: golden {fmt_ci(curve[0]['golden'])} at N={curve[0]['N']}, peak "
                       f"{fmt_ci(top['golden'])} at N={top['N']}, {fmt_ci(last['golden'])} at N={last['N']}.")
    return out


# --------------------------------------------------------------------------- the report


def build_report(root: str, cfg, seed_results: list[dict], title: str, extra_md: list[str] | None = None,
                 timings: dict | None = None) -> dict:
    from openrlhf_irl.utils.jsonl import atomic_write_json, atomic_writer

    config = asdict(cfg) if is_dataclass(cfg) else dict(cfg)
    n_boot = config.get("n_boot", 2000)
    rows, comps = aggregate(seed_results, n_boot=n_boot)
    sentences = reading(rows, comps)
    reward_models = reward_model_checks(seed_results)
    criteria = read_criteria([row_metrics(r) for r in seed_results], rows, reward_models, config.get("task", "sum"))
    seeds = [r["seed"] for r in seed_results]
    backend = ",".join(sorted({b for r in seed_results for b in r.get("backend", "").split(",") if b}))
    n_prompts = sum(len(r["prompts"]["held_out"]) for r in seed_results)
    timings = timings if timings is not None else seed_results[0].get("timings_s", {})

    plots = {"best_of_n": plot_best_of_n(rows, os.path.join(root, "best_of_n.png")),
             "policies": plot_policies(rows, os.path.join(root, "policies.png")),
             "quality_diversity": plot_quality_diversity(rows, os.path.join(root, "quality_diversity.png")),
             "subsets": plot_subsets(rows, os.path.join(root, "subsets.png"))}
    dtypes = {json.dumps(r["param_dtype"], sort_keys=True) for r in seed_results if r.get("param_dtype")}
    if len(dtypes) == 1:
        param_dtype = json.loads(dtypes.pop())
    else:  # results of a version that did not record it, or seeds that ran on different machines
        param_dtype = {"dtype": "mixed" if dtypes else "not recorded", "reason": "; ".join(sorted(dtypes))}
    report = {"config": config, "seeds": seeds, "backend": backend, "param_dtype": param_dtype,
              "n_eval_prompts": n_prompts, "rows": rows, "comparisons": comps, "reward_models": reward_models,
              "criteria": criteria, "timings_s": timings, "reading": sentences}
    atomic_write_json(os.path.join(root, "report.json"), report)

    groups = {}
    for r in rows.values():
        groups.setdefault(r["group"], []).append(r)
    from openrlhf_irl.demo.tasks import load_task

    md = [f"# {title}", "",
          f"Task: **{cfg.task}**, {load_task(cfg.task).TITLE}.", "",
          f"Seeds: {', '.join(map(str, seeds))}. Sampling backend: **{backend}** (GenerationPool). Training, reward "
          f"models and vLLM engines in **{param_dtype['dtype']}** ({param_dtype['reason'] or 'no reason recorded'}). "
          "Evaluation on "
          f"**held-out prompts** only ({n_prompts} (seed, prompt) units, none used in pre-training, SFT, AfD sampling "
          "or reward-model training). Every cell is the mean with a 95% interval (with 2 or more seeds Student's t over "
          "the per-seed means, which holds with few seeds; with one seed a bootstrap over its prompts, which leaves "
          "seed-to-seed variation out). Win rates compare golden rewards per prompt against the MLE SFT policy's samples ('vs SFT') and "
          "the demonstrator's responses ('vs demo'), ties counted half; the MLE SFT row against itself and the "
          "demonstrations against themselves are 0.5 by construction. Self-BLEU (lower = more diverse), distinct-2 "
          "and per-token entropy are among one prompt's samples.", ""]
    for group in ("policy", "baseline", "ppo", "td_sweep", "temperature", "subset"):
        if group in groups:
            md += [f"## {GROUP_TITLES[group]}", "", table(groups[group]), ""]
            if group == "ppo":
                md += ppo_md(seed_results)
    if reward_models:
        md += ["## Reward models, checked on held-out prompts", "",
               "Held-out accuracy: share of (positive, negative) response pairs of the same held-out prompt, from the "
               "two sources the model was trained to separate, that it orders correctly (0.5 = chance). Spearman: "
               "within-prompt rank correlation of its score with the golden reward on the held-out Best-of-N "
               "candidates (MLE SFT samples), averaged over prompts.", "",
               "| scorer | held-out accuracy | Spearman with golden |", "|---|---|---|"]
        md += [f"| {name} | {fmt_ci(c['heldout_accuracy']) if c.get('heldout_accuracy') else '-'} "
               f"({c.get('accuracy_sources', 'not a trained reward model')}) | "
               f"{fmt_ci(c['spearman_golden']) if c.get('spearman_golden') else '-'} |"
               for name, c in reward_models.items()] + [""]
    if comps:
        md += ["## Paired differences (per seed and prompt)", "",
               "| comparison | golden | self-BLEU in prompt | entropy/token |", "|---|---:|---:|---:|"]
        md += [f"| {c['comparison']} | {_cell(c, 'golden')} | {_cell(c, 'self_bleu')} | {_cell(c, 'entropy')} |"
               for c in comps]
        md.append("")
    if "bon" in groups:
        md += ["## Best-of-N from MLE SFT", "", "Golden reward of the selected response:", "", bon_table(rows), "",
               "Win rate of the selected response against an SFT sample for the same prompt:", "",
               bon_table(rows, "win_sft"), "", "Win rate against the demonstration:", "",
               bon_table(rows, "win_demo"), ""]
        if "ppo" in groups:
            md += ["PPO over the same rewards, one sample per prompt (the Best-of-N plot draws them as lines): "
                   + "; ".join(f"{r['label']} {fmt_ci(r['golden'])}" for r in groups["ppo"]) + ".", ""]
    for name, made in plots.items():
        if made:
            md += [f"![{name}]({name}.png)", ""]
    md += ["## What the numbers say", "", *[f"- {s}" for s in sentences], ""]
    md += criteria_md(criteria)
    if extra_md:
        md += extra_md
    if timings:
        md += ["## Stage timings (s)", "", *[f"- {k}: {v}" for k, v in timings.items()], ""]
    with atomic_writer(os.path.join(root, "report.md")) as f:
        f.write("\n".join(md))
    print("\n" + table([r for g in ("policy", "baseline", "ppo") for r in groups.get(g, [])]))
    if "bon" in groups:
        print("\nBest-of-N golden:\n" + bon_table(rows) + "\n")
    for s in sentences:
        print("* " + s)
    print(f"\nsampling backend: {backend}\nreport: {os.path.join(root, 'report.md')}")
    return report


def ppo_md(seed_results: list[dict]) -> list[str]:
    """Per PPO run and seed: its length, wall time and the training reward OpenRLHF logged at the first and last
    step (on the training prompts' rollouts, not the held-out evaluation above)."""
    lines = []
    for res in seed_results:
        for name, run in res.get("ppo", {}).items():
            rewards = [step["reward"] for step in run["logs"] if "reward" in step]
            trend = f"training reward {rewards[0]:.3f} at step 1, {rewards[-1]:.3f} at step {len(rewards)}" \
                if rewards else "no reward logged"
            lines.append(f"- seed {res['seed']}, {run['reward']}: {len(run['logs'])} PPO steps in {run['seconds']} s "
                         f"(start-up included); {trend}")
    return [*lines, ""] if lines else []


# --------------------------------------------------------------------------- plots


def _save(fig, path: str) -> None:
    import matplotlib.pyplot as plt

    from openrlhf_irl.utils.jsonl import atomic_writer

    fig.tight_layout()
    with atomic_writer(path, mode="wb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _err(rows: list[dict], key: str):
    return [[r[key]["mean"] - r[key]["lo"] for r in rows], [r[key]["hi"] - r[key]["mean"] for r in rows]]


def plot_best_of_n(rows: dict, path: str) -> bool:
    bon = [r for r in rows.values() if r["group"] in ("bon", "oracle")]
    if not bon:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for scorer in dict.fromkeys(r["scorer"] for r in bon):
        curve = sorted((r for r in bon if r["scorer"] == scorer), key=lambda r: r["N"])
        ax.errorbar([r["N"] for r in curve], [r["golden"]["mean"] for r in curve], yerr=_err(curve, "golden"),
                    marker="o", capsize=3, label=scorer, linestyle="--" if scorer == "oracle" else "-")
    for rid, name in (("demonstrations", "demonstrator"), ("policy:sft_mle", "MLE SFT")):
        if rid in rows:
            s = rows[rid]["golden"]
            ax.axhline(s["mean"], color="gray", linestyle=":", linewidth=1)
            ax.axhspan(s["lo"], s["hi"], color="gray", alpha=0.1)
            ax.annotate(name, (1, s["mean"]), textcoords="offset points", xytext=(2, 3), fontsize=8)
    for i, row in enumerate(r for r in rows.values() if r["group"] == "ppo"):
        color = f"C{(len(bon) + i) % 10}"
        ax.axhline(row["golden"]["mean"], color=color, linestyle="-.", linewidth=1.2, label=row["label"])
        ax.axhspan(row["golden"]["lo"], row["golden"]["hi"], color=color, alpha=0.08)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("N (samples per prompt)")
    ax.set_ylabel("golden reward of the selected response")
    ax.set_title("Best-of-N from MLE SFT on held-out prompts (95% intervals)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    _save(fig, path)
    return True


def plot_policies(rows: dict, path: str) -> bool:
    pols = [r for r in rows.values() if r["group"] in ("policy", "baseline", "ppo")]
    if not pols:
        return False
    plt = _plt()
    metrics = [m for m in ("golden", "win_sft", "win_demo", "self_bleu") if any(m in r for r in pols)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.8))
    for ax, m in zip(axes if len(metrics) > 1 else [axes], metrics):
        have = [r for r in pols if m in r]
        ax.bar(range(len(have)), [r[m]["mean"] for r in have], yerr=_err(have, m), capsize=3, color="tab:blue")
        ax.set_xticks(range(len(have)), [r["label"] for r in have], rotation=35, ha="right", fontsize=7)
        ax.set_title(METRICS[m], fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    _save(fig, path)
    return True


def plot_quality_diversity(rows: dict, path: str) -> bool:
    """Golden reward against within-prompt self-BLEU and against entropy, one line per SFT policy across
    temperatures."""
    sweep = [r for r in rows.values() if r.get("policy", "").startswith("sft_") and "demo_fraction" in r
             and r["demo_fraction"] == 1.0 and "self_bleu" in r]
    if len({(r["policy"], r.get("temperature")) for r in sweep}) < 3:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, x in zip(axes, ("self_bleu", "entropy")):
        for pol in dict.fromkeys(r["policy"] for r in sweep):
            pts = sorted((r for r in sweep if r["policy"] == pol and x in r), key=lambda r: r["temperature"])
            if not pts:
                continue
            ax.errorbar([r[x]["mean"] for r in pts], [r["golden"]["mean"] for r in pts], xerr=_err(pts, x),
                        yerr=_err(pts, "golden"), marker="o", capsize=2, label=pts[0]["label"].split(" @")[0])
            for r in pts:
                ax.annotate(f"T={r['temperature']:g}", (r[x]["mean"], r["golden"]["mean"]), fontsize=6,
                            textcoords="offset points", xytext=(3, 3))
        ax.set_xlabel(METRICS[x] + (" (lower = more diverse)" if x == "self_bleu" else " (higher = more diverse)"))
        ax.set_ylabel("golden reward")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("Quality vs diversity on held-out prompts: IQ-Learn td_weight and temperature (95% intervals)",
                 fontsize=10)
    _save(fig, path)
    return True


def plot_subsets(rows: dict, path: str) -> bool:
    pts = [r for r in rows.values() if r.get("group") in ("subset", "policy") and "demo_fraction" in r
           and r.get("temperature", 1.0) == 1.0]
    if not any(r["group"] == "subset" for r in pts):
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for td in sorted({r["td_weight"] for r in pts if r["group"] == "subset"}):
        line = sorted((r for r in pts if r["td_weight"] == td), key=lambda r: r["demo_fraction"])
        ax.errorbar([100 * r["demo_fraction"] for r in line], [r["golden"]["mean"] for r in line],
                    yerr=_err(line, "golden"), marker="o", capsize=3,
                    label="MLE SFT" if td == 0 else f"IQ-Learn (td {td:g})")
    ax.set_xscale("log")
    ax.set_xlabel("% of demonstrations used")
    ax.set_ylabel("golden reward (held-out prompts)")
    ax.set_title("Robustness to demonstration subsets (95% intervals)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)
    return True

