"""Sample N responses per prompt from a policy into JSONL - resumable (AfD's init/SFT policy samples).

Example (the paper's setting: temperature 1.0, top-p 0.95)::

    python -m openrlhf_irl.cli.sample --model ./sft --prompts prompts.jsonl --data.apply_chat_template \\
        --rollout.n_samples_per_prompt 4 --rollout.max_new_tokens 128 --policy-name sft --output sft_samples.jsonl

Each output line is ``{"prompt", "response", "policy", "sample_index", "finished", "logprob"}``: ``prompt``
is the raw prompt exactly as in the prompts file (not templated), ``finished`` says the response ended with
EOS within ``--rollout.max_new_tokens``, ``logprob`` is ``log pi(response|prompt)`` at temperature 1 (see
``openrlhf_irl.generation``). Records are appended (fsync'd) as batches finish; rerunning the same command
after a crash drops a torn last line and generates only the missing (prompt, sample_index) pairs.

What produced the file is kept next to it in ``<output>.provenance.json`` (the model's path and a hash of its
config and weights, the LoRA adapter, temperature, top-p, max new tokens, seed, prompt format, policy name,
tool version). A rerun resumes the file only when that record matches; otherwise it stops, names the
difference, and ``--overwrite`` starts the file over. A larger ``--rollout.n_samples_per_prompt`` or more prompts
extend it. An existing non-empty output without that record was not written by this tool and is refused (never
repaired).
The output is locked (``flock``) for the job's life: a second job on the same file is refused.
Every prompt must fit the model's context with ``--rollout.max_new_tokens`` to spare (``--skip-long-prompts``
skips and counts the others). A local Ray instance the job starts is shut down on exit, and by a watchdog process
if the job is killed.

Exit codes: 0 success, 2 bad arguments or bad data (message on stderr), 1 unreadable/unwritable file.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from typing import Dict, List, Optional, Set, Tuple

from openrlhf_irl.cli.common import (UsageError, add_flag, check_lora, check_model, check_output_file, cli_main,
                                     load_checked_config, load_checked_tokenizer, model_context_length, positive_int,
                                     resolve_outputs, temperature, top_p)
from openrlhf_irl.generation.params import SamplingParams, format_prompt, plan_requests
from openrlhf_irl.utils.jsonl import DataError, append_jsonl, data_error, read_jsonl, read_jsonl_tolerant_tail
from openrlhf_irl.utils.provenance import (differences, model_identity, read_provenance, sidecar_path,
                                           write_provenance)
from openrlhf_irl.utils.reaper import owned_shm_cleanup


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m openrlhf_irl.cli.sample",
        description="Sample N responses per prompt from a causal LM into resumable JSONL "
        "(CPU: transformers on Ray actors; GPU: OpenRLHF's vLLM engines).",
    )
    p.add_argument("--model", required=True, help="local model path (Hugging Face format)")
    p.add_argument("--lora", help="PEFT LoRA adapter to merge into --model")
    p.add_argument("--prompts", required=True, help="prompts JSONL")
    add_flag(p, "--data.input_key", "--input-key", default="prompt",
             help="prompt field of the prompts file (default: %(default)s)")
    fmt = p.add_mutually_exclusive_group()
    add_flag(fmt, "--data.apply_chat_template", "--apply-chat-template", action="store_true",
             help="render each prompt as one user message with the tokenizer's chat template")
    add_flag(fmt, "--data.input_template", "--input-template",
             help="format string with a {} slot for the prompt, e.g. 'User: {}\\nAssistant: '")
    add_flag(p, "--rollout.n_samples_per_prompt", "--n-samples", type=positive_int, default=1,
             help="samples per prompt (default: %(default)s)")
    add_flag(p, "--rollout.temperature", "--temperature", type=temperature, default=1.0,
             help="0 = greedy, else in [0.001, 100] (default: %(default)s)")
    add_flag(p, "--rollout.top_p", "--top-p", type=top_p, default=0.95, help="in (0, 1] (default: %(default)s)")
    add_flag(p, "--rollout.max_new_tokens", "--max-new-tokens", type=positive_int, default=128,
             help="default: %(default)s")
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
    p.add_argument("--overwrite", action="store_true",
                   help="start --output over (its records and provenance are replaced) instead of resuming it")
    p.add_argument("--skip-long-prompts", action="store_true",
                   help="skip (and count) prompts that leave less than --rollout.max_new_tokens of the model's "
                   "context, instead of stopping")
    return p


def load_prompts(path: str, input_key: str) -> Tuple[List[str], int, Dict[str, int]]:
    """Unique raw prompts in file order (first occurrence kept), the number of duplicates dropped, and the line
    of each prompt's first occurrence."""
    seen: Dict[str, int] = {}
    total = 0
    for line_no, record in read_jsonl(path, required=(input_key,)):
        total += 1
        seen.setdefault(record[input_key], line_no)
    if total == 0:
        raise data_error(path, None, "no prompts (the file is empty)", reason="empty")
    return list(seen), total - len(seen), seen


def validate_samples(path: str, policy: str) -> Tuple[Set[Tuple[str, int]], bool]:
    """``(prompt, sample_index)`` pairs of an existing output file and whether its last line is torn.

    Every complete line is checked (a bad one raises :class:`DataError` naming line and field), including
    repeated keys; the file is not modified.
    """
    if not os.path.exists(path):
        return set(), False
    with open(path, "rb") as f:
        data = f.read()
    torn = not data.endswith(b"\n") and len(data) > 0
    records = read_jsonl_tolerant_tail(path, truncate=False)
    first_line: Dict[Tuple[str, int], int] = {}
    line_no = 0
    for line_no, record in enumerate(records, start=1):
        for key, kind in (("prompt", str), ("response", str), ("policy", str), ("finished", bool)):
            if not isinstance(record.get(key), kind):
                raise data_error(path, line_no, f"expected {kind.__name__}, got {record.get(key)!r}", field=key,
                                 reason="bad_field")
        index = record.get("sample_index")
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise data_error(path, line_no, f"expected an integer >= 0, got {index!r}", field="sample_index",
                             reason="bad_field")
        if record["policy"] != policy:
            raise data_error(path, line_no, f"policy {record['policy']!r} differs from --policy-name {policy!r}; "
                             "write each policy's samples to its own file", field="policy", reason="bad_field")
        key = (record["prompt"], index)
        if key in first_line:
            raise data_error(path, line_no, f"repeated (prompt, sample_index) key, first at line {first_line[key]} "
                             "(two jobs wrote this file at once?); rerun with --overwrite to start over",
                             field="sample_index", reason="duplicate_key")
        first_line[key] = line_no
    return set(first_line), torn


def load_done(path: str, policy: str, skipped: Optional[Counter] = None) -> Set[Tuple[str, int]]:
    """Validate an output file, then cut off a torn last line; returns the ``(prompt, sample_index)`` pairs."""
    done, torn = validate_samples(path, policy)
    if torn:
        read_jsonl_tolerant_tail(path, truncate=True, skipped=skipped)
    return done


def provenance(args, tokenizer) -> dict:
    """What determines the samples' distribution (not how many there are: --rollout.n_samples_per_prompt and
    --max-prompts may grow)."""
    import hashlib

    from openrlhf_irl import __version__

    chat = getattr(tokenizer, "chat_template", None) if args.apply_chat_template else None
    return {
        "tool": "openrlhf_irl.cli.sample",
        "tool_version": __version__,
        "model": model_identity(args.model),
        "lora": model_identity(args.lora),
        "sampling": {"temperature": args.temperature, "top_p": args.top_p, "max_new_tokens": args.max_new_tokens,
                     "seed": args.seed},
        "prompt_format": {"input_key": args.input_key, "apply_chat_template": args.apply_chat_template,
                          "input_template": args.input_template,
                          "chat_template_sha256": hashlib.sha256(chat.encode()).hexdigest() if chat else None},
        "policy_name": args.policy_name,
    }


class OutputLock:
    """An exclusive ``flock`` on the output file for the job's life; a second job gets :class:`UsageError`.

    A file this lock created and nothing was written to is removed again on release, with the provenance
    sidecar this job wrote beside it (a job stopped before its first sample leaves nothing).
    """

    def __init__(self, path: str) -> None:
        import fcntl

        self.path = path
        self.created = not os.path.exists(path)
        self.wrote_sidecar = False  # set by prepare_output when it (re)writes the provenance
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise UsageError(f"--output {path}: another job is writing this file (it is locked); wait for it "
                             "or choose another --output") from None

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            if self.created and os.fstat(self.fd).st_size == 0:
                if self.wrote_sidecar and os.path.exists(sidecar_path(self.path)):
                    os.unlink(sidecar_path(self.path))
                if not os.path.exists(sidecar_path(self.path)):
                    os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)  # closing drops the flock
        self.fd = None


def prepare_output(args, tokenizer, skipped: Counter) -> Set[Tuple[str, int]]:
    """Under the lock: refuse a foreign or mismatching file, validate it, only then repair a torn tail and
    (re)write the provenance; returns the pairs already done."""
    path = args.output
    want = provenance(args, tokenizer)
    try:
        have = read_provenance(path)
    except ValueError as err:
        raise UsageError(f"--output {path}: {err}; rerun with --overwrite to start over") from None
    size = os.path.getsize(path) if os.path.exists(path) else 0
    if args.overwrite:
        with open(path, "r+b") as f:
            f.truncate(0)
            os.fsync(f.fileno())
        write_provenance(path, want)
        return set()
    if have is None:
        if size > 0:
            raise UsageError(f"--output {path}: exists ({size} bytes) but has no {os.path.basename(sidecar_path(path))}"
                             ", so it was not written by this tool and is left as it is; rerun with --overwrite to "
                             "replace it, or choose another --output")
        write_provenance(path, want)
        return set()
    diff = differences(have, want)
    if diff:
        raise UsageError(f"--output {path} was written with other settings ({'; '.join(diff)}); rerun with "
                         "--overwrite to start over, or choose another --output")
    return load_done(path, args.policy_name, skipped)


def check_prompt_lengths(args, tokenizer, prompts: List[str], formatted: List[str], lines: Dict[str, int],
                         context: Optional[int]) -> List[int]:
    """Indices of prompts whose tokens plus ``--rollout.max_new_tokens`` exceed the model's context; an error for the
    first one unless ``--skip-long-prompts``."""
    if context is None:
        return []
    budget = context - args.max_new_tokens
    if budget < 1:
        raise UsageError(f"--rollout.max_new_tokens {args.max_new_tokens}: leaves no room for a prompt in the model's "
                         f"context of {context} tokens")
    too_long = []
    for i, text in enumerate(formatted):
        n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if n > budget:
            if not args.skip_long_prompts:
                raise data_error(args.prompts, lines[prompts[i]], f"{n} prompt tokens + --rollout.max_new_tokens "
                                 f"{args.max_new_tokens} exceed the model's context of {context} tokens; shorten "
                                 "it, lower --rollout.max_new_tokens, or pass --skip-long-prompts",
                                 field=args.input_key, reason="too_long")
            too_long.append(i)
    if too_long and len(too_long) == len(formatted):
        raise UsageError(f"--prompts {args.prompts}: every prompt leaves less than --rollout.max_new_tokens "
                         f"{args.max_new_tokens} of the model's context of {context} tokens; nothing to sample")
    return too_long


@cli_main("sample", resume_hint="the samples written so far are kept: rerun the same command to resume")
def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        params = SamplingParams(n=args.n_samples, temperature=args.temperature, top_p=args.top_p,
                                max_new_tokens=args.max_new_tokens, seed=args.seed)
    except ValueError as e:
        parser.error(str(e))
    if args.input_template is not None and "{}" not in args.input_template:
        parser.error("--data.input_template must contain a {} slot for the prompt")

    skipped: Counter = Counter()
    lock = None
    try:
        check_model(args.model)
        check_lora(args.lora)
        resolve_outputs({"--output": args.output, "--output's sidecar": sidecar_path(args.output)},
                        {"--prompts": args.prompts, "--model": args.model, "--lora": args.lora},
                        managed=("--output", "--output's sidecar"))  # prepare_output refuses a foreign file
        check_output_file(args.output)
        prompts, duplicates, lines = load_prompts(args.prompts, args.input_key)
        if args.max_prompts is not None:
            prompts = prompts[: args.max_prompts]
        print(f"prompts: {len(prompts)} unique ({duplicates} duplicates dropped) from {args.prompts}")
        tokenizer = load_checked_tokenizer(args.model, need_eos=False)
        config = load_checked_config(args.model)
        if tokenizer.eos_token_id is None and getattr(config, "eos_token_id", None) is None:
            raise UsageError(f"--model {args.model}: neither its tokenizer nor its config defines an EOS token, so "
                             "no response could ever finish (set eos_token in its tokenizer config)")
        try:
            formatted = [format_prompt(tokenizer, p, apply_chat_template=args.apply_chat_template,
                                       input_template=args.input_template) for p in prompts]
        except (ValueError, KeyError, IndexError) as e:
            raise UsageError(f"formatting prompts: {e}") from None
        too_long = check_prompt_lengths(args, tokenizer, prompts, formatted, lines, model_context_length(config))
        lock = OutputLock(args.output)
        had_sidecar = os.path.exists(sidecar_path(args.output))
        lock.wrote_sidecar = not had_sidecar or args.overwrite
        done = prepare_output(args, tokenizer, skipped)
    except (DataError, UsageError) as e:
        if lock is not None:
            lock.release()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if lock is not None:
            lock.release()
        print(f"error: {e}", file=sys.stderr)
        return 1
    except BaseException:  # Ctrl-C or a bug: the lock (and a file it created empty) still goes
        if lock is not None:
            lock.release()
        raise
    try:
        with owned_shm_cleanup():  # vLLM's shared memory the job's engines leave, also on Ctrl-C during start-up
            return _run(args, params, prompts, formatted, done, too_long, skipped)
    finally:
        lock.release()


def _run(args, params, prompts, formatted, done, too_long, skipped) -> int:
    if skipped["partial_tail"]:
        print(f"resume: dropped a partial last line of {args.output}")
    if too_long:
        print(f"skipped {len(too_long)} prompts longer than the model's context allows (--skip-long-prompts)")
    skip = {(i, s) for i, p in enumerate(prompts) for s in range(params.n) if (p, s) in done}
    skip |= {(i, s) for i in too_long for s in range(params.n)}
    plan = plan_requests(len(prompts), params.n, skip)
    remaining = [len(samples) for samples in plan]
    todo = sum(remaining)
    total = (len(prompts) - len(too_long)) * params.n
    n_done = len(skip) - len(too_long) * params.n
    if n_done:
        print(f"resume: {n_done} of {total} samples already in {args.output}")
    if todo == 0:
        print(f"nothing to do: all {total} samples are in {args.output}")
        return 0

    from tqdm import tqdm

    from openrlhf_irl.generation.ray_pool import GenerationPool
    from openrlhf_irl.utils.ray_watchdog import current_ray_session, start_watchdog

    written = 0
    start = time.perf_counter()
    try:
        pool = GenerationPool(args.model, args.num_actors, args.backend, lora=args.lora, batch_size=args.batch_size)
    except (RuntimeError, ValueError) as e:  # e.g. --backend vllm without CUDA
        print(f"error: {e}", file=sys.stderr)
        return 2
    # only a Ray this job started on this machine: never the processes of a cluster joined through RAY_ADDRESS
    local_ray = pool._started_ray and not os.environ.get("RAY_ADDRESS")
    watchdog = start_watchdog(current_ray_session()) if local_ray else None
    try:
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
    finally:
        if watchdog is not None:
            watchdog.release()
    rate = written / gen_time if gen_time > 0 else float("inf")
    print(f"wrote {written} samples to {args.output} in {time.perf_counter() - start:.1f} s "
          f"({rate:.1f} samples/s while generating)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
