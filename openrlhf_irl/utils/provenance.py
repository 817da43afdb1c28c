"""What produced an output file: a ``<file>.provenance.json`` sidecar, compared before a rerun resumes the file.

A model is identified by its path, a SHA-256 of its ``config.json`` and a fingerprint of its weights (the
weights index and, per weight file, its size and a SHA-256 of its content - whole for files up to
``FULL_HASH_BYTES``, else its first and last MiB, which hold the safetensors header and two ends of the data).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Dict, List, Optional

from openrlhf_irl.utils.jsonl import atomic_write_json

__all__ = ["sidecar_path", "model_identity", "read_provenance", "write_provenance", "differences"]

FULL_HASH_BYTES = 256 << 20
_CHUNK = 1 << 20
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def sidecar_path(path: str) -> str:
    return f"{path}.provenance.json"


def _sha256_file(path: str, whole: bool) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if whole:
            for block in iter(lambda: f.read(_CHUNK), b""):
                h.update(block)
        else:
            h.update(f.read(_CHUNK))
            f.seek(-_CHUNK, os.SEEK_END)
            h.update(f.read(_CHUNK))
    return h.hexdigest()


def _weights_fingerprint(directory: str) -> Dict[str, Any]:
    files = sorted(n for n in os.listdir(directory) if n.endswith(_WEIGHT_SUFFIXES) or n.endswith(".index.json"))
    total = sum(os.path.getsize(os.path.join(directory, n)) for n in files)
    whole = total <= FULL_HASH_BYTES
    out: Dict[str, Any] = {"hashed": "whole files" if whole else "size + first and last MiB"}
    for name in files:
        path = os.path.join(directory, name)
        size = os.path.getsize(path)
        out[name] = f"{size}:{_sha256_file(path, whole or size <= 2 * _CHUNK or name.endswith('.json'))}"
    return out


def model_identity(path: Optional[str]) -> Optional[Dict[str, Any]]:
    """``{"path", "config_sha256", "weights"}`` of a local model or adapter directory; ``{"hub": name}`` else."""
    if path is None:
        return None
    if not os.path.isdir(path):
        return {"hub": path}
    ident: Dict[str, Any] = {"path": os.path.abspath(path)}
    for config in ("config.json", "adapter_config.json"):
        cfg = os.path.join(path, config)
        if os.path.isfile(cfg):
            ident[config.replace(".json", "_sha256")] = _sha256_file(cfg, True)
    ident["weights"] = _weights_fingerprint(path)
    return ident


def read_provenance(path: str) -> Optional[Dict[str, Any]]:
    """The sidecar of ``path`` as a dict, None if it has none; a ValueError if it is not valid JSON."""
    side = sidecar_path(path)
    if not os.path.exists(side):
        return None
    try:
        with open(side, encoding="utf-8") as f:
            data = json.load(f)
    except ValueError as err:
        raise ValueError(f"{side}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{side}: expected a JSON object")
    return data


def write_provenance(path: str, record: Dict[str, Any]) -> None:
    atomic_write_json(sidecar_path(path), record)


def _flatten(obj: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(obj, dict):
        out: Dict[str, Any] = {}
        for key, value in obj.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: obj}


def differences(old: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
    """``["sampling.temperature: 1.0 before, 0.7 now", ...]`` for every leaf that differs (hashes abbreviated)."""
    a, b = _flatten(old), _flatten(new)

    def show(value: Any) -> str:
        text = json.dumps(value) if value is not None else "absent"
        return text if len(text) <= 40 else text[:37] + "...\""

    return [f"{key}: {show(a.get(key))} before, {show(b.get(key))} now"
            for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)]
