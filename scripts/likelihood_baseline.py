"""A baseline for the reward-recovery reading, added after the results (post hoc): MLE SFT's own log-likelihood as a
reward, scored like IQ-Learn's extracted reward.

At gamma 1 the sum of IQ-Learn's extracted per-token rewards is ``log pi(y|x) + V(s_0)``, so within one prompt it
ranks responses as the IQ-Learn policy's likelihood does. This script runs the same ``extract_reward`` at gamma 1 on
the same held-out candidates (each seed's ``samples/iq_reward_in.jsonl``) with the MLE SFT policy, and prints the
per-prompt Spearman correlation of that sum with the task's hidden reward (bigram) and with the golden reward, per
seed and as a mean with a Student's t interval over the seeds:

    python scripts/likelihood_baseline.py outputs/exp_bigram/seed_0 outputs/exp_bigram/seed_1 ...
"""

from __future__ import annotations

import json
import os
import sys
import tempfile


def seed_correlations(seed_dir: str) -> dict:
    """MLE SFT's reward sum at gamma 1 on the seed's held-out candidates, correlated as the experiment does."""
    from openrlhf_irl.demo.pipeline import reward_sum_correlations
    from openrlhf_irl.demo.tasks import load_task

    with open(os.path.join(seed_dir, "results.json")) as f:
        task = load_task(json.load(f)["config"]["task"])
    with tempfile.TemporaryDirectory(prefix="oirl_likelihood_") as tmp:
        result = reward_sum_correlations(os.path.join(seed_dir, "models", "sft_mle"),
                                         os.path.join(seed_dir, "samples", "iq_reward_in.jsonl"),
                                         os.path.join(tmp, "mle_reward.jsonl"), task)
    return {k: v for k, v in result.items() if k in ("spearman_golden", "spearman_hidden")}


def main(seed_dirs: list[str]) -> int:
    from openrlhf_irl.eval.stats import fmt_ci, summarize

    per_seed = [seed_correlations(d) for d in seed_dirs]
    iq = []  # IQ-Learn's extracted reward on the same candidates, as the experiment stored it
    for d in seed_dirs:
        with open(os.path.join(d, "results.json")) as f:
            checks = json.load(f)["reward_checks"]
        iq.append(next(v for k, v in checks.items() if k.startswith("IQ-Learn reward")))
    for d, r, q in zip(seed_dirs, per_seed, iq):
        print(f"{d}: MLE " + ", ".join(f"{k} {v:.3f}" for k, v in r.items())
              + "; IQ-Learn " + ", ".join(f"{k} {q[k]:.3f}" for k in r))
    for key in per_seed[0]:
        mle = [r[key] for r in per_seed]
        diff = [q[key] - m for q, m in zip(iq, mle)]
        print(f"{key}: MLE SFT log-likelihood {fmt_ci(summarize([[v] for v in mle]))}, IQ-Learn reward "
              f"{fmt_ci(summarize([[q[key]] for q in iq]))}, IQ-Learn minus MLE {fmt_ci(summarize([[v] for v in diff]))}"
              f" ({len(mle)} seeds)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
