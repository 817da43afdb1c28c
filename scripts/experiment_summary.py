"""Print, as markdown, the criteria outcomes and the numbers behind them from one or more experiment reports.

    python scripts/experiment_summary.py outputs/exp_sort/report.json outputs/exp_bigram/report.json ...

Each report.json is what ``openrlhf-irl experiment`` writes (its ``criteria`` entry: openrlhf_irl/demo/criteria.py).
"""

from __future__ import annotations

import json
import sys

from openrlhf_irl.eval.stats import fmt_ci


def _ci(s) -> str:
    return fmt_ci(s) if s else "-"


def summary(report: dict) -> list[str]:
    cfg, crit = report["config"], report["criteria"]
    task, g = cfg["task"], crit["gates"]
    claims = crit["claims"]
    out = [f"### {task} ({len(report['seeds'])} seeds: {', '.join(map(str, report['seeds']))})", "",
           f"- Gate, level: MLE SFT held-out golden {_ci(g['level']['value'])}: "
           f"{'passed' if g['level']['passed'] else 'failed'}.",
           f"- Gate, headroom: oracle Best-of-16 minus Best-of-1 {_ci(g['headroom']['value'])}: "
           f"{'passed' if g['headroom']['passed'] else 'failed'}.", ""]
    out += ["| claim | outcome | why |", "|---|---|---|"]
    out += [f"| {name} | {c['outcome']} | {c['why']} |" for name, c in claims.items()]
    bon = claims["AfD, Best-of-N"]
    out += ["", "Best-of-N minus Best-of-1 (golden), and the reward models' checks on held-out prompts:", "",
            "| scorer | N=4 | N=8 | N=16 | held-out accuracy | Spearman with golden |", "|---|---|---|---|---|---|"]
    for scorer, lifts in bon["lifts"].items():
        rm = report["reward_models"].get(scorer, {})
        out.append(f"| {scorer} | " + " | ".join(_ci(lifts.get(str(n), lifts.get(n))) for n in (4, 8, 16))
                   + f" | {_ci(rm.get('heldout_accuracy'))} | {_ci(rm.get('spearman_golden'))} |")
    ppo = claims["AfD, PPO"]["minus_mle"]
    out += ["", "PPO minus MLE SFT (golden): " + "; ".join(f"{r} {_ci(d)}" for r, d in ppo.items()) + "."]
    qd = claims["IQ-Learn, quality against diversity"]["gap_to_mle_curve"]
    out += ["", "IQ-Learn at T = 1 minus MLE's temperature curve at the same self-BLEU (golden): "
            + "; ".join(f"{label} {_ci(e.get('gap'))} ({e['seeds_bracketed']} of {e['seeds']} seeds on the curve)"
                        for label, e in qd.items()) + "."]
    few = claims["IQ-Learn, fewer demonstrations"]["iq_minus_mle"]
    out += ["", "IQ-Learn minus MLE on demonstration subsets (same optimizer steps, golden): "
            + "; ".join(f"{k} of demos {_ci(d)}" for k, d in few.items()) + "."]
    rec = claims["IQ-Learn, reward recovery"]
    out += ["", f"IQ-Learn reward recovery, Spearman of extract_reward's sum with the hidden reward "
                f"{_ci(rec.get('spearman_hidden'))}, with the golden reward {_ci(rec.get('spearman_golden'))} "
                f"({rec['outcome']}).", ""]
    return out


def main(paths: list[str]) -> int:
    for path in paths:
        with open(path) as f:
            print("\n".join(summary(json.load(f))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
