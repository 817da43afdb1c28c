"""Build one experiment report from seeds that ran in several output folders (two experiments side by side, each on
its own seeds), after checking that every seed ran with the same settings.

    python scripts/combine_seeds.py --task sum --output-dir docs/experiment/sum \\
        outputs/exp_sum/seed_0 outputs/exp_sum/seed_1 outputs/exp_sum_b/seed_3 ...

Each folder holds the ``results.json`` that ``openrlhf-irl experiment`` writes per seed. Settings must equal those of
``experiment_config(task, scale, sweeps)``, apart from the seed and the folder; the report (``report.md``,
``report.json``, plots) is written into ``--output-dir``, which must not exist or be empty.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, replace


def main(argv: list[str] | None = None) -> int:
    from openrlhf_irl.demo.experiment import SCALES, SWEEPS, experiment_config, settings_md
    from openrlhf_irl.demo.report import build_report

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("seed_dirs", nargs="+")
    p.add_argument("--task", required=True)
    p.add_argument("--scale", choices=SCALES, default="full")
    p.add_argument("--sweeps", choices=SWEEPS, default="criteria")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--command", default="", help="the experiment commands that made the seeds, for the report")
    args = p.parse_args(argv)
    if os.path.isdir(args.output_dir) and os.listdir(args.output_dir):
        p.error(f"--output-dir {args.output_dir}: exists and is not empty")
    base = experiment_config(args.output_dir, scale=args.scale, task=args.task, sweeps=args.sweeps)
    results = []
    for folder in args.seed_dirs:
        path = os.path.join(folder, "results.json")
        try:
            with open(path) as f:
                result = json.load(f)
        except (OSError, ValueError) as err:
            p.error(f"{path}: cannot read ({err})")
        expected = json.loads(json.dumps(asdict(replace(base, seed=result["seed"], output_dir=os.path.abspath(folder)))))
        stored = result.get("config", {})
        differing = sorted(k for k in set(expected) | set(stored) if k != "output_dir" and expected.get(k) != stored.get(k))
        if differing:
            p.error(f"{path}: settings differ from --task {args.task} --scale {args.scale} --sweeps {args.sweeps} in "
                    + ", ".join(differing))
        results.append(result)
    seeds = [r["seed"] for r in results]
    if len(set(seeds)) != len(seeds):
        p.error(f"a seed appears twice: {seeds}")
    results.sort(key=lambda r: r["seed"])
    os.makedirs(args.output_dir, exist_ok=True)
    seed_times = {r["seed"]: sum(r.get("timings_s", {}).values()) for r in results}
    stage_means = {k: round(sum(r["timings_s"].get(k, 0) for r in results) / len(results), 1)
                   for k in results[0]["timings_s"]}
    build_report(args.output_dir, replace(base, seed=seeds[0]), results,
                 title=f"openrlhf-irl experiment ({args.scale} scale, {len(results)} seeds)",
                 extra_md=settings_md(base, sorted(seeds), args.command or "see docs/experiment.md",
                                      sum(seed_times.values()), seed_times,
                                      wall_label="Sum of the seeds' stage times (the seeds ran in several experiments)"),
                 timings={f"{k} (mean per seed)": v for k, v in stage_means.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
