"""Batches, a bare trainer and a fixed policy sampler for the IQ-Learn loss tests (trainer, online, multi-turn,
ZeRO-3 single pass, extract_reward)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from openrlhf_irl import compat

compat.activate()

import datasets  # noqa: E402

from openrlhf_irl.datasets.iq_sft import IQSFTDataset  # noqa: E402
from openrlhf_irl.generation.online import PolicySampler  # noqa: E402
from openrlhf_irl.generation.policy_samples import pack_policy_samples  # noqa: E402
from openrlhf_irl.losses.iq_sft import IQConfig, IQLearnSFTLoss  # noqa: E402
from openrlhf_irl.trainers.iq_learn import IQLearnTrainer  # noqa: E402

from .records import counting_records  # noqa: E402


def sft_batch(tokenizer, records, truncate_last_to=None):
    """Right-padded (inputs, attention_mask, loss_mask) as OpenRLHF's SFTDataset + collate build them."""
    rows, masks = [], []
    for i, r in enumerate(records):
        prompt = f"User: {r['prompt']}\nAssistant: "
        p_len = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        ids = tokenizer(prompt + r["response"] + " " + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        if truncate_last_to and i == len(records) - 1:
            ids = ids[:truncate_last_to]  # cut without EOS: not terminal
        rows.append(ids)
        masks.append([0] * (p_len - 1) + [1] * (len(ids) - p_len) + [0])
    width = max(map(len, rows))
    inputs = torch.full((len(rows), width), tokenizer.pad_token_id)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    loss_mask = torch.zeros((len(rows), width))
    for i, (ids, m) in enumerate(zip(rows, masks)):
        inputs[i, : len(ids)] = torch.tensor(ids)
        attn[i, : len(ids)] = 1
        loss_mask[i, : len(m)] = torch.tensor(m, dtype=torch.float32)
    return inputs, attn, loss_mask


def bare_trainer(actor, tokenizer, sampler=None, **cfg) -> IQLearnTrainer:
    """The real IQLearnTrainer methods on a plain (non-DeepSpeed) Actor, without OpenRLHF's trainer set-up."""
    trainer = object.__new__(IQLearnTrainer)
    trainer.model = actor
    trainer._actor_forward = actor.forward
    trainer.iq_config = IQConfig(**cfg)
    trainer.eos_token_id = tokenizer.eos_token_id
    trainer.strategy = SimpleNamespace(stage=0, print=print)
    trainer.iq_loss = IQLearnSFTLoss(trainer.iq_config, trainer.eos_token_id)
    trainer.loss_fn = trainer.scheduled_loss
    trainer.policy_sampler = sampler
    trainer._online_samples = trainer._online_refreshed_at = None
    return trainer


class FixedSampler(PolicySampler):
    """Deterministic completions keyed by the prompt's tokens: n per prompt, even samples end with EOS, odd ones
    are cut (no EOS). ``all_finished``: every sample ends with EOS."""

    def __init__(self, tokenizer, n=2, all_finished=False):
        self.tok, self.n, self.all_finished, self.refreshes = tokenizer, n, all_finished, 0

    def refresh(self, model, *, zero_stage=0):
        self.refreshes += 1

    def sample(self, prompts):
        eos = self.tok.eos_token_id
        rows, completions = [], []
        for p in prompts:
            key = int(p.sum())
            for s in range(self.n):
                length = 2 + (key + s) % 4
                toks = [5 + (key * 7 + s * 31 + 13 * j) % 250 for j in range(length)]
                if self.all_finished or s % 2 == 0:
                    toks.append(eos)
                rows.append(p)
                completions.append(toks)
        return pack_policy_samples(rows, completions, pad_id=self.tok.pad_token_id, device=prompts[0].device)


def model_logits(actor, ids, attn):
    """The HF model's logits with the position ids of left/right padding (what OpenRLHF's Actor passes)."""
    pos = attn.long().cumsum(-1) - 1
    pos = pos.masked_fill(attn == 0, 1)
    return actor.model(ids, attention_mask=attn, position_ids=pos).logits.float()


def grads(actor):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in actor.parameters()]


# assistant turns end with EOS (as Qwen's <|im_end|>), the generation prompt ends with a newline
TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ 'User: ' + m['content'] + '\\n' }}"
            "{% else %}{{ 'Assistant:\\n' + m['content'] + eos_token }}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}{{ 'Assistant:\\n' }}{% endif %}")


def conversations():
    out = []
    for i, r in enumerate(counting_records(3, seed=4)):
        a = int(r["prompt"].split()[-1])
        conv = [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": f"{a} {a + 1}"},
                {"role": "user", "content": "go on" + " please" * i},
                {"role": "assistant", "content": f"{a + 2} {a + 3} {a + 4}"}]
        out.append({"messages": conv})
    return out


def multiturn_batch(tok, records, max_len=64, truncation="bootstrap"):
    tok.chat_template = TEMPLATE
    args = SimpleNamespace(data=SimpleNamespace(input_key="messages", output_key=None, apply_chat_template=True,
                                                tokenizer_chat_template=None),
                           irl=SimpleNamespace(truncation=truncation))
    ds = IQSFTDataset(datasets.Dataset.from_list(records), tok, max_len, SimpleNamespace(args=args, print=print),
                      num_processors=1, multiturn=True)
    return ds.collate_fn([ds[i] for i in range(len(ds))])
