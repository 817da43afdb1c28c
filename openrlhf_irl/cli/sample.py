"""Sample N responses per prompt from a policy into JSONL - resumable (AfD's init/SFT policy samples).

Example (the paper's setting: temperature 1.0, top-p 0.95)::

    python -m openrlhf_irl.cli.sample --model ./sft --prompts prompts.jsonl --apply-chat-template \\
        --n-samples 4 --max-new-tokens 128 --policy-name sft --output sft_samples.jsonl

Each output line is ``{"prompt", "response", "policy", "sample_index", "finished", "logprob"}``: ``prompt``
is the raw prompt exactly as in the prompts file (not templated), ``finished`` says the response ended with
EOS within ``--max-new-tokens``, ``logprob`` is ``log pi(response|prompt)`` at temperature 1 (see
``openrlhf_irl.generation``). Records are appended (fsync'd) as batches finish; rerunning the same command
after a crash drops a torn last line and generates only the missing (prompt, sample_index) pairs.
A resumed run does not check that the other sampling settings are unchanged: keep the command identical.

Exit codes: 0 success, 2 bad arguments or bad data (message on stderr), 1 unreadable/unwritable file.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from typing import Dict, List, Optional, Set, Tuple

from openrlhf_irl.generation.params import SamplingParams, format_prompt, plan_requests
from openrlhf_irl.cli.common import positive_int
from openrlhf_irl.utils.jsonl import DataError, append_jsonl, data_error, read_jsonl, read_jsonl_tolerant_tail


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m openrlhf_irl.cli.sample",
        description="Sample N responses per prompt from a causal LM into resumable JSONL "
        "(CPU: transformers on Ray actors; GPU: OpenRLHF's vLLM engines).",
    )
    p.add_argument("--model", required=True, help="local model path (Hugging Face format)")
    p.add_argument("--lora", help="PEFT LoRA adapter to merge into --model")
    p.add_argument("--prompts", required=True, help="prompts JSONL")
    p.add_argument("--input-key", default="prompt", help="prompt field of the prompts file (default: %(default)s)")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--apply-chat-template", action="store_true",
                     help="render each prompt as one user message with the tokenizer's chat template")
    fmt.add_argument("--input-template", help="format string with a {} slot for the prompt, e.g. 'User: {}\\nAssistant: '")
    p.add_argument("--n-samples", type=positive_int, default=1, help="samples per prompt (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=1.0, help="default: %(default)s (0 = greedy)")
    p.add_argument("--top-p", type=float, default=0.95, help="default: %(default)s")
    p.add_argument("--max-new-tokens", type=positive_int, default=128, help="default: %(default)s")
    p.add_argument("--num-actors", type=positive_int, default=2,
                   help="Ray actors (hf) or vLLM engines (vllm) (default: %(default)s)")
    p.add_argument("--backend", choices=("auto", "hf", "vllm"), default="auto",
                   help="auto: vllm when CUDA and vLLM are available, else hf (default: %(default)s)")
    p.add_argument("--policy-name", required=True, help="value of the records' 'policy' field, e.g. init or sft")
    p.add_argument("--output", required=True, help="output JSONL (appended to; an existing file is resumed)")
    p.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    p.add_argument("--batch-size", type=positive_int, default=8,
                   help="sequences per generate call / shard (hf backend) (default: %(default)s)")
    p.add_argument("--max-prompts", type=positive_int, help="use only the first K unique prompts")
    return p


def load_prompts(path: str, input_key: str) -> Tuple[List[str], int]:
    """Unique raw prompts in file order (first occurrence kept) and the number of duplicates dropped."""
    seen: Dict[str, None] = {}
    total = 0
    for _, record in read_jsonl(path, required=(input_key,)):
        total += 1
        seen.setdefault(record[input_key], None)
    if total == 0:
        raise data_error(path, None, "no prompts (the file is empty)", reason="empty")
    return list(seen), total - len(seen)


def load_done(path: str, policy: str, skipped: Optional[Counter] = None) -> Set[Tuple[str, int]]:
    """``(prompt, sample_index)`` pairs already in an output file; a torn last line is cut off the file."""
    if not os.path.exists(path):
        return set()
    read_jsonl_tolerant_tail(path, truncate=True, skipped=skipped)
    done = set()
    for line_no, record in read_jsonl(path, required=("prompt", "policy")):
        index = record.get("sample_index")
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise data_error(path, line_no, f"expected an integer >= 0, got {index!r}", field="sample_index",
                             reason="bad_field")
        if record["policy"] != policy:
            raise data_error(path, line_no, f"policy {record['policy']!r} differs from --policy-name {policy!r}; "
                             "write each policy's samples to its own file", field="policy", reason="bad_field")
        done.add((record["prompt"], index))
    return done


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        params = SamplingParams(n=args.n_samples, temperature=args.temperature, top_p=args.top_p,
                                max_new_tokens=args.max_new_tokens, seed=args.seed)
    except ValueError as e:
        parser.error(str(e))
    if args.input_template is not None and "{}" not in args.input_template:
        parser.error("--input-template must contain a {} slot for the prompt")

    skipped: Counter = Counter()
    try:
        prompts, duplicates = load_prompts(args.prompts, args.input_key)
        if args.max_prompts is not None:
            prompts = prompts[: args.max_prompts]
        print(f"prompts: {len(prompts)} unique ({duplicates} duplicates dropped) from {args.prompts}")
        done = load_done(args.output, args.policy_name, skipped)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if skipped["partial_tail"]:
        print(f"resume: dropped a partial last line of {args.output}")

    skip = {(i, s) for i, p in enumerate(prompts) for s in range(params.n) if (p, s) in done}
    plan = plan_requests(len(prompts), params.n, skip)
    remaining = [len(samples) for samples in plan]
    todo = sum(remaining)
    total = len(prompts) * params.n
    if skip:
        print(f"resume: {len(skip)} of {total} samples already in {args.output}")
    if todo == 0:
        print(f"nothing to do: all {total} samples are in {args.output}")
        return 0

    try:
        if args.apply_chat_template:
            from openrlhf_irl.generation.hf import load_tokenizer

            tokenizer = load_tokenizer(args.model)
        else:
            tokenizer = None
        formatted = [format_prompt(tokenizer, p, apply_chat_template=args.apply_chat_template,
                                   input_template=args.input_template) for p in prompts]
    except (ValueError, KeyError, IndexError) as e:
        print(f"error: formatting prompts: {e}", file=sys.stderr)
        return 2
    out_dir = os.path.dirname(os.path.abspath(args.output))
    os.makedirs(out_dir, exist_ok=True)

    from tqdm import tqdm

    from openrlhf_irl.generation.ray_pool import GenerationPool

    written = 0
    start = time.perf_counter()
    try:
        pool = GenerationPool(args.model, args.num_actors, args.backend, lora=args.lora, batch_size=args.batch_size)
    except (RuntimeError, ValueError) as e:  # e.g. --backend vllm without CUDA
        print(f"error: {e}", file=sys.stderr)
        return 2
    with pool:
        print(f"sampling {todo} completions ({len(prompts) - remaining.count(0)} prompts x up to {params.n}) "
              f"with {args.num_actors} {pool.backend} actor(s)")
        gen_start = time.perf_counter()
        with tqdm(total=len(prompts), initial=remaining.count(0), unit="prompt", file=sys.stderr,
                  dynamic_ncols=True) as bar:
            for batch in pool.generate_stream(formatted, params, skip):
                batch = sorted(batch, key=lambda c: (c.prompt_index, c.sample_index))
                records = [
                    {"prompt": prompts[c.prompt_index], "response": c.text, "policy": args.policy_name,
                     "sample_index": c.sample_index, "finished": c.finished, "logprob": c.logprob}
                    for c in batch
                ]
                written += append_jsonl(args.output, records)
                completed = 0
                for c in batch:
                    remaining[c.prompt_index] -= 1
                    completed += remaining[c.prompt_index] == 0
                bar.update(completed)
        gen_time = time.perf_counter() - gen_start
    rate = written / gen_time if gen_time > 0 else float("inf")
    print(f"wrote {written} samples to {args.output} in {time.perf_counter() - start:.1f} s "
          f"({rate:.1f} samples/s while generating)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
