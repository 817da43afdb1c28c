"""``python -m openrlhf_irl.afd.ppo_series RUNS_JSON``: several ``train_ppo`` runs in one process and one local
Ray instance (:func:`openrlhf_irl.cli.train_ppo.run_cpu_series`), what :func:`openrlhf_irl.afd.ppo.run_ppo_series`
starts. ``RUNS_JSON`` is a JSON list of ``{"argv": [train_ppo flags], "seconds_file": path}``; each run's seconds
are written to its ``seconds_file`` once it ends."""

from __future__ import annotations

import json
import sys

from openrlhf_irl.cli.common import UsageError, cli_main


@cli_main("ppo_series", resume_hint="a run saving checkpoints (--ckpt.save_steps) resumes with --ckpt.load_enable")
def main(argv: list[str] | None = None) -> None:
    from openrlhf_irl.cli.train_ppo import run_cpu_series
    from openrlhf_irl.utils.jsonl import atomic_write_json

    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        runs = json.loads(argv[0]) if len(argv) == 1 else None
    except ValueError:
        runs = None
    if not isinstance(runs, list) or not all(isinstance(r, dict) and isinstance(r.get("argv"), list) for r in runs):
        raise UsageError("give one argument: a JSON list of {\"argv\": [...], \"seconds_file\": ...}")

    def done(i: int, seconds: float) -> None:
        if runs[i].get("seconds_file"):
            atomic_write_json(runs[i]["seconds_file"], {"seconds": round(seconds, 1)})

    raise SystemExit(run_cpu_series([r["argv"] for r in runs], on_run_done=done))


if __name__ == "__main__":
    main()
