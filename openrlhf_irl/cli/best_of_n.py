"""``python -m openrlhf_irl.cli.best_of_n``: AfD extrapolation by Best-of-N over a learned or log-ratio reward.

Samples N_max responses per prompt from the (SFT) policy with the resumable sampling job (Ray actors on CPU,
vLLM engines on GPU), scores them with a reward model and/or the training-free log-ratio
log pi_SFT(y|x) - log pi_init(y|x), keeps the best of the first N for each N, and, given a golden reward, writes
the golden reward of the selected responses against N as JSON and PNG.
"""

from __future__ import annotations

import argparse
import os
import sys

from openrlhf_irl.afd.best_of_n import load_golden, parse_ns, plot_curves, score_and_select
from openrlhf_irl.cli import sample as sample_cli
from openrlhf_irl.utils.jsonl import DataError, atomic_write_json, atomic_write_jsonl, read_jsonl


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m openrlhf_irl.cli.best_of_n", description=__doc__.splitlines()[0])
    p.add_argument("--policy", required=True, help="policy to sample from (the SFT model)")
    p.add_argument("--lora", help="LoRA adapter of the policy")
    p.add_argument("--prompts", required=True, help="prompts JSONL")
    p.add_argument("--input-key", default="prompt")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--apply-chat-template", action="store_true")
    fmt.add_argument("--input-template")
    p.add_argument("--n", default="1,2,4,8,16,32", help="comma-separated N values (default: %(default)s)")
    p.add_argument("--reward-model", action="append", default=[], metavar="PATH",
                   help="OpenRLHF-format reward model to rank with (repeatable)")
    p.add_argument("--log-ratio-init", metavar="PATH",
                   help="initial policy: also rank with log pi_policy(y|x) - log pi_init(y|x)")
    p.add_argument("--golden", help="golden reward: reward-model directory or module:function(prompt, response)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--num-actors", type=int, default=2)
    p.add_argument("--backend", choices=("auto", "hf", "vllm"), default="auto")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-prompts", type=int)
    p.add_argument("--seed", type=int, default=0)
    return p


def _sample(args, n_max: int, path: str) -> None:
    argv = ["--model", args.policy, "--prompts", args.prompts, "--input-key", args.input_key,
            "--n-samples", str(n_max), "--temperature", str(args.temperature), "--top-p", str(args.top_p),
            "--max-new-tokens", str(args.max_new_tokens), "--num-actors", str(args.num_actors),
            "--backend", args.backend, "--policy-name", "policy", "--output", path, "--seed", str(args.seed),
            "--batch-size", str(args.batch_size)]
    if args.lora:
        argv += ["--lora", args.lora]
    if args.apply_chat_template:
        argv.append("--apply-chat-template")
    elif args.input_template:
        argv += ["--input-template", args.input_template]
    if args.max_prompts:
        argv += ["--max-prompts", str(args.max_prompts)]
    code = sample_cli.main(argv)
    if code != 0:
        raise SystemExit(code)


def build_scorers(args) -> dict:
    """Scorers over sample records: each reward model, and the log-ratio (EOS counted for finished samples)."""
    fmt = dict(apply_chat_template=args.apply_chat_template, input_template=args.input_template)
    scorers = {}
    for path in args.reward_model:
        from openrlhf_irl.models.reward import RewardScorer

        rm = RewardScorer(path, batch_size=args.batch_size, **fmt)
        scorers[f"rm:{os.path.basename(os.path.normpath(path))}"] = (
            lambda recs, rm=rm: rm.score([r["prompt"] for r in recs], [r["response"] for r in recs]))
    if args.log_ratio_init:
        from openrlhf_irl.generation.scoring import LogRatioScorer

        ratio = LogRatioScorer(args.policy, args.log_ratio_init, sft_lora=args.lora, batch_size=args.batch_size, **fmt)
        scorers["log_ratio"] = lambda recs: ratio.score([r["prompt"] for r in recs], [r["response"] for r in recs],
                                                        add_eos=[r["finished"] for r in recs])
    return scorers


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        ns = parse_ns(args.n)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not args.reward_model and not args.log_ratio_init:
        print("error: give at least one scorer: --reward-model PATH and/or --log-ratio-init PATH", file=sys.stderr)
        return 2
    os.makedirs(args.output_dir, exist_ok=True)
    samples_path = os.path.join(args.output_dir, "samples.jsonl")
    _sample(args, ns[-1], samples_path)
    try:
        records = [r for _, r in read_jsonl(samples_path, required=("prompt", "response"))]
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    golden = load_golden(args.golden) if args.golden else None
    out = score_and_select(records, build_scorers(args), ns, golden)
    atomic_write_jsonl(os.path.join(args.output_dir, "scored.jsonl"), records)
    selected = [{"prompt": rec["prompt"], "scorer": name, "N": n, "response": rec["response"], "score": rec[name],
                 **({"golden": rec["golden"]} if golden else {})}
                for name, by_n in out["selected"].items() for n, recs in by_n.items() for rec in recs]
    atomic_write_jsonl(os.path.join(args.output_dir, "selected.jsonl"), selected)
    result = {"ns": ns, "n_prompts": len(out["groups"]), "scorers": list(out["selected"])}
    if golden:
        result["curves"] = out["curves"]
        plot_curves(out["curves"], os.path.join(args.output_dir, "best_of_n.png"),
                    title=f"Best-of-N, {len(out['groups'])} prompts")
        for name, curve in out["curves"].items():
            print(f"{name:>24}: " + "  ".join(f"N={n}: {v:.4f}" for n, v in curve.items()))
    atomic_write_json(os.path.join(args.output_dir, "best_of_n.json"), result)
    print(f"wrote {args.output_dir}/best_of_n.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
