"""Generation with transformers' ``generate`` (CPU or one GPU), the fallback where vLLM cannot run.

Log-probabilities are exact and backend-independent: after sampling, every (prompt ids, sampled ids) row is
rescored teacher forced in one right-padded forward pass (:func:`~openrlhf_irl.generation.scoring.
token_logprob_sums`), i.e. ``Completion.logprob = sum_t log softmax(logits_t / 1.0)[y_t]`` under the
model at temperature 1, over the sampled tokens including the EOS that ended the response. It is not taken
from ``generate``'s scores, which are the temperature/top-p-warped sampling distribution.

Determinism: each ``generate`` call of up to ``batch_size`` rows runs under its own seed derived from
``params.seed`` and the batch's first (prompt_index, sample_index) and size, inside ``torch.random.fork_rng``
(the caller's RNG state is untouched). The same rows in the same batches give the same completions.
"""

from __future__ import annotations

from typing import Any, Iterable, List, Optional, Sequence, Union

import torch

from .loading import load_causal_lm, load_tokenizer, resolve_device, resolve_dtype
from .params import Completion, SamplingParams, derive_seed
from .scoring import encode_prompt, token_logprob_sums

__all__ = ["HFGenerator", "load_tokenizer", "load_causal_lm", "resolve_device", "resolve_dtype", "eos_token_ids"]


def eos_token_ids(tokenizer: Any, model: Any = None) -> List[int]:
    """The tokenizer's EOS id plus any EOS ids of the model's generation config (e.g. Llama 3's ``<|eot_id|>``)."""
    ids = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    cfg_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for i in cfg_eos if isinstance(cfg_eos, (list, tuple)) else [cfg_eos]:
        if i is not None and int(i) not in ids:
            ids.append(int(i))
    if not ids:
        raise ValueError("neither the tokenizer nor the model's generation config defines an EOS token")
    return ids


class HFGenerator:
    """Sample completions with ``model.generate`` in left-padded batches of ``batch_size`` rows (one row = one
    sample of one prompt). Prompts are already formatted strings (see ``format_prompt``), tokenized with
    ``add_special_tokens=False``. See the module docstring for ``logprob`` and determinism.
    """

    def __init__(
        self,
        model: str,
        *,
        lora: Optional[str] = None,
        tokenizer: Optional[str] = None,
        batch_size: int = 8,
        dtype: Union[str, torch.dtype] = "auto",
        device: Optional[str] = None,
    ) -> None:
        from transformers import GenerationConfig

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.tokenizer = load_tokenizer(tokenizer or model)
        self.model = load_causal_lm(model, lora=lora, dtype=dtype, device=device)
        self.device = next(self.model.parameters()).device
        self.eos_ids = eos_token_ids(self.tokenizer, self.model)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0]
        # A clean generation config: the checkpoint's defaults (top_k=50, repetition penalties, its own
        # temperature...) must not leak into sampling; only what SamplingParams says applies.
        self.model.generation_config = GenerationConfig(
            bos_token_id=self.tokenizer.bos_token_id, eos_token_id=self.eos_ids, pad_token_id=self.pad_id
        )

    def generate(
        self,
        prompts: Sequence[str],
        params: SamplingParams,
        *,
        prompt_indices: Optional[Sequence[int]] = None,
        sample_indices: Optional[Sequence[Iterable[int]]] = None,
    ) -> List[Completion]:
        """Sample ``params.n`` completions per prompt (or, per prompt, the ``sample_indices`` given).

        ``prompt_indices`` relabels the prompts (default ``0..len-1``); completions come back in row order
        (prompt by prompt, sample indices ascending as given).
        """
        if prompt_indices is None:
            prompt_indices = list(range(len(prompts)))
        if sample_indices is None:
            sample_indices = [range(params.n)] * len(prompts)
        if not len(prompts) == len(prompt_indices) == len(sample_indices):
            raise ValueError("prompts, prompt_indices and sample_indices must have the same length")
        encoded = [encode_prompt(self.tokenizer, p) for p in prompts]
        rows = [(k, int(s)) for k, samples in enumerate(sample_indices) for s in samples]
        out: List[Completion] = []
        for start in range(0, len(rows), self.batch_size):
            out.extend(self._generate_batch(encoded, rows[start : start + self.batch_size], prompt_indices, params))
        return out

    @torch.no_grad()
    def _generate_batch(self, encoded, rows, prompt_indices, params: SamplingParams) -> List[Completion]:
        prompt_ids = [encoded[k] for k, _ in rows]
        width = max(len(p) for p in prompt_ids)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, ids in enumerate(prompt_ids):  # left padding
            input_ids[r, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[r, width - len(ids) :] = 1
        kwargs = dict(max_new_tokens=params.max_new_tokens, eos_token_id=self.eos_ids, pad_token_id=self.pad_id)
        if params.temperature > 0:
            kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0)
        else:
            kwargs.update(do_sample=False)
        first_k, first_s = rows[0]
        seed = derive_seed(params.seed, prompt_indices[first_k], first_s, len(rows))
        cuda_devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda_devices):
            torch.manual_seed(seed)
            sequences = self.model.generate(
                input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device), **kwargs
            )
        generated = sequences[:, width:].tolist()
        eos = set(self.eos_ids)
        responses, finished = [], []
        for ids in generated:
            cut = next((t for t, tok in enumerate(ids) if tok in eos), None)
            finished.append(cut is not None)
            responses.append(ids[: cut + 1] if cut is not None else ids)
        logprobs = token_logprob_sums(
            self.model, prompt_ids, responses, batch_size=self.batch_size, pad_token_id=self.pad_id
        )
        out = []
        for (k, s), ids, done, lp in zip(rows, responses, finished, logprobs):
            text = self.tokenizer.decode(ids[:-1] if done else ids, skip_special_tokens=True)
            out.append(Completion(int(prompt_indices[k]), s, text, done, lp, list(ids)))
        return out
