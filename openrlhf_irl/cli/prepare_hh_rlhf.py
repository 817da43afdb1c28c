"""``python -m openrlhf_irl.cli.prepare_hh_rlhf``: local HH-RLHF JSONL -> prompts.jsonl + demos.jsonl for AfD."""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter

from openrlhf_irl.cli.common import UsageError, claim_output_unit, cli_main, positive_int, resolve_outputs
from openrlhf_irl.utils.output_guard import OutputConflict
from openrlhf_irl.datasets.hh_rlhf import load_hh_rlhf
from openrlhf_irl.utils.jsonl import DataError, atomic_write_jsonl


UNIT = ("demos.jsonl", "prompts.jsonl")  # one unit; prompts.jsonl, written last, says it is complete


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m openrlhf_irl.cli.prepare_hh_rlhf", description=__doc__.splitlines()[0])
    p.add_argument("--input", required=True, help="HH-RLHF JSONL (gunzip the hub's .jsonl.gz first)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--key", default="chosen", help="conversation field whose last assistant turn is the demo")
    p.add_argument("--max-records", type=positive_int, default=None, help="keep only the first K demonstrations")
    p.add_argument("--overwrite", action="store_true",
                   help="write into an existing non-empty --output-dir that this tool did not write")
    p.add_argument("--lenient", action="store_true", help="skip and count bad records instead of failing")
    return p


@cli_main("prepare_hh_rlhf", resume_hint="the previous files, if any, are kept whole")
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    skipped = Counter()
    try:
        if not os.path.isfile(args.input):
            raise UsageError(f"--input {args.input}: no such file")
        resolve_outputs({"--output-dir": args.output_dir}, {}, managed=("--output-dir",))  # an empty path
        for name in ("demos.jsonl", "prompts.jsonl"):  # the files first: the sharper message
            path = os.path.join(args.output_dir, name)
            resolve_outputs({"--output-dir": path}, {"--input": args.input}, managed=("--output-dir",))
        resolve_outputs({"--output-dir": args.output_dir}, {"--input": args.input}, overwrite=args.overwrite,
                        dirs=("--output-dir",))
        records = load_hh_rlhf(args.input, key=args.key, lenient=args.lenient, skipped=skipped)
        if not records:
            raise UsageError(f"--input {args.input}: no usable records (skipped: {dict(skipped) or 'none'}); "
                             "nothing written")
        unit = claim_output_unit(args.output_dir, UNIT, "openrlhf_irl.cli.prepare_hh_rlhf")  # last: nothing to release
    except (DataError, UsageError, OutputConflict) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: {err.filename or args.input}: {err.strerror}", file=sys.stderr)
        return 1
    records = records[: args.max_records] if args.max_records is not None else records
    seen, prompts = set(), []
    for r in records:
        if r["prompt"] not in seen:
            seen.add(r["prompt"])
            prompts.append({"prompt": r["prompt"]})
    with unit:  # both files, or neither, replace the previous run's (a kill leaves no new one beside an old one)
        atomic_write_jsonl(unit.path("demos.jsonl"), records)
        atomic_write_jsonl(unit.path("prompts.jsonl"), prompts)
        unit.commit()
    print(f"{len(records)} demonstrations, {len(prompts)} unique prompts, skipped: {dict(skipped) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
