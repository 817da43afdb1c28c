"""Unpaired, labelled reward-model data (``--trainer afd_rm``): one ``(prompt, response, label)`` per sample.

The AfD ``labels`` format (:func:`openrlhf_irl.datasets.afd.build_afd_dataset`): label 1 = positive
(demonstration-like), 0 = negative. The text of a sample is built exactly as OpenRLHF's ``RewardDataset``
builds a chosen/rejected sequence (its own ``preprocess_data`` for the prompt: ``--data.input_template`` or
``--data.apply_chat_template``; then ``prompt + response``, trailing newlines stripped, ``" " + EOS`` appended,
cut at ``max_len`` with the last token forced to EOS), so a model trained here scores text the way OpenRLHF's
reward models do, and PPO's ``--reward_pretrain`` sees the same format.

Samples whose prompt alone takes ``max_len - 2`` tokens or more are dropped (nothing of the response would be
left to classify), with the rule OpenRLHF's ``RewardDataset`` applies to prompts in its DPO mode.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
from openrlhf.datasets.reward_dataset import preprocess_data
from openrlhf.utils.utils import zero_pad_sequences
from torch.utils.data import Dataset

from openrlhf_irl.utils.jsonl import DataError

__all__ = ["LabeledRewardDataset", "reward_text", "tokenize_reward_text", "check_label"]


def reward_text(prompt: str, response: str, eos_token: str) -> str:
    """The string OpenRLHF's ``RewardDataset`` tokenises for ``prompt`` + ``response``."""
    text = (prompt + response).rstrip("\n")
    return text if text.endswith(eos_token) else text + " " + eos_token


def tokenize_reward_text(tokenizer: Any, text: str, max_length: Optional[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``([1, L] input_ids, [1, L] attention_mask)`` as ``RewardDataset`` builds them: no special tokens,
    truncated at ``max_length`` (if given) and the last token forced to EOS."""
    kwargs = dict(max_length=max_length, truncation=True) if max_length is not None else {}
    token = tokenizer(text, padding=False, return_tensors="pt", add_special_tokens=False, **kwargs)
    input_ids, attention_mask = token["input_ids"], token["attention_mask"]
    # to avoid EOS_token truncation (as RewardDataset does)
    input_ids[0][-1] = tokenizer.eos_token_id
    attention_mask[0][-1] = True
    return input_ids, attention_mask


def check_label(value: Any, index: int, field: str) -> int:
    """``value`` as 0/1, or a :class:`DataError` (a ``ValueError``) naming the record and the field."""
    if value is None:
        raise DataError(f"record {index}, field {field!r}: missing", field=field, reason="missing_field")
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)) and value in (0, 1):
        return int(value)
    raise DataError(f"record {index}, field {field!r}: expected label 0 or 1, got {value!r}",
                    field=field, reason="bad_label")


class LabeledRewardDataset(Dataset):
    """Drop-in for OpenRLHF's ``RewardDataset`` in ``train_rm`` (same constructor) for labelled samples.

    Keys: ``--data.prompt_key`` ("prompt" when unset), ``--data.response_key`` ("response"),
    ``--data.label_key`` ("label"). A missing key or a label other than 0/1 raises :class:`DataError`
    (a ``ValueError``) naming the record index and the field. Items are ``(input_ids [1, L],
    attention_mask [1, L], label)``; :meth:`collate_fn` left-pads them into ``(input_ids [B, T],
    attention_mask [B, T], labels [B] float)``, what :class:`~openrlhf_irl.trainers.afd_rm.AfDRewardTrainer`
    consumes.
    """

    def __init__(
        self,
        dataset,
        tokenizer: Callable,
        max_length: int,
        strategy,
        input_template=None,
        num_processors=8,
    ) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.strategy = strategy
        self.max_length = max_length
        self.input_template = input_template

        data_args = self.strategy.args.data
        self.prompt_key = getattr(data_args, "prompt_key", None) or "prompt"
        self.response_key = getattr(data_args, "response_key", None) or "response"
        self.label_key = getattr(data_args, "label_key", None) or "label"
        self.apply_chat_template = getattr(data_args, "apply_chat_template", False)
        if self.apply_chat_template:
            self.apply_chat_template = self.tokenizer.apply_chat_template
            tokenizer_chat_template = getattr(data_args, "tokenizer_chat_template", None)
            if tokenizer_chat_template:
                self.tokenizer.chat_template = tokenizer_chat_template

        self._validate(dataset)
        processed = dataset.map(
            self.process_data, remove_columns=dataset.column_names,
            num_proc=max(1, min(num_processors, len(dataset))),
        )
        before = len(processed)
        processed = processed.filter(lambda x: x["prompt"] is not None)
        self.n_filtered = before - len(processed)
        if self.n_filtered:
            self.strategy.print(f"LabeledRewardDataset: dropped {self.n_filtered} samples whose prompt leaves no "
                                f"room for the response within max_len={self.max_length}")

        self.prompts: List[str] = processed["prompt"]
        self.responses: List[str] = processed["response"]
        self.labels: List[int] = processed["label"]

    def _validate(self, dataset) -> None:
        if len(dataset) == 0:
            raise DataError("no records (an empty dataset or split; without --eval.dataset OpenRLHF's train_rm "
                            "evaluates on 1% of the training records, none below 100: pass --eval.dataset)",
                            reason="empty")
        columns = set(dataset.column_names)
        for key in (self.prompt_key, self.response_key, self.label_key):
            if key not in columns:
                raise DataError(f"record 0, field {key!r}: missing (columns: {sorted(columns)})",
                                field=key, reason="missing_field")
        for key in (self.prompt_key, self.response_key):
            for index, value in enumerate(dataset[key]):
                if value is None:
                    raise DataError(f"record {index}, field {key!r}: missing", field=key, reason="missing_field")
        for index, value in enumerate(dataset[self.label_key]):
            check_label(value, index, self.label_key)

    def process_data(self, data):
        # OpenRLHF's own prompt handling; the response plays the role of "chosen" (and of the unused "rejected").
        prompt, response, _, _ = preprocess_data(
            data, self.input_template, self.prompt_key, self.response_key, self.response_key,
            self.apply_chat_template,
        )
        prompt_len = len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if prompt_len >= self.max_length - 2:
            prompt = None
        return {"prompt": prompt, "response": response, "label": int(data[self.label_key])}  # validated in __init__

    def __len__(self):
        return len(self.responses)

    def text(self, idx) -> str:
        return reward_text(self.prompts[idx], self.responses[idx], self.tokenizer.eos_token)

    def __getitem__(self, idx):
        input_ids, attention_mask = tokenize_reward_text(self.tokenizer, self.text(idx), self.max_length)
        return input_ids, attention_mask, self.labels[idx]

    def collate_fn(self, item_list: Sequence):
        input_ids = zero_pad_sequences([ids for ids, _, _ in item_list], side="left",
                                       value=self.tokenizer.pad_token_id)
        attention_mask = zero_pad_sequences([mask for _, mask, _ in item_list], side="left")
        labels = torch.tensor([label for _, _, label in item_list], dtype=torch.float32)
        return input_ids, attention_mask, labels
