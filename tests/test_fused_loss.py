"""The single-pass fused IQ objective (default) and the two-pass reference op against an independent loop over
(row, position) on materialised float64 logits: values and both gradients, fp32 tight and bf16 loose, with prompt,
padding, EOS, cut (bootstrapped) and multi-turn rows, with and without online-term weights, and with the logit
transforms of Gemma-2/3, Cohere and Granite heads. Also: the single pass runs 3 lm_head-sized matmuls per chunk."""

import math
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers.loss_api import fused_iq_learn_loss
from openrlhf_irl.losses import HeadTransform, IQTermWeights, linear_iq_objective, linear_q_and_v
from openrlhf_irl.losses.fused_linear_qv import masked_linear_q_and_v

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_loss_check as glc  # noqa: E402

V, H, T = 40, 16, 12

# (prompt_len, segments [(start, length)] of the response, ending): ending "eos" = the last response token is
# terminal, "cut" = cut by max_len (bootstrapped from the next position), "none" = no TD term on the last token.
ROWS = [
    (3, [(3, 5)], "eos"),  # padded after EOS
    (2, [(2, T - 3)], "cut"),  # cut one before the last column: bootstrap from column T - 1
    (4, [(4, T - 4)], "eos"),  # EOS at the last column
    (1, [(1, 6)], "none"),
    (0, [(0, 7)], "eos"),  # no prompt
    (5, [], "none"),  # no response at all
    (2, [(2, 1)], "eos"),  # one-token response
    (1, [(1, 3), (6, 4)], "eos"),  # two assistant turns with a user turn between: V' of the first turn's end = v[6]
]


def build(gen, rows=ROWS):
    """Masks and labels of ``rows`` (the CUDA check ``benchmarks/gpu_loss_check.py`` builds its cases the same way)."""
    return glc.build_batch(T, V, gen, [(segs, end) for _, segs, end in rows])


def reference(logits, labels, mask, term, cut, weights, gamma):
    """sum over response tokens of w_lp log pi + w_v v + w_n V' + [TD] (w_r r + w_r2 r^2), by hand."""
    total = logits.new_zeros(())
    b_n, t_n = mask.shape
    for b in range(b_n):
        for t in range(t_n):
            if not mask[b, t]:
                continue
            row = logits[b, t]
            v = torch.logsumexp(row, 0)
            q = row[int(labels[b, t])]
            later = [j for j in range(t + 1, t_n) if mask[b, j]]
            td = True
            if term[b, t]:
                v_next = logits.new_zeros(())
            elif later:
                v_next = torch.logsumexp(logits[b, later[0]], 0)
            elif cut[b, t]:
                v_next = torch.logsumexp(logits[b, t + 1], 0)
            else:
                v_next, td = logits.new_zeros(()), False
            w = {k: (0.0 if x is None else float(x[b, t])) for k, x in weights._asdict().items()}
            total = total + w["log_probs"] * (q - v) + w["values"] * v + w["next_values"] * v_next
            if td:
                r = q - gamma * v_next
                total = total + w["rewards"] * r + w["rewards_sq"] * r * r
    return total


def offline_weights(mask, td_weight, mle_weight, gen):
    w = mask.float() * (0.5 + torch.rand(mask.shape, generator=gen)) / mask.sum()  # any per-token normaliser
    return IQTermWeights(log_probs=-mle_weight * w, rewards_sq=td_weight * w)


def online_weights(mask, gen):
    r = lambda: torch.randn(mask.shape, generator=gen) * mask  # noqa: E731
    return IQTermWeights(log_probs=r(), rewards=r(), rewards_sq=r().abs(), values=r(), next_values=r())


def run_fused(h0, w0, labels, mask, term, cut, weights, gamma, chunk, head=HeadTransform(), dtype=torch.float32):
    hidden = h0.detach().clone().to(dtype).requires_grad_(True)
    weight = w0.detach().clone().to(dtype).requires_grad_(True)
    out = linear_iq_objective(hidden, weight, labels, mask, term, weights, gamma=gamma, head=head, chunk_size=chunk,
                              bootstrap_mask=cut)
    out.loss.backward()
    return out, hidden.grad, weight.grad


def run_reference(h0, w0, labels, mask, term, cut, weights, gamma, head=HeadTransform()):
    rh, rw = h0.double().requires_grad_(True), w0.double().requires_grad_(True)
    ref = reference(head.apply(rh @ rw.T), labels, mask, term, cut, weights, gamma)
    ref.backward()
    return ref.detach(), rh.grad, rw.grad


def data(seed, hidden_width=T):
    gen = torch.Generator().manual_seed(seed)
    mask, term, cut, labels = build(gen)
    h0 = torch.randn(len(ROWS), hidden_width, H, generator=gen)
    w0 = torch.randn(V, H, generator=gen) / math.sqrt(H) * 2
    return gen, mask, term, cut, labels, h0, w0


@pytest.mark.parametrize("gamma,td_weight,mle_weight", [(1.0, 0.1, 1.0), (0.9, 1.0, 0.5), (1.0, 0.0, 1.0)])
@pytest.mark.parametrize("chunk", [1, 5, 4096])
def test_single_pass_offline_matches_loop_fp32(gamma, td_weight, mle_weight, chunk):
    gen, mask, term, cut, labels, h0, w0 = data(0)
    weights = offline_weights(mask, td_weight, mle_weight, gen)
    out, gh, gw = run_fused(h0, w0, labels, mask, term, cut, weights, gamma, chunk)
    ref, rh, rw = run_reference(h0, w0, labels, mask, term, cut, weights, gamma)
    torch.testing.assert_close(out.loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gh.double(), rh, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gw.double(), rw, rtol=1e-4, atol=1e-6)
    # the cut row bootstraps from the next position's value; the multi-turn row links across the user turn
    assert out.terms.td_mask[1].sum() == mask[1].sum() and out.terms.td_mask[7, 3]
    torch.testing.assert_close(out.terms.next_values[7, 3], out.v[7, 6])
    assert not out.terms.td_mask[3, 6]


@pytest.mark.parametrize("chunk", [1, 4, 4096])
@pytest.mark.parametrize("gamma", [1.0, 0.8])
def test_single_pass_with_online_term_weights_matches_loop(chunk, gamma):
    gen, mask, term, cut, labels, h0, w0 = data(1)
    weights = online_weights(mask, gen)
    out, gh, gw = run_fused(h0, w0, labels, mask, term, cut, weights, gamma, chunk)
    ref, rh, rw = run_reference(h0, w0, labels, mask, term, cut, weights, gamma)
    torch.testing.assert_close(out.loss.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gh.double(), rh, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gw.double(), rw, rtol=1e-4, atol=1e-5)
    # deleting a weight changes the result: each term is really counted
    for field in IQTermWeights._fields:
        partial = weights._replace(**{field: None})
        with torch.no_grad():
            loss = linear_iq_objective(h0, w0, labels, mask, term, partial, gamma=gamma, bootstrap_mask=cut).loss
        assert abs(float(loss) - float(ref)) > 1e-3, field


def test_single_pass_bf16_close_to_fp64_loop():
    gen, mask, term, cut, labels, h0, w0 = data(2)
    weights = offline_weights(mask, 0.1, 1.0, gen)
    out, gh, gw = run_fused(h0, w0, labels, mask, term, cut, weights, 0.9, 4, dtype=torch.bfloat16)
    assert gh.dtype == gw.dtype == torch.bfloat16
    ref, rh, rw = run_reference(h0.bfloat16(), w0.bfloat16(), labels, mask, term, cut, weights, 0.9)
    rel = lambda a, b: float((a.double() - b).norm() / b.norm())  # noqa: E731
    assert rel(out.loss.detach(), ref) < 2e-2 and rel(gh, rh) < 2e-2 and rel(gw, rw) < 2e-2


@pytest.mark.parametrize("head", [HeadTransform(softcap=2.0), HeadTransform(scale=0.25),
                                  HeadTransform(scale=3.0, softcap=5.0)], ids=str)
def test_head_transforms_single_and_two_pass(head):
    gen, mask, term, cut, labels, h0, w0 = data(3)
    h0 = h0 * 2  # logits of a few units, so that a soft-cap of 2 bends them
    weights = offline_weights(mask, 0.5, 1.0, gen)
    out, gh, gw = run_fused(h0, w0, labels, mask, term, cut, weights, 1.0, 5, head=head)
    ref, rh, rw = run_reference(h0, w0, labels, mask, term, cut, weights, 1.0, head=head)
    torch.testing.assert_close(out.loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gh.double(), rh, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gw.double(), rw, rtol=1e-4, atol=1e-6)
    plain, *_ = run_reference(h0, w0, labels, mask, term, cut, weights, 1.0)
    assert abs(float(plain - ref)) > 1e-2  # the transform matters here

    # two-pass op: q, v and their gradients under the same transform
    hidden, weight = h0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
    q, v = masked_linear_q_and_v(hidden, weight, labels, mask, chunk_size=3, head=head)
    dq, dv = torch.randn(mask.shape, generator=gen), torch.randn(mask.shape, generator=gen)
    ((q * dq).sum() + (v * dv).sum()).backward()
    rh_, rw_ = h0.double().requires_grad_(True), w0.double().requires_grad_(True)
    logits = head.apply(rh_ @ rw_.T)
    rq = torch.where(mask, logits.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1), 0.0)
    rv = torch.where(mask, torch.logsumexp(logits, -1), 0.0)
    ((rq * dq).sum() + (rv * dv).sum()).backward()
    torch.testing.assert_close(q.double(), rq.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden.grad.double(), rh_.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(weight.grad.double(), rw_.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("td_weight", [0.0, 0.3])
def test_fused_iq_learn_loss_single_pass_equals_two_pass(td_weight):
    gen, mask, term, _, labels, h0, w0 = data(4)
    results = []
    for single in (True, False):
        hidden, weight = h0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
        loss, stats = fused_iq_learn_loss(hidden, weight, labels, mask, term, td_weight=td_weight, gamma=0.9,
                                          chunk_size=6, single_pass=single)
        loss.backward()
        results.append((loss.detach(), hidden.grad, weight.grad, stats))
    (l1, h1, w1, s1), (l2, h2, w2, s2) = results
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h1, h2, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w1, w2, rtol=1e-4, atol=1e-6)
    assert s1.keys() == s2.keys()
    for k in s1:
        assert s1[k] == pytest.approx(s2[k], rel=1e-5, abs=1e-6), k


class _CountMM(TorchDispatchMode):
    """Counts matmuls with a vocabulary-sized operand or result."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab, self.count = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default):
            shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)] + [tuple(out.shape)]
            if any(self.vocab in s and min(s) > 1 for s in shapes):
                self.count += 1
        return out


def test_single_pass_runs_three_vocab_matmuls_per_chunk_two_pass_four():
    gen, mask, term, _, labels, h0, w0 = data(5)
    n_chunks = math.ceil(int(mask.sum()) / 8)
    counts = {}
    for single in (True, False):
        hidden, weight = h0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
        with _CountMM(V) as mode:
            loss, _ = fused_iq_learn_loss(hidden, weight, labels, mask, term, td_weight=0.1, chunk_size=8,
                                          single_pass=single)
            loss.backward()
        counts[single] = mode.count
    assert counts == {True: 3 * n_chunks, False: 4 * n_chunks}


def test_no_grad_and_frozen_weight():
    gen, mask, term, cut, labels, h0, w0 = data(6)
    weights = offline_weights(mask, 0.2, 1.0, gen)
    with torch.no_grad():
        out = linear_iq_objective(h0, w0, labels, mask, term, weights, bootstrap_mask=cut)
    ref, *_ = run_reference(h0, w0, labels, mask, term, cut, weights, 1.0)
    torch.testing.assert_close(out.loss.double(), ref, rtol=1e-5, atol=1e-6)
    hidden = h0.clone().requires_grad_(True)
    linear_iq_objective(hidden, w0, labels, mask, term, weights, bootstrap_mask=cut).loss.backward()
    _, rh, _ = run_reference(h0, w0, labels, mask, term, cut, weights, 1.0)
    torch.testing.assert_close(hidden.grad.double(), rh, rtol=1e-4, atol=1e-6)


def test_entropy_rows():
    gen, mask, term, _, labels, h0, w0 = data(7)
    pick = mask & (torch.rand(mask.shape, generator=gen) < 0.5)
    out = linear_iq_objective(h0, w0, labels, mask, term, offline_weights(mask, 0.1, 1.0, gen), entropy_mask=pick,
                              chunk_size=3)
    logits = (h0 @ w0.T)[pick]
    expected = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
    torch.testing.assert_close(out.entropy, expected, rtol=1e-5, atol=1e-5)
    _, v = linear_q_and_v(h0, w0, labels.clamp(min=0))
    torch.testing.assert_close(out.v[mask], v[mask])


@pytest.mark.parametrize("gamma,chi2", [(1.0, True), (0.9, True), (0.9, False)])
def test_online_term_as_weights_equals_iq_online_term(gamma, chi2):
    """The trainer's online term (``iq_online_term`` on expert and policy terms) folded into the single-pass op as
    per-token weights read off by ``term_weights_of``: same value and gradients as on plain logits."""
    from openrlhf_irl.losses import iq_token_terms
    from openrlhf_irl.losses.fused_iq_objective import add_weights, td_mask_for, term_weights_of
    from openrlhf_irl.losses.iq_learn import iq_online_term

    gen, mask, term, cut, labels, h0, w0 = data(8)
    pmask, pterm, pcut, plabels = mask[[4, 1, 0, 3]], term[[4, 1, 0, 3]], cut[[4, 1, 0, 3]], labels[[4, 1, 0, 3]]
    ph0 = torch.randn(4, T, H, generator=gen)
    kw = dict(alpha=0.3, td_weight=0.5, gamma=gamma, chi2_on_policy=chi2, token_normaliser=torch.tensor(37.0),
              dp_size=2)
    offline = offline_weights(mask, 0.5, 1.0, gen)

    # plain: terms from materialised logits, autograd through iq_online_term
    hidden, phidden, weight = (x.clone().requires_grad_(True) for x in (h0, ph0, w0))

    def plain_terms(h, lab, m, t, c):
        logits = h @ weight.T
        q = torch.where(m, logits.gather(-1, lab.clamp(min=0)[..., None]).squeeze(-1), 0.0)
        v = torch.logsumexp(logits, -1)
        boot_v = torch.where(c, torch.cat([v[:, 1:], v[:, :1]], 1), 0.0)
        return iq_token_terms(q, v, m, t, gamma=gamma, bootstrap_mask=c, bootstrap_values=boot_v)

    e_terms, p_terms = plain_terms(hidden, labels, mask, term, cut), plain_terms(phidden, plabels, pmask, pterm, pcut)
    from openrlhf_irl.losses import iq_weighted_loss

    ref = iq_weighted_loss(e_terms, offline) + iq_online_term(e_terms, mask, p_terms, pmask, **kw)[0]
    ref.backward()

    ew, pw = term_weights_of(lambda e, p: iq_online_term(e, mask, p, pmask, **kw)[0],
                             (mask, td_mask_for(mask, term, cut)), (pmask, td_mask_for(pmask, pterm, pcut)))
    fh, fph, fw = (x.clone().requires_grad_(True) for x in (h0, ph0, w0))
    expert = linear_iq_objective(fh, fw, labels, mask, term, add_weights(offline, ew), gamma=gamma, chunk_size=5,
                                 bootstrap_mask=cut)
    policy = linear_iq_objective(fph, fw, plabels, pmask, pterm, pw, gamma=gamma, chunk_size=5, bootstrap_mask=pcut)
    (expert.loss + policy.loss).backward()
    torch.testing.assert_close(expert.loss + policy.loss, ref, rtol=1e-5, atol=1e-5)
    for got, want in ((fh.grad, hidden.grad), (fph.grad, phidden.grad), (fw.grad, weight.grad)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert float(policy.loss.detach().abs()) > 1e-3  # the policy rows really enter


@pytest.mark.parametrize("dtype,head", [(torch.float32, HeadTransform()), (torch.float32, HeadTransform(scale=0.5)),
                                        (torch.float32, HeadTransform(softcap=2.0)),
                                        (torch.bfloat16, HeadTransform())], ids=str)
def test_logged_entropy_with_gradients(dtype, head):
    """With input gradients the logged entropy comes from the dense gradient rows (h . dh / B = sum p l), without
    (or with a soft-cap) from the logits: both equal -sum p log p of the transformed logits."""
    gen, mask, term, cut, labels, h0, w0 = data(9)
    pick = mask & (torch.rand(mask.shape, generator=gen) < 0.6)
    hidden = h0.to(dtype).requires_grad_(True)
    out = linear_iq_objective(hidden, w0.to(dtype), labels, mask, term, offline_weights(mask, 0.3, 1.0, gen),
                              head=head, entropy_mask=pick, chunk_size=4, bootstrap_mask=cut)
    logits = head.apply(h0.to(dtype).double() @ w0.to(dtype).double().T)[pick]
    expected = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=0, atol=0.05)
    torch.testing.assert_close(out.entropy.double(), expected, **tol)
