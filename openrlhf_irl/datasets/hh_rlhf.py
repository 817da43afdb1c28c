"""Anthropic HH-RLHF (a local JSONL file, e.g. ``harmless-base/train.jsonl`` gunzipped) -> AfD prompts and
demonstrations.

Each HH record is ``{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": ...}``. The prompt is the
conversation up to and including the last ``"\\n\\nAssistant:"`` of ``chosen``; the demonstration is what follows
it (the paper uses a stronger model's answer there; the chosen answer is the stand-in when none is given).

The text is kept exactly: ``prompt + response == record["chosen"]``, so the response keeps HH's leading space
(``" I'd suggest..."``), which is what HH's golden reward models and an SFT policy trained on HH saw.
"""

from __future__ import annotations

from collections import Counter
from typing import Optional

from openrlhf_irl.utils.jsonl import DataError, read_jsonl

ASSISTANT = "\n\nAssistant:"


def split_conversation(text: str) -> tuple[str, str]:
    """(prompt ending with the last ``\\n\\nAssistant:``, the final assistant turn as written, leading space kept)."""
    cut = text.rfind(ASSISTANT)
    if cut < 0:
        raise ValueError("no '\\n\\nAssistant:' turn")
    end = cut + len(ASSISTANT)
    return text[:end], text[end:]


def load_hh_rlhf(path: str, key: str = "chosen", lenient: bool = False,
                 skipped: Optional[Counter] = None) -> list[dict]:
    """``[{"prompt", "response"}]`` from a local HH-RLHF JSONL file; bad records raise (or are counted if lenient)."""
    skipped = Counter() if skipped is None else skipped
    out = []
    for line_no, record in read_jsonl(path, required=(key,), lenient=lenient, skipped=skipped):
        try:
            prompt, response = split_conversation(record[key])
            if not response.strip():
                raise ValueError("empty final assistant turn")
        except ValueError as err:
            if lenient:
                skipped[str(err)] += 1
                continue
            raise DataError(f"{path}, line {line_no}, field {key!r}: {err}", path=path, line_no=line_no,
                            field=key) from None
        out.append({"prompt": prompt, "response": response})
    return out
