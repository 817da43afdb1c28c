"""``openrlhf-irl`` / ``python -m openrlhf_irl``: the embedded demo, the multi-seed experiment, and a list of the
package's commands."""

from __future__ import annotations

import argparse
import os
import sys

from openrlhf_irl.cli.common import cli_main
from openrlhf_irl.demo.tasks import TASKS

COMMANDS = {
    "train_sft": "OpenRLHF's SFT CLI with --trainer {sft,irl_iq}",
    "train_rm": "OpenRLHF's reward-model CLI with --trainer {rm,afd_rm}",
    "sample": "N samples per prompt from a policy (Ray + transformers on CPU, vLLM on GPU), resumable",
    "build_afd_dataset": "demo-vs-sample reward-model dataset (pairs or labels)",
    "best_of_n": "Best-of-N over a reward model or the log-ratio, golden reward against N",
    "extract_reward": "per-token IQ-Learn rewards and their correlation with a reference score",
}


def _offline_env(output_dir: str) -> None:
    """No downloads, and no caches in the home directory: datasets' and matplotlib's under the output directory's
    ``.cache``; a user's own settings win. (DeepSpeed's, triton's and torch's build caches were pointed into the
    package's cache when this module imported ``openrlhf_irl.cli``: ``utils.cache_dir``.)"""
    cache = os.path.join(os.path.abspath(output_dir), ".cache")
    for key, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
                       "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_CACHE": os.path.join(cache, "hf_datasets"),
                       "MPLCONFIGDIR": os.path.join(cache, "matplotlib")}.items():
        os.environ.setdefault(key, value)


def _check_output_dir(path: str, overwrite: bool, subdirs: list | None = None, mark: bool = True) -> None:
    """Refuse (one line) an empty path, or an existing non-empty directory, or a ``seed_<s>/`` folder in it that a
    rerun would replace, which this tool did not write (no marker) unless ``--overwrite``; then claim ``path``."""
    from openrlhf_irl.cli.common import UsageError, resolve_outputs
    from openrlhf_irl.utils.output_guard import mark_dir

    try:
        resolve_outputs({"--output-dir": path}, {}, overwrite=overwrite, dirs=("--output-dir",))
        for sub in subdirs or ():
            resolve_outputs({f"--output-dir's {os.path.basename(sub)}/": sub}, {}, overwrite=overwrite,
                            dirs=(f"--output-dir's {os.path.basename(sub)}/",))
        if mark:
            mark_dir(path, "openrlhf-irl")
            for sub in subdirs or ():
                if overwrite and os.path.isdir(sub):
                    mark_dir(sub, "openrlhf-irl (--overwrite)")  # told to: the experiment may replace it
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as err:
        print(f"error: --output-dir {path}: cannot create it ({err.strerror})", file=sys.stderr)
        raise SystemExit(1) from None


def _seeds(text: str) -> list[int]:
    try:
        if "-" in text and "," not in text:
            lo, hi = (int(x) for x in text.split("-"))
            seeds = list(range(lo, hi + 1))
        else:
            seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count (3), a list (0,1,2) or a range (0-2), got {text!r}")
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"expected distinct non-negative seeds, got {text!r}")
    return seeds


def _parse_seeds(parser, text: str) -> list[int]:
    """``--seeds``: a count K (seeds 0..K-1), a list or a range; a parser error otherwise."""
    text = text.strip()
    try:
        seeds = list(range(int(text))) if text.isdigit() else _seeds(text)
    except argparse.ArgumentTypeError as e:
        parser.error(f"--seeds: {e}")
    if not seeds:
        parser.error("--seeds: need at least one seed")
    return seeds


def _counts(text: str) -> list[int]:
    """A comma-separated list of positive whole numbers."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive whole numbers, got {text!r}")
    return values


@cli_main("openrlhf-irl", resume_hint="rerun the same command; a stopped run never leaves its old report beside new data")
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="openrlhf-irl", description="Inverse RL for OpenRLHF.",
                                     epilog="other commands: " + "; ".join(
                                         f"python -m openrlhf_irl.cli.{k} ({v})" for k, v in COMMANDS.items()))
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="IQ-Learn SFT and AfD Best-of-N end to end on a tiny model, on CPU "
                                       "(one seed, held-out prompts)")
    demo.add_argument("--output-dir", default="outputs/demo")
    demo.add_argument("--overwrite", action="store_true",
                      help="write into an existing non-empty --output-dir that this tool did not write")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quick", action="store_true", help="a one-minute smoke version")
    demo.add_argument("--task", choices=tuple(TASKS), default="sum",
                      help="sum: the new-target stress test (held-out targets never trained on); sort and bigram: "
                           "held-out prompts from the training distribution; bigram: a hidden bigram reward the "
                           "expert samples from exactly (default: %(default)s)")
    demo.add_argument("--expert-habit", action="store_true",
                      help="bigram only: the expert also prefers to end on a word the reward ignores")
    demo.add_argument("--backend", choices=("auto", "hf", "vllm"), default="auto",
                      help="sampling backend of the GenerationPool (default: %(default)s)")
    demo.add_argument("--ppo-rewards", default=None, metavar="LIST",
                      help="comma-separated rewards of the PPO stage, from 'BCE init-sft', 'BT init-sft', "
                           "'BT golden-pref' (the comparator on golden-ordered SFT samples), 'log-ratio' "
                           "(default: BCE init-sft,log-ratio); 'none' skips PPO")
    demo.add_argument("--verbose", action="store_true", help="every stage's output on the terminal (OpenRLHF, "
                      "DeepSpeed, vLLM, Ray) instead of a line per stage and logs in OUTPUT_DIR/logs/")

    exp = sub.add_parser("experiment", help="the demo's pipeline over several seeds with the papers' comparisons; "
                                            "every row as mean with a 95%% interval")
    exp.add_argument("--output-dir", default="outputs/experiment")
    exp.add_argument("--overwrite", action="store_true", help="write into (and replace seed_<s>/ folders of) an "
                     "existing non-empty --output-dir that this tool did not write")
    exp.add_argument("--seeds", default="3",
                     help="a count K (seeds 0..K-1), a list 0,1,2 or a range 0-4 (default: %(default)s)")
    exp.add_argument("--scale", choices=("quick", "small", "full"), default="full",
                     help="full: the demo's model and data; small: a smaller model and data set, every sweep; "
                          "quick: tiny models and sweeps, a CI-sized run (default: %(default)s)")
    exp.add_argument("--quick", action="store_true", help="same as --scale quick")
    exp.add_argument("--backend", choices=("auto", "hf", "vllm"), default="auto",
                     help="sampling backend of the GenerationPool (default: %(default)s)")
    exp.add_argument("--sweeps", choices=("criteria", "all"), default="criteria",
                     help="small and full scales: criteria = the comparisons the criteria of docs/experiment.md read "
                          "(about 4000 AfD pairs); all = every comparison, init-demo/sft-demo models, SPIN and "
                          "Best-of-64 included, 16 AfD samples per prompt (default: %(default)s)")
    exp.add_argument("--no-spin", action="store_true", help="skip the SPIN-style DPO baseline (with --sweeps all or "
                     "--quick; the criteria sweeps have none)")
    exp.add_argument("--task", choices=tuple(TASKS), default="sum", help="the task (see demo --help)")
    exp.add_argument("--expert-habit", action="store_true", help="bigram only (see demo --help)")
    exp.add_argument("--verbose", action="store_true", help="every stage's output on the terminal instead of a "
                     "line per stage and logs in OUTPUT_DIR/seed_<s>/logs/")
    size = sub.add_parser("size-task", help="MLE SFT's golden reward on validation prompts for task sizes: the "
                                            "gate to pass before comparing methods (docs/experiment.md)")
    size.add_argument("--task", choices=[t for t in TASKS if t != "sum"], required=True,
                      help="a task whose held-out prompts are fresh draws (sum's are fixed by its split)")
    size.add_argument("--n-train", type=_counts, default=[1000], metavar="LIST",
                      help="training prompts (= demonstrations), comma-separated (default: 1000)")
    size.add_argument("--epochs", type=_counts, default=[16], metavar="LIST",
                      help="MLE SFT epochs, comma-separated (default: 16)")
    size.add_argument("--seeds", default="1", help="as experiment --seeds (default: %(default)s)")
    size.add_argument("--quick", action="store_true", help="the quick demo's model and pre-training")
    size.add_argument("--backend", choices=("auto", "hf", "vllm"), default="auto")
    size.add_argument("--output-dir", default="outputs/sizing")
    size.add_argument("--overwrite", action="store_true",
                      help="write into an existing non-empty --output-dir that this tool did not write")
    args = parser.parse_args(argv)
    if getattr(args, "expert_habit", False) and args.task != "bigram":
        parser.error(f"--expert-habit: only the bigram task has an expert habit, not --task {args.task}")
    _check_output_dir(args.output_dir, args.overwrite, mark=False)  # before _offline_env points caches into it
    _offline_env(args.output_dir)
    if args.command == "demo":
        from openrlhf_irl.demo.pipeline import run_demo

        overrides = {"task": args.task, "expert_habit": args.expert_habit}
        if args.ppo_rewards is not None:
            text = args.ppo_rewards.strip()
            overrides["ppo_rewards"] = () if text == "none" else tuple(r.strip() for r in text.split(",") if r.strip())
        try:
            from openrlhf_irl.demo.pipeline import DemoConfig

            DemoConfig.make(args.output_dir, quick=args.quick, **overrides)  # refused here, before any work
        except ValueError as err:
            parser.error(f"--ppo-rewards: {err}")
        _check_output_dir(args.output_dir, args.overwrite)
        run_demo(args.output_dir, seed=args.seed, quick=args.quick, backend=args.backend, verbose=args.verbose,
                 **overrides)
    elif args.command == "experiment":
        seeds = _parse_seeds(parser, args.seeds)
        _check_output_dir(args.output_dir, args.overwrite,
                          [os.path.join(args.output_dir, f"seed_{s}") for s in seeds])
        from openrlhf_irl.demo.experiment import run_experiment

        run_experiment(args.output_dir, seeds, backend=args.backend, spin=not args.no_spin,
                       scale="quick" if args.quick else args.scale, verbose=args.verbose, task=args.task,
                       expert_habit=args.expert_habit, sweeps=args.sweeps)
    elif args.command == "size-task":
        seeds = _parse_seeds(parser, args.seeds)
        _check_output_dir(args.output_dir, args.overwrite)
        from openrlhf_irl.demo.sizing import run_sizing

        run_sizing(args.task, args.n_train, args.epochs, seeds, args.output_dir, quick=args.quick,
                   backend=args.backend)
    return 0


if __name__ == "__main__":
    sys.exit(main())
