"""Independent per-token loop references for the IQ-Learn trainer's loss (offline and online).

Written from the equations (docs/iq_learn.md, offline and online objectives), with Python loops over rows and
positions and no code from ``openrlhf_irl``. ``logits`` are the model's full [B, T, V] logits of ``ids`` [B, T]; a
row's response positions are the shifted indices t (label ``ids[b, t + 1]``) where ``mask[b][t]`` is set.
"""

from __future__ import annotations

import torch


def row_steps(logits, ids, attn, mask, b, eos_id, gamma, truncation):
    """[(log_pi, v, r or None, next_v or None)] for the response tokens of row b, in order."""
    positions = [t for t in range(len(mask[b])) if bool(mask[b][t])]
    real = [t for t in range(ids.shape[1]) if int(attn[b][t])]
    last_label = max(real) - 1  # label index of the row's last real token
    out = []
    for k, t in enumerate(positions):
        row = logits[b, t].float()
        label = int(ids[b, t + 1])
        v = torch.logsumexp(row, 0)
        q = row[label]
        if k + 1 < len(positions):  # next agent state: the next response position (across a user turn if any)
            nv = torch.logsumexp(logits[b, positions[k + 1]].float(), 0)
        elif t == last_label and label == eos_id:
            nv = torch.zeros(())
        elif t == last_label and truncation == "bootstrap":
            nv = torch.logsumexp(logits[b, t + 1].float(), 0)
        else:
            nv = None
        r = None if nv is None else q - gamma * nv
        out.append((q - v, v, r, nv))
    return out


def offline_loss(logits, ids, attn, mask, eos_id, *, td_weight, gamma=1.0, mle_weight=1.0, truncation="bootstrap",
                 normaliser=None):
    """sum over response tokens of [-mle * log pi + lambda r^2] / normaliser (default: the response token count)."""
    total, count = 0.0, 0
    for b in range(ids.shape[0]):
        for logp, _, r, _ in row_steps(logits, ids, attn, mask, b, eos_id, gamma, truncation):
            total = total - mle_weight * logp + (td_weight * r * r if r is not None else 0.0)
            count += 1
    return total / (count if normaliser is None else normaliser)


def g_sum(logits, ids, attn, mask, eos_id, *, td_weight, gamma, chi2, truncation="bootstrap"):
    """(sum over tokens with a TD target of V - gamma V' + [lambda r^2], number of rows with a response)."""
    total, rows = 0.0, 0
    for b in range(ids.shape[0]):
        steps = row_steps(logits, ids, attn, mask, b, eos_id, gamma, truncation)
        rows += bool(steps)
        for _, v, r, nv in steps:
            if r is not None:
                total = total + v - gamma * nv + (td_weight * r * r if chi2 else 0.0)
    return total, rows


def online_term(expert, policy, eos_id, *, alpha, td_weight, gamma, chi2=True, truncation="bootstrap",
                normaliser=None):
    """alpha * ((B_E / B_pi) * sum_pi g - sum_E g) / N_E; ``expert``/``policy`` are (logits, ids, attn, mask)."""
    e_sum, e_rows = g_sum(*expert, eos_id, td_weight=td_weight, gamma=gamma, chi2=chi2, truncation=truncation)
    p_sum, p_rows = g_sum(*policy, eos_id, td_weight=td_weight, gamma=gamma, chi2=chi2, truncation=truncation)
    n_e = sum(int(bool(m)) for row in expert[3] for m in row) if normaliser is None else normaliser
    return alpha * (e_rows / p_rows * p_sum - e_sum) / n_e
