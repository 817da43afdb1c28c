"""Fused-MLE baseline for the benchmark: chunked single-pass linear cross-entropy, plain PyTorch.

What Liger-Kernel's fused linear cross-entropy does, without Triton: for each chunk of ``chunk_size`` rows,

    l = (h_c W^T).float();  loss += sum_t w_t (logsumexp(l_t) - l_t[a_t])
    g = w_t (softmax(l_t) - onehot(a_t));  dh_c = g W;  dW += g^T h_c          (dW accumulated in fp32)

so the input and weight gradients exist after the forward pass (3 lm_head-sized matmuls per chunk, no [N, V]
logits), and backward only scales them by the incoming gradient. ``w_t`` are per-token loss weights (1/N for a mean).
"""

from __future__ import annotations

import torch

__all__ = ["FusedLinearCrossEntropy", "fused_linear_cross_entropy"]


class FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, token_weights, chunk_size):
        n = hidden.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        dh = torch.empty_like(hidden) if need_h else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            h, a, w = hidden[s:e], labels[s:e, None], token_weights[s:e, None].float()
            logits = (h @ weight.t()).float()
            lse = torch.logsumexp(logits, dim=-1, keepdim=True)
            loss += (w * (lse - logits.gather(1, a))).sum()
            if need_h or need_w:
                g = logits.sub_(lse).exp_().mul_(w)  # in place: w * softmax
                g.scatter_add_(1, a, -w)
                g = g.to(hidden.dtype)
                if need_h:
                    dh[s:e] = g @ weight
                if need_w:
                    dw.add_(g.t() @ h)
        ctx.save_for_backward(*(t for t in (dh, None if dw is None else dw.to(weight.dtype)) if t is not None))
        ctx.has = (need_h, need_w)
        return loss

    @staticmethod
    def backward(ctx, dloss):
        saved = list(ctx.saved_tensors)
        dh = dw = None
        if ctx.has[0]:
            dh = saved.pop(0)
            dh = dh * dloss.to(dh.dtype)
        if ctx.has[1]:
            dw = saved.pop(0)
            dw = dw * dloss.to(dw.dtype)
        return dh, dw, None, None, None


def fused_linear_cross_entropy(hidden, weight, labels, token_weights=None, chunk_size: int = 1024):
    """sum_t w_t * CE(hidden_t @ weight.T, labels_t) over rows [N, H]; w_t = 1/N (a mean) when not given."""
    if token_weights is None:
        token_weights = torch.full(labels.shape, 1.0 / max(labels.numel(), 1), device=hidden.device)
    return FusedLinearCrossEntropy.apply(hidden, weight, labels, token_weights, int(chunk_size))
