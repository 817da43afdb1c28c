"""AfD reward-model datasets: demonstrations and policy samples as positives vs negatives.

AfD (Sun & van der Schaar 2024) trains a reward model to tell a "positive" source from a "negative"
one; its logit is the reward. Variants (``negative -> positive``):

* ``init-sft`` (default): init-policy samples -> SFT-policy samples
* ``init-demo``: init-policy samples -> demonstrations
* ``sft-demo``: SFT-policy samples -> demonstrations

Inputs are JSONL. Samples (from the sampling job) are ``{"prompt", "response", "policy",
"sample_index", "finished", "logprob"}``; demonstrations have ``prompt``/``response`` keys unless
``input_key``/``output_key`` name others. Prompts are matched by exact string equality, so samples
must store the prompt exactly as the demonstrations give it.

Output formats:

* ``pairs``: ``{"prompt", "chosen", "rejected"}`` with chosen = positive. This is what OpenRLHF's
  ``RewardDataset`` reads; train with ``python -m openrlhf.cli.train_rm --data.dataset OUT.jsonl
  --data.prompt_key prompt`` (``--data.chosen_key chosen`` and ``--data.rejected_key rejected`` are
  its defaults). It builds ``prompt + chosen`` as plain text, so do not pass
  ``--data.apply_chat_template`` (it expects message lists); pass ``--data.input_template`` only if
  the stored prompts are raw and the policies were sampled with that same template.
* ``labels``: ``{"prompt", "response", "label"}`` with label 1 for positives, 0 for negatives
  (unpaired binary classification, the paper's own objective).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

from openrlhf_irl.datasets.response_text import normalize_response
from openrlhf_irl.utils.jsonl import DataError, data_error, read_jsonl

__all__ = ["VARIANTS", "FORMATS", "DROP_REASONS", "build_afd_dataset", "format_report"]

#: variant -> (negative source, positive source)
VARIANTS: Dict[str, Tuple[str, str]] = {
    "init-sft": ("init", "sft"),
    "init-demo": ("init", "demo"),
    "sft-demo": ("sft", "demo"),
}
FORMATS = ("pairs", "labels")
#: Each dropped record is counted under the first reason that applies, in this order.
DROP_REASONS = (
    "bad_line",
    "prompt_too_long",
    "unmatched_prompt",
    "empty",
    "truncated",
    "duplicate",
    "ambiguous",
    "orphaned",
)
_SOURCE_LABEL = {"init": "init-policy samples", "sft": "SFT-policy samples", "demo": "demonstrations"}
_SOURCE_PARAM = {"init": "init_samples", "sft": "sft_samples", "demo": "demos"}


@dataclass
class _Item:
    prompt: str
    response: str
    line_no: int
    finished: bool = True


@dataclass
class _Side:
    role: str  # "positive" | "negative"
    source: str  # "init" | "sft" | "demo"
    path: str
    prompt_key: str = "prompt"
    items: List[_Item] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)
    bad_lines: Counter = field(default_factory=Counter)

    @property
    def label(self) -> str:
        return _SOURCE_LABEL[self.source]

    def keep(self, pred: Callable[[_Item], bool], reason: str) -> None:
        """Keep the items satisfying ``pred``; count the others under ``reason``."""
        kept = [it for it in self.items if pred(it)]
        self.dropped[reason] += len(self.items) - len(kept)
        self.items = kept


# ----------------------------------------------------------------------------------------- loading


class _PromptLength:
    """Cached prompt length in tokens (no special tokens, as OpenRLHF's datasets count it)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.cache: Dict[str, int] = {}

    def __call__(self, prompt: str) -> int:
        if prompt not in self.cache:
            self.cache[prompt] = len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        return self.cache[prompt]


def _check_finished(path: str, line_no: int, record: dict) -> bool:
    if "finished" not in record:
        raise data_error(path, line_no, "missing", field="finished", reason="missing_field")
    if not isinstance(record["finished"], bool):
        got = type(record["finished"]).__name__
        raise data_error(path, line_no, f"expected true or false, got {got}", field="finished", reason="non_bool_field")
    return record["finished"]


def _load_side(
    role: str,
    source: str,
    path: str,
    *,
    input_key: str,
    output_key: str,
    need_finished: bool,
    lenient: bool,
    prompt_len: Optional[_PromptLength],
    max_prompt_len: Optional[int],
) -> _Side:
    """Read one input file into a :class:`_Side`; bad lines raise or (lenient) are counted."""
    pkey, rkey = (input_key, output_key) if source == "demo" else ("prompt", "response")
    side = _Side(role, source, str(path), pkey)
    for line_no, record in read_jsonl(path, required=(pkey, rkey), lenient=lenient, skipped=side.bad_lines):
        try:
            finished = _check_finished(side.path, line_no, record) if need_finished else True
            n_tokens = prompt_len(record[pkey]) if prompt_len is not None else 0
            if prompt_len is not None and n_tokens > max_prompt_len:
                raise data_error(
                    side.path, line_no, f"{n_tokens} tokens, longer than max_prompt_len={max_prompt_len}",
                    field=pkey, reason="prompt_too_long",
                )
        except DataError as e:
            if not lenient:
                raise
            counter = side.dropped if e.reason == "prompt_too_long" else side.bad_lines
            counter[e.reason] += 1
            continue
        # both sides the same way: neither source keeps a trailing-whitespace mark (datasets/response_text.py)
        side.items.append(_Item(record[pkey], normalize_response(record[rkey]), line_no, finished))
    side.dropped["bad_line"] = sum(side.bad_lines.values())
    if not side.items and not side.dropped["prompt_too_long"]:
        skipped = f" ({side.dropped['bad_line']} bad lines skipped)" if side.dropped["bad_line"] else ""
        raise data_error(side.path, None, f"the {side.label} file has no records{skipped}", reason="empty_file")
    return side


# ---------------------------------------------------------------------------------------- cleaning


def _short(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _match_prompts(pos: _Side, neg: _Side, lenient: bool) -> int:
    """Prompts present on one side only: raise on the first, or (lenient) drop them; return how many."""
    prompts = {pos.role: {it.prompt for it in pos.items}, neg.role: {it.prompt for it in neg.items}}
    unmatched = set()
    for side, other in ((pos, neg), (neg, pos)):
        theirs = prompts[other.role]
        for it in side.items:
            if it.prompt in theirs:
                continue
            if not lenient:
                hint = ""
                if not prompts[pos.role] & prompts[neg.role]:
                    hint = " No prompt occurs in both files: were they stored with different templates or keys?"
                raise data_error(
                    side.path, it.line_no,
                    f"prompt {_short(it.prompt)} occurs in the {side.label} but not in the {other.label} "
                    f"({other.path}); lenient mode skips such prompts.{hint}",
                    field=side.prompt_key, reason="unmatched_prompt",
                )
            unmatched.add(it.prompt)
        side.keep(lambda it, theirs=theirs: it.prompt in theirs, "unmatched_prompt")
    return len(unmatched)


def _dedupe(side: _Side) -> None:
    seen = set()

    def first(it: _Item) -> bool:
        key = (it.prompt, it.response)
        if key in seen:
            return False
        seen.add(key)
        return True

    side.keep(first, "duplicate")


def _clean(side: _Side, *, keep_empty: bool, keep_truncated: bool) -> None:
    """Drop empty responses, truncated samples and within-side duplicates, counting each."""
    if not keep_empty:
        side.keep(lambda it: bool(it.response.strip()), "empty")
    if not keep_truncated:
        side.keep(lambda it: it.finished, "truncated")
    _dedupe(side)


def _drop_ambiguous(pos: _Side, neg: _Side) -> None:
    """A (prompt, response) present on both sides cannot be labelled: drop it from both."""
    both = {(it.prompt, it.response) for it in pos.items} & {(it.prompt, it.response) for it in neg.items}
    for side in (pos, neg):
        side.keep(lambda it: (it.prompt, it.response) not in both, "ambiguous")


def _drop_orphans(pos: _Side, neg: _Side) -> None:
    """Drop records whose prompt lost every record of the other side during cleaning."""
    shared = {it.prompt for it in pos.items} & {it.prompt for it in neg.items}
    for side in (pos, neg):
        side.keep(lambda it: it.prompt in shared, "orphaned")


# ---------------------------------------------------------------------------------------- building


def _group(items: Iterable[_Item]) -> Dict[str, List[str]]:
    groups: Dict[str, List[str]] = {}
    for it in items:
        groups.setdefault(it.prompt, []).append(it.response)
    return groups


def _shuffled(responses: List[str], seed: int, role: str, prompt: str) -> List[str]:
    """Shuffle deterministically per (seed, side, prompt), independent of other prompts."""
    out = list(responses)
    random.Random(f"{seed}\x00{role}\x00{prompt}").shuffle(out)
    return out


def _pairs(pos: _Side, neg: _Side, seed: int, cap: Optional[int]) -> Tuple[List[dict], int]:
    """Pair the i-th positive with the i-th negative per prompt, cycling the shorter side."""
    negs = _group(neg.items)
    records, capped = [], 0
    for prompt, chosen in _group(pos.items).items():
        chosen = _shuffled(chosen, seed, pos.role, prompt)
        rejected = _shuffled(negs[prompt], seed, neg.role, prompt)
        n = max(len(chosen), len(rejected))
        if cap is not None and n > cap:
            capped += n - cap
            n = cap
        for i in range(n):
            records.append(
                {"prompt": prompt, "chosen": chosen[i % len(chosen)], "rejected": rejected[i % len(rejected)]}
            )
    return records, capped


def _labels(pos: _Side, neg: _Side) -> List[dict]:
    """One record per kept response, grouped by prompt: positives (label 1) then negatives (0)."""
    negs = _group(neg.items)
    records = []
    for prompt, responses in _group(pos.items).items():
        records += [{"prompt": prompt, "response": r, "label": 1} for r in responses]
        records += [{"prompt": prompt, "response": r, "label": 0} for r in negs[prompt]]
    return records


# ------------------------------------------------------------------------------------ surface features
#: A feature that tells the classes apart with this balanced accuracy (or better) is reported as a leak ...
LEAK_ACCURACY = 0.95
#: ... once each class has at least this many responses (a handful is separated by anything).
LEAK_MIN_PER_CLASS = 20


def surface_features(response: str, eos_token: Optional[str]) -> Dict[str, float]:
    """Features of a response that say nothing about its quality; a reward model can learn any of them."""
    return {
        "trailing whitespace": float(len(response) - len(response.rstrip())),
        "leading whitespace": float(len(response) - len(response.lstrip())),
        "EOS count": float(response.count(eos_token)) if eos_token else 0.0,
        "length": float(len(response)),
    }


def best_threshold_accuracy(pos: List[float], neg: List[float]) -> float:
    """Balanced accuracy of the best rule ``x > t`` (or ``x <= t``) telling ``pos`` from ``neg``: 0.5 when the
    feature carries nothing, 1.0 when one threshold separates the classes."""
    from bisect import bisect_right

    pos_sorted, neg_sorted = sorted(pos), sorted(neg)
    best = 0.5
    for t in sorted(set(pos) | set(neg)):  # x > t is positive; t = the largest value: nothing is
        tpr = 1 - bisect_right(pos_sorted, t) / len(pos)
        tnr = bisect_right(neg_sorted, t) / len(neg)
        best = max(best, (tpr + tnr) / 2, 1 - (tpr + tnr) / 2)
    return best


def surface_leaks(pos: List[str], neg: List[str], eos_token: Optional[str] = None) -> Tuple[Dict[str, float], List[str]]:
    """``({feature: balanced accuracy}, [warning, ...])`` for the positive and negative responses of a dataset."""
    if not pos or not neg:
        return {}, []
    pf = [surface_features(r, eos_token) for r in pos]
    nf = [surface_features(r, eos_token) for r in neg]
    scores = {name: round(best_threshold_accuracy([f[name] for f in pf], [f[name] for f in nf]), 4) for name in pf[0]}
    warnings = []
    if min(len(pos), len(neg)) >= LEAK_MIN_PER_CLASS:
        for name, acc in scores.items():
            if acc >= LEAK_ACCURACY:
                warnings.append(f"{name} alone separates the positives from the negatives (balanced accuracy "
                                f"{acc:.3f}): a reward model can learn it instead of what the responses say")
    return scores, warnings


def _class_responses(records: List[dict], fmt: str) -> Tuple[List[str], List[str]]:
    if fmt == "pairs":
        return [r["chosen"] for r in records], [r["rejected"] for r in records]
    return [r["response"] for r in records if r["label"] == 1], [r["response"] for r in records if r["label"] == 0]


def _report(variant: str, fmt: str, pos: _Side, neg: _Side, unmatched: int, records: List[dict], capped: int) -> dict:
    sides = (pos, neg)
    dropped_by_side = {s.role: {r: s.dropped[r] for r in DROP_REASONS} for s in sides}
    bad_lines = Counter()
    for s in sides:
        bad_lines.update(s.bad_lines)
    return {
        "variant": variant,
        "format": fmt,
        "sources": {s.role: s.source for s in sides},
        "read": {s.role: len(s.items) + sum(s.dropped.values()) for s in sides},
        "kept": {s.role: len(s.items) for s in sides},
        "dropped": {r: pos.dropped[r] + neg.dropped[r] for r in DROP_REASONS},
        "dropped_by_side": dropped_by_side,
        "bad_lines": dict(sorted(bad_lines.items())),
        "unmatched_prompts": unmatched,
        "prompts": len({r["prompt"] for r in records}),
        "capped_pairs": capped,
        "records": len(records),
    }


def _add_leak_check(report: dict, records: List[dict], fmt: str, eos_token: Optional[str]) -> None:
    report["surface_features"], report["warnings"] = surface_leaks(*_class_responses(records, fmt), eos_token)


def _check_args(variant, fmt, inputs, tokenizer, max_prompt_len, max_pairs_per_prompt) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {', '.join(VARIANTS)}")
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    for source in VARIANTS[variant]:
        if inputs[source] is None:
            raise ValueError(f"variant {variant!r} needs {_SOURCE_PARAM[source]} ({_SOURCE_LABEL[source]})")
    if (tokenizer is None) != (max_prompt_len is None):
        raise ValueError("tokenizer and max_prompt_len must be given together")
    if max_prompt_len is not None and max_prompt_len < 1:
        raise ValueError(f"max_prompt_len must be >= 1, got {max_prompt_len}")
    if max_pairs_per_prompt is not None:
        if fmt != "pairs":
            raise ValueError("max_pairs_per_prompt applies only to the 'pairs' format")
        if max_pairs_per_prompt < 1:
            raise ValueError(f"max_pairs_per_prompt must be >= 1, got {max_pairs_per_prompt}")


def build_afd_dataset(
    variant: str = "init-sft",
    *,
    demos: Optional[str] = None,
    init_samples: Optional[str] = None,
    sft_samples: Optional[str] = None,
    fmt: str = "pairs",
    input_key: str = "prompt",
    output_key: str = "response",
    keep_truncated: bool = False,
    keep_empty: bool = False,
    lenient: bool = False,
    max_pairs_per_prompt: Optional[int] = None,
    tokenizer: Any = None,
    max_prompt_len: Optional[int] = None,
    seed: int = 0,
    eos_token: Optional[str] = "</s>",
) -> Tuple[List[dict], dict]:
    """Build AfD reward-model records from the inputs ``variant`` needs; return ``(records, report)``.

    Only the variant's two inputs are read. Cleaning, each dropped record counted under the first
    reason that applies (:data:`DROP_REASONS`): bad lines (lenient only), prompts longer than
    ``max_prompt_len`` tokens (error unless lenient), prompts found on one side only (error naming
    file, line and prompt unless lenient), empty responses, truncated samples (``finished`` false),
    duplicate (prompt, response) within a side, responses present on both sides of a prompt
    ("ambiguous", dropped from both), and records whose prompt has nothing left on the other side
    after cleaning ("orphaned").

    ``pairs``: per prompt, both sides are shuffled with ``seed``, the i-th positive is paired with the
    i-th negative and the shorter side cycles, so each record of the longer side is used once; at
    most ``max_pairs_per_prompt`` pairs per prompt. ``labels``: every kept record, label 1/0.

    Responses of every source lose their trailing whitespace (:func:`normalize_response`), so a demonstration and a
    sample of the same text are the same tokens. ``report["surface_features"]`` gives, per feature that says nothing
    about quality (trailing/leading whitespace, count of ``eos_token`` -- the tokenizer's when one is given --, length),
    how well one threshold on it separates the two classes (balanced accuracy), and ``report["warnings"]`` names any
    feature that does so almost perfectly (:data:`LEAK_ACCURACY`, with :data:`LEAK_MIN_PER_CLASS` responses a class).
    Raises :class:`DataError` for bad data, including an empty input file or an empty result.
    """
    inputs = {"demo": demos, "init": init_samples, "sft": sft_samples}
    _check_args(variant, fmt, inputs, tokenizer, max_prompt_len, max_pairs_per_prompt)
    neg_source, pos_source = VARIANTS[variant]
    prompt_len = _PromptLength(tokenizer) if tokenizer is not None else None
    pos, neg = (
        _load_side(
            role, source, inputs[source],
            input_key=input_key, output_key=output_key, need_finished=source != "demo" and not keep_truncated,
            lenient=lenient, prompt_len=prompt_len, max_prompt_len=max_prompt_len,
        )
        for role, source in (("positive", pos_source), ("negative", neg_source))
    )
    unmatched = _match_prompts(pos, neg, lenient)
    for side in (pos, neg):
        _clean(side, keep_empty=keep_empty, keep_truncated=keep_truncated)
    _drop_ambiguous(pos, neg)
    _drop_orphans(pos, neg)
    records, capped = _pairs(pos, neg, seed, max_pairs_per_prompt) if fmt == "pairs" else (_labels(pos, neg), 0)
    report = _report(variant, fmt, pos, neg, unmatched, records, capped)
    _add_leak_check(report, records, fmt, getattr(tokenizer, "eos_token", None) if tokenizer is not None else eos_token)
    if not records:
        raise DataError("no records left after cleaning\n" + format_report(report), reason="empty_result")
    return records, report


def format_report(report: dict) -> str:
    """Render a :func:`build_afd_dataset` report as a few human-readable lines."""
    lines = [
        f"AfD dataset (variant {report['variant']}, format {report['format']}): "
        f"{report['records']} records over {report['prompts']} prompts"
    ]
    for role in ("positive", "negative"):
        label = _SOURCE_LABEL[report["sources"][role]]
        lines.append(f"  {role} ({label}): read {report['read'][role]}, kept {report['kept'][role]}")
    dropped = ", ".join(f"{r} {n}" for r, n in report["dropped"].items() if n) or "none"
    lines.append(f"  dropped: {dropped}")
    if report["bad_lines"]:
        lines.append("  bad lines: " + ", ".join(f"{r} {n}" for r, n in report["bad_lines"].items()))
    if report["unmatched_prompts"]:
        lines.append(f"  prompts on one side only (skipped): {report['unmatched_prompts']}")
    if report["capped_pairs"]:
        lines.append(f"  pairs left out by max_pairs_per_prompt: {report['capped_pairs']}")
    lines += [f"  warning: {w}" for w in report.get("warnings", [])]
    return "\n".join(lines)
