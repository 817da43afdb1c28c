"""IQ-Learn losses (plain and fused) against an independent loop reference, hand-worked cases and the analytic
gradient of docs/iq_learn.md#fused-gradient."""

import math

import pytest
import torch
import torch.nn.functional as F

from helpers.loss_api import fused_iq_learn_loss, iq_learn_loss
from openrlhf_irl.losses import iq_stats, iq_token_terms, linear_q_and_v, token_rewards

V = 32  # vocab
H = 8  # hidden size
T = 12  # sequence length

# (prompt_len, response_len, eos): left prompt, response, right padding. Response with eos ends on a terminal token.
ROWS = [
    (3, 5, True),  # EOS-terminated, padded
    (2, T - 2, False),  # truncated: response runs to the last column without EOS
    (4, T - 4, True),  # EOS exactly at the last column
    (1, 6, False),  # truncated: stops without EOS before the end (then padding)
    (0, 7, True),  # no prompt, EOS-terminated
    (5, 0, False),  # no response at all
    (2, 1, True),  # one-token response that is EOS
    (1, 9, True),  # two episodes packed in one row: an extra terminal mid-response (see MID_TERMINALS)
]
B = len(ROWS)
MID_TERMINALS = [(7, 4)]  # (row, column): terminal even though the next token is a response token


def make_masks(rows=ROWS, seq_len=T):
    loss_mask = torch.zeros(len(rows), seq_len, dtype=torch.bool)
    terminal = torch.zeros(len(rows), seq_len, dtype=torch.bool)
    for b, (p, n, eos) in enumerate(rows):
        loss_mask[b, p : p + n] = True
        if eos and n > 0:
            terminal[b, p + n - 1] = True
    if rows is ROWS:
        for b, t in MID_TERMINALS:
            terminal[b, t] = True
    return loss_mask, terminal


def make_labels(loss_mask, gen, vocab=V):
    labels = torch.randint(0, vocab, loss_mask.shape, generator=gen)
    junk = torch.where(torch.rand(loss_mask.shape, generator=gen) < 0.5, -100, vocab + 7)
    return torch.where(loss_mask, labels, junk)  # never-valid indices outside the response


def ce_labels(labels, loss_mask):
    return torch.where(loss_mask, labels, -100)


# ----------------------------------------------------------------------------------------------------------------
# Independent reference: explicit loops over (b, t) with torch scalars.
# ----------------------------------------------------------------------------------------------------------------
def reference_loss(logits, labels, loss_mask, terminal, td_weight, gamma, mle_weight):
    """L = (1/N) sum over response tokens of [-mle * log pi_t + td * r_t^2], r_t = q_t - gamma V(s_{t+1})."""
    Bn, Tn, _ = logits.shape
    total = logits.new_zeros(())
    count = 0
    for b in range(Bn):
        for t in range(Tn):
            if not bool(loss_mask[b, t]):
                continue
            count += 1
            row = logits[b, t]
            y = int(labels[b, t])
            value = torch.logsumexp(row, dim=0)
            q = row[y]
            total = total - mle_weight * (q - value)
            if bool(terminal[b, t]):
                next_value = 0.0
            elif t + 1 < Tn and bool(loss_mask[b, t + 1]):
                next_value = torch.logsumexp(logits[b, t + 1], dim=0)
            else:
                continue  # truncated: no TD term
            r = q - gamma * next_value
            total = total + td_weight * r * r
    return total / max(count, 1)


def reference_rewards(logits, labels, loss_mask, terminal, gamma):
    out = torch.zeros(loss_mask.shape, dtype=torch.float64)
    Bn, Tn, _ = logits.shape
    for b in range(Bn):
        for t in range(Tn):
            if not bool(loss_mask[b, t]):
                continue
            q = float(logits[b, t, int(labels[b, t])])
            if bool(terminal[b, t]):
                out[b, t] = q
            elif t + 1 < Tn and bool(loss_mask[b, t + 1]):
                out[b, t] = q - gamma * float(torch.logsumexp(logits[b, t + 1].double(), dim=0))
    return out


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


GRID = [(g, lam, m) for g in (1.0, 0.9) for lam in (0.0, 0.1, 1.0) for m in (1.0, 0.5)]


# ----------------------------------------------------------------------------------------------------------------
# Plain loss
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gamma,td_weight,mle_weight", GRID)
def test_plain_matches_reference_fp32(gamma, td_weight, mle_weight):
    gen = torch.Generator().manual_seed(0)
    loss_mask, terminal = make_masks()
    labels = make_labels(loss_mask, gen)
    base = 2.0 * torch.randn(B, T, V, generator=gen)

    logits = base.clone().requires_grad_(True)
    loss, stats = iq_learn_loss(
        logits, labels, loss_mask, terminal, td_weight=td_weight, gamma=gamma, mle_weight=mle_weight
    )
    loss.backward()

    ref_logits = base.double().requires_grad_(True)
    ref = reference_loss(ref_logits, labels, loss_mask, terminal, td_weight, gamma, mle_weight)
    ref.backward()

    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits.grad.double(), ref_logits.grad, rtol=1e-5, atol=1e-6)
    # nothing leaks into prompt / padding positions
    assert logits.grad[~loss_mask].abs().max() == 0
    assert set(stats) == {"nll", "td", "value", "reward", "entropy"}
    assert all(isinstance(x, float) for x in stats.values())


def test_plain_bf16_close_to_fp32_reference():
    gen = torch.Generator().manual_seed(1)
    loss_mask, terminal = make_masks()
    labels = make_labels(loss_mask, gen)
    base = (2.0 * torch.randn(B, T, V, generator=gen)).bfloat16()

    logits = base.clone().requires_grad_(True)
    loss, _ = iq_learn_loss(logits, labels, loss_mask, terminal, td_weight=0.1, gamma=0.9)
    loss.backward()

    ref_logits = base.double().requires_grad_(True)
    ref = reference_loss(ref_logits, labels, loss_mask, terminal, 0.1, 0.9, 1.0)
    ref.backward()
    assert loss.dtype == torch.float32
    assert rel_err(loss, ref) < 2e-2
    assert rel_err(logits.grad, ref_logits.grad) < 2e-2


def test_td_weight_zero_is_cross_entropy():
    gen = torch.Generator().manual_seed(2)
    loss_mask, terminal = make_masks()
    labels = make_labels(loss_mask, gen)
    base = 3.0 * torch.randn(B, T, V, generator=gen)

    logits = base.clone().requires_grad_(True)
    loss, stats = iq_learn_loss(logits, labels, loss_mask, terminal, td_weight=0.0)
    loss.backward()

    ce_in = base.clone().requires_grad_(True)
    ce = F.cross_entropy(ce_in.view(-1, V), ce_labels(labels, loss_mask).view(-1), ignore_index=-100)
    ce.backward()
    torch.testing.assert_close(loss, ce)
    torch.testing.assert_close(logits.grad, ce_in.grad)
    assert stats["nll"] == pytest.approx(ce.item(), rel=1e-6)

    # fused, td_weight = 0: cross-entropy of hidden @ W^T
    hidden = torch.randn(B, T, H, generator=gen)
    weight = torch.randn(V, H, generator=gen)
    fused, _ = fused_iq_learn_loss(hidden, weight, labels, loss_mask, terminal, td_weight=0.0, chunk_size=5)
    ce = F.cross_entropy((hidden @ weight.T).view(-1, V), ce_labels(labels, loss_mask).view(-1))
    torch.testing.assert_close(fused, ce)


def test_hand_computed_tiny_case():
    # Vocab 2, two response tokens, the second emits EOS; gamma = 1, td_weight = 0.5, mle_weight = 1.
    #   t=0: logits [0, 0],    label 0: q0 = 0,     v0 = ln 2, log pi0 = -ln 2
    #   t=1: logits [0, ln 3], label 1: q1 = ln 3,  v1 = ln 4, log pi1 = ln 3 - ln 4
    #   r0 = q0 - v1 = -ln 4;  r1 = q1 - 0 = ln 3 (terminal)
    #   L = 1/2 * [ln 2 + (ln 4 - ln 3) + 0.5 * ((ln 4)^2 + (ln 3)^2)]
    #     = 1/2 * [0.693147 + 0.287682 + 0.5 * (1.921812 + 1.206949)] = 1.2726049
    logits = torch.tensor([[[0.0, 0.0], [0.0, math.log(3.0)]]])
    labels = torch.tensor([[0, 1]])
    loss_mask = torch.tensor([[True, True]])
    terminal = torch.tensor([[False, True]])
    loss, stats = iq_learn_loss(logits, labels, loss_mask, terminal, td_weight=0.5, gamma=1.0)
    assert loss.item() == pytest.approx(1.2726049, abs=1e-6)
    # stats: nll = (ln2 + ln4 - ln3)/2, td = (ln4^2 + ln3^2)/2, reward = (ln3 - ln4)/2, value = (ln2 + ln4)/2
    assert stats["nll"] == pytest.approx(0.4904146, abs=1e-6)
    assert stats["td"] == pytest.approx(1.5643805, abs=1e-6)
    assert stats["reward"] == pytest.approx(-0.1438410, abs=1e-6)
    assert stats["value"] == pytest.approx(1.0397208, abs=1e-6)
    # entropy: t=0 ln 2; t=1 p = (1/4, 3/4): -(1/4 ln 1/4 + 3/4 ln 3/4) = 0.5623351
    assert stats["entropy"] == pytest.approx((0.6931472 + 0.5623351) / 2, abs=1e-6)

    rewards = token_rewards(logits, labels, loss_mask, terminal, gamma=1.0)
    torch.testing.assert_close(rewards, torch.tensor([[-math.log(4.0), math.log(3.0)]]))
    # telescoping (gamma = 1): r0 + r1 = ln(3/4) = log pi(y|x) + V(s0) = (-ln 2 + ln 3 - ln 4) + ln 2
    assert rewards.sum().item() == pytest.approx(math.log(0.75), abs=1e-6)

    # gamma = 0.5: r0 = 0 - 0.5 ln 4 = -ln 2, r1 = ln 3
    rewards = token_rewards(logits, labels, loss_mask, terminal, gamma=0.5)
    torch.testing.assert_close(rewards, torch.tensor([[-math.log(2.0), math.log(3.0)]]))


def _analytic_grad(logits, labels, loss_mask, terminal, td_weight, gamma, mle_weight):
    """dL/dl_t = A_t onehot(a_t) + B_t p_t with A_t = -mle + 2 lam r_t (0 TD part if t has no TD term) and
    B_t = mle - 2 lam gamma r_{t-1} (only if t-1 is a non-terminal response token), all over the token count."""
    Tn = logits.shape[1]
    p = torch.softmax(logits[0], dim=-1)
    v = torch.logsumexp(logits[0], dim=-1)
    resp, term = loss_mask[0], terminal[0]
    q = logits[0].gather(-1, torch.where(resp, labels[0], 0).unsqueeze(-1)).squeeze(-1)
    grad = torch.zeros_like(logits[0])
    r = torch.zeros(Tn)
    has_td = torch.zeros(Tn, dtype=torch.bool)
    for t in range(Tn):
        if resp[t] and term[t]:
            r[t], has_td[t] = q[t], True
        elif resp[t] and t + 1 < Tn and resp[t + 1]:
            r[t], has_td[t] = q[t] - gamma * v[t + 1], True
    for t in range(Tn):
        if not resp[t]:
            continue
        A = -mle_weight + (2 * td_weight * r[t] if has_td[t] else 0.0)
        Bc = mle_weight
        if t > 0 and resp[t - 1] and not term[t - 1]:
            Bc = Bc - 2 * td_weight * gamma * r[t - 1]
        grad[t] = Bc * p[t]
        grad[t, labels[0, t]] += A
    return (grad / resp.sum()).unsqueeze(0)


@pytest.mark.parametrize(
    "rows,mle_weight",
    [
        ([(0, 7, True)], 1.0),  # all response, EOS-terminated (docs/iq_learn.md A/B formula as written)
        ([(2, 5, False)], 0.5),  # prompt then a response truncated at the last column
        ([(1, 4, True)], 1.0),  # prompt, EOS, padding
    ],
)
def test_gradient_formula(rows, mle_weight):
    gen = torch.Generator().manual_seed(3)
    seq_len = 7
    loss_mask, terminal = make_masks(rows, seq_len)
    labels = make_labels(loss_mask, gen, vocab=10)
    logits = torch.randn(1, seq_len, 10, generator=gen, dtype=torch.float64).requires_grad_(True)
    td_weight, gamma = 0.3, 0.9
    loss, _ = iq_learn_loss(
        logits, labels, loss_mask, terminal, td_weight=td_weight, gamma=gamma, mle_weight=mle_weight
    )
    loss.backward()
    expected = _analytic_grad(logits.detach().float(), labels, loss_mask, terminal, td_weight, gamma, mle_weight)
    torch.testing.assert_close(logits.grad.float(), expected, rtol=1e-5, atol=1e-6)


def test_token_rewards_match_reference_and_telescope():
    gen = torch.Generator().manual_seed(4)
    loss_mask, terminal = make_masks()
    labels = make_labels(loss_mask, gen)
    logits = 2.0 * torch.randn(B, T, V, generator=gen)
    for gamma in (1.0, 0.9):
        rewards = token_rewards(logits, labels, loss_mask, terminal, gamma=gamma)
        ref = reference_rewards(logits, labels, loss_mask, terminal, gamma)
        torch.testing.assert_close(rewards.double(), ref, rtol=1e-5, atol=1e-5)
        assert rewards[~loss_mask].abs().max() == 0

    rewards = token_rewards(logits, labels, loss_mask, terminal, gamma=1.0)
    logp = torch.log_softmax(logits.double(), dim=-1)
    for b, (p, n, eos) in enumerate(ROWS):
        if not eos or n == 0 or any(row == b for row, _ in MID_TERMINALS):
            continue
        seq_logp = sum(logp[b, t, labels[b, t]] for t in range(p, p + n))
        v0 = torch.logsumexp(logits[b, p].double(), dim=0)
        assert rewards[b].sum().item() == pytest.approx(float(seq_logp + v0), abs=1e-4)
    # the truncated last token's reward is undefined, reported as 0
    assert rewards[1, T - 1] == 0 and rewards[3, 1 + 6 - 1] == 0


def test_iq_token_terms_masks():
    loss_mask, terminal = make_masks()
    q = torch.randn(B, T)
    v = torch.randn(B, T)
    terms = iq_token_terms(q, v, loss_mask, terminal, gamma=0.9)
    expected_td = loss_mask.clone()
    expected_td[1, T - 1] = False  # truncated at the last column
    expected_td[3, 6] = False  # truncated before padding
    assert torch.equal(terms.td_mask, expected_td)
    assert torch.all(terms.next_values[terminal] == 0)
    torch.testing.assert_close(terms.rewards[7, 4], q[7, 4])  # terminal wins over a following response token
    torch.testing.assert_close(terms.rewards[7, 3], q[7, 3] - 0.9 * v[7, 4])
    assert torch.all(terms.log_probs[~loss_mask] == 0) and torch.all(terms.rewards[~terms.td_mask] == 0)
    stats = iq_stats(terms, loss_mask)
    assert "entropy" not in stats
    empty = iq_stats(terms, torch.zeros_like(loss_mask))
    assert empty["nll"] == 0.0 and empty["value"] == 0.0


# ----------------------------------------------------------------------------------------------------------------
# Fused loss
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gamma,td_weight,mle_weight", GRID)
def test_fused_matches_reference_fp32(gamma, td_weight, mle_weight):
    gen = torch.Generator().manual_seed(5)
    loss_mask, terminal = make_masks()
    labels = make_labels(loss_mask, gen)
    h0 = torch.randn(B, T, H, generator=gen)
    w0 = torch.randn(V, H, generator=gen) / math.sqrt(H) * 2

    n_resp = int(loss_mask.sum())
    chunk = 5
    assert n_resp > chunk and n_resp % chunk != 0

    hidden = h0.clone().requires_grad_(True)
    weight = w0.clone().requires_grad_(True)
    loss, stats = fused_iq_learn_loss(
        hidden, weight, labels, loss_mask, terminal,
        td_weight=td_weight, gamma=gamma, mle_weight=mle_weight, chunk_size=chunk,
    )
    loss.backward()

    rh = h0.double().requires_grad_(True)
    rw = w0.double().requires_grad_(True)
    ref = reference_loss(rh @ rw.T, labels, loss_mask, terminal, td_weight, gamma, mle_weight)
    ref.backward()

    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden.grad.double(), rh.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weight.grad.double(), rw.grad, rtol=1e-5, atol=1e-5)

    # same stats as the plain loss on materialised logits
    _, plain_stats = iq_learn_loss(
        h0 @ w0.T, labels, loss_mask, terminal, td_weight=td_weight, gamma=gamma, mle_weight=mle_weight
    )
    assert set(stats) == set(plain_stats)
    for k in stats:
        assert stats[k] == pytest.approx(plain_stats[k], rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("chunk_size", [1, 3, 4096])
def test_fused_equals_plain_any_chunk(chunk_size):
    gen = torch.Generator().manual_seed(6)
    loss_mask, terminal = make_masks()
    labels = make_labels(loss_mask, gen)
    h0 = torch.randn(B, T, H, generator=gen)
    w0 = torch.randn(V, H, generator=gen)

    hidden, weight = h0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
    loss, _ = fused_iq_learn_loss(
        hidden, weight, labels, loss_mask, terminal, td_weight=0.1, gamma=1.0, chunk_size=chunk_size
    )
    loss.backward()

    ph, pw = h0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
    ploss, _ = iq_learn_loss(ph @ pw.T, labels, loss_mask, terminal, td_weight=0.1, gamma=1.0)
    ploss.backward()
    torch.testing.assert_close(loss, ploss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden.grad, ph.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weight.grad, pw.grad, rtol=1e-5, atol=1e-5)


def test_fused_bf16_close_to_fp32_reference():
    gen = torch.Generator().manual_seed(7)
    loss_mask, terminal = make_masks()
    labels = make_labels(loss_mask, gen)
    h0 = torch.randn(B, T, H, generator=gen).bfloat16()
    w0 = (torch.randn(V, H, generator=gen) / math.sqrt(H) * 2).bfloat16()

    hidden, weight = h0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
    loss, _ = fused_iq_learn_loss(
        hidden, weight, labels, loss_mask, terminal, td_weight=0.1, gamma=0.9, chunk_size=4
    )
    loss.backward()
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.bfloat16

    rh = h0.double().requires_grad_(True)
    rw = w0.double().requires_grad_(True)
    ref = reference_loss(rh @ rw.T, labels, loss_mask, terminal, 0.1, 0.9, 1.0)
    ref.backward()
    assert rel_err(loss, ref) < 2e-2
    assert rel_err(hidden.grad, rh.grad) < 2e-2
    assert rel_err(weight.grad, rw.grad) < 2e-2


def test_linear_q_and_v_op():
    gen = torch.Generator().manual_seed(8)
    h0 = torch.randn(3, 9, H, generator=gen, dtype=torch.float64)
    w0 = torch.randn(V, H, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, V, (3, 9), generator=gen)
    labels[0, :2] = -100  # invalid labels: q = 0, no one-hot gradient

    hidden, weight = h0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
    q, v, ent = linear_q_and_v(hidden, weight, labels, chunk_size=7, return_entropy=True)
    assert q.shape == v.shape == ent.shape == (3, 9) and q.dtype == torch.float32
    assert not ent.requires_grad
    dq, dv = torch.randn(3, 9, generator=gen), torch.randn(3, 9, generator=gen)
    ((q * dq).sum() + (v * dv).sum()).backward()

    rh, rw = h0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
    logits = rh @ rw.T
    valid = labels >= 0
    rq = torch.where(valid, logits.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1), 0.0)
    rv = torch.logsumexp(logits, -1)
    rent = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
    ((rq * dq).sum() + (rv * dv).sum()).backward()
    torch.testing.assert_close(q.double(), rq.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v.double(), rv.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double(), rent.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden.grad, rh.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weight.grad, rw.grad, rtol=1e-5, atol=1e-5)

    # only v used, frozen weight (q gets a zero gradient, no weight gradient is computed)
    hidden = h0.clone().requires_grad_(True)
    q, v = linear_q_and_v(hidden, w0, labels, chunk_size=4)
    v.sum().backward()
    rh = h0.clone().requires_grad_(True)
    torch.logsumexp(rh @ w0.T, -1).sum().backward()
    torch.testing.assert_close(hidden.grad, rh.grad, rtol=1e-5, atol=1e-5)


def _saved_numels(fn):
    numels = []

    def pack(x):
        numels.append(x.numel())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = fn()
    return out, numels


def test_fused_never_saves_full_logits():
    gen = torch.Generator().manual_seed(9)
    loss_mask, terminal = make_masks()
    labels = make_labels(loss_mask, gen)
    hidden = torch.randn(B, T, H, generator=gen, requires_grad=True)
    weight = torch.randn(V, H, generator=gen, requires_grad=True)
    n_tokens = B * T
    assert n_tokens * V > max(n_tokens * H, V * H)

    # sanity: the hook sees the [N, V] tensors the plain path saves
    _, plain = _saved_numels(
        lambda: iq_learn_loss(hidden @ weight.T, labels, loss_mask, terminal, td_weight=0.1)[0]
    )
    assert max(plain) >= n_tokens * V

    (q, v), op = _saved_numels(lambda: linear_q_and_v(hidden, weight, labels.clamp(min=0), chunk_size=3))
    assert max(op) < n_tokens * V
    (q.sum() + v.sum()).backward()

    n_resp = int(loss_mask.sum())
    loss, fused = _saved_numels(
        lambda: fused_iq_learn_loss(hidden, weight, labels, loss_mask, terminal, td_weight=0.1, chunk_size=3)[0]
    )
    assert max(fused) < n_resp * V
    loss.backward()


def test_fused_empty_response():
    hidden = torch.randn(2, 4, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    labels = torch.full((2, 4), -100)
    mask = torch.zeros(2, 4, dtype=torch.bool)
    loss, stats = fused_iq_learn_loss(hidden, weight, labels, mask, mask, td_weight=0.1)
    loss.backward()
    assert loss.item() == 0.0 and stats["nll"] == 0.0
    assert hidden.grad.abs().max() == 0 and weight.grad.abs().max() == 0
