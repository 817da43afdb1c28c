"""IQ-Learn loss for language models (Wulfmeier et al. 2024, chi^2 form), offline and online.

Token MDP: Q(s_t, a) = logits[t, a], V(s_t) = logsumexp(logits[t]) (fp32), log pi_t = q_t - v_t with
q_t = logits[t, labels[t]]. The offline loss, a mean over response tokens, is

    L = mean_t [ -mle_weight * log pi_t + td_weight * (q_t - gamma * V(s_{t+1}))^2 ]

where r_t = q_t - gamma * V(s_{t+1}) is the implicit reward and the next value is
  * 0                 if t is terminal (the step that emits the episode's final EOS),
  * V at the next response position of the row, if there is one: the next token's state, or, across a user turn
    of a multi-turn row, the state where the next assistant segment starts (the user's tokens are the environment's
    transition and are never an agent state),
  * ``bootstrap_values[t]`` where ``bootstrap_mask`` is set (a response cut by max_len: V of the state after the
    last kept token, read from the last position's logits),
  * undefined otherwise (cut with ``--irl.truncation drop``, or followed only by non-agent tokens): such a token
    has no TD term (its MLE term still counts) and its reward is reported as 0.

The online term (``iq_online_term``) is documented there. Conventions: ``labels[:, t]`` is predicted by
``logits[:, t]``; ``loss_mask`` [B, T] marks response tokens; ``terminal_mask`` [B, T] marks response tokens after
which the episode ends. Labels outside the response may hold anything (e.g. -100): they are never used as indices.
Prompt and padding positions never enter V, log pi or the means.

The loss over (q, v) is ``iq_per_token_loss``: from full logits (``logits_q_and_v``) or a chunked lm_head
(``fused_linear_qv``); ``fused_iq_objective`` fuses it with the lm_head in one pass.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

__all__ = [
    "IQTokenTerms",
    "next_response_index",
    "episode_masks",
    "iq_token_terms",
    "iq_online_term",
    "iq_per_token_loss",
    "iq_stats",
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


def next_response_index(loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For every position t of [B, T] ``loss_mask``: the first response position j > t of the same row, and whether
    there is one. (Returns ``(index, has_next)``; ``index`` is 0 where ``has_next`` is False.)"""
    resp = loss_mask.bool()
    batch, width = resp.shape
    pos = torch.arange(width, device=resp.device).expand(batch, width)
    marked = torch.where(resp, pos, torch.full_like(pos, width))
    # nearest response position at or after t, then shift by one: strictly after t
    at_or_after = torch.flip(torch.cummin(torch.flip(marked, [1]), dim=1).values, [1])
    after = torch.cat([at_or_after[:, 1:], at_or_after.new_full((batch, 1), width)], dim=1)
    has_next = after < width
    return torch.where(has_next, after, torch.zeros_like(after)), has_next


def iq_token_terms(
    q: torch.Tensor,
    v: torch.Tensor,
    loss_mask: torch.Tensor,
    terminal_mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    bootstrap_mask: Optional[torch.Tensor] = None,
    bootstrap_values: Optional[torch.Tensor] = None,
) -> IQTokenTerms:
    """log pi_t = q_t - v_t and r_t = q_t - gamma * V(s_{t+1}) from per-token q, v [B, T] (fp32).

    V(s_{t+1}) follows the module docstring: 0 after a terminal token, else v at the row's next response position,
    else ``bootstrap_values`` where ``bootstrap_mask`` is set, else no TD term.
    """
    resp = loss_mask.bool()
    term = terminal_mask.bool() & resp
    zero = q.new_zeros(())

    nxt, has_next = next_response_index(resp)
    v_next = v.gather(1, nxt)
    follow = resp & has_next & ~term
    next_values = torch.where(follow, v_next, zero)
    td_mask = resp & (term | has_next)
    if bootstrap_mask is not None:
        boot = bootstrap_mask.bool() & resp & ~term & ~has_next
        next_values = torch.where(boot, bootstrap_values.to(next_values.dtype), next_values)
        td_mask = td_mask | boot
    rewards = torch.where(td_mask, q - gamma * next_values, zero)
    log_probs = torch.where(resp, q - v, zero)
    values = torch.where(resp, v, zero)
    return IQTokenTerms(log_probs, rewards, td_mask, next_values, values)


def episode_masks(
    labels: torch.Tensor, loss_mask: torch.Tensor, attention_mask: torch.Tensor, eos_token_id: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(terminal, cut) [B, T-1] for teacher-forced rows: ``labels = sequences[:, 1:]``, ``attention_mask`` [B, T].

    Only a row's last response token can end it. It is *terminal* when it emits EOS as the row's last real token
    (the episode ended), and *cut* when it is the row's last real token without EOS (truncated by a length limit:
    the state after it, at the last real input position, exists and can be bootstrapped from). A last response token
    followed by other real tokens (a multi-turn row cut inside a user turn, or template text after the last
    assistant turn) is neither: its next agent state is not in the row, so it gets no TD term.
    An EOS inside a row (a chat template whose end-of-turn token is EOS) never ends the episode.
    """
    resp = loss_mask.bool()
    _, has_next = next_response_index(resp)
    last_resp = resp & ~has_next
    width = labels.shape[1]
    real = attention_mask.bool()[:, 1:]  # label t is input token t + 1
    pos = torch.arange(width, device=labels.device).expand_as(real)
    last_real = torch.where(real, pos, torch.full_like(pos, -1)).max(dim=1, keepdim=True).values
    at_end = last_resp & (pos == last_real)
    terminal = at_end & (labels == eos_token_id)
    return terminal, at_end & ~terminal


def iq_per_token_loss(
    q: torch.Tensor,
    v: torch.Tensor,
    loss_mask: torch.Tensor,
    terminal_mask: torch.Tensor,
    *,
    td_weight: float,
    gamma: float = 1.0,
    mle_weight: float = 1.0,
    bootstrap_mask: Optional[torch.Tensor] = None,
    bootstrap_values: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, IQTokenTerms]:
    """l_t = -mle_weight * log pi_t + td_weight * r_t^2 * td_mask_t, zero outside ``loss_mask``. Returns (l [B, T], terms)."""
    terms = iq_token_terms(q, v, loss_mask, terminal_mask, gamma=gamma, bootstrap_mask=bootstrap_mask,
                           bootstrap_values=bootstrap_values)
    per_token = -mle_weight * terms.log_probs
    if td_weight != 0:
        per_token = per_token + td_weight * terms.rewards.square() * terms.td_mask
    per_token = torch.where(loss_mask.bool(), per_token, per_token.new_zeros(()))
    return per_token, terms


def iq_online_term(
    expert: IQTokenTerms,
    expert_mask: torch.Tensor,
    policy: IQTokenTerms,
    policy_mask: torch.Tensor,
    *,
    alpha: float,
    td_weight: float,
    gamma: float,
    chi2_on_policy: bool = True,
    token_normaliser: Optional[torch.Tensor | float] = None,
    dp_size: int = 1,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Online IQ-Learn term, added to the offline loss of the same expert micro-batch.

    IQ-Learn (Garg et al. 2021) minimises, over the mixture rho_mix = (1 - alpha) rho_E + alpha rho_pi of expert
    and policy occupancies,

        -E_E[r] + E_mix[V(s) - gamma V(s')] + lambda E_mix[r^2]                      (lambda = 1 / (4 alpha_iq))

    (the chi^2 regulariser on the mixture is IQ-Learn's online ``regularize`` option; its reference code takes it
    over the concatenated expert and policy batches of equal size, i.e. alpha = 1/2). Since -E_E[r] + E_E[V - gamma V'] =
    E_E[-log pi], this is the offline loss plus ``alpha * (P[g] - E[g])`` with per-token

        g_t = V(s_t) - gamma V(s_{t+1}) + lambda r_t^2        (lambda r^2 only with ``chi2_on_policy``)

    over tokens with a TD term. Occupancies of a finite-horizon, undiscounted episode are sums over its steps; the
    whole objective is divided by the expert tokens per sequence, which is what makes the offline part a token
    mean. So, per micro-batch with B_E expert and B_pi policy sequences and the step's expert token count N_E,

        E[g] = sum_{expert tokens} g / N_E,     P[g] = (B_E / B_pi) * sum_{policy tokens} g / N_E.

    With gamma = 1 the value part of g telescopes along a sequence to V(s_0) (minus V at a cut), so for policy
    samples drawn from the micro-batch's own prompts the value parts of P and E cancel exactly: the samples'
    content enters only through the chi^2 term (and V at cut states). ``token_normaliser`` is OpenRLHF's per-step
    ``batch_num_tokens`` (N_E / gradient-accumulation steps, over all ranks; None: this micro-batch's expert
    token count) and ``dp_size`` its data-parallel factor, exactly as ``aggregate_loss`` uses them.
    """

    def part(terms: IQTokenTerms) -> torch.Tensor:
        g = terms.values - gamma * terms.next_values
        if chi2_on_policy and td_weight != 0:
            g = g + td_weight * terms.rewards.square()
        return torch.where(terms.td_mask, g, g.new_zeros(())).sum()

    n_expert = (expert_mask.bool().sum(-1) > 0).sum()
    n_policy = (policy_mask.bool().sum(-1) > 0).sum()
    if token_normaliser is None:
        token_normaliser = expert_mask.bool().sum().clamp(min=1)
    expert_sum, policy_sum = part(expert), part(policy)
    ratio = n_expert.float() / n_policy.clamp(min=1).float()
    loss = alpha * (ratio * policy_sum - expert_sum) / token_normaliser * dp_size
    stats = {
        "online_term": float(loss.detach()),
        "policy_g_per_seq": float(policy_sum.detach() / n_policy.clamp(min=1)),
        "expert_g_per_seq": float(expert_sum.detach() / n_expert.clamp(min=1)),
    }
    return loss, stats


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
