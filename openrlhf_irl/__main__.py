"""``openrlhf-irl`` / ``python -m openrlhf_irl``: the embedded demo and a list of the package's commands."""

from __future__ import annotations

import argparse
import sys

COMMANDS = {
    "train_sft": "OpenRLHF's SFT CLI with --trainer {sft,irl_iq}",
    "train_rm": "OpenRLHF's reward-model CLI with --trainer {rm,afd_rm}",
    "sample": "N samples per prompt from a policy (Ray + transformers on CPU, vLLM on GPU), resumable",
    "build_afd_dataset": "demo-vs-sample reward-model dataset (pairs or labels)",
    "best_of_n": "Best-of-N over a reward model or the log-ratio, golden reward against N",
    "extract_reward": "per-token IQ-Learn rewards and their correlation with a reference score",
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="openrlhf-irl", description="Inverse RL for OpenRLHF.",
                                     epilog="other commands: " + "; ".join(
                                         f"python -m openrlhf_irl.cli.{k} ({v})" for k, v in COMMANDS.items()))
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="IQ-Learn SFT and AfD Best-of-N end to end on a tiny model, on CPU")
    demo.add_argument("--output-dir", default="outputs/demo")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quick", action="store_true", help="a one-minute smoke version")
    args = parser.parse_args(argv)
    if args.command == "demo":
        import os

        for key, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
                           "TOKENIZERS_PARALLELISM": "false"}.items():
            os.environ.setdefault(key, value)
        from openrlhf_irl.demo.pipeline import run_demo

        run_demo(args.output_dir, seed=args.seed, quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
