"""Single-pass fused lm_head + IQ-Learn objective: input and weight gradients computed in the forward pass.

Every IQ-Learn objective the trainer uses is a per-token weighted sum of the terms of ``IQTokenTerms``:

    L = sum_t [ w_lp,t log pi_t + w_r,t r_t + w_r2,t r_t^2 + w_v,t v_t + w_n,t V'_t ]            (IQTermWeights)

with q_t = l_t[a_t], v_t = logsumexp(l_t), log pi_t = q_t - v_t, V'_t = v_{t+1} where t links to a next response
token (0 after a terminal step, and r_t, r_t^2 only where t has a TD term), r_t = q_t - gamma V'_t. The offline loss
with OpenRLHF's normalisers w_t is w_lp = -mle_weight w, w_r2 = lambda w. Its gradient wrt the logits of row t is

    dL/dl_t = A_t onehot(a_t) + B_t softmax(l_t)
    A_t = w_lp,t + w_r,t + 2 w_r2,t r_t                                  (needs v_{t+1}: added after all chunks)
    B_t = -w_lp,t + w_v,t + [t-1 links to t] (w_n,t-1 - gamma w_r,t-1 - 2 gamma w_r2,t-1 r_{t-1})

(docs/iq_learn.md#fused-gradient with w_lp = -w, w_r2 = lambda w: A = w(-1 + 2 lambda r_t),
B = w(1 - 2 lambda gamma r_{t-1})).
B_t needs only q_{t-1} and v_t, known once row t's chunk of logits exists, so the dense part B_t p_t goes into
dh_c = g W and dW += g^T h_c right away, and the one-column part A_t is added after the last chunk:
dh_t += A_t W[a_t], dW[a_t] += A_t h_t. Three lm_head-sized matmuls per chunk (logits, dh, dW), as a fused
cross-entropy, instead of the four of the two-pass ``LinearQV`` (logits again in backward). Backward only scales
the saved gradients by the incoming grad.

Output-head transforms (``HeadTransform``): logits = softcap * tanh(scale * (h W^T) / softcap) or scale * (h W^T);
then dl/dz = scale * (1 - (l / softcap)^2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from .iq_learn import IQTokenTerms, iq_token_terms

__all__ = ["IQTermWeights", "FusedIQOutput", "HeadTransform", "LinearIQObjective", "linear_iq_objective", "iq_weighted_loss",
           "token_weights_of", "evenly_spaced_rows", "term_weights_of", "td_mask_for", "add_weights"]


@dataclass(frozen=True)
class HeadTransform:
    """logits = softcap * tanh(scale * z / softcap) (softcap set) or scale * z, with z = hidden @ weight.T."""

    scale: float = 1.0
    softcap: Optional[float] = None

    @property
    def identity(self) -> bool:
        return self.scale == 1.0 and self.softcap is None

    def apply(self, z: torch.Tensor) -> torch.Tensor:
        """The transform on fp32 pre-logits (differentiable; for references and the plain path)."""
        z = z * self.scale if self.scale != 1.0 else z
        if self.softcap is not None:
            z = self.softcap * torch.tanh(z / self.softcap)
        return z


class IQTermWeights(NamedTuple):
    """Per-token weights [B, T] (None = 0) of the ``IQTokenTerms`` fields in L (module docstring)."""

    log_probs: Optional[torch.Tensor] = None
    rewards: Optional[torch.Tensor] = None
    rewards_sq: Optional[torch.Tensor] = None
    values: Optional[torch.Tensor] = None
    next_values: Optional[torch.Tensor] = None


def iq_weighted_loss(terms: IQTokenTerms, weights: IQTermWeights) -> torch.Tensor:
    """The plain (autograd) form of L: sum_t of the weighted terms. r and r^2 count only where td_mask is set."""
    total = terms.values.new_zeros(())
    td = terms.td_mask
    pairs = [(weights.log_probs, terms.log_probs), (weights.rewards, terms.rewards * td),
             (weights.rewards_sq, terms.rewards.square() * td), (weights.values, terms.values),
             (weights.next_values, terms.next_values)]
    for w, x in pairs:
        if w is not None:
            total = total + (w.float() * x).sum()
    return total


def add_weights(a: IQTermWeights, b: IQTermWeights) -> IQTermWeights:
    """Field-wise sum (None = 0)."""
    return IQTermWeights(*(x if y is None else y if x is None else x + y for x, y in zip(a, b)))


def td_mask_for(loss_mask, terminal_mask, bootstrap_mask=None) -> torch.Tensor:
    """Response tokens with a TD term under ``linear_iq_objective``'s rules: terminal, followed by a response token
    of the same row, or bootstrapped (a cut token)."""
    resp = loss_mask.bool()
    later = torch.flip(torch.cumsum(torch.flip(resp.int(), [1]), 1), [1]) - resp.int()  # response tokens after t
    td = resp & ((terminal_mask.bool() & resp) | (later > 0))
    if bootstrap_mask is not None:
        td = td | (bootstrap_mask.bool() & resp)
    return td


def term_weights_of(loss_of_terms, *masks) -> tuple[IQTermWeights, ...]:
    """The ``IQTermWeights`` of a loss given as a function of ``IQTokenTerms`` (one per ``(loss_mask, td_mask)``
    pair in ``masks``), e.g. the online term ``iq_online_term``: read off by differentiating it at probe terms.

    The loss must be a per-token weighted sum of log pi, v, V', r and r^2 (what ``IQTermWeights`` can express): its
    derivatives wrt log pi, v, V' are their weights; wrt r at r = 0 the weight of r, and at r = 1 that plus twice
    the weight of r^2.
    """

    def probe(r_value):
        terms = []
        for loss_mask, td in masks:
            shape, dev = loss_mask.shape, loss_mask.device
            z = lambda: torch.zeros(shape, dtype=torch.float32, device=dev, requires_grad=True)  # noqa: E731
            r = torch.full(shape, float(r_value), dtype=torch.float32, device=dev, requires_grad=True)
            terms.append(IQTokenTerms(z(), r, td.bool(), z(), z()))
        with torch.enable_grad():
            out = loss_of_terms(*terms)
            leaves = [x for t in terms for x in (t.log_probs, t.rewards, t.next_values, t.values)]
            grads = torch.autograd.grad(out, leaves, allow_unused=True)
        zero = lambda g, x: torch.zeros_like(x) if g is None else g  # noqa: E731
        return [tuple(zero(g, x) for g, x in zip(grads[4 * i:4 * i + 4], leaves[4 * i:4 * i + 4]))
                for i in range(len(terms))]

    at0, at1 = probe(0.0), probe(1.0)
    out = []
    for (g_lp, g_r0, g_nv, g_v), (_, g_r1, _, _), (loss_mask, _) in zip(at0, at1, masks):
        resp = loss_mask.bool()
        keep = lambda x: torch.where(resp, x, 0.0)  # noqa: E731
        out.append(IQTermWeights(log_probs=keep(g_lp), rewards=keep(g_r0), rewards_sq=keep((g_r1 - g_r0) / 2),
                                 values=keep(g_v), next_values=keep(g_nv)))
    return tuple(out)


def token_weights_of(reduce, like: torch.Tensor) -> torch.Tensor:
    """w_t = d reduce(x) / d x_t for a linear reduction ``reduce`` of a per-token tensor (e.g. OpenRLHF's
    ``aggregate_loss`` with its normalisers): the weights the single-pass op needs before any loss exists."""
    with torch.enable_grad():
        x = torch.zeros(like.shape, dtype=torch.float32, device=like.device, requires_grad=True)
        (w,) = torch.autograd.grad(reduce(x), x)
    return w


def evenly_spaced_rows(mask: torch.Tensor, max_rows: int) -> torch.Tensor:
    """Bool mask of at most ``max_rows`` evenly spaced set positions of ``mask`` (row-major), e.g. the response
    tokens whose entropy is logged."""
    rows, cols = mask.bool().nonzero(as_tuple=True)
    out = torch.zeros(mask.shape, dtype=torch.bool, device=mask.device)
    if len(rows) == 0 or max_rows <= 0:
        return out
    pick = torch.linspace(0, len(rows) - 1, steps=min(len(rows), max_rows), device=rows.device).long()
    out[rows[pick], cols[pick]] = True
    return out


def _chunk_logits(h, weight, head: HeadTransform):
    z = (h @ weight.t()).float()
    if head.scale != 1.0:
        z.mul_(head.scale)
    if head.softcap is not None:
        z.div_(head.softcap).tanh_().mul_(head.softcap)
    return z


class LinearIQObjective(torch.autograd.Function):
    """Flattened rows: hidden [N, H], weight [V, H], labels [N] (outside [0, V): q = 0, no one-hot part), per-row
    fp32 coefficients cq, cv, cn, c2 [N] and ``link`` [N] (row t's next value is row t+1's v):

        L = sum_t cq q_t + cv v_t + cn link_t v_{t+1} + c2 r_t^2,   r_t = q_t - gamma link_t v_{t+1}

    ``entropy_rows``: None, or (index [k] of the rows whose entropy is logged, ascending; tuple of how many of them
    fall in each chunk), so that the chunk loop never reads a device value (no host sync).
    Returns (L, q, v, entropy of the ``entropy_rows`` rows); only L is differentiable."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, cq, cv, cn, c2, link, gamma, head, chunk_size, need_h, need_w,
                entropy_rows):
        n, vocab = hidden.shape[0], weight.shape[0]
        dev = hidden.device
        qs = torch.zeros(n + 1, dtype=torch.float32, device=dev)  # qs[t + 1] = q_t; qs[0] = 0 (no row before)
        q = qs[1:]
        v = torch.zeros(n, dtype=torch.float32, device=dev)
        dlab = torch.ones(n, dtype=torch.float32, device=dev)  # dl/dz at the label column (softcap)
        valid = (labels >= 0) & (labels < vocab)
        invalid = ~valid
        index = torch.where(valid, labels, torch.zeros_like(labels))
        lf = link.float()
        # coefficients of row t-1 that reach v_t, folded: B_t = base_t - c2g_t r_{t-1}
        first = cn.new_zeros(min(n, 1))
        base = cv + torch.cat([first, (cn * lf)[:-1]])
        c2g = 2.0 * gamma * torch.cat([first, (c2 * lf)[:-1]])
        dh = torch.empty_like(hidden) if need_h else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        ent_index, ent_counts = entropy_rows if entropy_rows is not None else (None, ())
        ent = torch.zeros(n if ent_index is not None else 0, dtype=torch.float32, device=dev)  # per row, picked at the end
        # logged entropy H_t = v_t - sum_a p_a l_a. With the dense gradient row dh_t = B_t T'(..) p_t W (no soft-cap),
        # sum_a p_a l_a = h_t . dh_t / B_t comes for free (for the whole chunk); a row with B_t = 0 is run with
        # B_t = 1 and its gradient rows are zeroed (masked h in dW, dh row set to 0), so no row needs a host-side
        # test. Otherwise (soft-cap, no input gradient) it is computed from the chunk's logits of the entropy rows.
        from_dh = need_h and head.softcap is None and ent_index is not None
        ent_at = 0
        for c, s in enumerate(range(0, n, chunk_size)):
            e = min(s + chunk_size, n)
            h = hidden[s:e]
            logits = _chunk_logits(h, weight, head)
            qc, vc = q[s:e], v[s:e]
            torch.gather(logits, 1, index[s:e, None], out=qc[:, None])
            qc.masked_fill_(invalid[s:e], 0.0)
            torch.logsumexp(logits, dim=-1, out=vc)
            k_c = ent_counts[c] if ent_index is not None else 0
            if k_c and not from_dh:
                sel = ent_index[ent_at:ent_at + k_c]  # the chunk's entropy rows
                for k in range(0, k_c, 32):  # a few rows at a time: no second [chunk, V] buffer
                    rows_k = sel[k:k + 32]
                    ls, vs = logits.index_select(0, rows_k - s), v.index_select(0, rows_k)[:, None]
                    ent.index_copy_(0, rows_k, vs.squeeze(1) - (ls - vs).exp_().mul_(ls).sum(-1))
            ent_at += k_c
            if not (need_h or need_w):
                continue
            # B_t for the chunk's rows; r_{t-1} = q_{t-1} - gamma v_t
            b = base[s:e] - c2g[s:e] * (qs[s:e] - gamma * vc)
            zero_b = None
            if from_dh and k_c:
                zero_b = b == 0
                b = b + zero_b
            dz = None
            if head.softcap is not None:  # dl/dz = scale * (1 - (l / c)^2), needs l: before l becomes p in place
                dz = (logits / head.softcap).square_().neg_().add_(1.0)
                dlab[s:e] = dz.gather(1, index[s:e, None]).squeeze(1) * head.scale
            elif head.scale != 1.0:
                dlab[s:e] = head.scale
            g = logits.sub_(vc[:, None]).exp_().mul_(b[:, None])  # B_t softmax(l_t), in place of the logits
            del logits
            if dz is not None:
                g.mul_(dz)
                del dz
            if head.scale != 1.0:
                g.mul_(head.scale)
            g = g.to(hidden.dtype)
            if need_h:
                dh_c = g @ weight
                if zero_b is not None:
                    hd = h.to(torch.float32, copy=True).mul_(dh_c).sum(-1)
                    torch.addcdiv(vc, hd, b, value=-1.0, out=ent[s:e])
                    dh_c.masked_fill_(zero_b[:, None], 0)
                dh[s:e] = dh_c
            if need_w:
                dw.add_(g.t() @ (h if zero_b is None else h.masked_fill(zero_b[:, None], 0)))
        v_next = torch.cat([v[1:], v.new_zeros(min(n, 1))]) * lf
        r = q - gamma * v_next
        loss = (cq * q).sum() + (cv * v).sum() + (cn * v_next).sum() + (c2 * r.square()).sum()
        if need_h or need_w:
            a = torch.where(valid, (cq + 2.0 * c2 * r) * dlab, torch.zeros_like(r))
            if need_h:
                dh.add_((a[:, None] * weight[index].float()).to(hidden.dtype))
            if need_w:
                dw.index_add_(0, index, a[:, None] * hidden.float())
                dw = dw.to(weight.dtype)
        ctx.save_for_backward(*(t for t in (dh, dw) if t is not None))
        ctx.has = (need_h, need_w)
        entropy = ent.index_select(0, ent_index) if ent_index is not None else q.new_zeros(0)
        ctx.mark_non_differentiable(q, v, entropy)
        return loss, q, v, entropy

    @staticmethod
    def backward(ctx, dloss, dq, dv, dent):
        saved = list(ctx.saved_tensors)
        need_h, need_w = ctx.has
        dh = saved.pop(0) if need_h else None
        dw = saved.pop(0) if need_w else None
        if dh is not None and ctx.needs_input_grad[0]:
            dh = dh * dloss.to(dh.dtype)
        else:
            dh = None
        if dw is not None and ctx.needs_input_grad[1]:
            dw = dw * dloss.to(dw.dtype)
        else:
            dw = None
        return (dh, dw) + (None,) * 12


class FusedIQOutput(NamedTuple):
    loss: torch.Tensor  # L, differentiable wrt hidden and weight
    terms: IQTokenTerms  # of the detached (q, v), for stats
    entropy: torch.Tensor  # [k] policy entropy of the ``entropy_mask`` rows (row-major), detached
    q: torch.Tensor  # [B, T] detached
    v: torch.Tensor  # [B, T] detached
    bootstrap_values: Optional[torch.Tensor]  # [B, T] V after each ``bootstrap_mask`` token (0 elsewhere), detached


def linear_iq_objective(hidden, weight, labels, loss_mask, terminal_mask, weights: IQTermWeights, *,
                        gamma: float = 1.0, head: HeadTransform = HeadTransform(), chunk_size: int = 1024,
                        entropy_mask: Optional[torch.Tensor] = None,
                        bootstrap_mask: Optional[torch.Tensor] = None) -> FusedIQOutput:
    """L (see module docstring) from hidden states and the lm_head weight [V, H] in one pass over the vocabulary.

    ``hidden`` [B, T_h, H] with T_h >= T: position t predicts ``labels[:, t]`` ([B, T]). Only response rows
    (``loss_mask``) go through the lm_head, plus, for each token of ``bootstrap_mask`` (a response cut by a length
    limit), the state after it, ``hidden[:, t + 1]``, whose value is V(s_{t+1}) of that token. A response token's
    next value is v of the row's next response position (the next token, or the start of the next assistant
    segment across a user turn), else the bootstrap value, 0 after a terminal token, else it has no TD term; the
    weights of r and r^2 count only on tokens with a TD term.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    resp = loss_mask.bool()
    batch, width = resp.shape
    t_h = hidden.shape[1]
    if t_h < width:
        raise ValueError(f"hidden {tuple(hidden.shape)} is shorter than labels {tuple(labels.shape)}")
    dev = resp.device
    term = terminal_mask.bool() & resp
    boot = bootstrap_mask.bool() & resp & ~term if bootstrap_mask is not None else None
    ent = entropy_mask.bool() & resp if entropy_mask is not None else None
    # Everything is set up on the hidden grid [B, T_h] and compressed by one gather, so that the op makes one host
    # sync only: a small device-to-host copy of the row count, the bootstrap check and the number of entropy rows
    # per chunk. The compressed (row-major) row of a selected position is its rank among the selected ones.
    grid = resp.new_zeros((2 + (boot is not None) + (ent is not None), batch, t_h))
    grid[:, :, :width] = torch.stack([resp, term] + [x for x in (boot, ent) if x is not None])
    g_resp, g_term = grid[0], grid[1]
    rows = g_resp.clone()
    if boot is not None:
        rows[:, 1:] |= grid[2][:, :-1]
    flat = rows.view(-1)
    cnt = torch.cumsum(flat, 0)  # selected positions up to and including each position
    rank = cnt - 1
    # row i's next state is row i + 1 when a selected position follows in the same sequence
    later = cnt.view(batch, t_h) < cnt.view(batch, t_h)[:, -1:]
    link = g_resp & ~g_term & later
    td = g_resp & (g_term | later)
    total = flat.numel()
    positions = torch.arange(total, device=dev)
    # idx_all[j] = flat position of compressed row j (unselected positions land in the dropped last slot)
    idx_all = torch.zeros(total + 1, dtype=torch.long, device=dev).scatter_(0, torch.where(flat, rank, total), positions)
    host = [cnt[-1:] if total else cnt.new_zeros(1)]
    if boot is not None and t_h == width:
        host.append(boot[:, -1].any().view(1))
    ent_counts, ent_all = [], None
    if ent is not None:
        ent_flat = grid[-1].view(-1)
        per_chunk = torch.zeros(max(1, -(-total // chunk_size)), dtype=torch.long, device=dev)
        host.append(per_chunk.scatter_add_(0, rank.clamp(min=0) // chunk_size, ent_flat.long()))
        ent_rank = torch.where(ent_flat, torch.cumsum(ent_flat, 0) - 1, total)
        ent_all = torch.zeros(total + 1, dtype=torch.long, device=dev).scatter_(0, ent_rank, rank)
    n, *rest = torch.cat(host).tolist()
    if boot is not None and t_h == width:
        if rest.pop(0):
            raise ValueError("bootstrap_mask needs the hidden state after the last label position")
    ent_counts = rest
    idx = idx_all[:n]

    # per-position coefficients (module docstring) on the grid: cq, cv, cn, c2 and link
    coef = torch.zeros((5, batch, t_h), dtype=torch.float32, device=dev)
    cq, cv, cn, c2 = coef[0], coef[1], coef[2], coef[3]
    for i, x in enumerate(weights):
        if x is None:
            continue
        wx = torch.where((td if i in (1, 2) else g_resp)[:, :width], x.float(), 0.0)
        if i == 0:
            cq[:, :width] += wx
            cv[:, :width] -= wx
        elif i == 1:
            cq[:, :width] += wx
            cn[:, :width] -= gamma * wx
        elif i == 2:
            c2[:, :width] = wx
        elif i == 3:
            cv[:, :width] += wx
        else:
            cn[:, :width] += wx
    coef[4] = link
    cq, cv, cn, c2, lf = coef.view(5, -1).index_select(1, idx).unbind(0)
    grid_labels = labels.new_full((batch, t_h), -1)
    grid_labels[:, :width] = torch.where(resp, labels, -1)
    grad = torch.is_grad_enabled()
    ent_rows = None if ent is None else (ent_all[:sum(ent_counts)], tuple(ent_counts))
    loss, q, v, entropy = LinearIQObjective.apply(
        hidden.reshape(batch * t_h, -1).index_select(0, idx), weight, grid_labels.view(-1).index_select(0, idx),
        cq, cv, cn, c2, lf, float(gamma), head, int(chunk_size), grad and hidden.requires_grad,
        grad and weight.requires_grad, ent_rows,
    )
    q_rows = q.new_zeros(batch * t_h).index_copy_(0, idx, q).view(batch, t_h)
    v_rows = v.new_zeros(batch * t_h).index_copy_(0, idx, v).view(batch, t_h)
    q_full = torch.where(resp, q_rows[:, :width], 0.0)
    v_full = torch.where(resp, v_rows[:, :width], 0.0)
    if boot is None:
        terms = iq_token_terms(q_full, v_full, resp, term, gamma=gamma)
        return FusedIQOutput(loss, terms, entropy, q_full, v_full, None)
    v_after = torch.cat([v_rows[:, 1:], v_rows.new_zeros(batch, 1)], dim=1)[:, :width]
    boot_v = torch.where(boot, v_after, 0.0)
    terms = iq_token_terms(q_full, v_full, resp, term, gamma=gamma, bootstrap_mask=boot, bootstrap_values=boot_v)
    return FusedIQOutput(loss, terms, entropy, q_full, v_full, boot_v)
