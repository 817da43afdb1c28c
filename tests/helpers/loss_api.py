"""The IQ-Learn offline loss as one call, from full logits or fused with the lm_head: compositions of the library's
pieces that the loss tests compare with each other and with the loop references (``helpers.iq_reference``).

The package's loss API is ``openrlhf_irl.losses.iq_sft.IQLearnSFTLoss``; these two only fix its offline, single
micro-batch case (normaliser: this batch's response token count) so the pieces can be checked on their own:

    L = sum_t[-mle_weight * log pi_t + td_weight * (q_t - gamma V_{t+1})^2] / #response tokens

``iq_learn_loss`` takes the full logits [B, T, V]; ``fused_iq_learn_loss`` takes hidden [B, T, H] and the lm_head
weight [V, H] (no bias) and never builds logits for prompt or padding rows: ``single_pass`` (default) through
``linear_iq_objective`` (gradients in the forward), else through the two-pass ``masked_linear_q_and_v``. Same
loss, stats and gradients as ``iq_learn_loss(T(hidden @ weight.T), ...)``. Both return ``(loss, stats)``, stats as
in ``iq_stats`` plus the mean entropy over response tokens.
"""

from __future__ import annotations

from openrlhf_irl.losses import (
    HeadTransform,
    IQTermWeights,
    entropy_from_logits,
    iq_per_token_loss,
    iq_stats,
    linear_iq_objective,
    logits_q_and_v,
    masked_linear_q_and_v,
)

__all__ = ["iq_learn_loss", "fused_iq_learn_loss"]


def _mean_loss(q, v, loss_mask, terminal_mask, entropy, **weights):
    per_token, terms = iq_per_token_loss(q, v, loss_mask, terminal_mask, **weights)
    loss = per_token.sum() / loss_mask.sum().clamp(min=1)
    return loss, iq_stats(terms, loss_mask, entropy=entropy)


def iq_learn_loss(logits, labels, loss_mask, terminal_mask, *, td_weight, gamma=1.0, mle_weight=1.0):
    """The loss from full logits [B, T, V] (td_weight=0, mle_weight=1: cross-entropy over the response tokens)."""
    q, v = logits_q_and_v(logits, labels, loss_mask)
    return _mean_loss(q, v, loss_mask, terminal_mask, entropy_from_logits(logits, v), td_weight=td_weight,
                      gamma=gamma, mle_weight=mle_weight)


def fused_iq_learn_loss(hidden, weight, labels, loss_mask, terminal_mask, *, td_weight, gamma=1.0, mle_weight=1.0,
                        chunk_size=1024, single_pass=True, head=HeadTransform()):
    """The loss with the lm_head fused in, ``chunk_size`` response tokens at a time."""
    resp = loss_mask.bool()
    if not single_pass:
        q, v, entropy = masked_linear_q_and_v(hidden, weight, labels, resp, chunk_size, return_entropy=True,
                                              head=head)
        return _mean_loss(q, v, resp, terminal_mask, entropy, td_weight=td_weight, gamma=gamma,
                          mle_weight=mle_weight)
    w = resp.float() / resp.sum().clamp(min=1)
    weights = IQTermWeights(log_probs=-mle_weight * w, rewards_sq=td_weight * w if td_weight else None)
    loss, terms, entropy, *_ = linear_iq_objective(
        hidden, weight, labels, resp, terminal_mask, weights, gamma=gamma, head=head, chunk_size=chunk_size,
        entropy_mask=resp,
    )
    entropy = entropy.new_zeros(resp.shape).masked_scatter(resp, entropy)
    return loss, iq_stats(terms, resp, entropy=entropy)
