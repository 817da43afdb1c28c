"""IQ-Learn SFT trainer (``--trainer irl_iq``): TD-regularised MLE on OpenRLHF's ``SFTTrainer``.

Offline loss over demonstration response tokens (REFERENCE section 1, lambda = ``--irl.td_weight``):

    L = mean_t [ -mle_weight * log pi(a_t|s_t) + lambda * (Q(s_t, a_t) - gamma * V(s_{t+1}))^2 ]

Online (``--irl.online_mix`` alpha > 0) adds the value term on policy samples, generated then teacher-forced:

    L_online = L + alpha * ( E_pi[V(s) - gamma V(s')] - E_demo[V(s) - gamma V(s')] )  [+ lambda * E_pi[r^2]]

OpenRLHF 0.11.2's ``SFTTrainer.fit`` computes its loss inline as ``self.loss_fn(self.model(...), mask, **norms)``.
This trainer keeps that loop untouched and changes the two pieces it calls: the model's forward returns a
:class:`PolicyForward` (what the loss needs: full logits, or hidden states and the lm_head weight for the fused
loss) and ``loss_fn`` is :class:`IQLearnSFTLoss`, which reduces with OpenRLHF's own ``aggregate_loss`` and the
per-optimizer-step normalisers, so ``td_weight=0`` is exactly OpenRLHF's SFT loss.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from openrlhf.models import aggregate_loss
from openrlhf.trainer.sft_trainer import SFTTrainer

from openrlhf_irl.losses import (
    entropy_from_logits,
    iq_per_token_loss,
    iq_stats,
    iq_token_terms,
    logits_q_and_v,
    masked_linear_q_and_v,
)


@dataclass(frozen=True)
class IQConfig:
    td_weight: float = 0.1
    gamma: float = 1.0
    mle_weight: float = 1.0
    td_warmup_steps: int = 0
    fused_loss: bool = False
    fused_chunk_size: int = 1024
    online_mix: float = 0.0
    online_refresh_steps: int = 1
    chi2_on_policy: bool = False
    entropy_sample_tokens: int = 256

    @classmethod
    def from_args(cls, args) -> "IQConfig":
        irl = getattr(args, "irl", None)
        return cls(**{k: getattr(irl, k) for k in cls.__dataclass_fields__ if hasattr(irl, k)})

    def td_weight_at(self, step: int) -> float:
        """Linear warm-up of lambda over ``td_warmup_steps`` optimizer steps."""
        if self.td_warmup_steps <= 0:
            return self.td_weight
        return self.td_weight * min(1.0, step / self.td_warmup_steps)


@dataclass
class PolicyForward:
    """One teacher-forced pass, shifted so that position t predicts ``labels[:, t]`` ([B, T-1])."""

    sequences: torch.Tensor  # [B, T] input tokens
    labels: torch.Tensor
    logits: Optional[torch.Tensor] = None  # [B, T, V] fp32 (plain loss; the last position predicts nothing)
    hidden: Optional[torch.Tensor] = None  # [B, T-1, H] (fused loss)
    weight: Optional[torch.Tensor] = None  # [V, H] lm_head weight (fused loss)
    chunk_size: int = 1024

    def q_and_v(self, loss_mask: torch.Tensor):
        """(q, v) [B, T-1] fp32, differentiable."""
        if self.logits is not None:
            # Reduce the full [B, T, V] logits and slice the [B, T] results: reducing the strided [:, :-1] view
            # would make backward zero-fill and copy a whole [B, T, V] gradient.
            pad = (0, 1)
            q, v = logits_q_and_v(self.logits, F.pad(self.labels, pad), F.pad(loss_mask.bool(), pad))
            return q[:, :-1], v[:, :-1]
        return masked_linear_q_and_v(self.hidden, self.weight, self.labels, loss_mask, self.chunk_size)

    @torch.no_grad()
    def mean_entropy(self, loss_mask: torch.Tensor, v: torch.Tensor, max_tokens: int) -> float:
        """Mean policy entropy over (at most ``max_tokens`` evenly spaced) response tokens, for logging.

        A sample keeps logging off the hot path: a full entropy pass costs as much as the loss's own pass over the
        vocabulary. Only the picked rows are gathered.
        """
        rows, cols = loss_mask.bool().nonzero(as_tuple=True)
        if len(rows) == 0 or max_tokens <= 0:
            return 0.0
        pick = torch.linspace(0, len(rows) - 1, steps=min(len(rows), max_tokens), device=rows.device).long()
        rows, cols = rows[pick], cols[pick]
        logits = self.logits[rows, cols] if self.logits is not None else self.hidden[rows, cols] @ self.weight.T
        return float(entropy_from_logits(logits, v.detach()[rows, cols]).mean())


def terminal_mask(labels: torch.Tensor, loss_mask: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Response steps that emit EOS: the episode ends after them."""
    return loss_mask.bool() & (labels == eos_token_id)


class IQLearnSFTLoss(nn.Module):
    """Drop-in for OpenRLHF's ``SFTLoss``: ``loss_fn(PolicyForward, loss_mask, **loss_batch_info)``."""

    def __init__(self, trainer: "IQLearnTrainer"):
        super().__init__()
        self.trainer = trainer
        self.stats = defaultdict(list)

    def forward(self, fwd: PolicyForward, loss_mask, dp_size=1, batch_num_tokens=None, global_batch_size=None):
        trainer, cfg = self.trainer, self.trainer.iq_config
        mask = loss_mask.bool()
        q, v = fwd.q_and_v(mask)
        td_weight = cfg.td_weight_at(trainer.optimizer_steps) if trainer.model.training else cfg.td_weight
        per_token, terms = iq_per_token_loss(
            q, v, mask, terminal_mask(fwd.labels, mask, trainer.eos_token_id),
            td_weight=td_weight, gamma=cfg.gamma, mle_weight=cfg.mle_weight,
        )
        loss = aggregate_loss(
            per_token, loss_mask, dp_size=dp_size, batch_num_tokens=batch_num_tokens,
            global_batch_size=global_batch_size,
        )
        stats = iq_stats(terms, mask)
        stats["entropy"] = fwd.mean_entropy(mask, v, cfg.entropy_sample_tokens)
        stats["td_weight"] = td_weight
        if trainer.model.training and cfg.online_mix > 0:
            online_loss, online_stats = trainer.online_value_term(fwd, terms, mask, td_weight)
            loss = loss + online_loss
            stats.update(online_stats)
        for key, value in stats.items():
            self.stats[key].append(value)
        return loss

    def pop_stats(self) -> dict[str, float]:
        means = {k: sum(v) / len(v) for k, v in self.stats.items() if v}
        self.stats.clear()
        return means


class IQLearnTrainer(SFTTrainer):
    """OpenRLHF ``SFTTrainer`` whose per-token loss is IQ-Learn's; see the module docstring."""

    def __init__(self, model, strategy, *args, **kwargs):
        super().__init__(model, strategy, *args, **kwargs)
        self.iq_config = IQConfig.from_args(self.args)
        if self.packing_samples:
            raise ValueError(
                "--trainer irl_iq does not support --ds.packing_samples: the TD term needs V(s_{t+1}) of the same "
                "sequence, which packed rows would mix across samples. Train without packing."
            )
        if self.pretrain_mode:
            raise ValueError("--trainer irl_iq needs prompt/response data; --model.pretrain_mode_enable is MLE only.")
        if self.iq_config.fused_loss and strategy.stage == 3:
            raise ValueError(
                "--irl.fused_loss reads the lm_head weight outside the module's forward, which ZeRO-3 partitions; "
                "use ZeRO 0-2 with the fused loss, or the plain loss with ZeRO-3."
            )
        if self.tokenizer is None or self.tokenizer.eos_token_id is None:
            raise ValueError("--trainer irl_iq needs a tokenizer with an EOS token to find terminal steps.")
        self.eos_token_id = self.tokenizer.eos_token_id
        self.loss_fn = IQLearnSFTLoss(self)
        self._actor_forward = model.forward
        # SFTTrainer.fit/evaluate call self.model(...) and hand the result to self.loss_fn.
        model.forward = self.policy_forward
        self._online_samples = None
        self._online_refreshed_at = None
        self.policy_sampler = None
        if self.iq_config.online_mix > 0:
            from openrlhf_irl.generation.online import build_policy_sampler

            self.policy_sampler = build_policy_sampler(self.args, self.tokenizer)

    # ---- model side -------------------------------------------------------------------------------------------
    @property
    def optimizer_steps(self) -> int:
        return int(getattr(self.model.model, "global_steps", 0))

    def _hf_model(self):
        engine = self.model.model
        return getattr(engine, "module", engine)

    def policy_forward(self, sequences, attention_mask=None, return_output=False, return_logprobs=False,
                       ring_attn_group=None, **kwargs):
        """Replaces ``Actor.forward`` for this trainer: returns ``PolicyForward`` (and the HF output)."""
        labels = sequences[:, 1:]
        if self.iq_config.fused_loss:
            position_ids = attention_mask.long().cumsum(-1) - 1
            position_ids.masked_fill_(attention_mask == 0, 1)
            output = self.model.model(
                sequences, attention_mask=attention_mask, position_ids=position_ids,
                output_hidden_states=True, logits_to_keep=1,
            )
            weight = self._hf_model().get_output_embeddings().weight
            fwd = PolicyForward(sequences, labels, hidden=output.hidden_states[-1][:, :-1], weight=weight,
                                chunk_size=self.iq_config.fused_chunk_size)
        else:
            output = self._actor_forward(sequences, attention_mask=attention_mask, return_output=True,
                                         ring_attn_group=ring_attn_group)
            fwd = PolicyForward(sequences, labels, logits=output["logits"])
        return (fwd, output) if return_output else fwd

    # ---- online variant -----------------------------------------------------------------------------------------
    def online_value_term(self, expert_fwd, expert_terms, expert_mask, td_weight):
        """alpha * (E_pi[V - gamma V'] - E_demo[V - gamma V']) (+ lambda E_pi[r^2]) on fresh policy samples."""
        cfg = self.iq_config
        samples = self._policy_samples(expert_fwd.sequences, expert_mask)
        fwd = self.policy_forward(samples["sequences"], attention_mask=samples["attention_mask"])
        mask = samples["loss_mask"]
        q, v = fwd.q_and_v(mask)
        terms = iq_token_terms(q, v, mask, terminal_mask(fwd.labels, mask, self.eos_token_id), gamma=cfg.gamma)

        def value_gap(t):
            td = t.td_mask
            return ((t.values - cfg.gamma * t.next_values) * td).sum() / td.sum().clamp(min=1)

        policy_gap, expert_gap = value_gap(terms), value_gap(expert_terms)
        loss = cfg.online_mix * (policy_gap - expert_gap)
        if cfg.chi2_on_policy:
            td = terms.td_mask
            loss = loss + td_weight * (terms.rewards.square() * td).sum() / td.sum().clamp(min=1)
        stats = {
            "policy_value_gap": float(policy_gap.detach()),
            "expert_value_gap": float(expert_gap.detach()),
            "policy_sample_len": float(mask.sum(-1).float().mean()),
        }
        return loss, stats

    def _policy_samples(self, sequences, loss_mask):
        """Samples from the prompts of the current micro-batch, refreshed every ``online_refresh_steps`` steps.

        ``self.policy_sampler`` (``--irl.sampler``) draws them: transformers' generate on the live model, or
        OpenRLHF's vLLM engines after a weight push. Every rank refreshes at the same optimizer steps (collective).
        """
        cfg = self.iq_config
        step = self.optimizer_steps
        if self._online_samples is None or step - self._online_refreshed_at >= cfg.online_refresh_steps:
            self.policy_sampler.refresh(self.model.model, zero_stage=self.strategy.stage)
            self._online_samples = self.policy_sampler.sample(prompt_rows(sequences, loss_mask))
            self._online_refreshed_at = step
        return self._online_samples

    # ---- logging hooks of SFTTrainer.fit ---------------------------------------------------------------------------
    def save_logs_and_checkpoints(self, args, global_step, step_bar, logs_dict=None, client_states=None):
        logs_dict = dict(logs_dict or {})
        iq_logs = self.strategy.all_reduce(self.loss_fn.pop_stats())
        logs_dict.update({f"iq_{k}": v for k, v in iq_logs.items()})
        if self.strategy.is_rank_0() and iq_logs:
            step_bar.set_postfix({k: round(v, 4) for k, v in logs_dict.items() if k.startswith("iq_")})
        return super().save_logs_and_checkpoints(args, global_step, step_bar, logs_dict, client_states)

    def evaluate(self, eval_dataloader, steps=0):
        self.loss_fn.pop_stats()  # drop unlogged training stats of a partial window
        super().evaluate(eval_dataloader, steps)
        logs = self.strategy.all_reduce(self.loss_fn.pop_stats())
        self.last_eval_stats = logs
        self.strategy.print(f"[irl_iq eval @ step {steps}] " + ", ".join(f"{k}={v:.4f}" for k, v in logs.items()))
        if self.strategy.is_rank_0():
            if self._wandb is not None:
                self._wandb.log({**{f"eval/iq_{k}": v for k, v in logs.items()}, "eval/global_step": steps})
            elif self._tensorboard is not None:
                for k, v in logs.items():
                    self._tensorboard.add_scalar(f"eval/iq_{k}", v, steps)
        return logs



def prompt_rows(sequences: torch.Tensor, loss_mask: torch.Tensor) -> list[torch.Tensor]:
    """Prompt tokens of each SFT row: everything up to the state that emits the first response token."""
    rows = []
    for seq, mask in zip(sequences, loss_mask.bool()):
        idx = mask.nonzero()
        if len(idx):
            rows.append(seq[: int(idx[0]) + 1])
    return rows
