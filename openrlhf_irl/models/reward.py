"""Score (prompt, response) pairs with a reward model saved by OpenRLHF's ``train_rm`` (``--trainer rm`` or
``afd_rm``), loaded with OpenRLHF's own loader, the one PPO's ``--reward_pretrain`` uses.

Text is built exactly as the training datasets build it (OpenRLHF's ``RewardDataset`` and
:class:`~openrlhf_irl.datasets.labeled_reward.LabeledRewardDataset`): the prompt through OpenRLHF's
``preprocess_data`` (``input_template`` or the tokenizer's chat template), the response without trailing whitespace
(as the AfD datasets store it), then ``prompt + response`` with trailing
newlines stripped and ``" " + EOS`` appended, tokenised without special tokens. For an ``afd_rm`` model the score
is the classifier's logit ``log D - log(1 - D)`` (unless ``normalize_reward``).
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence

import torch

from openrlhf_irl import compat

__all__ = ["RewardScorer", "SequenceClassifierScorer"]


class RewardScorer:
    """A reward model from ``model_path`` and the text formatting it was trained with.

    ``normalize_reward`` applies the ``(r - mean) / std`` stored in its config.json at training (as PPO's
    ``--reward.normalize_enable`` would); off by default, so an AfD model returns its logit. ``max_length``
    cuts the text as training did with ``--data.max_len`` (last token forced to EOS); None keeps it whole.
    ``param_dtype`` ``auto``: bf16 where the CPU computes it natively (or on CUDA), fp32 otherwise.
    """

    def __init__(
        self,
        model_path: str,
        *,
        device: str = "cpu",
        batch_size: int = 8,
        input_template: Optional[str] = None,
        apply_chat_template: bool = False,
        tokenizer_chat_template: Optional[str] = None,
        normalize_reward: bool = False,
        max_length: Optional[int] = None,
        param_dtype: str = "auto",
        attn_implementation: str = "eager",
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        compat.activate()
        from openrlhf.models import get_llm_for_sequence_regression

        from openrlhf_irl.compat.param_dtype import resolve as resolve_param_dtype
        from openrlhf.utils import get_tokenizer
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_path, trust_remote_code=True)
        self.value_head_prefix = getattr(config, "value_head_prefix", "score")
        self.model = get_llm_for_sequence_regression(
            model_path, "reward", normalize_reward=normalize_reward,
            param_dtype=resolve_param_dtype(param_dtype).dtype,
            attn_implementation=attn_implementation, value_head_prefix=self.value_head_prefix,
        ).to(device).eval()
        self.tokenizer = get_tokenizer(model_path, self.model, "left", None)
        if tokenizer_chat_template:
            self.tokenizer.chat_template = tokenizer_chat_template
        self.device = device
        self.batch_size = batch_size
        self.input_template = input_template
        self.apply_chat_template = apply_chat_template
        self.max_length = max_length

    def format(self, prompt: Any, response: Any) -> str:
        """The text the model scores: prompt handling of OpenRLHF's ``preprocess_data``, then ``RewardDataset``'s."""
        from openrlhf.datasets.reward_dataset import preprocess_data

        from openrlhf_irl.datasets.labeled_reward import reward_text
        from openrlhf_irl.datasets.response_text import normalize_response

        chat = self.tokenizer.apply_chat_template if self.apply_chat_template else None
        prompt, response, _, _ = preprocess_data(
            {"prompt": prompt, "response": response}, self.input_template, "prompt", "response", "response", chat
        )
        # as the AfD datasets store responses (datasets/response_text.py): no trailing-whitespace mark of the source
        response = normalize_response(response) if isinstance(response, str) else response
        return reward_text(prompt, response, self.tokenizer.eos_token)

    @torch.no_grad()
    def score_texts(self, texts: Sequence[str]) -> List[float]:
        """Rewards of already formatted texts, in left-padded batches of ``batch_size``."""
        from openrlhf.utils.utils import zero_pad_sequences

        from openrlhf_irl.datasets.labeled_reward import tokenize_reward_text

        out: List[float] = []
        for start in range(0, len(texts), self.batch_size):
            batch = texts[start : start + self.batch_size]
            encoded = [tokenize_reward_text(self.tokenizer, t, self.max_length) for t in batch]
            input_ids = zero_pad_sequences([ids for ids, _ in encoded], side="left", value=self.tokenizer.pad_token_id)
            attention_mask = zero_pad_sequences([mask for _, mask in encoded], side="left")
            rewards = self.model(input_ids.to(self.device), attention_mask=attention_mask.to(self.device))
            out.extend(float(r) for r in rewards.float().cpu())
        return out

    def score(self, prompts: Sequence[Any], responses: Sequence[Any]) -> List[float]:
        """One reward per (prompt, response) pair."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        return self.score_texts([self.format(p, r) for p, r in zip(prompts, responses)])


class SequenceClassifierScorer:
    """A third-party ``AutoModelForSequenceClassification`` (e.g. HH's GPT-2 harmless/helpful reward models)
    scored its own way, not with OpenRLHF's convention: the plain text ``prompt + response`` (a list-of-messages
    prompt goes through the model's chat template with the response as the assistant turn), tokenised by its own
    tokenizer with its own special tokens, cut at its maximum length. The score is the single logit
    (``num_labels == 1``) or ``logit[1] - logit[0]`` (two labels). Texts are batched only when the model's config
    names a pad token (its own pooling then finds the last real token); otherwise scored one by one.
    """

    def __init__(self, model_path: str, *, device: str = "cpu", batch_size: int = 8,
                 max_length: Optional[int] = None) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForSequenceClassification.from_pretrained(model_path, dtype=torch.float32)
        self.model = self.model.to(device).eval()
        self.num_labels = self.model.config.num_labels
        if self.num_labels not in (1, 2):
            raise ValueError(f"{model_path}: a classifier with {self.num_labels} labels is not a reward model "
                             "(expected 1 logit, or 2 labels read as logit[1] - logit[0])")
        limits = [m for m in (max_length, getattr(self.tokenizer, "model_max_length", None),
                              getattr(self.model.config, "max_position_embeddings", None),
                              getattr(self.model.config, "n_positions", None)) if isinstance(m, int) and m < 10**9]
        self.max_length = min(limits) if limits else None
        self.pad_id = self.model.config.pad_token_id
        self.batch_size = batch_size if self.pad_id is not None else 1
        self.device = device

    def format(self, prompt: Any, response: str) -> str:
        if isinstance(prompt, list):
            messages = list(prompt) + [{"role": "assistant", "content": response}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        return prompt + response

    @torch.no_grad()
    def score_texts(self, texts: Sequence[str]) -> List[float]:
        out: List[float] = []
        for start in range(0, len(texts), self.batch_size):
            batch = list(texts[start : start + self.batch_size])
            kwargs = dict(truncation=True, max_length=self.max_length) if self.max_length else {}
            if len(batch) > 1:
                self.tokenizer.pad_token_id = self.pad_id
                self.tokenizer.padding_side = "right"
                kwargs["padding"] = True
            enc = self.tokenizer(batch, return_tensors="pt", **kwargs).to(self.device)
            logits = self.model(**enc).logits.float()
            values = logits[:, 0] if self.num_labels == 1 else logits[:, 1] - logits[:, 0]
            out.extend(float(v) for v in values.cpu())
        return out

    def score(self, prompts: Sequence[Any], responses: Sequence[str]) -> List[float]:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        return self.score_texts([self.format(p, r) for p, r in zip(prompts, responses)])
