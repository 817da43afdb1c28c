"""IQ-Learn SFT loss over one teacher-forced pass (``--trainer irl_iq``), apart from any trainer.

Offline, over demonstration response tokens (``docs/iq_learn.md#offline-objective``; lambda = ``td_weight``):

    L = mean_t [ -mle_weight * log pi(a_t|s_t) + lambda * (Q(s_t, a_t) - gamma * V(s_{t+1}))^2 ]

Online (``online_mix`` alpha > 0, a batch of policy samples given): IQ-Learn's objective over the mixture of expert
and policy occupancies (``iq_online_term``):

    L_online = L + alpha * ( P[g] - E[g] ),   g_t = V(s_t) - gamma V(s_{t+1}) + lambda r_t^2

:class:`IQLearnSFTLoss` takes its config, a :class:`PolicyForward` (full logits, or hidden states and the lm_head for
the fused loss), the loss mask, OpenRLHF's normalisers (reduced with OpenRLHF's own ``aggregate_loss``, so
``td_weight=0`` is OpenRLHF's SFT loss), and from its caller this step's ``td_weight`` (the warm-up schedule) and
the optional policy batch. It knows nothing of the trainer that calls it.
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
from openrlhf_irl.losses.iq_learn import (
    entropy_from_logits,
    episode_masks,
    iq_online_term,
    iq_per_token_loss,
    iq_stats,
    logits_q_and_v,
)
from openrlhf_irl.losses.fused_linear_qv import masked_linear_q_and_v

__all__ = ["TRUNCATION_MODES", "IQConfig", "PolicyForward", "IQLearnSFTLoss", "NonFiniteLoss", "forward_terms",
           "single_pass_loss", "terminal_mask", "check_online_config"]

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
    """The loss as OpenRLHF's ``SFTLoss`` is called (``loss_fn(output, loss_mask, **normalisers)``), where the output
    is a :class:`PolicyForward`; the caller adds this step's ``td_weight`` and, online, the ``policy`` batch."""

    def __init__(self, cfg: IQConfig, eos_token_id: int, printer=print):
        super().__init__()
        self.cfg, self.eos_token_id, self.printer = cfg, eos_token_id, printer
        self.stats = defaultdict(list)
        self.skipped = 0

    def forward(self, fwd: PolicyForward, loss_mask, dp_size=1, batch_num_tokens=None, global_batch_size=None, *,
                td_weight: Optional[float] = None, policy=None, where: str = ""):
        """``td_weight``: lambda for this step (default ``cfg.td_weight``); ``policy``: ``(PolicyForward, mask)``
        of policy samples for the online term (None: offline); ``where``: the step, named if the loss goes
        non-finite."""
        cfg, eos = self.cfg, self.eos_token_id
        td_weight = cfg.td_weight if td_weight is None else td_weight
        mask = loss_mask.bool()
        norms = dict(dp_size=dp_size, batch_num_tokens=batch_num_tokens, global_batch_size=global_batch_size)
        online = None
        if policy is not None:
            pfwd, pmask = policy

            def term(expert_terms, policy_terms):
                return iq_online_term(
                    expert_terms, mask, policy_terms, pmask, alpha=cfg.online_mix, td_weight=td_weight,
                    gamma=cfg.gamma, chi2_on_policy=cfg.chi2_on_policy, token_normaliser=batch_num_tokens,
                    dp_size=dp_size)

            online = (pfwd, pmask, term)
        if fwd.single_pass:
            loss, terms, entropy, online_stats = single_pass_loss(
                fwd, mask, eos, cfg, td_weight, lambda x: aggregate_loss(x, loss_mask, **norms), online=online)
            stats = iq_stats(terms, mask)
            stats["entropy"] = entropy
            stats["td_weight"] = td_weight
            stats.update(online_stats)
        else:
            per_token, terms, q, v = forward_terms(fwd, mask, eos, cfg, td_weight)
            loss = aggregate_loss(per_token, loss_mask, **norms)
            stats = iq_stats(terms, mask)
            stats["entropy"] = fwd.mean_entropy(mask, v, cfg.entropy_sample_tokens)
            stats["td_weight"] = td_weight
            if online is not None:
                pfwd, pmask, term = online
                _, pterms, _, _ = forward_terms(pfwd, pmask, eos, cfg, td_weight)
                online_loss, online_stats = term(terms, pterms)
                online_stats["policy_td"] = float(
                    (pterms.rewards.detach().square() * pterms.td_mask).sum() / pterms.td_mask.sum().clamp(min=1))
                online_stats["policy_sample_len"] = float(pmask.sum(-1).float().mean())
                loss = loss + online_loss
                stats.update(online_stats)
        loss = self._check_finite(loss, stats, fwd, where)
        for key, value in stats.items():
            self.stats[key].append(value)
        return loss

    def _check_finite(self, loss, stats, fwd, where):
        """A non-finite loss stops the run (all ranks agree), or with ``skip_nonfinite`` becomes a zero loss for
        this micro-batch (gradient 0, counted in the logged ``nonfinite_skipped``)."""
        cfg = self.cfg
        finite = torch.isfinite(loss.detach()).float().reshape(1)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        if bool(finite.item()):
            if cfg.skip_nonfinite:
                stats["nonfinite_skipped"] = float(self.skipped)
            return loss
        bad = {k: v for k, v in stats.items() if isinstance(v, float) and not math.isfinite(v)}
        where = where or "this micro-batch"
        what = ", ".join(f"{k}={v}" for k, v in bad.items()) or f"loss={float(loss.detach())} (on another rank)"
        if not cfg.skip_nonfinite:
            raise NonFiniteLoss(
                f"error: --trainer irl_iq: non-finite loss at {where}: {what}. Lower the learning rate or "
                f"--irl.td_weight, or pass --irl.skip_nonfinite to skip such micro-batches.")
        self.skipped += 1
        self.printer(f"[irl_iq] skipped a micro-batch with a non-finite loss at {where}: {what} "
                     f"({self.skipped} skipped so far)")
        stats.clear()
        stats["nonfinite_skipped"] = float(self.skipped)
        base = fwd.logits if fwd.logits is not None else fwd.hidden
        return torch.nan_to_num(base, 0.0, 0.0, 0.0).sum() * 0.0

    def pop_stats(self) -> dict[str, float]:
        means = {k: sum(v) / len(v) for k, v in self.stats.items() if v}
        self.stats.clear()
        return means


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
