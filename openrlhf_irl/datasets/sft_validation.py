"""Up-front check of SFT datasets for ``--trainer irl_iq``: one line naming file, record and field.

OpenRLHF loads ``--data.dataset`` after the model, then drops records with an empty or missing response without
saying so, trains a dict prompt as its ``str()``, fails with a bare ``StopIteration`` on an empty file and with a
pyarrow row number on a malformed line. Local ``.json`` / ``.jsonl`` files are read here first (other sources, hub
names and dataset directories, are left to OpenRLHF).
"""

from __future__ import annotations

import json
import os
from typing import Iterator, Optional

from openrlhf_irl.utils.jsonl import DataError, read_jsonl

__all__ = ["validate_sft_datasets", "validate_sft_record"]


def data_error(path, where: str, problem: str, *, field: Optional[str] = None, reason: str = "") -> DataError:
    """``file, line N (or record N), field 'f': problem``."""
    loc = f"{path}, {where}" + (f", field '{field}'" if field else "")
    return DataError(f"{loc}: {problem}", path=path, field=field, reason=reason or "error")


def _local_files(spec: str) -> list[str]:
    files = []
    for item in spec.split(","):
        path = item.split("@")[0].strip()
        if os.path.splitext(path)[1].lower() in (".json", ".jsonl"):
            files.append(path)
    return files


def _records(path: str) -> Iterator[tuple[str, dict]]:
    """("line N" or "record N", record) of a JSONL file, or of a .json file holding one array of objects."""
    if path.lower().endswith(".json"):
        with open(path, "rb") as f:
            head = f.read(4096).lstrip().lstrip(b"\xef\xbb\xbf")
        if head.startswith(b"["):
            try:
                with open(path, encoding="utf-8") as f:
                    items = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DataError(f"{path}: not valid JSON ({e})") from None
            for i, rec in enumerate(items, start=1):
                if not isinstance(rec, dict):
                    raise DataError(f"{path}, record {i}: expected a JSON object, got {type(rec).__name__}")
                yield f"record {i}", rec
            return
    for line_no, rec in read_jsonl(path):
        yield f"line {line_no}", rec


def _messages(value, path, where, field) -> None:
    if not isinstance(value, list) or not value:
        raise data_error(path, where, f"expected a non-empty list of chat messages, got {_kind(value)}", field=field,
                         reason="bad_field")
    for j, msg in enumerate(value):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) or not isinstance(msg.get("content"), str):
            raise data_error(path, where, f"message {j} must be an object with string 'role' and 'content', got "
                             f"{json.dumps(msg)[:80]}", field=field, reason="bad_field")


def _kind(value) -> str:
    return "null" if value is None else type(value).__name__


def validate_sft_record(rec: dict, path: str, where, *, input_key: str, output_key: Optional[str], multiturn: bool,
                        chat_template: bool) -> str:
    """Raise :class:`DataError` for a record OpenRLHF's SFT dataset would drop, stringify or crash on; returns the
    prompt's kind ("str" or "list") so a caller can check that every record has the same."""
    if input_key not in rec:
        raise data_error(path, where, "missing", field=input_key, reason="missing_field")
    prompt = rec[input_key]
    if multiturn:
        _messages(prompt, path, where, input_key)
        if output_key and rec.get(output_key) is not None:
            _messages([rec[output_key]], path, where, output_key)
        turns = prompt + ([rec[output_key]] if output_key and rec.get(output_key) is not None else [])
        if turns[-1]["role"] != "assistant":
            raise data_error(path, where, f"the conversation must end with an assistant message (the episode's last "
                             f"action), not {turns[-1]['role']!r}", field=input_key, reason="bad_field")
        return "list"
    if isinstance(prompt, str):
        pass
    elif chat_template and isinstance(prompt, list):
        _messages(prompt, path, where, input_key)
    else:
        allowed = "a string or a list of chat messages" if chat_template else "a string"
        raise data_error(path, where, f"expected {allowed}, got {_kind(prompt)}", field=input_key, reason="bad_field")
    if output_key not in rec or rec[output_key] is None:
        raise data_error(path, where, "missing response" if output_key not in rec else "response is null",
                         field=output_key, reason="missing_field")
    response = rec[output_key]
    if isinstance(response, str):
        if not response:
            raise data_error(path, where, "empty response (OpenRLHF would drop the record)", field=output_key,
                             reason="bad_field")
    elif chat_template and isinstance(response, list) and not isinstance(prompt, str):
        _messages(response, path, where, output_key)
    else:
        raise data_error(path, where, f"expected a string, got {_kind(response)}", field=output_key, reason="bad_field")
    return "str" if isinstance(prompt, str) else "list"


def _json_kind(value) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "list", dict: "object"}.get(type(value), "null")


def _check_column_types(rec: dict, seen: dict, path: str, where: str) -> None:
    """pyarrow loads a JSON file as columns: a field whose type changes between records fails there with a row
    number; say which record and field here instead (null is allowed anywhere)."""
    for key, value in rec.items():
        kind = _json_kind(value)
        if kind == "null":
            continue
        first = seen.setdefault(key, (kind, where))
        if first[0] != kind:
            raise data_error(path, where, f"a {kind} here but a {first[0]} at {first[1]} (a field must keep one "
                             "type across records to load)", field=key, reason="mixed_types")


def validate_sft_datasets(spec: str, *, flag: str, input_key: str, output_key: Optional[str], multiturn: bool,
                          chat_template: bool) -> int:
    """Check every local JSON/JSONL file of a comma-separated dataset spec; returns the records checked.

    Raises ``ValueError`` with one line: an empty file, a malformed line, a record whose fields OpenRLHF
    would mishandle, or a field whose type changes between records (pyarrow's error otherwise).
    """
    total = 0
    for path in _local_files(spec):
        if not os.path.exists(path):
            continue  # OpenRLHF names it in its own error (example scripts parse with placeholder paths)
        if not os.path.isfile(path):
            raise ValueError(f"{flag}: {path} is not a file")
        count, field_kinds = 0, {}
        for where, rec in _records(path):
            _check_column_types(rec, field_kinds, path, where)
            validate_sft_record(rec, path, where, input_key=input_key, output_key=output_key, multiturn=multiturn,
                                chat_template=chat_template)
            count += 1
        if count == 0:
            raise ValueError(f"{flag}: {path} has no records")
        total += count
    return total
