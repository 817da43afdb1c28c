"""Tiny, real Hugging Face models for tests and the demo: a Llama built from a config, a BPE tokenizer
trained with ``tokenizers``, both saved so that ``from_pretrained`` loads them exactly like a hub model."""

from __future__ import annotations

import os
import random
from collections.abc import Iterable

PAD, BOS, EOS = "<pad>", "<s>", "</s>"

# A chat template in the shape OpenRLHF's SFT dataset expects: the prompt rendered with
# add_generation_prompt is a prefix of the full conversation.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
)


def sample_corpus(n: int = 400, seed: int = 0) -> list[str]:
    """A small generated English-and-digits corpus, enough to train a few-hundred-token BPE."""
    rng = random.Random(seed)
    subjects = ["the model", "a student", "my cat", "the robot", "our team", "the reward", "a policy"]
    verbs = ["learns", "writes", "counts", "finds", "imitates", "ranks", "samples"]
    objects = ["short answers", "the numbers", "good demonstrations", "a list", "every token", "the best reply"]
    lines = []
    for _ in range(n):
        nums = " ".join(str(rng.randint(0, 99)) for _ in range(rng.randint(1, 5)))
        lines.append(f"User: {rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}.\nAssistant: {nums}")
    return lines


def train_tokenizer(texts: Iterable[str], vocab_size: int = 300, model_max_length: int = 512):
    """Byte-level BPE with pad/bos/eos and :data:`CHAT_TEMPLATE`, as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        chat_template=CHAT_TEMPLATE,
        model_max_length=model_max_length,
    )


def write_tiny_llama(
    out_dir: str,
    texts: Iterable[str] | None = None,
    *,
    vocab_size: int = 300,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,  # head_dim = hidden_size / num_heads = 32: vLLM's CPU attention needs head_dim >= 32
    intermediate_size: int | None = None,
    max_position_embeddings: int = 256,
    tie_word_embeddings: bool = False,
    seed: int = 0,
) -> str:
    """Write a randomly initialised ``LlamaForCausalLM`` and its tokenizer to ``out_dir``; returns ``out_dir``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = train_tokenizer(texts if texts is not None else sample_corpus(seed=seed), vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=tie_word_embeddings,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
