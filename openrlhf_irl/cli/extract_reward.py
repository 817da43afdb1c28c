"""``python -m openrlhf_irl.cli.extract_reward``: per-token implicit rewards of an IQ-Learn policy.

r_t = Q(s_t, a_t) - gamma * V(s_{t+1}) with Q = logits and V = logsumexp(logits)
(docs/iq_learn.md#reward-extraction), computed on exactly
the token rows training saw: each record goes through the IQ trainer's dataset (OpenRLHF's ``SFTDataset``: same
input template or chat template, prompt and response tokenised jointly, " " + EOS appended, cut at
``--data.max_len``)
and through the trainer's own episode rules (terminal at the final EOS, ``--truncation`` for cut rows, multi-turn
segments bootstrapped across user turns). A record with ``"finished": false`` (a sample cut by its length limit)
is tokenised the same way without the EOS and is not terminal. Pass the template flags used for training.

Writes one record per input with the token rewards, their sum and log pi(y|x). With ``--reference-key`` it reports
Spearman correlations of the sequence reward (and, for comparison, of the log-likelihood) with the reference score,
within prompts and across prompts. With gamma = 1 the sum telescopes to log pi(y|x) + V(s_0), so within one prompt
the reward ranks responses exactly as the likelihood does.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import defaultdict
from types import SimpleNamespace

import openrlhf_irl.cli.common  # noqa: F401  first: a Ctrl-C while torch imports ends in one line
import torch

from openrlhf_irl.cli.common import (
    UsageError,
    add_flag,
    check_device,
    check_model,
    check_output_file,
    cli_main,
    load_checked_tokenizer,
    model_context_length,
    positive_int,
    resolve_outputs,
)
from openrlhf_irl.utils.output_guard import mark_file
from openrlhf_irl.utils.jsonl import DataError, atomic_write_json, atomic_write_jsonl, read_jsonl
from openrlhf_irl.utils.metrics import spearman

DEFAULT_TEMPLATE = "User: {}\nAssistant: "  # OpenRLHF train_sft's --data.input_template default


def _unit_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise argparse.ArgumentTypeError(f"must be a finite number in [0, 1], got {text}")
    return value


def _max_len(text: str) -> int:
    value = positive_int(text)
    if value < 3:
        raise argparse.ArgumentTypeError(f"must be >= 3 (prompt, response and EOS), got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="HF model directory (an IQ-Learn checkpoint)")
    p.add_argument("--data", required=True, help="JSONL with prompt/response records")
    p.add_argument("--output", required=True, help="JSONL with per-token and per-sequence rewards")
    p.add_argument("--report", default=None, help="JSON file for the correlation report")
    p.add_argument("--overwrite", action="store_true",
                   help="write over an existing --output / --report that this tool did not write")
    add_flag(p, "--data.input_key", "--input-key", default="prompt", help="as in training (default: %(default)s)")
    add_flag(p, "--data.output_key", "--output-key", default="response",
             help="as in training (default: %(default)s)")
    p.add_argument("--reference-key", default=None, help="numeric column to correlate the rewards with")
    add_flag(p, "--data.apply_chat_template", "--apply-chat-template", action="store_true", help="as in training")
    add_flag(p, "--data.tokenizer_chat_template", "--tokenizer-chat-template", default=None, help="as in training")
    add_flag(p, "--data.input_template", "--input-template", default=DEFAULT_TEMPLATE,
             help=f"as in training (OpenRLHF's default {DEFAULT_TEMPLATE!r}); ignored with "
                  "--data.apply_chat_template")
    add_flag(p, "--data.multiturn", "--multiturn", action="store_true",
             help="as in training: the input key holds a whole conversation ending with an assistant turn")
    p.add_argument("--truncation", choices=("bootstrap", "drop", "eos"), default="bootstrap",
                   help="as --irl.truncation of training: how a row cut by --data.max_len ends")
    p.add_argument("--gamma", type=_unit_float, default=1.0, help="discount in [0, 1], as --irl.gamma")
    p.add_argument("--batch-size", type=positive_int, default=8)
    add_flag(p, "--data.max_len", "--max-len", type=_max_len, default=2048,
             help="as in training (default: %(default)s)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def _check_paths(args) -> None:
    """Flags and paths, before any model or data is loaded or any output is opened."""
    if not os.path.isfile(args.data):
        raise UsageError(f"--data {args.data}: no such file")
    outputs = {"--output": args.output, **({"--report": args.report} if args.report is not None else {})}
    resolve_outputs(outputs, {"--data": args.data, "--model": args.model}, overwrite=args.overwrite)
    for flag, path in outputs.items():
        check_output_file(path, flag)
    check_device(args.device)
    check_model(args.model)


def _check_records(records, args) -> None:
    from openrlhf_irl.datasets.sft_validation import validate_sft_record

    first_kind = None
    for line_no, rec in records:
        where = f"line {line_no}"
        kind = validate_sft_record(rec, args.data, where, input_key=args.input_key,
                                   output_key=None if args.multiturn else args.output_key,
                                   multiturn=args.multiturn, chat_template=args.apply_chat_template)
        first_kind = first_kind or kind
        if kind != first_kind:
            raise DataError(f"{args.data}, {where}, field '{args.input_key}': prompt is a {kind} here but a "
                            f"{first_kind} in earlier records")
        finished = rec.get("finished", True)
        if not isinstance(finished, bool):
            raise DataError(f"{args.data}, {where}, field 'finished': expected true or false, got {finished!r}")
        if args.reference_key:
            value = rec.get(args.reference_key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise DataError(f"{args.data}, {where}, field {args.reference_key!r}: expected a finite number, "
                                f"got {value!r}")


def build_dataset(tokenizer, records, args):
    """The trainer's dataset (``IQSFTDataset``) over the records, refusing any record it would drop."""
    import datasets

    from openrlhf_irl import compat

    compat.activate()
    from openrlhf_irl.datasets.iq_sft import IQSFTDataset

    keys = [args.input_key] if args.multiturn else [args.input_key, args.output_key]
    rows = [{k: rec[k] for k in keys} for _, rec in records]
    strategy = SimpleNamespace(
        args=SimpleNamespace(
            data=SimpleNamespace(input_key=args.input_key, output_key=None if args.multiturn else args.output_key,
                                 apply_chat_template=args.apply_chat_template or args.multiturn,
                                 tokenizer_chat_template=args.tokenizer_chat_template),
            irl=SimpleNamespace(truncation=args.truncation),
        ),
        print=lambda *a, **k: None,
    )
    probe = IQSFTDataset(datasets.Dataset.from_list(rows[:1]), tokenizer, args.max_len, strategy,
                         input_template=args.input_template, num_processors=1, multiturn=args.multiturn)
    for (line_no, _), row in zip(records, rows):
        if probe.process_data(json.loads(json.dumps(row)))["prompt"] is None:
            raise DataError(f"{args.data}, line {line_no}, field {args.input_key!r}: the prompt leaves no room for "
                            f"a response under --data.max_len {args.max_len} (training drops such records)")
    return IQSFTDataset(datasets.Dataset.from_list(rows), tokenizer, args.max_len, strategy,
                        input_template=args.input_template, num_processors=1, multiturn=args.multiturn)


def check_context(ds, records, args, context) -> None:
    """Every row, as training tokenises it, fits the model's context (positions beyond it are not trained and
    give meaningless logits): DataError naming the record otherwise."""
    if context is None or args.max_len <= context:
        return
    for i, (line_no, rec) in enumerate(records):
        n = dataset_item(ds, i, rec.get("finished", True))[0].shape[-1]
        if n > context:
            field = args.input_key if args.multiturn else args.output_key
            raise DataError(f"{args.data}, line {line_no}, field {field!r}: {n} tokens, beyond the model's "
                            f"context of {context} tokens; lower --data.max_len to {context} (rows are cut there, "
                            "as training with --data.max_len cuts them) or shorten the record")


def dataset_item(ds, idx: int, finished: bool):
    """(input_ids, attention_mask, loss_mask) [1, L] as training builds them; an unfinished sample has no EOS."""
    if finished:
        return ds[idx]
    text = ds.prompts[idx] + ds.responses[idx]
    tok = ds.tokenizer(text, max_length=ds.max_length, truncation=True, return_tensors="pt", add_special_tokens=False)
    return tok["input_ids"], tok["attention_mask"], ds.get_loss_mask(tok["input_ids"], idx)


@torch.no_grad()
def score_batch(model, items, tokenizer, *, gamma: float, truncation: str):
    """Per-row (labels, per-token rewards, log pi sum, terminal, cut) over the response tokens, computed by the
    trainer's own ``forward_terms`` on full logits."""
    from openrlhf_irl.losses.iq_learn import episode_masks
    from openrlhf_irl.losses.iq_sft import IQConfig, PolicyForward, forward_terms

    ids = torch.nn.utils.rnn.pad_sequence([i[0][0] for i in items], batch_first=True,
                                          padding_value=tokenizer.pad_token_id)
    attn = torch.nn.utils.rnn.pad_sequence([i[1][0].long() for i in items], batch_first=True)
    loss_mask = torch.nn.utils.rnn.pad_sequence([i[2][0] for i in items], batch_first=True)
    device = next(model.parameters()).device
    logits = model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits.float().cpu()
    fwd = PolicyForward(ids, ids[:, 1:], logits=logits, attention_mask=attn)
    mask = loss_mask[:, :-1].bool()
    cfg = IQConfig(gamma=gamma, truncation=truncation, td_weight=0.0)
    _, terms, _, _ = forward_terms(fwd, mask, tokenizer.eos_token_id, cfg, 0.0)
    terminal, cut = episode_masks(fwd.labels, mask, attn, tokenizer.eos_token_id)
    return [(fwd.labels[i][mask[i]].tolist(), terms.rewards[i][mask[i]].tolist(),
             float(terms.log_probs[i][mask[i]].double().sum()), bool(terminal[i].any()), bool(cut[i].any()))
            for i in range(len(items))]


def _group_key(prompt) -> str:
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)


def correlations(records, key: str, reference_key: str) -> dict:
    """Spearman of ``key`` with the reference across all pairs, and the mean within prompts (>= 2 responses)."""
    xs = [r[key] for r in records]
    ys = [float(r[reference_key]) for r in records]
    groups = defaultdict(list)
    for r in records:
        groups[_group_key(r["prompt"])].append((r[key], float(r[reference_key])))
    within = [spearman([a for a, _ in g], [b for _, b in g]) for g in groups.values() if len(g) >= 2]
    within = [w for w in within if not math.isnan(w)]
    return {
        "across_prompts": spearman(xs, ys),
        "within_prompts_mean": sum(within) / len(within) if within else float("nan"),
        "prompts_with_within_correlation": len(within),
    }


def _finite_or_none(obj):
    """The report with an undefined correlation (NaN: too few or constant values) as JSON null."""
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    return None if isinstance(obj, float) and not math.isfinite(obj) else obj


@cli_main("extract_reward", resume_hint="nothing was written")
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _check_paths(args)
        records = list(read_jsonl(args.data))
        if not records:
            raise DataError(f"{args.data}: no records")
        _check_records(records, args)
        tokenizer = load_checked_tokenizer(args.model)  # pad falls back to EOS, as OpenRLHF's get_tokenizer
        tokenizer.padding_side = "right"
        ds = build_dataset(tokenizer, records, args)
        from openrlhf_irl.cli.common import load_checked_config

        check_context(ds, records, args, model_context_length(load_checked_config(args.model)))
    except (DataError, UsageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(args.device).eval()

    out = []
    for start in range(0, len(records), args.batch_size):
        chunk = records[start : start + args.batch_size]
        items = [dataset_item(ds, start + i, rec.get("finished", True)) for i, (_, rec) in enumerate(chunk)]
        scored = score_batch(model, items, tokenizer, gamma=args.gamma, truncation=args.truncation)
        for (_, rec), (labels, rewards, log_prob, terminal, cut) in zip(chunk, scored):
            row = {
                "prompt": rec[args.input_key],
                "response": rec.get(args.output_key) if not args.multiturn else None,
                "tokens": tokenizer.convert_ids_to_tokens(labels),
                "token_rewards": rewards,
                "reward": float(sum(rewards)),
                "log_prob": log_prob,
                "terminal": terminal,
                "cut": cut,
            }
            if args.reference_key:
                row[args.reference_key] = rec[args.reference_key]
            out.append(row)
    try:
        atomic_write_jsonl(args.output, out)
    except DataError as err:  # a non-finite reward: the model's weights or logits are broken
        print(f"error: {err} (--model {args.model} gives non-finite rewards)", file=sys.stderr)
        return 1
    mark_file(args.output, "openrlhf_irl.cli.extract_reward")
    print(f"wrote {len(out)} records to {args.output}")
    if args.reference_key:
        report = {
            "reward": correlations(out, "reward", args.reference_key),
            "log_prob": correlations(out, "log_prob", args.reference_key),
            "gamma": args.gamma,
        }
        for name, corr in report.items():
            if isinstance(corr, dict):
                print(f"spearman({name}, {args.reference_key}): across prompts {corr['across_prompts']:.4f}, "
                      f"within prompts {corr['within_prompts_mean']:.4f} ({corr['prompts_with_within_correlation']} prompts)")
        if args.report:
            atomic_write_json(args.report, _finite_or_none(report))
            mark_file(args.report, "openrlhf_irl.cli.extract_reward")
    return 0


if __name__ == "__main__":
    sys.exit(main())
