"""Teacher-forced sequence log-probabilities and the training-free AfD reward.

``log pi(y|x) = sum_t log softmax(logits_t)[y_t]`` at temperature 1, with the prompt and the response
tokenized separately (``add_special_tokens=False``, OpenRLHF's convention) and concatenated, so the
prompt/response boundary is exact. Batches are right-padded: the real tokens never attend to padding and
keep positions ``0..L-1``, so a batched score equals the unbatched one up to float rounding.

The closed-form optimum of AfD's Init-SFT discriminator gives the reward
``r(x, y) = log pi_SFT(y|x) - log pi_init(y|x)`` (:class:`LogRatioScorer`).
"""

from __future__ import annotations

from typing import Any, Iterator, List, Optional, Sequence, Tuple, Union

import torch

__all__ = ["token_logprob_sums", "response_logits", "sequence_logprobs", "LogRatioScorer", "encode_prompt"]


def encode_prompt(tokenizer: Any, prompt: str) -> List[int]:
    """Token ids of an already formatted prompt (``add_special_tokens=False``).

    An empty encoding cannot condition a causal LM; it becomes ``[bos_token_id]`` when the tokenizer has one.
    """
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if not ids:
        if tokenizer.bos_token_id is None:
            raise ValueError("the prompt encodes to no tokens and the tokenizer has no BOS token to start from")
        ids = [tokenizer.bos_token_id]
    return list(ids)


@torch.no_grad()
def token_logprob_sums(
    model: Any,
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    *,
    batch_size: int = 8,
    pad_token_id: int = 0,
) -> List[float]:
    """``sum_t log pi(response_t | prompt, response_<t)`` per row, teacher forced, at temperature 1.

    Rows are grouped by length (to limit padding) into right-padded batches of ``batch_size``; the
    log-softmax is taken in float32 on the response positions only. An empty response scores 0.0.
    """
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(response_ids)} responses")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out = [0.0] * len(prompt_ids)
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]) + len(response_ids[i]))
    order = [i for i in order if len(response_ids[i]) > 0]
    for i in order:
        if len(prompt_ids[i]) == 0:
            raise ValueError(f"row {i}: empty prompt ids (nothing to condition the first response token on)")
    for i, logits in response_logits(model, prompt_ids, response_ids, order, batch_size=batch_size,
                                     pad_token_id=pad_token_id):
        step_logits = logits.float()
        targets = torch.tensor(list(response_ids[i]), dtype=torch.long, device=step_logits.device)
        lp = torch.log_softmax(step_logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)
        out[i] = float(lp.double().sum())
    return out


def response_logits(
    model: Any,
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    rows: Sequence[int],
    *,
    batch_size: int,
    pad_token_id: int,
) -> Iterator[Tuple[int, torch.Tensor]]:
    """Teacher forced, ``rows`` in order in right-padded batches of ``batch_size``: yields ``(i, logits)`` per row
    i, ``logits`` [n, V] (the model's dtype) at the positions that predict its n response tokens. Logits at position
    t predict token t+1: after a prompt of p tokens, the response tokens p..p+n-1 are predicted at p-1..p+n-2."""
    device = next(model.parameters()).device
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        seqs = [list(prompt_ids[i]) + list(response_ids[i]) for i in batch]
        width = max(len(s) for s in seqs)
        input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, s in enumerate(seqs):
            input_ids[r, : len(s)] = torch.tensor(s, dtype=torch.long)
            attention_mask[r, : len(s)] = 1
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
        for r, i in enumerate(batch):
            p, n = len(prompt_ids[i]), len(response_ids[i])
            yield i, logits[r, p - 1 : p + n - 1]


def sequence_logprobs(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    responses: Sequence[str],
    batch_size: int = 8,
    *,
    add_eos: Union[bool, Sequence[bool]] = True,
) -> List[float]:
    """``log pi(y|x)`` of text responses, teacher forced: the sum over the response tokens (plus a final EOS
    token when ``add_eos`` is true for that row) of ``log pi(y_t | x, y_<t)`` at temperature 1.

    ``prompts`` are already formatted (see :func:`~openrlhf_irl.generation.params.format_prompt`). Prompt and
    response are tokenized separately with ``add_special_tokens=False``. ``add_eos`` may be one flag or one per
    row (e.g. a sample's ``finished``: a truncated response did not end, so its EOS has no probability to count).

    Re-tokenizing a sampled text may give other ids than the sampler produced (BPE is not always canonical), so
    this equals a :class:`~openrlhf_irl.generation.params.Completion`'s ``logprob`` only when the text round-trips.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    flags = [bool(add_eos)] * len(prompts) if isinstance(add_eos, bool) else [bool(f) for f in add_eos]
    if len(flags) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(flags)} add_eos flags")
    if any(flags) and tokenizer.eos_token_id is None:
        raise ValueError("add_eos needs a tokenizer with an eos token")
    prompt_ids = [encode_prompt(tokenizer, p) for p in prompts]
    response_ids = []
    for text, eos in zip(responses, flags):
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []
        response_ids.append(ids + [tokenizer.eos_token_id] if eos else ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return token_logprob_sums(model, prompt_ids, response_ids, batch_size=batch_size, pad_token_id=pad)


class LogRatioScorer:
    """Training-free AfD reward ``log pi_SFT(y|x) - log pi_init(y|x)`` (the Init-SFT discriminator's optimum).

    Each model is scored with its own tokenizer and prompt formatting (``apply_chat_template``/``input_template``
    as in :func:`~openrlhf_irl.generation.params.format_prompt`); ``score`` takes RAW prompts.
    """

    def __init__(
        self,
        sft_path: str,
        init_path: str,
        *,
        sft_lora: Optional[str] = None,
        init_lora: Optional[str] = None,
        apply_chat_template: bool = False,
        input_template: Optional[str] = None,
        batch_size: int = 8,
        dtype: Union[str, torch.dtype] = "auto",
        device: Optional[str] = None,
    ) -> None:
        from .loading import load_causal_lm, load_tokenizer

        self.apply_chat_template = apply_chat_template
        self.input_template = input_template
        self.batch_size = batch_size
        self.sft_tokenizer = load_tokenizer(sft_path)
        self.init_tokenizer = load_tokenizer(init_path)
        self.sft_model = load_causal_lm(sft_path, lora=sft_lora, dtype=dtype, device=device)
        self.init_model = load_causal_lm(init_path, lora=init_lora, dtype=dtype, device=device)

    def _logprobs(self, model, tokenizer, prompts, responses, add_eos) -> List[float]:
        from .params import format_prompt

        formatted = [
            format_prompt(tokenizer, p, apply_chat_template=self.apply_chat_template, input_template=self.input_template)
            for p in prompts
        ]
        return sequence_logprobs(model, tokenizer, formatted, responses, self.batch_size, add_eos=add_eos)

    def logprobs(
        self, prompts: Sequence[str], responses: Sequence[str], *, add_eos: Union[bool, Sequence[bool]] = True
    ) -> tuple:
        """``(log pi_SFT(y|x), log pi_init(y|x))`` per row."""
        sft = self._logprobs(self.sft_model, self.sft_tokenizer, prompts, responses, add_eos)
        init = self._logprobs(self.init_model, self.init_tokenizer, prompts, responses, add_eos)
        return sft, init

    def score(
        self, prompts: Sequence[str], responses: Sequence[str], *, add_eos: Union[bool, Sequence[bool]] = True
    ) -> List[float]:
        """The reward ``log pi_SFT(y|x) - log pi_init(y|x)`` per (raw prompt, response)."""
        sft, init = self.logprobs(prompts, responses, add_eos=add_eos)
        return [a - b for a, b in zip(sft, init)]
