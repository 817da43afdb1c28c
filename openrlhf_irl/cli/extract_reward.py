"""``python -m openrlhf_irl.cli.extract_reward``: per-token implicit rewards of an IQ-Learn policy.

r_t = Q(s_t, a_t) - gamma * V(s_{t+1}) with Q = logits and V = logsumexp(logits), V = 0 after EOS (REFERENCE 1).
Reads JSONL prompt/response pairs, writes one record per pair with the token rewards, their sum and log pi(y|x).
With ``--reference-key`` it reports Spearman correlations of the sequence reward (and, for comparison, of the
log-likelihood) with the reference score, within prompts and across prompts. With gamma = 1 the sum telescopes to
log pi(y|x) + V(s_0), so within one prompt the reward ranks responses exactly as the likelihood does.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict

import torch

from openrlhf_irl.generation.params import format_prompt
from openrlhf_irl.generation.scoring import encode_prompt
from openrlhf_irl.losses import iq_token_terms, logits_q_and_v
from openrlhf_irl.utils.jsonl import DataError, atomic_write_json, atomic_write_jsonl, read_jsonl
from openrlhf_irl.utils.metrics import spearman


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="HF model directory (an IQ-Learn checkpoint)")
    p.add_argument("--data", required=True, help="JSONL with prompt/response records")
    p.add_argument("--output", required=True, help="JSONL with per-token and per-sequence rewards")
    p.add_argument("--report", default=None, help="JSON file for the correlation report")
    p.add_argument("--input-key", default="prompt")
    p.add_argument("--output-key", default="response")
    p.add_argument("--reference-key", default=None, help="numeric column to correlate the rewards with")
    p.add_argument("--apply-chat-template", action="store_true")
    p.add_argument("--input-template", default=None)
    p.add_argument("--gamma", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-len", type=int, default=2048, help="prompt + response tokens; longer pairs are truncated")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def _encode(tokenizer, record, args, path, line_no):
    prompt = format_prompt(tokenizer, record[args.input_key], apply_chat_template=args.apply_chat_template,
                           input_template=args.input_template)
    prompt_ids = encode_prompt(tokenizer, prompt)
    response_ids = tokenizer(record[args.output_key], add_special_tokens=False)["input_ids"]
    ended = record.get("finished", True) is not False  # samples marked unfinished are cut, not terminal
    if ended:
        response_ids = response_ids + [tokenizer.eos_token_id]
    if len(prompt_ids) >= args.max_len:
        raise DataError(f"{path}, line {line_no}, field {args.input_key!r}: prompt has {len(prompt_ids)} tokens, "
                        f"not shorter than --max-len {args.max_len}")
    cut = len(prompt_ids) + len(response_ids) > args.max_len
    response_ids = response_ids[: args.max_len - len(prompt_ids)]
    return prompt_ids, response_ids, ended and not cut


@torch.no_grad()
def sequence_token_rewards(model, rows, pad_id: int, eos_id: int, gamma: float):
    """For rows of (prompt_ids, response_ids, terminal): per-token rewards and log pi over the response tokens."""
    device = next(model.parameters()).device
    width = max(len(p) + len(r) for p, r, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    resp = torch.zeros((len(rows), width - 1), dtype=torch.bool)
    for i, (p, r, _) in enumerate(rows):
        ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        attn[i, : len(p) + len(r)] = 1
        resp[i, len(p) - 1 : len(p) + len(r) - 1] = True
    logits = model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits[:, :-1].float().cpu()
    labels = ids[:, 1:]
    terminal = resp & (labels == eos_id)
    for i, (_, _, is_terminal) in enumerate(rows):
        if not is_terminal:
            terminal[i] = False
    q, v = logits_q_and_v(logits, labels, resp)
    terms = iq_token_terms(q, v, resp, terminal, gamma=gamma)
    return [(terms.rewards[i][resp[i]].tolist(), float(terms.log_probs[i][resp[i]].double().sum()))
            for i in range(len(rows))]


def correlations(records, key: str, reference_key: str) -> dict:
    """Spearman of ``key`` with the reference across all pairs, and the mean within prompts (>= 2 responses)."""
    xs = [r[key] for r in records]
    ys = [float(r[reference_key]) for r in records]
    groups = defaultdict(list)
    for r in records:
        groups[r["prompt"]].append((r[key], float(r[reference_key])))
    within = [spearman([a for a, _ in g], [b for _, b in g]) for g in groups.values() if len(g) >= 2]
    within = [w for w in within if not math.isnan(w)]
    return {
        "across_prompts": spearman(xs, ys),
        "within_prompts_mean": sum(within) / len(within) if within else float("nan"),
        "prompts_with_within_correlation": len(within),
    }


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(args.device).eval()
    required = (args.input_key, args.output_key)
    try:
        records = list(read_jsonl(args.data, required=required))
        if not records:
            raise DataError(f"{args.data}: no records")
        encoded = [_encode(tokenizer, rec, args, args.data, line_no) for line_no, rec in records]
        if args.reference_key:
            for line_no, rec in records:
                value = rec.get(args.reference_key)
                if not isinstance(value, (int, float)) or isinstance(value, bool):
                    raise DataError(f"{args.data}, line {line_no}, field {args.reference_key!r}: "
                                    f"expected a number, got {value!r}")
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    out = []
    for start in range(0, len(encoded), args.batch_size):
        batch = encoded[start : start + args.batch_size]
        scored = sequence_token_rewards(model, batch, tokenizer.pad_token_id, tokenizer.eos_token_id, args.gamma)
        for (_, rec), (p, r, terminal), (rewards, log_prob) in zip(records[start:], batch, scored):
            row = {
                "prompt": rec[args.input_key],
                "response": rec[args.output_key],
                "tokens": tokenizer.convert_ids_to_tokens(r),
                "token_rewards": rewards,
                "reward": float(sum(rewards)),
                "log_prob": log_prob,
                "terminal": terminal,
            }
            if args.reference_key:
                row[args.reference_key] = rec[args.reference_key]
            out.append(row)
    atomic_write_jsonl(args.output, out)
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
            atomic_write_json(args.report, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
