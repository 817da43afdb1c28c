"""IQ-Learn SFT trainer (``--trainer irl_iq``): TD-regularised MLE on OpenRLHF's ``SFTTrainer``.

Offline loss over demonstration response tokens (REFERENCE section 1, lambda = ``--irl.td_weight``):

    L = mean_t [ -mle_weight * log pi(a_t|s_t) + lambda * (Q(s_t, a_t) - gamma * V(s_{t+1}))^2 ]

Online (``--irl.online_mix`` alpha > 0): IQ-Learn's objective over the mixture of expert and policy occupancies
(policy samples generated, then teacher-forced), see ``losses.iq_learn.iq_online_term``:

    L_online = L + alpha * ( P[g] - E[g] ),   g_t = V(s_t) - gamma V(s_{t+1}) + lambda r_t^2

so the chi^2 term covers (1 - alpha) expert + alpha policy states. With gamma = 1 the value part telescopes and
cancels; the chi^2 part is what makes the term contrastive, so gamma = 1 without it is refused. With gamma < 1 the
undiscounted step sums do not telescope: V at policy-visited states enters with weight (1 - gamma) and only the chi^2
term on those states bounds it, so gamma < 1 without it is refused too.

OpenRLHF 0.11.2's ``SFTTrainer.fit`` computes its loss inline as ``self.loss_fn(self.model(...), mask, **norms)``.
This trainer keeps that loop untouched and changes the two pieces it calls: the model's forward returns a
:class:`PolicyForward` (what the loss needs: full logits, or hidden states and the lm_head weight for the fused
loss) and ``loss_fn`` is :class:`IQLearnSFTLoss`, which reduces with OpenRLHF's own ``aggregate_loss`` and the
per-optimizer-step normalisers, so ``td_weight=0`` is exactly OpenRLHF's SFT loss.
"""

from __future__ import annotations

import math
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
from openrlhf_irl.losses.fused_head import FusedHead
from openrlhf_irl.losses.fused_iq_objective import (
    IQTermWeights,
    add_weights,
    evenly_spaced_rows,
    linear_iq_objective,
    td_mask_for,
    term_weights_of,
    token_weights_of,
)
from openrlhf_irl.losses.iq_learn import episode_masks, iq_online_term

TRUNCATION_MODES = ("bootstrap", "drop", "eos")


@dataclass(frozen=True)
class IQConfig:
    td_weight: float = 0.1
    gamma: float = 1.0
    mle_weight: float = 1.0
    td_warmup_steps: int = 0
    fused_loss: bool = False
    fused_chunk_size: int = 1024
    fused_single_pass: bool = True  # False: the two-pass reference op (logits recomputed in backward)
    online_mix: float = 0.0
    online_refresh_steps: int = 1
    chi2_on_policy: bool = True
    entropy_sample_tokens: int = 256
    truncation: str = "bootstrap"
    skip_nonfinite: bool = False

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
    attention_mask: Optional[torch.Tensor] = None  # [B, T]; None: every position is real
    hidden_full: Optional[torch.Tensor] = None  # [B, T, H] (fused loss: also the last position, for bootstrapping)
    head: Optional[FusedHead] = None  # fused loss: lm_head module + logit transform; ops run inside its forward
    single_pass: bool = False  # fused loss: the loss (offline and online) through ``objective`` (grads in forward)

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of a few hidden rows (fused loss), differentiable."""
        if self.head is not None:
            return self.head.logits(hidden)
        return (hidden @ self.weight.T).float()

    def objective(self, loss_mask, terminal, weights, *, gamma, bootstrap_mask=None, entropy_mask=None):
        """``linear_iq_objective`` over this pass's hidden states, run inside the lm_head's forward."""
        hidden = self.hidden_full if self.hidden_full is not None else self.hidden
        return self.head.run(lambda w, h: linear_iq_objective(
            h, w, self.labels, loss_mask, terminal, weights, gamma=gamma, head=self.head.transform,
            chunk_size=self.chunk_size, entropy_mask=entropy_mask, bootstrap_mask=bootstrap_mask), hidden)

    def q_and_v(self, loss_mask: torch.Tensor):
        """(q, v) [B, T-1] fp32, differentiable."""
        if self.logits is not None:
            # Reduce the full [B, T, V] logits and slice the [B, T] results: reducing the strided [:, :-1] view
            # would make backward zero-fill and copy a whole [B, T, V] gradient.
            pad = (0, 1)
            q, v = logits_q_and_v(self.logits, F.pad(self.labels, pad), F.pad(loss_mask.bool(), pad))
            return q[:, :-1], v[:, :-1]
        if self.head is not None:  # inside the lm_head's forward, where ZeRO-3 gathers its weight
            return self.head.run(lambda w, h: masked_linear_q_and_v(
                h, w, self.labels, loss_mask, self.chunk_size, head=self.head.transform), self.hidden)
        return masked_linear_q_and_v(self.hidden, self.weight, self.labels, loss_mask, self.chunk_size)

    def bootstrap_values(self, cut: torch.Tensor) -> torch.Tensor:
        """V of the state after each ``cut`` token [B, T-1] (0 elsewhere), differentiable: logsumexp of the logits at
        the next input position, the row's last real one."""
        out = torch.zeros(cut.shape, dtype=torch.float32, device=cut.device)
        rows, cols = cut.bool().nonzero(as_tuple=True)
        if len(rows) == 0:
            return out
        if self.logits is not None:
            logits = self.logits[rows, cols + 1]
        else:
            hidden = self.hidden_full if self.hidden_full is not None else self.hidden
            logits = self.head_logits(hidden[rows, cols + 1])
        return out.index_put((rows, cols), torch.logsumexp(logits.float(), dim=-1))

    def real_mask(self) -> torch.Tensor:
        if self.attention_mask is not None:
            return self.attention_mask
        return torch.ones_like(self.sequences)

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
        logits = self.logits[rows, cols] if self.logits is not None else self.head_logits(self.hidden[rows, cols])
        return float(entropy_from_logits(logits, v.detach()[rows, cols]).mean())


def terminal_mask(labels: torch.Tensor, loss_mask: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Response steps that emit EOS (every one, also inside a row; see ``episode_masks`` for what the trainer uses)."""
    return loss_mask.bool() & (labels == eos_token_id)


def forward_terms(fwd: PolicyForward, mask: torch.Tensor, eos_token_id: int, cfg: IQConfig, td_weight: float,
                  mle_weight: Optional[float] = None):
    """(per-token loss, terms, q, v) of one teacher-forced pass, with the trainer's episode rules.

    Terminal: the row's final EOS. Multi-turn rows bootstrap across user turns from the start of the next assistant
    segment. A row cut by a length limit bootstraps from V after its last token (``--irl.truncation bootstrap``)
    or has no TD term on that token (``drop``; ``eos`` is OpenRLHF's forced EOS, which makes the cut look terminal).
    """
    q, v = fwd.q_and_v(mask)
    terminal, cut = episode_masks(fwd.labels, mask, fwd.real_mask(), eos_token_id)
    boot_mask = boot_values = None
    if cfg.truncation == "bootstrap" and bool(cut.any()):
        boot_mask, boot_values = cut, fwd.bootstrap_values(cut)
    per_token, terms = iq_per_token_loss(
        q, v, mask, terminal, td_weight=td_weight, gamma=cfg.gamma,
        mle_weight=cfg.mle_weight if mle_weight is None else mle_weight,
        bootstrap_mask=boot_mask, bootstrap_values=boot_values,
    )
    return per_token, terms, q, v


def single_pass_loss(fwd: PolicyForward, mask: torch.Tensor, eos_token_id: int, cfg: IQConfig, td_weight: float,
                     reduce, online=None):
    """(loss, terms, logged entropy, online stats) of the loss in one pass over the vocabulary per forward
    (``linear_iq_objective``, gradients computed in the forward pass).

    ``reduce`` (OpenRLHF's ``aggregate_loss`` with this step's normalisers) is linear in the per-token loss, so its
    weights w_t = d reduce / d l_t give the objective's term weights: -mle_weight * w on log pi, lambda * w on r^2.
    ``online`` = (policy PolicyForward, policy mask, term(expert_terms, policy_terms) -> (loss, stats)): the online
    term's per-token weights on the expert and the policy rows are read off ``term`` (``term_weights_of``) before
    either op runs. Same episode rules as ``forward_terms``.
    """
    boot = cfg.truncation == "bootstrap"
    terminal, cut = episode_masks(fwd.labels, mask, fwd.real_mask(), eos_token_id)
    w = token_weights_of(reduce, mask)
    weights = IQTermWeights(log_probs=-cfg.mle_weight * w, rewards_sq=td_weight * w if td_weight else None)
    policy = None
    if online is not None:
        pfwd, pmask, term = online
        pterminal, pcut = episode_masks(pfwd.labels, pmask, pfwd.real_mask(), eos_token_id)
        expert_w, policy_w = term_weights_of(
            lambda e, p: term(e, p)[0], (mask, td_mask_for(mask, terminal, cut if boot else None)),
            (pmask, td_mask_for(pmask, pterminal, pcut if boot else None)))
        weights = add_weights(weights, expert_w)
        policy = pfwd.objective(pmask, pterminal, policy_w, gamma=cfg.gamma, bootstrap_mask=pcut if boot else None)
    out = fwd.objective(mask, terminal, weights, gamma=cfg.gamma, bootstrap_mask=cut if boot else None,
                        entropy_mask=evenly_spaced_rows(mask, cfg.entropy_sample_tokens))
    entropy = float(out.entropy.mean()) if out.entropy.numel() else 0.0
    if policy is None:
        return out.loss, out.terms, entropy, {}
    stats = term(out.terms, policy.terms)[1]  # logging only: the loss value is the same sum
    td = policy.terms.td_mask
    stats["policy_td"] = float((policy.terms.rewards.square() * td).sum() / td.sum().clamp(min=1))
    stats["policy_sample_len"] = float(pmask.sum(-1).float().mean())
    return out.loss + policy.loss, out.terms, entropy, stats


class NonFiniteLoss(SystemExit):
    """Stops the run with one line (no traceback): the step and the statistics that went non-finite."""


class IQLearnSFTLoss(nn.Module):
    """Drop-in for OpenRLHF's ``SFTLoss``: ``loss_fn(PolicyForward, loss_mask, **loss_batch_info)``."""

    def __init__(self, trainer: "IQLearnTrainer"):
        super().__init__()
        self.trainer = trainer
        self.stats = defaultdict(list)
        self.skipped = 0

    def forward(self, fwd: PolicyForward, loss_mask, dp_size=1, batch_num_tokens=None, global_batch_size=None):
        trainer, cfg = self.trainer, self.trainer.iq_config
        mask = loss_mask.bool()
        td_weight = cfg.td_weight_at(trainer.optimizer_steps) if trainer.model.training else cfg.td_weight
        norms = dict(dp_size=dp_size, batch_num_tokens=batch_num_tokens, global_batch_size=global_batch_size)
        online = trainer.model.training and cfg.online_mix > 0
        if fwd.single_pass:
            parts = trainer.online_parts(fwd, mask, td_weight, batch_num_tokens, dp_size) if online else None
            loss, terms, entropy, online_stats = single_pass_loss(
                fwd, mask, trainer.eos_token_id, cfg, td_weight, lambda x: aggregate_loss(x, loss_mask, **norms),
                online=parts)
            stats = iq_stats(terms, mask)
            stats["entropy"] = entropy
            stats["td_weight"] = td_weight
            stats.update(online_stats)
            online = False  # already in the loss
        else:
            per_token, terms, q, v = forward_terms(fwd, mask, trainer.eos_token_id, cfg, td_weight)
            loss = aggregate_loss(per_token, loss_mask, **norms)
            stats = iq_stats(terms, mask)
            stats["entropy"] = fwd.mean_entropy(mask, v, cfg.entropy_sample_tokens)
            stats["td_weight"] = td_weight
        if online:
            online_loss, online_stats = trainer.online_value_term(
                fwd, terms, mask, td_weight, token_normaliser=batch_num_tokens, dp_size=dp_size)
            loss = loss + online_loss
            stats.update(online_stats)
        loss = self._check_finite(loss, stats, fwd)
        for key, value in stats.items():
            self.stats[key].append(value)
        return loss

    def _check_finite(self, loss, stats, fwd):
        """A non-finite loss stops the run (all ranks agree), or with ``--irl.skip_nonfinite`` becomes a zero loss
        for this micro-batch (gradient 0, counted in the logged ``nonfinite_skipped``)."""
        trainer, cfg = self.trainer, self.trainer.iq_config
        finite = torch.isfinite(loss.detach()).float().reshape(1)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        if bool(finite.item()):
            if cfg.skip_nonfinite:
                stats["nonfinite_skipped"] = float(self.skipped)
            return loss
        bad = {k: v for k, v in stats.items() if isinstance(v, float) and not math.isfinite(v)}
        where = f"optimizer step {trainer.optimizer_steps}" + ("" if trainer.model.training else " (evaluation)")
        what = ", ".join(f"{k}={v}" for k, v in bad.items()) or f"loss={float(loss.detach())} (on another rank)"
        if not cfg.skip_nonfinite:
            raise NonFiniteLoss(
                f"error: --trainer irl_iq: non-finite loss at {where}: {what}. Lower the learning rate or "
                f"--irl.td_weight, or pass --irl.skip_nonfinite to skip such micro-batches.")
        self.skipped += 1
        printer = getattr(getattr(trainer, "strategy", None), "print", print)
        printer(f"[irl_iq] skipped a micro-batch with a non-finite loss at {where}: {what} "
                               f"({self.skipped} skipped so far)")
        stats.clear()
        stats["nonfinite_skipped"] = float(self.skipped)
        base = fwd.logits if fwd.logits is not None else fwd.hidden
        return torch.nan_to_num(base, 0.0, 0.0, 0.0).sum() * 0.0

    def pop_stats(self) -> dict[str, float]:
        means = {k: sum(v) / len(v) for k, v in self.stats.items() if v}
        self.stats.clear()
        return means


class IQLearnTrainer(SFTTrainer):
    """OpenRLHF ``SFTTrainer`` whose per-token loss is IQ-Learn's; see the module docstring."""

    def __init__(self, model, strategy, *args, **kwargs):
        super().__init__(model, strategy, *args, **kwargs)
        from openrlhf_irl.utils.checkpoint import write_then_retire

        write_then_retire(self.strategy)  # --ckpt.max_num rotation never deletes the only complete checkpoint
        self.iq_config = IQConfig.from_args(self.args)
        if self.packing_samples:
            raise ValueError(
                "--trainer irl_iq does not support --ds.packing_samples: the TD term needs V(s_{t+1}) of the same "
                "sequence, which packed rows would mix across samples. Train without packing."
            )
        if self.pretrain_mode:
            raise ValueError("--trainer irl_iq needs prompt/response data; --model.pretrain_mode_enable is MLE only.")
        if self.tokenizer is None or self.tokenizer.eos_token_id is None:
            raise ValueError("--trainer irl_iq needs a tokenizer with an EOS token to find terminal steps.")
        check_online_config(self.iq_config, multiturn=bool(getattr(getattr(self.args, "data", None), "multiturn", False)))
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
            head = FusedHead.of(self._hf_model())  # refuses heads it cannot reproduce, naming the config field
            head.check(output.hidden_states[-1][:, -1], output.logits[:, -1])  # once: vs the model's own logits
            fwd = PolicyForward(sequences, labels, hidden=output.hidden_states[-1][:, :-1], head=head,
                                chunk_size=self.iq_config.fused_chunk_size, attention_mask=attention_mask,
                                hidden_full=output.hidden_states[-1], single_pass=self.iq_config.fused_single_pass)
        else:
            output = self._actor_forward(sequences, attention_mask=attention_mask, return_output=True,
                                         ring_attn_group=ring_attn_group)
            fwd = PolicyForward(sequences, labels, logits=output["logits"], attention_mask=attention_mask)
        return (fwd, output) if return_output else fwd

    # ---- online variant -----------------------------------------------------------------------------------------
    def online_parts(self, expert_fwd, expert_mask, td_weight, token_normaliser=None, dp_size=1):
        """(policy PolicyForward, policy mask, term(expert_terms, policy_terms) -> (loss, stats)) for this
        micro-batch: the policy samples of its prompts, teacher-forced, and ``iq_online_term`` on them."""
        cfg = self.iq_config
        samples = self._policy_samples(expert_fwd.sequences, expert_mask)
        fwd = self.policy_forward(samples["sequences"], attention_mask=samples["attention_mask"])
        mask = samples["loss_mask"].bool()

        def term(expert_terms, policy_terms):
            return iq_online_term(
                expert_terms, expert_mask, policy_terms, mask, alpha=cfg.online_mix, td_weight=td_weight,
                gamma=cfg.gamma, chi2_on_policy=cfg.chi2_on_policy, token_normaliser=token_normaliser,
                dp_size=dp_size)

        return fwd, mask, term

    def online_value_term(self, expert_fwd, expert_terms, expert_mask, td_weight, token_normaliser=None, dp_size=1):
        """alpha * (P[g] - E[g]) on policy samples of this micro-batch's prompts (``iq_online_term``)."""
        fwd, mask, term = self.online_parts(expert_fwd, expert_mask, td_weight, token_normaliser, dp_size)
        _, terms, _, _ = forward_terms(fwd, mask, self.eos_token_id, self.iq_config, td_weight)
        loss, stats = term(expert_terms, terms)
        stats["policy_td"] = float((terms.rewards.detach().square() * terms.td_mask).sum() / terms.td_mask.sum().clamp(min=1))
        stats["policy_sample_len"] = float(mask.sum(-1).float().mean())
        return loss, stats

    def _policy_samples(self, sequences, loss_mask):
        """Samples from the prompts of the current micro-batch.

        Every ``online_refresh_steps`` optimizer steps the sampler (``--irl.sampler``) gets the current weights and
        each micro-batch of that step draws from its own prompts; the steps in between reuse the samples drawn for
        the micro-batch at the same position of the window. Every rank makes the same calls (collective).
        """
        cfg = self.iq_config
        step = self.optimizer_steps
        if step != getattr(self, "_window_step", None):
            self._window_step, self._micro_batch = step, 0
        else:
            self._micro_batch += 1
        if self._online_refreshed_at is None or step - self._online_refreshed_at >= cfg.online_refresh_steps:
            self.policy_sampler.refresh(self.model.model, zero_stage=self.strategy.stage)
            self._online_refreshed_at = step
            self._online_samples = {}
        cache = self._online_samples
        if step == self._online_refreshed_at or self._micro_batch not in cache:
            cache[self._micro_batch] = self.policy_sampler.sample(prompt_rows(sequences, loss_mask))
        return cache[self._micro_batch]

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



def check_online_config(cfg: IQConfig, *, multiturn: bool = False) -> None:
    """Refuse online configurations whose online term is meaningless (see the module docstring)."""
    if cfg.online_mix <= 0:
        return
    if multiturn:
        raise ValueError("--irl.online_mix > 0 with --data.multiturn: policy samples are single-turn completions of "
                         "the first user turn and cannot continue a conversation; train multi-turn data offline.")
    if cfg.gamma == 1.0 and (not cfg.chi2_on_policy or cfg.td_weight == 0):
        why = "--irl.td_weight is 0" if cfg.td_weight == 0 else "--no-irl.chi2_on_policy is set"
        raise ValueError(
            f"--irl.online_mix {cfg.online_mix} does nothing here: with --irl.gamma 1 the value term telescopes to "
            f"V(s_0) for expert and policy sequences alike, and {why}, so the policy samples never enter the loss. "
            "Keep the chi^2 term on policy states (--irl.chi2_on_policy, the default, with --irl.td_weight > 0), "
            "use --irl.gamma < 1, or set --irl.online_mix 0.")
    if cfg.gamma < 1.0 and (not cfg.chi2_on_policy or cfg.td_weight == 0):
        why = "--irl.td_weight is 0" if cfg.td_weight == 0 else "--no-irl.chi2_on_policy is set"
        raise ValueError(
            f"--irl.online_mix {cfg.online_mix} with --irl.gamma {cfg.gamma} has no lower bound here: summed over an "
            f"episode's steps, each state a policy sample visits enters the value term with weight (1 - gamma) "
            f"V(s), and {why}, so nothing stops V at those states from falling without end. Keep the chi^2 term on "
            "policy states (--irl.chi2_on_policy, the default, with --irl.td_weight > 0) or set --irl.online_mix 0.")


def prompt_rows(sequences: torch.Tensor, loss_mask: torch.Tensor) -> list[torch.Tensor]:
    """Prompt tokens of each SFT row: everything up to the state that emits the first response token."""
    rows = []
    for seq, mask in zip(sequences, loss_mask.bool()):
        idx = mask.nonzero()
        if len(idx):
            rows.append(seq[: int(idx[0]) + 1])
    return rows
