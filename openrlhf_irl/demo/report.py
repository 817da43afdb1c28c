"""The demo's report: golden reward and diversity per policy and per Best-of-N row, as a terminal table,
``report.md``, ``report.json`` and PNG plots."""

from __future__ import annotations

import os
from dataclasses import asdict

from openrlhf_irl.utils.metrics import distinct_n, self_bleu

POLICY_LABELS = {
    "init": "initial policy",
    "sft_mle": "MLE SFT",
    "sft_iq": "IQ-Learn SFT",
    "demonstrations": "demonstrations (noisy expert)",
}


def diversity(responses: list[str]) -> dict[str, float]:
    return {"distinct_1": distinct_n(responses, 1), "distinct_2": distinct_n(responses, 2),
            "self_bleu": self_bleu(responses)}


def within_prompt_self_bleu(samples: list[tuple]) -> float:
    """Mean over prompts of the self-BLEU of that prompt's samples: how varied one prompt's answers are."""
    by_prompt: dict[str, list[str]] = {}
    for prompt, response, _ in samples:
        by_prompt.setdefault(prompt, []).append(response)
    values = [self_bleu(rs) for rs in by_prompt.values() if len(rs) > 1]
    return sum(values) / len(values) if values else float("nan")


def summarise(policy_rows: dict, curves: dict, selected: dict) -> list[dict]:
    """One row per policy and per (scorer, N) of Best-of-N.

    ``golden`` is the mean over all of a row's samples. Distinct-n and self-BLEU are computed on one response per
    prompt (a policy's first sample, Best-of-N's selection), so every row is measured on the same kind of set;
    policies also get ``within_self_bleu``, the self-BLEU among the samples of one prompt, averaged over prompts.
    """
    rows = []
    for name, samples in policy_rows.items():
        goldens = [g for _, _, g in samples]
        first = list({p: r for p, r, _ in reversed(samples)}.values())
        rows.append({"row": POLICY_LABELS.get(name, name), "kind": "policy", "n": len(samples),
                     "golden": sum(goldens) / len(goldens), **diversity(first),
                     "within_self_bleu": within_prompt_self_bleu(samples)})
    for scorer, by_n in selected.items():
        for n, responses in by_n.items():
            rows.append({"row": f"Best-of-{n} ({scorer})", "kind": "best_of_n", "scorer": scorer, "N": n,
                         "n": len(responses), "golden": curves[scorer][n], **diversity(responses)})
    for n, value in curves.get("oracle (golden)", {}).items():
        rows.append({"row": f"Best-of-{n} (oracle: golden)", "kind": "oracle", "N": n, "golden": value})
    return rows


def format_table(rows: list[dict]) -> str:
    head = (f"| {'row':<34} | {'golden':>7} | {'distinct-1':>10} | {'distinct-2':>10} | {'self-BLEU':>9} "
            f"| {'self-BLEU within prompt':>23} |")
    lines = [head, "|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|"]
    for r in rows:
        cells = [f"{r[k]:>{w}.3f}" if k in r else " " * (w - 1) + "-"
                 for k, w in (("distinct_1", 10), ("distinct_2", 10), ("self_bleu", 9), ("within_self_bleu", 23))]
        lines.append(f"| {r['row']:<34} | {r['golden']:>7.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def reading(rows: list[dict]) -> list[str]:
    """Sentences computed from the numbers (no claims the numbers do not support)."""
    by = {r["row"]: r for r in rows}
    out = []
    mle, iq, demo, init = (by.get(POLICY_LABELS[k]) for k in ("sft_mle", "sft_iq", "demonstrations", "init"))
    if mle and iq:
        d = iq["golden"] - mle["golden"]
        out.append(f"IQ-Learn SFT vs MLE SFT: golden {iq['golden']:.3f} vs {mle['golden']:.3f} ({d:+.3f}); "
                   f"self-BLEU within a prompt {iq['within_self_bleu']:.3f} vs {mle['within_self_bleu']:.3f} "
                   f"(lower = more diverse).")
    if init and mle:
        out.append(f"SFT moved the policy from {init['golden']:.3f} (initial) to {mle['golden']:.3f}; "
                   f"the demonstrator scores {demo['golden']:.3f}." if demo else "")
    bon = [r for r in rows if r["kind"] == "best_of_n"]
    if bon and demo:
        best = max(bon, key=lambda r: r["golden"])
        verdict = "above" if best["golden"] > demo["golden"] else "not above"
        out.append(f"Best Best-of-N row: {best['row']} at {best['golden']:.3f}, {verdict} the demonstrator "
                   f"({demo['golden']:.3f}).")
    return [s for s in out if s]


def build_report(root: str, cfg, policy_rows: dict, curves: dict, selected: dict, timings: dict) -> dict:
    from openrlhf_irl.afd.best_of_n import plot_curves
    from openrlhf_irl.utils.jsonl import atomic_write_json, atomic_writer

    rows = summarise(policy_rows, curves, selected)
    table = format_table(rows)
    sentences = reading(rows)
    baselines = {POLICY_LABELS[k]: next(r["golden"] for r in rows if r["row"] == POLICY_LABELS[k])
                 for k in ("init", "sft_mle", "sft_iq", "demonstrations") if k in policy_rows}
    plot_curves(curves, os.path.join(root, "best_of_n.png"), title="Best-of-N from MLE SFT (golden reward)",
                baselines=baselines)
    _plot_policies(rows, os.path.join(root, "policies.png"))
    report = {"config": asdict(cfg), "rows": rows, "curves": {k: {str(n): v for n, v in c.items()}
                                                             for k, c in curves.items()},
              "timings_s": timings, "reading": sentences}
    atomic_write_json(os.path.join(root, "report.json"), report)
    md = [
        f"# openrlhf-irl demo report ({'quick' if cfg.quick else 'full'}, seed {cfg.seed})", "",
        "Golden reward (0-1, higher is better) and diversity of each policy's samples on the evaluation prompts, "
        "and of the responses Best-of-N selects from the MLE SFT policy's samples. Distinct-n and self-BLEU use one "
        "response per prompt for every row; 'self-BLEU within prompt' compares a policy's samples for the same "
        "prompt (lower = more diverse).", "",
        table, "", "![Best-of-N](best_of_n.png)", "", "![Policies](policies.png)", "",
        "## What the numbers say", "", *[f"- {s}" for s in sentences], "",
        "## Stage timings (s)", "", *[f"- {k}: {v}" for k, v in timings.items()], "",
    ]
    with atomic_writer(os.path.join(root, "report.md")) as f:
        f.write("\n".join(md))
    print("\n" + table + "\n")
    for s in sentences:
        print("* " + s)
    print(f"\nreport: {os.path.join(root, 'report.md')}")
    return report


def _plot_policies(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from openrlhf_irl.utils.jsonl import atomic_writer

    policies = [r for r in rows if r["kind"] == "policy"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    names = [r["row"].replace(" (noisy expert)", "\n(noisy expert)") for r in policies]
    axes[0].bar(names, [r["golden"] for r in policies], color="tab:blue")
    axes[0].set_title("golden reward")
    axes[1].bar(names, [r["within_self_bleu"] for r in policies], color="tab:orange")
    axes[1].set_title("self-BLEU among one prompt's samples (lower = more diverse)", fontsize=10)
    for ax in axes:
        ax.tick_params(axis="x", labelsize=7, rotation=20)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    with atomic_writer(path, mode="wb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)
