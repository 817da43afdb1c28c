"""Policy samples for the online IQ-Learn term, as teacher-forcing tensors.

Both samplers (transformers' ``generate`` in-process, OpenRLHF's vLLM engines) end in :func:`pack_policy_samples`,
so the trainer sees the same layout whichever produced the tokens.
"""

from __future__ import annotations

import contextlib

from typing import Sequence

import torch


def pack_policy_samples(prompts: Sequence[torch.Tensor], completions: Sequence[Sequence[int]], *, pad_id: int,
                        device=None) -> dict[str, torch.Tensor]:
    """Left-pad prompts, right-pad completions; row i is ``prompts[i] + completions[i]``.

    A completion holds its sampled tokens, ending in EOS when the episode terminated (truncated ones simply stop).
    Returns ``sequences`` [N, L], ``attention_mask`` [N, L] and the shifted ``loss_mask`` [N, L-1] (position t
    predicts ``sequences[:, t+1]``) marking completion tokens.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    device = device if device is not None else (prompts[0].device if len(prompts) else "cpu")
    width = max(len(p) for p in prompts)
    gen_width = max(1, max(len(c) for c in completions))
    n = len(prompts)
    sequences = torch.full((n, width + gen_width), pad_id, dtype=torch.long, device=device)
    attention = torch.zeros((n, width + gen_width), dtype=torch.long, device=device)
    loss_mask = torch.zeros((n, width + gen_width - 1), dtype=torch.bool, device=device)
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        sequences[i, width - len(prompt):width] = prompt.to(device)
        attention[i, width - len(prompt):width + len(completion)] = 1
        if len(completion):
            sequences[i, width:width + len(completion)] = torch.as_tensor(list(completion), dtype=torch.long)
            loss_mask[i, width - 1:width - 1 + len(completion)] = True
    return {"sequences": sequences, "attention_mask": attention, "loss_mask": loss_mask}


def cut_after_eos(tokens: Sequence[int], eos_id: int) -> list[int]:
    """Tokens up to and including the first EOS (all of them if there is none)."""
    tokens = list(tokens)
    return tokens[: tokens.index(eos_id) + 1] if eos_id in tokens else tokens


@contextlib.contextmanager
def policy_generation_config(model, *, temperature: float, max_new_tokens: int, pad_id: int, eos_id: int):
    """Sampling from the policy itself, temperature only: while active, ``model.generation_config`` is a clean one.

    The checkpoint's own config (repetition penalties, ``no_repeat_ngram_size``, ``min_new_tokens``, suppressed
    tokens, top-k...) must not reshape the distribution whose samples the online IQ-Learn terms treat as the
    policy's. transformers fills every field of a config passed to ``generate`` that is left at its default from
    ``model.generation_config``, so the model's own config is swapped out, not merely overridden."""
    from transformers import GenerationConfig

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT model generates with its base
    saved = base.generation_config
    base.generation_config = GenerationConfig(pad_token_id=pad_id, eos_token_id=eos_id,
                                              bos_token_id=getattr(base.config, "bos_token_id", None))
    try:
        yield GenerationConfig(do_sample=True, temperature=temperature, top_p=1.0, top_k=0,
                               max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=eos_id,
                               use_cache=True)
    finally:
        base.generation_config = saved


@torch.no_grad()
def sample_completions(model, tokenizer, prompts: list[torch.Tensor], *, n: int = 1, max_new_tokens: int = 64,
                       temperature: float = 1.0, synced_gpus: bool = False) -> dict[str, torch.Tensor]:
    """Sample ``n`` completions per prompt with transformers' ``generate``; see :func:`pack_policy_samples`.

    A completion that reached ``max_new_tokens`` without EOS is kept whole and is not terminal. ``synced_gpus``:
    keep running forward passes until every rank is done (needed when the weights are ZeRO-3 shards).
    """
    device = next(model.parameters()).device
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    rows = [p.to(device) for p in prompts for _ in range(n)]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    attention = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row):] = row
        attention[i, width - len(row):] = 1
    with policy_generation_config(model, temperature=temperature, max_new_tokens=max_new_tokens, pad_id=pad_id,
                                  eos_id=eos_id) as config:
        out = model.generate(input_ids=input_ids, attention_mask=attention, synced_gpus=synced_gpus,
                             generation_config=config)
    completions = [cut_after_eos(row, eos_id) for row in out[:, width:].tolist()]
    return pack_policy_samples(rows, completions, pad_id=pad_id, device=device)
