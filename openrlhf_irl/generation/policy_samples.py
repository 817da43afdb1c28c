"""Policy samples for the online IQ-Learn term: generate from the training model, return teacher-forcing tensors."""

from __future__ import annotations

import torch


@torch.no_grad()
def sample_completions(model, tokenizer, prompts: list[torch.Tensor], *, n: int = 1, max_new_tokens: int = 64,
                       temperature: float = 1.0) -> dict[str, torch.Tensor]:
    """Sample ``n`` completions per prompt with transformers' ``generate``.

    Returns ``sequences`` [N, L] (left-padded prompt + completion, pad after EOS), ``attention_mask`` [N, L] and the
    shifted ``loss_mask`` [N, L-1] marking completion tokens up to and including EOS (a completion that reached
    ``max_new_tokens`` without EOS is kept whole and is not terminal).
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
    out = model.generate(
        input_ids=input_ids, attention_mask=attention, do_sample=True, temperature=temperature, top_p=1.0, top_k=0,
        max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=eos_id, use_cache=True,
    )
    generated = out[:, width:]
    steps = torch.arange(generated.shape[1], device=device)
    is_eos = generated == eos_id
    length = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, generated.shape[1])
    response = steps.unsqueeze(0) < length.unsqueeze(1)
    sequences = torch.cat([input_ids, generated.masked_fill(~response, pad_id)], dim=1)
    attention_mask = torch.cat([attention, response.long()], dim=1)
    loss_mask = torch.zeros((len(rows), sequences.shape[1] - 1), dtype=torch.bool, device=device)
    loss_mask[:, width - 1:] = response
    return {"sequences": sequences, "attention_mask": attention_mask, "loss_mask": loss_mask}
