"""Build an AfD reward-model dataset (demonstrations / policy samples) as JSONL.

Example (the paper's Init-SFT variant, pairs for OpenRLHF's reward trainer)::

    python -m openrlhf_irl.cli.build_afd_dataset --variant init-sft \\
        --init-samples init.jsonl --sft-samples sft.jsonl --format pairs --output afd_pairs.jsonl
    python -m openrlhf.cli.train_rm --data.dataset afd_pairs.jsonl --data.prompt_key prompt ...

Exit codes: 0 success, 2 bad arguments or bad data (message on stderr), 1 unreadable/unwritable file.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from openrlhf_irl.datasets.afd import FORMATS, VARIANTS, build_afd_dataset, format_report
from openrlhf_irl.cli.common import UsageError, check_output_file, positive_int, resolve_outputs
from openrlhf_irl.utils.output_guard import mark_file
from openrlhf_irl.utils.jsonl import DataError, atomic_write_jsonl

#: input source -> (flag, argparse dest)
_INPUTS = {
    "demo": ("--demos", "demos"),
    "init": ("--init-samples", "init_samples"),
    "sft": ("--sft-samples", "sft_samples"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m openrlhf_irl.cli.build_afd_dataset",
        description="Build an AfD reward-model dataset: positives vs negatives per variant "
        "(init-sft: init samples vs SFT samples; init-demo: init samples vs demos; sft-demo: SFT samples vs demos).",
    )
    p.add_argument("--variant", choices=list(VARIANTS), default="init-sft", help="default: %(default)s")
    p.add_argument("--demos", help="demonstrations JSONL (init-demo, sft-demo)")
    p.add_argument("--init-samples", help="init-policy samples JSONL (init-sft, init-demo)")
    p.add_argument("--sft-samples", help="SFT-policy samples JSONL (init-sft, sft-demo)")
    p.add_argument("--format", choices=FORMATS, default="pairs",
                   help="pairs: {prompt, chosen, rejected} for openrlhf.cli.train_rm --data.prompt_key prompt; "
                   "labels: {prompt, response, label}. Default: %(default)s")
    p.add_argument("--output", required=True, help="output JSONL, written atomically (with a .provenance.json "
                   "sidecar marking it as this tool's)")
    p.add_argument("--overwrite", action="store_true",
                   help="write over an existing --output that this tool did not write")
    p.add_argument("--input-key", default="prompt", help="prompt key of the demonstrations (default: %(default)s)")
    p.add_argument("--output-key", default="response",
                   help="response key of the demonstrations (default: %(default)s)")
    p.add_argument("--keep-truncated", action="store_true", help="keep samples that did not end with EOS")
    p.add_argument("--keep-empty", action="store_true", help="keep empty (whitespace-only) responses")
    p.add_argument("--lenient", action="store_true",
                   help="skip and count bad lines, unmatched prompts and too-long prompts instead of failing")
    p.add_argument("--max-pairs-per-prompt", type=positive_int, help="cap on pairs per prompt (pairs format)")
    p.add_argument("--tokenizer", help="local tokenizer path for --max-prompt-len")
    p.add_argument("--max-prompt-len", type=positive_int, help="max prompt length in tokens (needs --tokenizer)")
    p.add_argument("--seed", type=int, default=0, help="pairing shuffle seed (default: %(default)s)")
    return p


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Argument combinations argparse cannot express; unused inputs get a note on stderr."""
    needed = VARIANTS[args.variant]
    for source, (flag, dest) in _INPUTS.items():
        given = getattr(args, dest) is not None
        if source in needed and not given:
            parser.error(f"{flag} is required for --variant {args.variant}")
        if source not in needed and given:
            print(f"note: {flag} is not used by --variant {args.variant}", file=sys.stderr)
    if (args.tokenizer is None) != (args.max_prompt_len is None):
        parser.error("--tokenizer and --max-prompt-len must be given together")
    if args.max_pairs_per_prompt is not None and args.format != "pairs":
        parser.error("--max-pairs-per-prompt applies only to --format pairs")


def _load_tokenizer(path: str):
    from openrlhf_irl.cli.common import load_checked_tokenizer

    return load_checked_tokenizer(path, "--tokenizer", need_eos=False)


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check(parser, args)
    try:
        needed = VARIANTS[args.variant]
        inputs = {flag: getattr(args, dest) for flag, dest in _INPUTS.values()}  # unused ones too: still the user's
        resolve_outputs({"--output": args.output}, {**inputs, "--tokenizer": args.tokenizer}, overwrite=args.overwrite)
        check_output_file(args.output)
        tokenizer = _load_tokenizer(args.tokenizer) if args.tokenizer else None
        records, report = build_afd_dataset(
            args.variant,
            demos=args.demos if "demo" in needed else None,
            init_samples=args.init_samples if "init" in needed else None,
            sft_samples=args.sft_samples if "sft" in needed else None,
            fmt=args.format,
            input_key=args.input_key,
            output_key=args.output_key,
            keep_truncated=args.keep_truncated,
            keep_empty=args.keep_empty,
            lenient=args.lenient,
            max_pairs_per_prompt=args.max_pairs_per_prompt,
            tokenizer=tokenizer,
            max_prompt_len=args.max_prompt_len,
            seed=args.seed,
        )
        atomic_write_jsonl(args.output, records)
        mark_file(args.output, "openrlhf_irl.cli.build_afd_dataset")
    except (DataError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_report(report))
    print(f"wrote {len(records)} records to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
