"""Fused lm_head + (q, v), two-pass: the reference for the single-pass default in ``fused_iq_objective``.

The IQ-Learn loss depends on the logits l_t = T(W h_t) (T the head's transform, identity for most models) only
through two fp32 scalars per token, q_t = l_t[a_t] and v_t = logsumexp(l_t). ``linear_q_and_v`` processes
``chunk_size`` tokens at a time and recomputes the chunk's logits in backward, so it works for any downstream loss:

    forward : l = T((h_c W^T).float());  q = l[a];  v = logsumexp(l)            (optionally H = v - sum p*l, detached)
    backward: p = exp(l - v);  g = (dq * onehot(a) + dv * p) * T'(z);  dh_c = g W;  dW += g^T h_c   (dW in fp32)

Only hidden, weight, labels and v (O(N H + V H + N)) are saved for backward. Four lm_head-sized matmuls per chunk
(logits twice, dh, dW); ``linear_iq_objective`` needs three.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .fused_iq_objective import HeadTransform

__all__ = ["linear_q_and_v", "masked_linear_q_and_v", "LinearQV"]


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, head: HeadTransform = HeadTransform()) -> torch.Tensor:
    return head.apply((h @ weight.t()).float())


def _valid_labels(labels: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    valid = (labels >= 0) & (labels < vocab)
    return valid, torch.where(valid, labels, torch.zeros_like(labels))


class LinearQV(torch.autograd.Function):
    """(hidden [N, H], weight [V, H], labels [N]) -> q, v, entropy [N] fp32. Labels outside [0, V) give q = 0."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size, return_entropy, head=HeadTransform()):
        n, vocab = hidden.shape[0], weight.shape[0]
        q = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        v = torch.empty(n, dtype=torch.float32, device=hidden.device)
        ent = torch.empty(n if return_entropy else 0, dtype=torch.float32, device=hidden.device)
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            logits = _chunk_logits(hidden[s:e], weight, head)
            valid, index = _valid_labels(labels[s:e], vocab)
            qc = logits.gather(1, index.unsqueeze(1)).squeeze(1)
            q[s:e] = torch.where(valid, qc, torch.zeros_like(qc))
            vc = torch.logsumexp(logits, dim=-1)
            v[s:e] = vc
            if return_entropy:
                p = torch.exp(logits - vc.unsqueeze(1))
                ent[s:e] = vc - (p * logits).sum(-1)
        ctx.save_for_backward(hidden, weight, labels, v)
        ctx.chunk_size = chunk_size
        ctx.head = head
        ctx.mark_non_differentiable(ent)
        return q, v, ent

    @staticmethod
    @once_differentiable
    def backward(ctx, dq, dv, dent):
        hidden, weight, labels, v = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_h or need_w):
            return None, None, None, None, None, None
        n, vocab, chunk = hidden.shape[0], weight.shape[0], ctx.chunk_size
        dh = torch.empty_like(hidden) if need_h else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        dq = dq.float()
        dv = dv.float()
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            h = hidden[s:e]
            logits = _chunk_logits(h, weight, ctx.head)
            g = logits.sub(v[s:e].unsqueeze(1)).exp_().mul_(dv[s:e].unsqueeze(1))  # dv * softmax
            valid, index = _valid_labels(labels[s:e], vocab)
            dqc = torch.where(valid, dq[s:e], torch.zeros_like(dq[s:e]))
            g.scatter_add_(1, index.unsqueeze(1), dqc.unsqueeze(1))  # + dq * onehot(label)
            if ctx.head.softcap is not None:  # dl/dz = scale * (1 - (l / c)^2)
                g.mul_(logits.div_(ctx.head.softcap).square_().neg_().add_(1.0))
            if ctx.head.scale != 1.0:
                g.mul_(ctx.head.scale)
            del logits
            g = g.to(hidden.dtype)
            if need_h:
                dh[s:e] = g @ weight
            if need_w:
                dw.add_(g.t() @ h)
        if need_w:
            dw = dw.to(weight.dtype)
        return dh, dw, None, None, None, None


def linear_q_and_v(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int = 1024,
    return_entropy: bool = False,
    head: HeadTransform = HeadTransform(),
):
    """q = (hidden @ weight.T)[label], v = logsumexp(hidden @ weight.T), fp32, shape hidden.shape[:-1], computed
    ``chunk_size`` tokens at a time (full logits never exist, forward or backward). Labels < 0 (or >= vocab) give
    q = 0 and no gradient through q. With ``return_entropy`` also returns the (detached) softmax entropy. ``head``: the
    logit transform T (logits = T(hidden @ weight.T)), identity by default."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    lead = hidden.shape[:-1]
    h = hidden.reshape(-1, hidden.shape[-1])
    lab = labels.reshape(-1)
    if lab.shape[0] != h.shape[0]:
        raise ValueError(f"labels {tuple(labels.shape)} do not match hidden {tuple(hidden.shape)}")
    q, v, ent = LinearQV.apply(h, weight, lab, int(chunk_size), bool(return_entropy), head)
    q, v = q.view(lead), v.view(lead)
    if return_entropy:
        return q, v, ent.view(lead)
    return q, v


def masked_linear_q_and_v(hidden, weight, labels, mask, chunk_size: int = 1024, return_entropy: bool = False,
                          head: HeadTransform = HeadTransform()):
    """``linear_q_and_v`` on the rows where ``mask`` [B, T] is set; results scattered back to [B, T] (0 elsewhere).

    Only those rows go through the lm_head: prompt and padding positions never get logits.
    """
    resp = mask.bool()
    outs = linear_q_and_v(hidden[resp], weight, labels[resp], chunk_size=chunk_size, return_entropy=return_entropy,
                          head=head)
    return tuple(x.new_zeros(resp.shape).masked_scatter(resp, x) for x in outs)
