"""Loading a local checkpoint for generation or scoring: tokenizer, causal LM (+ LoRA merged), device and dtype."""

from __future__ import annotations

from typing import Any, Optional, Union

import torch

__all__ = ["load_tokenizer", "load_causal_lm", "resolve_device", "resolve_dtype"]


def resolve_device(device: Optional[str] = None) -> torch.device:
    """``device`` if given, else ``cuda`` when available, else ``cpu``."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: Union[str, torch.dtype], device: torch.device) -> torch.dtype:
    """``"auto"``: float32 on CPU (exact log-probs), bfloat16 on GPU; else a ``torch.dtype`` or its name."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return value


def load_tokenizer(path: str) -> Any:
    """``AutoTokenizer`` from a local path; a missing pad token falls back to the EOS token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(
    path: str,
    *,
    lora: Optional[str] = None,
    dtype: Union[str, torch.dtype] = "auto",
    device: Optional[str] = None,
) -> Any:
    """``AutoModelForCausalLM`` in eval mode on ``device``; a PEFT LoRA adapter at ``lora`` is merged in."""
    from transformers import AutoModelForCausalLM

    dev = resolve_device(device)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype, dev))
    if lora:
        try:
            from peft import PeftModel
        except ImportError as e:  # pragma: no cover - peft ships with openrlhf
            raise ImportError("loading a LoRA adapter needs `peft`") from e
        model = PeftModel.from_pretrained(model, lora).merge_and_unload()
    return model.to(dev).eval()
