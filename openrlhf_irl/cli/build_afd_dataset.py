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
from openrlhf_irl.cli.common import UsageError, add_flag, check_output_file, cli_main, positive_int, resolve_outputs
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
    add_flag(p, "--data.input_key", "--input-key", default="prompt",
             help="prompt key of the demonstrations (default: %(default)s)")
    add_flag(p, "--data.output_key", "--output-key", default="response",
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


_ROLE_WORDS = {"init": ("init", "initial", "base"), "sft": ("sft",)}


def _policy_role(value: str) -> Optional[str]:
    """``init`` or ``sft`` when a record's ``policy`` value names one of them (as a word: ``init``, ``sft-1b``,
    ``base_policy``), None when it names neither or both."""
    import re

    words = set(re.split(r"[^a-z0-9]+", value.lower()))
    roles = [role for role, names in _ROLE_WORDS.items() if words & set(names)]
    return roles[0] if len(roles) == 1 else None


def check_sample_policies(files: dict) -> None:
    """Every record's ``policy`` field agrees with the flag its file was passed with, before any pairing:
    ``files`` is ``{source: (flag, path)}`` for the sources the variant reads. A file mixing policies, an init file
    holding ``sft`` samples (or the reverse: the two files swapped), or both files holding one policy would build
    inverted or meaningless pairs with exit 0. Lines that are not JSON objects, or have no string ``policy``, are
    left to the dataset's own checks. :class:`DataError` naming the file, the line and the field."""
    import json

    first: dict = {}  # source -> (policy, line)
    for source, (flag, path) in files.items():
        if source == "demo":
            continue
        try:
            f = open(path, encoding="utf-8")
        except OSError:
            continue  # reported, naming the flag, when the dataset reads it
        with f:
            for line_no, line in enumerate(f, start=1):
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                policy = record.get("policy") if isinstance(record, dict) else None
                if not isinstance(policy, str):
                    continue
                role = _policy_role(policy)
                if role is not None and role != source:
                    other = {"init": "--init-samples", "sft": "--sft-samples"}[role]
                    raise DataError(f"{path}, line {line_no}, field 'policy': {policy!r} samples given as {flag}; "
                                    f"they belong to {other} (are the two files swapped?)")
                if source not in first:
                    first[source] = (policy, line_no)
                elif policy != first[source][0]:
                    raise DataError(f"{path}, line {line_no}, field 'policy': {policy!r}, but line "
                                    f"{first[source][1]} has {first[source][0]!r}: {flag} must hold one policy's "
                                    "samples")
    if "init" in first and "sft" in first and first["init"][0] == first["sft"][0]:
        policy, line_no = first["sft"]
        raise DataError(f"{files['sft'][1]}, line {line_no}, field 'policy': {policy!r}, the same policy as "
                        f"--init-samples {files['init'][1]}: the two files must hold samples of two policies")


@cli_main("build_afd_dataset", resume_hint="nothing was written")
def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check(parser, args)
    try:
        needed = VARIANTS[args.variant]
        inputs = {flag: getattr(args, dest) for flag, dest in _INPUTS.values()}  # unused ones too: still the user's
        resolve_outputs({"--output": args.output}, {**inputs, "--tokenizer": args.tokenizer}, overwrite=args.overwrite)
        check_output_file(args.output)
        check_sample_policies({source: (flag, getattr(args, dest)) for source, (flag, dest) in _INPUTS.items()
                               if source in needed})
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
