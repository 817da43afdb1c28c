"""``python -m openrlhf_irl.cli.best_of_n``: AfD extrapolation by Best-of-N over a learned or log-ratio reward.

Samples N_max responses per prompt from the (SFT) policy with the resumable sampling job (Ray actors on CPU,
vLLM engines on GPU; ``samples.jsonl`` carries its provenance, so a rerun with another policy or sampling setting
stops and ``--overwrite`` starts over), scores them with reward models and/or the training-free log-ratio
log pi_SFT(y|x) - log pi_init(y|x), and, given a golden reward, writes the expected golden reward of the
best-scored of N (the all-subsets estimate over the N_max samples, with its standard error, and the expected
number of prompts whose pick is unfinished) against N as JSON and PNG. Unfinished candidates rank below
finished ones for every scorer unless ``--unfinished score``. Every path is checked before any sampling.
"""

from __future__ import annotations

import argparse
import os
import sys

from openrlhf_irl.afd.best_of_n import (ESTIMATORS, UNFINISHED, ScoreError, check_scores, load_golden, parse_ns,
                                        plot_curves, resolve_golden, score_and_select)
from openrlhf_irl.cli import sample as sample_cli
from openrlhf_irl.cli.common import (UsageError, add_flag, check_lora, check_model, claim_output_unit, cli_main,
                                     load_checked_tokenizer, positive_int, resolve_outputs, temperature, top_p)
from openrlhf_irl.utils.output_guard import OutputConflict, OutputUnit
from openrlhf_irl.utils.jsonl import DataError, atomic_write_json, atomic_write_jsonl, data_error, read_jsonl


# The results computed from samples.jsonl, one unit; best_of_n.json, written last, says it is complete.
UNIT = ("scored.jsonl", "selected.jsonl", "best_of_n.png", "best_of_n.json")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m openrlhf_irl.cli.best_of_n", description=__doc__.splitlines()[0])
    p.add_argument("--policy", required=True, help="policy to sample from (the SFT model)")
    p.add_argument("--lora", help="LoRA adapter of the policy")
    p.add_argument("--prompts", required=True, help="prompts JSONL")
    add_flag(p, "--data.input_key", "--input-key", default="prompt")
    fmt = p.add_mutually_exclusive_group()
    add_flag(fmt, "--data.apply_chat_template", "--apply-chat-template", action="store_true")
    add_flag(fmt, "--data.input_template", "--input-template")
    p.add_argument("--n", default="1,2,4,8,16,32", help="comma-separated N values (default: %(default)s)")
    p.add_argument("--n-max", type=positive_int,
                   help="samples per prompt (N_max); the N grid is cut at it and ends at it (default: largest --n)")
    p.add_argument("--estimator", choices=ESTIMATORS, default="all_subsets",
                   help="all_subsets: expected golden reward of the best of N drawn from the N_max samples "
                   "(unbiased, lower variance); first: the best of the first N (default: %(default)s)")
    p.add_argument("--unfinished", choices=UNFINISHED, default="last",
                   help="candidates cut by --rollout.max_new_tokens: last = ranked below every finished one (for every "
                   "scorer and the oracle), score = ranked by score like the others (default: %(default)s)")
    p.add_argument("--reward-model", action="append", default=[], metavar="PATH",
                   help="OpenRLHF-format reward model to rank with (repeatable)")
    p.add_argument("--log-ratio-init", metavar="PATH",
                   help="initial policy: also rank with log pi_policy(y|x) - log pi_init(y|x)")
    p.add_argument("--golden", help="golden reward: hf:PATH (a third-party sequence classifier, scored on the plain "
                   "text), openrlhf:PATH (an OpenRLHF reward model), a directory (detected from its config), or "
                   "module:function(prompt, response)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--overwrite", action="store_true", help="start samples.jsonl over instead of resuming it (and "
                   "write into an existing non-empty --output-dir that this tool did not write)")
    add_flag(p, "--rollout.temperature", "--temperature", type=temperature, default=1.0,
             help="0 = greedy, else in [0.001, 100]")
    add_flag(p, "--rollout.top_p", "--top-p", type=top_p, default=0.95, help="in (0, 1]")
    add_flag(p, "--rollout.max_new_tokens", "--max-new-tokens", type=positive_int, default=128)
    p.add_argument("--num-actors", type=positive_int, default=2)
    p.add_argument("--backend", choices=("auto", "hf", "vllm"), default="auto")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--max-prompts", type=positive_int, help="use only the first K unique prompts")
    p.add_argument("--seed", type=int, default=0)
    return p


def _sample(args, n_max: int, path: str) -> None:
    argv = ["--model", args.policy, "--prompts", args.prompts, "--data.input_key", args.input_key,
            "--rollout.n_samples_per_prompt", str(n_max), "--rollout.temperature", str(args.temperature),
            "--rollout.top_p", str(args.top_p), "--rollout.max_new_tokens", str(args.max_new_tokens),
            "--num-actors", str(args.num_actors),
            "--backend", args.backend, "--policy-name", "policy", "--output", path, "--seed", str(args.seed),
            "--batch-size", str(args.batch_size)]
    if args.lora:
        argv += ["--lora", args.lora]
    if args.apply_chat_template:
        argv.append("--data.apply_chat_template")
    elif args.input_template:
        argv += ["--data.input_template", args.input_template]
    if args.max_prompts:
        argv += ["--max-prompts", str(args.max_prompts)]
    if args.overwrite:
        argv.append("--overwrite")
    code = sample_cli.main(argv)
    if code != 0:
        raise SystemExit(code)


def check_scorer_paths(args) -> None:
    """Every model path the run will load, checked before any sampling (UsageError naming the flag)."""
    check_model(args.policy, "--policy")
    check_lora(args.lora)
    for path in args.reward_model:
        check_model(path, "--reward-model")
        try:
            from openrlhf_irl.afd.best_of_n import golden_kind

            golden_kind(path)
        except ValueError:
            raise UsageError(f"--reward-model {path}: not a reward model (its config has no value_head_prefix and "
                             "no ...ForSequenceClassification architecture)") from None
        load_checked_tokenizer(path, "--reward-model")
    if args.log_ratio_init:
        check_model(args.log_ratio_init, "--log-ratio-init")
        init_vocab = load_checked_tokenizer(args.log_ratio_init, "--log-ratio-init", need_eos=False).get_vocab()
        if load_checked_tokenizer(args.policy, "--policy", need_eos=False).get_vocab() != init_vocab:
            raise UsageError(f"--log-ratio-init {args.log_ratio_init}: its tokenizer differs from --policy's; the "
                             "log-ratio needs both models on one tokenizer")
    if args.golden:
        try:
            resolve_golden(args.golden)
        except ValueError as err:
            raise UsageError(f"--golden: {err}") from None


def check_golden_call(args, prompt: str) -> None:
    """A ``module:function`` golden reward, called once on the first prompt and an empty response, returns one
    finite number (a failing or NaN-returning function is found before the sampling, not after it)."""
    if not args.golden or resolve_golden(args.golden)[0] != "function":
        return
    try:
        values = load_golden(args.golden)([prompt], [""])
    except Exception as err:  # whatever the user's function raises
        line = (str(err).strip().splitlines() or [""])[0]
        raise UsageError(f"--golden {args.golden}: fails on a test call with the first prompt "
                         f"({type(err).__name__}: {line})") from None
    try:
        check_scores(f"--golden {args.golden}", values, [{"prompt": prompt, "sample_index": None}])
    except ScoreError as err:
        raise UsageError(f"{err} (a test call with the first prompt and an empty response)") from None


def _path_inputs(args) -> dict:
    """Every path the run reads, by flag (for the output checks)."""
    inputs = {"--policy": args.policy, "--lora": args.lora, "--prompts": args.prompts,
              "--log-ratio-init": args.log_ratio_init}
    inputs.update({f"--reward-model #{i + 1}": path for i, path in enumerate(args.reward_model)})
    if args.golden:
        golden = args.golden.split(":", 1)[1] if args.golden.startswith(("hf:", "openrlhf:")) else args.golden
        if os.path.exists(golden):
            inputs["--golden"] = golden
    return inputs


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


def read_candidates(path: str, prompts: list, n_max: int) -> list:
    """This run's candidates (its prompts, sample_index < N_max) from the samples file; a repeated
    (prompt, sample_index) key is a DataError naming both lines."""
    wanted = set(prompts)
    first, records = {}, []
    for line_no, rec in read_jsonl(path, required=("prompt", "response")):
        key = (rec["prompt"], rec.get("sample_index"))
        if key in first:
            raise data_error(path, line_no, f"repeated (prompt, sample_index) key, first at line {first[key]}; "
                             "rerun with --overwrite", field="sample_index", reason="duplicate_key")
        first[key] = line_no
        if rec["prompt"] in wanted and rec["sample_index"] < n_max:
            records.append(rec)
    return records


@cli_main("best_of_n", resume_hint="the samples written so far are kept: rerun the same command to resume")
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        ns = parse_ns(args.n, args.n_max)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not args.reward_model and not args.log_ratio_init:
        print("error: give at least one scorer: --reward-model PATH and/or --log-ratio-init PATH", file=sys.stderr)
        return 2
    try:
        resolve_outputs({"--output-dir": args.output_dir}, _path_inputs(args), overwrite=args.overwrite,
                        dirs=("--output-dir",))
        check_scorer_paths(args)
        prompts = sample_cli.load_prompts(args.prompts, args.input_key)[0][: args.max_prompts]
        check_golden_call(args, prompts[0])
        unit = claim_output_unit(args.output_dir, UNIT, "openrlhf_irl.cli.best_of_n")  # last: nothing to release
    except (UsageError, DataError, OutputConflict) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    samples_path = os.path.join(args.output_dir, "samples.jsonl")
    before = _file_state(samples_path)
    unit.set_aside()  # the previous results leave the folder before the samples they were computed from change
    try:
        code = _results(args, ns, prompts, samples_path, unit)
    finally:  # the previous results come back only where the samples are still theirs (a refusal changes nothing)
        unit.close(restore=_file_state(samples_path) == before)
    return code


def _file_state(path: str):
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _results(args, ns: list, prompts: list, samples_path: str, unit: OutputUnit) -> int:
    """Sample (or resume), score and select; the results written to ``unit`` and committed together."""
    n_max = ns[-1]
    _sample(args, n_max, samples_path)
    try:
        records = read_candidates(samples_path, prompts, n_max)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    golden = load_golden(args.golden, batch_size=args.batch_size) if args.golden else None
    try:
        out = score_and_select(records, build_scorers(args), ns, golden, unfinished=args.unfinished,
                               estimator=args.estimator)
    except ScoreError as err:
        print(f"error: {err}; nothing written but {samples_path}", file=sys.stderr)
        return 2
    atomic_write_jsonl(unit.path("scored.jsonl"), records)
    selected = [{"prompt": rec["prompt"], "scorer": name, "N": n, "response": rec["response"], "score": rec[name],
                 "finished": rec.get("finished"), **({"golden": rec["golden"]} if golden else {})}
                for name, by_n in out["selected"].items() for n, recs in by_n.items() for rec in recs]
    atomic_write_jsonl(unit.path("selected.jsonl"), selected)
    result = {"ns": ns, "n_max": n_max, "n_prompts": len(out["groups"]), "scorers": list(out["selected"]),
              "estimator": args.estimator, "unfinished": args.unfinished,
              "unfinished_candidates": out["unfinished_candidates"], "n_candidates": len(records)}
    print(f"{out['unfinished_candidates']} of {len(records)} candidates are unfinished (ranked "
          f"{'last' if args.unfinished == 'last' else 'by score'})")
    if golden:
        result["curves"] = out["curves"]
        result["stats"] = out["stats"]
        plot_curves(out["curves"], unit.path("best_of_n.png"),
                    title=f"Best-of-N, {len(out['groups'])} prompts")
        for name, stats in out["stats"].items():
            print(f"{name:>24}: " + "  ".join(
                f"N={n}: {s['mean']:.4f}" + (f"±{s['se']:.4f}" if s["se"] is not None else "")
                + f" (unfinished {s['unfinished']:.1f})" for n, s in stats.items()))
    atomic_write_json(unit.path("best_of_n.json"), result)
    unit.commit()  # a previous run's curve (a run without --golden has none) is gone with the rest
    print(f"wrote {args.output_dir}/best_of_n.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
