"""IQ-Learn loss for language models (Wulfmeier et al. 2024, offline chi^2 form).

Token MDP: Q(s_t, a) = logits[t, a], V(s_t) = logsumexp(logits[t]) (fp32), log pi_t = q_t - v_t with
q_t = logits[t, labels[t]]. The loss, a mean over response tokens, is

    L = mean_t [ -mle_weight * log pi_t + td_weight * (q_t - gamma * V(s_{t+1}))^2 ]

where r_t = q_t - gamma * V(s_{t+1}) is the implicit reward and the next value is
  * v_{t+1}  if position t+1 is a response token,
  * 0        if t is terminal (the step that emits EOS),
  * undefined if t is a response token that is neither terminal nor followed by a response token (cut by max_len
    or the last column): such a token has no TD term (its MLE term still counts) and its reward is reported as 0.

Conventions: ``labels[:, t]`` is predicted by ``logits[:, t]``; ``loss_mask`` [B, T] marks response tokens;
``terminal_mask`` [B, T] marks response tokens after which the episode ends. Labels outside the response may hold
anything (e.g. -100): they are never used as indices. Prompt and padding positions never enter V, log pi or the
means.

``iq_learn_loss`` (full logits) and ``fused_iq_learn_loss`` (chunked lm_head, see ``fused_linear_qv``) only differ
in how (q, v) are obtained; both share ``iq_per_token_loss``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = [
    "IQTokenTerms",
    "iq_token_terms",
    "iq_per_token_loss",
    "iq_stats",
    "iq_learn_loss",
    "token_rewards",
    "logits_q_and_v",
    "entropy_from_logits",
]


class IQTokenTerms(NamedTuple):
    """Per-token IQ-Learn quantities, all [B, T] and zero outside the response."""

    log_probs: torch.Tensor  # q_t - v_t
    rewards: torch.Tensor  # r_t = q_t - gamma * V(s_{t+1}); 0 where td_mask is False
    td_mask: torch.Tensor  # bool: response tokens that have a TD term (terminal, or followed by a response token)
    next_values: torch.Tensor  # V(s_{t+1}) as used in r_t (0 after terminal and where td_mask is False)
    values: torch.Tensor  # v_t = V(s_t)


def iq_token_terms(
    q: torch.Tensor,
    v: torch.Tensor,
    loss_mask: torch.Tensor,
    terminal_mask: torch.Tensor,
    *,
    gamma: float = 1.0,
) -> IQTokenTerms:
    """log pi_t = q_t - v_t and r_t = q_t - gamma * V(s_{t+1}) from per-token q, v [B, T] (fp32)."""
    resp = loss_mask.bool()
    term = terminal_mask.bool() & resp
    zero = q.new_zeros(())

    next_is_resp = torch.zeros_like(resp)
    next_is_resp[:, :-1] = resp[:, 1:]
    v_next = torch.cat([v[:, 1:], v.new_zeros(v.shape[0], 1)], dim=1)

    td_mask = resp & (term | next_is_resp)
    next_values = torch.where(resp & next_is_resp & ~term, v_next, zero)
    rewards = torch.where(td_mask, q - gamma * next_values, zero)
    log_probs = torch.where(resp, q - v, zero)
    values = torch.where(resp, v, zero)
    return IQTokenTerms(log_probs, rewards, td_mask, next_values, values)


def iq_per_token_loss(
    q: torch.Tensor,
    v: torch.Tensor,
    loss_mask: torch.Tensor,
    terminal_mask: torch.Tensor,
    *,
    td_weight: float,
    gamma: float = 1.0,
    mle_weight: float = 1.0,
) -> tuple[torch.Tensor, IQTokenTerms]:
    """l_t = -mle_weight * log pi_t + td_weight * r_t^2 * td_mask_t, zero outside ``loss_mask``. Returns (l [B, T], terms)."""
    terms = iq_token_terms(q, v, loss_mask, terminal_mask, gamma=gamma)
    per_token = -mle_weight * terms.log_probs
    if td_weight != 0:
        per_token = per_token + td_weight * terms.rewards.square() * terms.td_mask
    per_token = torch.where(loss_mask.bool(), per_token, per_token.new_zeros(()))
    return per_token, terms


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    mask = mask.bool()
    n = int(mask.sum().item())
    if n == 0:
        return 0.0
    return float((x.detach().float() * mask).sum().item() / n)


@torch.no_grad()
def iq_stats(terms: IQTokenTerms, loss_mask: torch.Tensor, entropy: torch.Tensor | None = None) -> dict[str, float]:
    """Detached diagnostics: nll (mean -log pi), value (mean v) and entropy over response tokens; td (mean r^2)
    and reward (mean r) over tokens with a TD term. Empty masks give 0.0."""
    stats = {
        "nll": _masked_mean(-terms.log_probs, loss_mask),
        "td": _masked_mean(terms.rewards.square(), terms.td_mask),
        "value": _masked_mean(terms.values, loss_mask),
        "reward": _masked_mean(terms.rewards, terms.td_mask),
    }
    if entropy is not None:
        stats["entropy"] = _masked_mean(entropy, loss_mask)
    return stats


def logits_q_and_v(
    logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q_t = logits[t, labels[t]] (0 outside the response) and v_t = logsumexp(logits[t]), both fp32 [B, T]."""
    resp = loss_mask.bool()
    index = torch.where(resp, labels, torch.zeros_like(labels)).long()
    q = logits.gather(-1, index.unsqueeze(-1)).squeeze(-1).float()
    q = torch.where(resp, q, q.new_zeros(()))
    v = torch.logsumexp(logits.float(), dim=-1)
    return q, v


@torch.no_grad()
def entropy_from_logits(logits: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """H_t = v_t - sum_a p_t[a] * l_t[a] (fp32, detached)."""
    logits = logits.detach().float()
    p = torch.exp(logits - v.detach().unsqueeze(-1))
    return v.detach() - (p * logits).sum(-1)


def iq_learn_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    terminal_mask: torch.Tensor,
    *,
    td_weight: float,
    gamma: float = 1.0,
    mle_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """L = sum_t[-mle_weight * log pi_t + td_weight * r_t^2] / #response tokens, from full logits [B, T, V].

    With td_weight=0, mle_weight=1 this is cross-entropy averaged over the response tokens. Returns (loss, stats),
    stats as in ``iq_stats`` plus 'entropy' (mean entropy of softmax(logits) over response tokens).
    """
    q, v = logits_q_and_v(logits, labels, loss_mask)
    per_token, terms = iq_per_token_loss(
        q, v, loss_mask, terminal_mask, td_weight=td_weight, gamma=gamma, mle_weight=mle_weight
    )
    loss = per_token.sum() / loss_mask.sum().clamp(min=1)
    stats = iq_stats(terms, loss_mask, entropy=entropy_from_logits(logits, v))
    return loss, stats


@torch.no_grad()
def token_rewards(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    terminal_mask: torch.Tensor,
    *,
    gamma: float = 1.0,
) -> torch.Tensor:
    """Implicit per-token reward r_t = q_t - gamma * V(s_{t+1}) [B, T] fp32, V = 0 after a terminal token.

    0 outside the response. For a response token cut without EOS (no next response token, not terminal) the reward
    is undefined and reported as 0. With gamma = 1 the rewards of an EOS-terminated response telescope:
    sum_t r_t = log pi(y|x) + V(s_0).
    """
    q, v = logits_q_and_v(logits, labels, loss_mask)
    return iq_token_terms(q, v, loss_mask, terminal_mask, gamma=gamma).rewards
