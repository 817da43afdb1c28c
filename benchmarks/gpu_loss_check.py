#!/usr/bin/env python
"""The fused IQ-Learn loss on one device: correctness against float64, then lm_head-level time and memory.

Pure PyTorch (imports only ``openrlhf_irl.losses`` and ``benchmarks/fused_mle.py``), so it runs on a CUDA machine
without transformers/OpenRLHF. ``--smoke``: tiny shapes, any device (CPU), a few seconds.

1. Correctness. Batches with prompt and padding positions, EOS-terminated rows, a row cut by the length limit
   (bootstrapped: V' = V of the state after its last token), a row whose last token has no TD term, an empty row, a
   one-token row and a two-turn row. Loss value and the gradients wrt hidden states and lm_head weight of

     single    ``linear_iq_objective`` (single pass, gradients in forward; the trainer's default)
     two_pass  ``masked_linear_q_and_v`` (logits recomputed in backward) + ``iq_token_terms`` + ``iq_weighted_loss``
     plain     full logits T(h W^T).float() + ``logits_q_and_v`` + ``iq_token_terms`` + ``iq_weighted_loss``

   against the truth: the loss written out here from its equation on float64 logits of the same (dtype-rounded)
   inputs, differentiated by autograd,

     L = sum_t m_t [w_lp (q_t - v_t) + w_v v_t + w_n V'_t] + td_t [w_r r_t + w_r2 r_t^2],  r_t = q_t - gamma V'_t

   with offline weights (w_lp = -w, w_r2 = lambda w, w = per-token normaliser) and online-term weights (all five
   random). Criteria, fp32: loss |x - ref| <= atol + 1e-5 |ref| (atol 1e-6 offline, 1e-5 online); each gradient
   tensor max |x - ref| <= 1e-4 max |ref| and ||x - ref|| / ||ref|| <= 1e-4 (a gradient entry is a sum over the
   vocabulary or the tokens whose terms can cancel, so its fp32 error scales with the tensor's size, not with the
   entry: an elementwise rtol fails on cancelled entries with no error to speak of; the elementwise numbers are
   still reported); bf16 norm-relative error ||x - ref|| / ||ref|| < 2e-2. The single pass's logged entropy
   against float64 (fp32 elementwise rtol = atol = 1e-5, bf16 atol 0.05).
2. Speed and memory at the lm_head level (hidden states [B, T, H] -> loss -> backward; no model body), bf16,
   Qwen2-0.5B head (H 896, V 151,936, 4 x 2,048 tokens) and a 32k-vocab head of the same width: fused IQ single
   pass, fused IQ two-pass, fused MLE (``benchmarks/fused_mle.py``), plain MLE (full logits + cross-entropy),
   plain IQ (full fp32 logits). Time: forward + backward between CUDA events, warm-up, then the median of
   ``--steps`` steps, methods interleaved round-robin. Memory: one extra step each, ``max_memory_allocated`` after
   ``reset_peak_memory_stats`` minus ``memory_allocated`` at its start (the step peak). Targets: IQ fused / fused
   MLE <= 1.05 in time and in step peak memory. Host syncs per step of every method (CUDA): one step under
   ``torch.cuda.set_sync_debug_mode("warn")``, counting its warnings.
3. Writes ``gpu-loss-<card>.json`` and ``.md`` into ``--out`` (atomically). Exit 1 if a correctness check fails,
   2 on bad usage (no CUDA without ``--smoke``).

Run: ``python benchmarks/gpu_loss_check.py --out DIR`` (CUDA), ``python benchmarks/gpu_loss_check.py --smoke --out DIR``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
for p in (str(HERE.parent), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fused_mle import fused_linear_cross_entropy  # noqa: E402
from openrlhf_irl.losses.fused_iq_objective import (  # noqa: E402
    HeadTransform, IQTermWeights, evenly_spaced_rows, iq_weighted_loss, linear_iq_objective)
from openrlhf_irl.losses.fused_linear_qv import masked_linear_q_and_v  # noqa: E402
from openrlhf_irl.losses.iq_learn import iq_per_token_loss, iq_token_terms, logits_q_and_v  # noqa: E402

TARGET = 1.05
BF16_TOL = 2e-2
FP32_NORM_TOL = 1e-4
FP32_GRAD_MAX_TOL = 1e-4  # max |x - ref| / max |ref| of a gradient tensor (fp32)
TD_WEIGHT = 0.1


# ---- batches --------------------------------------------------------------------------------------------------
def row_specs(t):
    """(segments [(start, length)], ending) per row for label width t; ending eos | cut | none (see module doc)."""
    return [
        ([(t // 8, t // 2)], "eos"),  # prompt, response, EOS, padding
        ([(t // 4, t - t // 4)], "cut"),  # cut at the last label column: bootstrap from hidden column t
        ([(t // 3, t - t // 3)], "eos"),  # EOS at the last label column
        ([(2, t // 2)], "none"),  # last token followed by non-agent tokens: no TD term
        ([(0, (2 * t) // 3)], "eos"),  # no prompt
        ([], "none"),  # no response at all
        ([(3, 1)], "eos"),  # one-token response
        ([(2, t // 4), (t // 2, t // 4)], "eos"),  # two assistant turns, a user turn between
    ]


def build_batch(t, vocab, gen, specs=None):
    """loss mask, terminal, cut [B, t] bool and labels [B, t] (-100 outside the response), on CPU."""
    specs = row_specs(t) if specs is None else specs
    b = len(specs)
    mask = torch.zeros(b, t, dtype=torch.bool)
    term, cut = torch.zeros_like(mask), torch.zeros_like(mask)
    for i, (segs, end) in enumerate(specs):
        for s, n in segs:
            assert n >= 1 and s + n <= t, (i, s, n, t)
            mask[i, s:s + n] = True
        if segs:
            last = segs[-1][0] + segs[-1][1] - 1
            term[i, last] = end == "eos"
            cut[i, last] = end == "cut"
    labels = torch.where(mask, torch.randint(0, vocab, (b, t), generator=gen), -100)
    return mask, term, cut, labels


def next_state_table(mask, term, cut):
    """Per response token, from the episode rules, by a loop over positions: kind 0 = no TD term, 1 = terminal
    (V' = 0), 2 = V' = v at ``index`` (the row's next response position, else t + 1 for a cut token)."""
    b_n, t_n = mask.shape
    kind = torch.zeros(b_n, t_n, dtype=torch.long)
    index = torch.zeros(b_n, t_n, dtype=torch.long)
    for b in range(b_n):
        pos = [t for t in range(t_n) if mask[b, t]]
        for k, t in enumerate(pos):
            if term[b, t]:
                kind[b, t] = 1
            elif k + 1 < len(pos):
                kind[b, t], index[b, t] = 2, pos[k + 1]
            elif cut[b, t]:
                kind[b, t], index[b, t] = 2, t + 1
    return kind, index


def make_weights(mask, kind, gen, online):
    m = mask.float()
    if not online:  # offline: w = per-token normaliser (not uniform, as OpenRLHF's can be), lambda = 0.3
        w = m * (0.5 + torch.rand(mask.shape, generator=gen)) / m.sum()
        return IQTermWeights(log_probs=-w, rewards_sq=0.3 * w)
    r = lambda: torch.randn(mask.shape, generator=gen) * m  # noqa: E731
    return IQTermWeights(log_probs=r(), rewards=r(), rewards_sq=r().abs(), values=r(), next_values=r())


# ---- the three implementations and the truth -------------------------------------------------------------------
def pad_col(x, value):
    return F.pad(x, (0, 1), value=value)


def loss_single(hidden, weight, labels, mask, term, cut, weights, gamma, head, chunk, entropy_mask=None):
    out = linear_iq_objective(hidden, weight, labels, mask, term, weights, gamma=gamma, head=head, chunk_size=chunk,
                              bootstrap_mask=cut, entropy_mask=entropy_mask)
    return out.loss, out.entropy


def two_pass_qv(hidden, weight, labels, mask, cut, head, chunk):
    """(q, v, bootstrap values) [B, T] of the response rows and of the state after each cut token, two-pass op."""
    width = mask.shape[1]
    rows = pad_col(mask, False)
    rows[:, 1:] |= pad_col(cut, False)[:, :-1]
    q, v = masked_linear_q_and_v(hidden[:, :width + 1], weight, pad_col(labels, -100), rows, chunk, head=head)
    return q[:, :width], v[:, :width], torch.where(cut, v[:, 1:width + 1], 0.0)


def plain_qv(hidden, weight, labels, mask, cut, head):
    """The same from full logits [B, T + 1, V] fp32, as the plain trainer path holds them."""
    width = mask.shape[1]
    logits = head.apply((hidden[:, :width + 1] @ weight.t()).float())
    q, v = logits_q_and_v(logits, pad_col(labels, -100), pad_col(mask, False))
    return q[:, :width], v[:, :width], torch.where(cut, v[:, 1:width + 1], 0.0)


def weighted(qvb, mask, term, cut, weights, gamma):
    q, v, boot_v = qvb
    terms = iq_token_terms(q, v, mask, term, gamma=gamma, bootstrap_mask=cut, bootstrap_values=boot_v)
    return iq_weighted_loss(terms, weights)


def loss_two_pass(hidden, weight, labels, mask, term, cut, weights, gamma, head, chunk):
    return weighted(two_pass_qv(hidden, weight, labels, mask, cut, head, chunk), mask, term, cut, weights, gamma)


def loss_plain(hidden, weight, labels, mask, term, cut, weights, gamma, head, chunk=None):
    return weighted(plain_qv(hidden, weight, labels, mask, cut, head), mask, term, cut, weights, gamma)


def truth(h64, w64, labels, mask, kind, index, weights, gamma, head):
    """L from its equation on float64 logits (no package code but ``HeadTransform.apply``), and the entropy."""
    width = mask.shape[1]
    logits = head.apply(h64[:, :width + 1] @ w64.t())
    v_all = torch.logsumexp(logits, -1)
    q = logits[:, :width].gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    v = v_all[:, :width]
    v_next = torch.where(kind == 2, v_all.gather(1, index), 0.0)
    td = (kind > 0) & mask
    r = q - gamma * v_next
    m = mask.double()
    z = lambda x: 0.0 if x is None else x.double()  # noqa: E731
    w = [z(x) for x in weights]
    loss = (m * (w[0] * (q - v) + w[3] * v + w[4] * v_next)).sum() + (td.double() * (w[1] * r + w[2] * r * r)).sum()
    with torch.no_grad():
        lg = logits[:, :width][mask]
        ent = -(torch.softmax(lg, -1) * torch.log_softmax(lg, -1)).sum(-1)
    return loss, ent


# ---- error metrics ---------------------------------------------------------------------------------------------
def errors(x, ref, rtol=None, atol=None):
    d = (x.detach().double() - ref.detach().double())
    ref_abs = ref.detach().double().abs()
    out = {
        "max_abs": float(d.abs().max()) if d.numel() else 0.0,
        "max_abs_over_max_ref": float(d.abs().max() / ref_abs.max().clamp(min=1e-300)) if d.numel() else 0.0,
        "norm_rel": float(d.norm() / ref.detach().double().norm().clamp(min=1e-300)),
    }
    if rtol is not None:
        excess = d.abs() - (atol + rtol * ref_abs)
        out["allclose"] = bool((excess <= 0).all())
        out["allclose_violations"] = int((excess > 0).sum())
        # the smallest rtol that would pass with this atol (how far inside the tolerance it is)
        need = ((d.abs() - atol).clamp(min=0) / ref_abs.clamp(min=1e-300))
        out["rtol_needed"] = float(need.max()) if d.numel() else 0.0
    return out


def fp32_pass(key, e):
    """The fp32 criterion on ``errors`` output. The loss is a scalar: its elementwise test is its relative error.
    A gradient tensor is matmul-reduced (entries are sums over the vocabulary or the tokens, whose terms can cancel):
    its error is judged against the tensor's scale, max and norm, not entry by entry."""
    if key == "loss":
        return e["allclose"] and e["norm_rel"] <= FP32_NORM_TOL
    return e["max_abs_over_max_ref"] <= FP32_GRAD_MAX_TOL and e["norm_rel"] <= FP32_NORM_TOL


def check_case(case, device, log):
    """One shape x dtype x weights x head: each op vs the float64 truth, and op vs op."""
    gen = torch.Generator().manual_seed(case["seed"])
    t, hid, voc, dtype = case["T"], case["H"], case["V"], case["dtype"]
    head = HeadTransform(**case.get("head", {}))
    mask, term, cut, labels = build_batch(t, voc, gen)
    kind, index = next_state_table(mask, term, cut)
    weights = make_weights(mask, kind, gen, case["online"])
    h0 = torch.randn(mask.shape[0], t + 1, hid, generator=gen) * case.get("h_scale", 1.0)
    w0 = torch.randn(voc, hid, generator=gen) / math.sqrt(hid) * 2
    dev = lambda x: x.to(device)  # noqa: E731
    mask, term, cut, labels, kind, index = map(dev, (mask, term, cut, labels, kind, index))
    weights = IQTermWeights(*(None if x is None else dev(x) for x in weights))
    h_in, w_in = dev(h0).to(dtype), dev(w0).to(dtype)  # the inputs every op and the truth see

    rh, rw = h_in.double().requires_grad_(True), w_in.double().requires_grad_(True)
    ref, ref_ent = truth(rh, rw, labels, mask, kind, index, weights, case["gamma"], head)
    ref.backward()
    ref_vals = (ref.detach(), rh.grad, rw.grad)
    del rh, rw

    fp32 = dtype == torch.float32
    atol = 1e-5 if case["online"] else 1e-6
    tols = [(1e-5, atol), (1e-4, atol), (1e-4, atol)]
    ops = {"single": loss_single, "two_pass": loss_two_pass, "plain": loss_plain}
    got, result = {}, {"name": case["name"], "ops": {}, "pairs": {}}
    for name, fn in ops.items():
        hidden, weight = h_in.clone().requires_grad_(True), w_in.clone().requires_grad_(True)
        args = (hidden, weight, labels, mask, term, cut, weights, case["gamma"], head, case["chunk"])
        if name == "single":
            loss, ent = fn(*args, entropy_mask=mask)
        else:
            loss, ent = fn(*args), None
        loss.backward()
        vals = (loss.detach(), hidden.grad, weight.grad)
        got[name] = vals
        r = {}
        ok = True
        for key, x, y, (rt, at) in zip(("loss", "grad_hidden", "grad_weight"), vals, ref_vals, tols):
            if fp32:
                e = errors(x, y, rt, at)
                e["pass"] = fp32_pass(key, e)
            else:
                e = errors(x, y)
                e["pass"] = e["norm_rel"] < BF16_TOL
            ok &= e["pass"]
            r[key] = e
        if ent is not None:
            et = (1e-5, 1e-5) if fp32 else (0.0, 0.05)
            e = errors(ent, ref_ent, *et)
            e["pass"] = e["allclose"]
            ok &= e["pass"]
            r["entropy"] = e
        r["pass"] = ok
        r["loss_value"] = float(vals[0])
        result["ops"][name] = r
        del hidden, weight, loss
    for a, b in (("single", "two_pass"), ("single", "plain"), ("two_pass", "plain")):
        result["pairs"][f"{a}-{b}"] = {k: errors(x, y) for k, x, y in zip(("loss", "grad_hidden", "grad_weight"),
                                                                           got[a], got[b])}
    result["truth_loss"] = float(ref_vals[0])
    result["pass"] = all(r["pass"] for r in result["ops"].values())
    result["criteria"] = ("fp32: loss |x - ref| <= %g + 1e-5 |ref|; grads max|x - ref| / max|ref| <= %g and "
                          "norm_rel <= %g; entropy elementwise rtol=atol=1e-5"
                          % (atol, FP32_GRAD_MAX_TOL, FP32_NORM_TOL)) if fp32 else (
        "bf16: norm_rel < %g (loss, grads); entropy atol 0.05" % BF16_TOL)
    for name, r in result["ops"].items():
        log(f"  {case['name']:<34} {name:<9} loss {_fmt(r, 'loss')} | dh {_fmt(r, 'grad_hidden')} | "
            f"dW {_fmt(r, 'grad_weight')}" + (f" | ent {_fmt(r, 'entropy')}" if "entropy" in r else "")
            + f"  {'PASS' if r['pass'] else 'FAIL'}")
    return result


def _fmt(r, key):
    e = r[key]
    return f"max_abs {e['max_abs']:.2e} /max|ref| {e['max_abs_over_max_ref']:.1e} norm_rel {e['norm_rel']:.2e}"


def correctness_cases(smoke):
    if smoke:
        shapes = [dict(tag="tiny", T=12, H=16, V=40, chunk=5)]
    else:
        shapes = [dict(tag="32k", T=96, H=256, V=32000, chunk=100),
                  dict(tag="qwen2-head", T=128, H=896, V=151936, chunk=256)]
    cases = []
    seed = 0
    for s in shapes:
        dims = {k: v for k, v in s.items() if k != "tag"}
        for dtype, dn in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
            for online, gamma in ((False, 0.9), (True, 1.0)):
                seed += 1
                cases.append(dict(name=f"{s['tag']} {dn} {'online' if online else 'offline'} gamma {gamma}",
                                  dtype=dtype, online=online, gamma=gamma, seed=seed, **dims))
        seed += 1  # a soft-capped head (Gemma-2's transform), as in the CPU tests: cap 2, logits of a few units
        cases.append(dict(name=f"{s['tag']} fp32 offline softcap 2 gamma 1.0", dtype=torch.float32, online=False,
                          gamma=1.0, seed=seed, head=dict(softcap=2.0), h_scale=2.0, **dims))
    return cases


# ---- speed and memory ------------------------------------------------------------------------------------------
def speed_batch(b, t, gen, vocab):
    """Right-padded rows like OpenRLHF's SFT collate: prompt 15-35% of the row, response to EOS; the last row is
    cut at the length limit (bootstrapped). Labels width t - 1; hidden width t."""
    specs = []
    w = t - 1
    for i in range(b):
        p = int(w * (0.15 + 0.2 * torch.rand((), generator=gen).item()))
        if i == b - 1:
            specs.append(([(p, w - p)], "cut"))
        else:
            n = int((w - p) * (0.6 + 0.4 * torch.rand((), generator=gen).item()))
            specs.append(([(p, max(n, 1))], "eos"))
    return build_batch(w, vocab, gen, specs)


def methods(hidden, weight, labels, mask, term, cut, chunk):
    width = mask.shape[1]
    n = mask.sum().clamp(min=1)
    w = mask.float() / n
    weights = IQTermWeights(log_probs=-w, rewards_sq=TD_WEIGHT * w)
    ent_rows = evenly_spaced_rows(mask, 256)  # the trainer logs the entropy of 256 response tokens

    def iq_single(entropy_mask=ent_rows):
        return linear_iq_objective(hidden, weight, labels, mask, term, weights, gamma=1.0, chunk_size=chunk,
                                   bootstrap_mask=cut, entropy_mask=entropy_mask).loss

    def offline(qvb):  # the trainer's non-single-pass route: iq_per_token_loss, summed over the normaliser
        q, v, boot_v = qvb
        per_token, _ = iq_per_token_loss(q, v, mask, term, td_weight=TD_WEIGHT, gamma=1.0, bootstrap_mask=cut,
                                         bootstrap_values=boot_v)
        return per_token.sum() / n

    def iq_two_pass():
        return offline(two_pass_qv(hidden, weight, labels, mask, cut, HeadTransform(), chunk))

    def mle_fused():
        return fused_linear_cross_entropy(hidden[:, :width][mask], weight, labels[mask], chunk_size=chunk)

    def mle_plain():
        logits = hidden[:, :width] @ weight.t()
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)

    def iq_plain():
        return offline(plain_qv(hidden, weight, labels, mask, cut, HeadTransform()))

    return {"iq_fused": iq_single, "iq_fused_two_pass": iq_two_pass, "mle_fused": mle_fused, "mle_plain": mle_plain,
            "iq_plain": iq_plain, "iq_fused_no_entropy": lambda: iq_single(None)}


LABELS = {
    "iq_fused": "IQ fused, single pass (linear_iq_objective; entropy of 256 tokens)",
    "iq_fused_two_pass": "IQ fused, two-pass reference op (linear_q_and_v)",
    "mle_fused": "MLE fused (benchmarks/fused_mle.py)",
    "mle_plain": "MLE plain (full logits + F.cross_entropy)",
    "iq_plain": "IQ plain (full fp32 logits)",
    "iq_fused_no_entropy": "ablation: IQ fused, single pass, no entropy logged",
}


def speed(shape, device, steps, warmup, log, profile=False):
    gen = torch.Generator().manual_seed(1234)
    b, t, hid, voc, chunk = shape["B"], shape["T"], shape["H"], shape["V"], shape["chunk"]
    dtype = shape["dtype"]
    mask, term, cut, labels = (x.to(device) for x in speed_batch(b, t, gen, voc))
    hidden = (torch.randn(b, t, hid, generator=gen)).to(device, dtype).requires_grad_(True)
    weight = (torch.randn(voc, hid, generator=gen) / math.sqrt(hid) * 2).to(device, dtype).requires_grad_(True)
    fns = methods(hidden, weight, labels, mask, term, cut, chunk)
    cuda = device.type == "cuda"

    def step(fn):
        hidden.grad = weight.grad = None
        loss = fn()
        loss.backward()
        return loss

    def timed(fn):
        hidden.grad = weight.grad = None
        if cuda:
            torch.cuda.synchronize()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            step(fn)
            e.record()
            torch.cuda.synchronize()
            return s.elapsed_time(e)
        t0 = time.perf_counter()
        step(fn)
        return (time.perf_counter() - t0) * 1e3

    # same loss value across the methods (sanity): both IQ fused = IQ plain, MLE fused = MLE plain
    losses = {k: float(step(f).detach()) for k, f in fns.items()}
    for _ in range(warmup):
        for f in fns.values():
            timed(f)
    times = {k: [] for k in fns}
    keys = list(fns)
    for i in range(steps):
        for k in keys[i % len(keys):] + keys[:i % len(keys)]:
            times[k].append(timed(fns[k]))
    mem = {}
    for k, f in fns.items():
        hidden.grad = weight.grad = None
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step(f)
            torch.cuda.synchronize()
            mem[k] = {"step_peak": torch.cuda.max_memory_allocated() - base,
                      "peak": torch.cuda.max_memory_allocated(), "base": base}
        else:
            mem[k] = None
    hidden.grad = weight.grad = None
    syncs = count_syncs(fns, step, device)
    hidden.grad = weight.grad = None
    prof = profile_steps(fns, step, device, log) if profile else None
    rows = {}
    for k in fns:
        rows[k] = {"label": LABELS[k], "median_ms": statistics.median(times[k]), "min_ms": min(times[k]),
                   "times_ms": times[k], "loss": losses[k],
                   "step_peak_bytes": None if mem[k] is None else mem[k]["step_peak"],
                   "peak_bytes": None if mem[k] is None else mem[k]["peak"], "host_syncs_per_step": syncs[k]}
    ref = rows["mle_fused"]
    for k, r in rows.items():
        r["time_ratio_vs_mle_fused"] = r["median_ms"] / ref["median_ms"]
        r["min_time_ratio_vs_mle_fused"] = r["min_ms"] / ref["min_ms"]
        r["memory_ratio_vs_mle_fused"] = (None if r["step_peak_bytes"] is None
                                          else r["step_peak_bytes"] / ref["step_peak_bytes"])
    iq = rows["iq_fused"]
    targets = {"time": iq["time_ratio_vs_mle_fused"] <= TARGET}
    if iq["memory_ratio_vs_mle_fused"] is not None:
        targets["memory"] = iq["memory_ratio_vs_mle_fused"] <= TARGET
    sanity = {"iq_fused-iq_plain_rel": abs(losses["iq_fused"] - losses["iq_plain"]) / abs(losses["iq_plain"]),
              "iq_two_pass-iq_plain_rel": abs(losses["iq_fused_two_pass"] - losses["iq_plain"]) / abs(losses["iq_plain"]),
              "mle_fused-mle_plain_rel": abs(losses["mle_fused"] - losses["mle_plain"]) / abs(losses["mle_plain"])}
    res = {"shape": {k: (str(v) if k == "dtype" else v) for k, v in shape.items()},
           "response_tokens": int(mask.sum()), "rows": rows, "targets": targets, "loss_sanity": sanity,
           "profile": prof}
    log(f"  {shape['name']}: {int(mask.sum())} response tokens of {b * (t - 1)}")
    for k, r in rows.items():
        mib = "-" if r["step_peak_bytes"] is None else f"{r['step_peak_bytes'] / 2**20:,.0f} MiB"
        mr = "-" if r["memory_ratio_vs_mle_fused"] is None else f"{r['memory_ratio_vs_mle_fused']:.3f}"
        sy = "-" if r["host_syncs_per_step"] is None else r["host_syncs_per_step"]
        log(f"    {k:<18} median {r['median_ms']:8.2f} ms  min {r['min_ms']:8.2f} ms  step peak {mib:>12}"
            f"  time/fusedMLE {r['time_ratio_vs_mle_fused']:.3f}  mem/fusedMLE {mr}  host syncs {sy}")
    log(f"    IQ fused / fused MLE: time {iq['time_ratio_vs_mle_fused']:.3f} "
        f"({'PASS' if targets['time'] else 'FAIL'} <= {TARGET})"
        + ("" if "memory" not in targets else
           f", memory {iq['memory_ratio_vs_mle_fused']:.3f} ({'PASS' if targets['memory'] else 'FAIL'} <= {TARGET})"))
    del hidden, weight, fns
    if cuda:
        torch.cuda.empty_cache()
    return res


PROFILED = ("iq_fused", "iq_fused_no_entropy", "mle_fused")


def count_syncs(fns, step, device):
    """Host syncs of one step (forward + backward) of each method: the warnings of
    ``torch.cuda.set_sync_debug_mode("warn")`` (each synchronizing CUDA call warns once). None off CUDA."""
    out = {}
    for k, f in fns.items():
        if device.type != "cuda":
            out[k] = None
            continue
        torch.cuda.synchronize()
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    step(f)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            out[k] = sum("synchroniz" in str(w.message).lower() for w in caught)
        except Exception:  # noqa: BLE001 - a diagnostic; keep the measured numbers
            out[k] = None
    return out


def profile_steps(fns, step, device, log, n=3):
    """torch.profiler over ``n`` steps of the fused ops: GPU kernel time per step (the sum of the kernels' own
    times), host syncs per step, and the top ops, to tell GPU work from host-side stalls."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    out = {}
    for k in PROFILED:
        try:
            step(fns[k])
            if device.type == "cuda":
                torch.cuda.synchronize()
            with profile(activities=acts) as prof:
                for _ in range(n):
                    step(fns[k])
                if device.type == "cuda":
                    torch.cuda.synchronize()
            events = prof.key_averages()
            dev_self = lambda e: getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0))  # noqa
            kernel_us = sum(dev_self(e) for e in events if getattr(e, "device_type", None) is not None
                            and "CUDA" in str(e.device_type))
            if not kernel_us:  # older versions: device time is reported on the CPU-side ops; kernels are leaves
                kernel_us = sum(dev_self(e) for e in events)
            count = lambda name: sum(e.count for e in events if e.key == name) / n  # noqa: E731
            sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
            try:
                table = events.table(sort_by=sort, row_limit=15, max_name_column_width=60)
            except Exception:  # noqa: BLE001
                table = events.table(sort_by="self_device_time_total", row_limit=15, max_name_column_width=60)
            out[k] = {"kernel_ms_per_step": kernel_us / n / 1e3,
                      "stream_syncs_per_step": count("cudaStreamSynchronize"),
                      "memcpy_per_step": count("cudaMemcpyAsync"),
                      "kernel_launches_per_step": count("cudaLaunchKernel") + count("cuLaunchKernel")
                      + count("cuLaunchKernelEx"),
                      "cpu_ops_per_step": sum(e.count for e in events if not e.key.startswith("cuda")) / n,
                      "top_ops": table}
            log(f"    profile {k:<20} kernels {out[k]['kernel_ms_per_step']:.2f} ms/step, "
                f"{out[k]['stream_syncs_per_step']:.0f} stream syncs, {out[k]['kernel_launches_per_step']:.0f} "
                f"launches per step")
        except Exception as e:  # noqa: BLE001 - the profile is a diagnostic; keep the measured numbers
            out[k] = {"error": f"{type(e).__name__}: {e}"}
            log(f"    profile {k}: {out[k]['error']}")
    return out


def speed_shapes(smoke):
    if smoke:
        return [dict(name="tiny", B=2, T=65, H=32, V=512, chunk=48, dtype=torch.float32)]
    return [dict(name="Qwen2-0.5B head (H 896, V 151,936), 4 x 2,048, bf16", B=4, T=2048, H=896, V=151936,
                 chunk=1024, dtype=torch.bfloat16),
            dict(name="32k vocab (H 896, V 32,000), 4 x 2,048, bf16", B=4, T=2048, H=896, V=32000, chunk=1024,
                 dtype=torch.bfloat16)]


# ---- report ----------------------------------------------------------------------------------------------------
def card_tag(device):
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    for tag in ("h200", "h100", "a100", "l40s", "l4", "a10g", "v100", "t4"):
        if tag in name:
            return tag
    return "cuda"


def markdown(rep):
    env = rep["env"]
    out = [f"# Fused IQ-Learn loss on {env['device_name']}", "",
           f"`{rep['command']}` at {rep['time_utc']}; torch {env['torch']}, CUDA {env['cuda']}, "
           f"float32 matmul precision `{env['float32_matmul_precision']}` (TF32 off), bf16 reduced-precision "
           f"reductions {env['bf16_reduced_precision_reduction']}.", "",
           "## Correctness against float64", "",
           "Each op's loss and gradients against the loss written from its equation on float64 logits of the same "
           "(dtype-rounded) inputs. `max_abs` = max |x - ref|, `/max|ref|` = max_abs / max |ref|, `norm_rel` = "
           "||x - ref|| / ||ref||; `rtol_needed` (information only, not a criterion) = the smallest rtol with which "
           "an elementwise check |x - ref| <= atol + rtol |ref| would pass.", "",
           "| case | op | loss norm_rel | dh max_abs | dh /max\\|ref\\| | dh norm_rel | dh rtol_needed | dW max_abs | "
           "dW /max\\|ref\\| | dW norm_rel | dW rtol_needed | entropy max_abs | result |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    g = lambda e, k: "-" if e is None or k not in e else f"{e[k]:.2e}"  # noqa: E731
    for c in rep["correctness"]:
        for op, r in c["ops"].items():
            out.append(f"| {c['name']} | {op} | {g(r['loss'], 'norm_rel')} | {g(r['grad_hidden'], 'max_abs')} | "
                       f"{g(r['grad_hidden'], 'max_abs_over_max_ref')} | "
                       f"{g(r['grad_hidden'], 'norm_rel')} | {g(r['grad_hidden'], 'rtol_needed')} | "
                       f"{g(r['grad_weight'], 'max_abs')} | {g(r['grad_weight'], 'max_abs_over_max_ref')} | "
                       f"{g(r['grad_weight'], 'norm_rel')} | "
                       f"{g(r['grad_weight'], 'rtol_needed')} | {g(r.get('entropy'), 'max_abs')} | "
                       f"{'PASS' if r['pass'] else 'FAIL'} |")
    out += ["", "Criteria: " + "; ".join(sorted({c["criteria"] for c in rep["correctness"]})) + ".", "",
            "Op vs op (norm_rel of loss / dh / dW):", "", "| case | single vs two_pass | single vs plain | "
            "two_pass vs plain |", "|---|---|---|---|"]
    for c in rep["correctness"]:
        cells = ["{:.1e} / {:.1e} / {:.1e}".format(*(p[k]["norm_rel"] for k in ("loss", "grad_hidden", "grad_weight")))
                 for p in c["pairs"].values()]
        out.append(f"| {c['name']} | " + " | ".join(cells) + " |")
    out += ["", f"**Correctness: {'PASS' if rep['correctness_pass'] else 'FAIL'}**", "",
            "## Time and memory at the lm_head level", "",
            "Hidden states -> loss -> backward (no model body); time "
            + ("between CUDA events, " if env["device"].startswith("cuda") else "by the wall clock (CPU: no memory), ")
            + f"{rep['timing']['warmup']} warm-up rounds then the median of {rep['timing']['steps']} steps, methods "
            "interleaved; step peak = `max_memory_allocated` - `memory_allocated` at the step's start (one extra "
            "step). Ratios to fused MLE from the same run. Host syncs: one step under "
            "`torch.cuda.set_sync_debug_mode(\"warn\")`, its warnings counted.", ""]
    for s in rep["speed"]:
        out += [f"### {s['shape']['name']}", "", f"{s['response_tokens']} response tokens; chunk "
                f"{s['shape']['chunk']}.", "",
                "| method | median (ms) | min (ms) | step peak (MiB) | time / fused MLE | min time / fused MLE | "
                "memory / fused MLE | host syncs / step |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in s["rows"].values():
            mib = "-" if r["step_peak_bytes"] is None else f"{r['step_peak_bytes'] / 2**20:,.1f}"
            mr = "-" if r["memory_ratio_vs_mle_fused"] is None else f"{r['memory_ratio_vs_mle_fused']:.3f}"
            sy = "-" if r.get("host_syncs_per_step") is None else str(r["host_syncs_per_step"])
            out.append(f"| {r['label']} | {r['median_ms']:.2f} | {r['min_ms']:.2f} | {mib} | "
                       f"{r['time_ratio_vs_mle_fused']:.3f} | {r['min_time_ratio_vs_mle_fused']:.3f} | {mr} | {sy} |")
        t = s["targets"]
        out += ["", "IQ fused / fused MLE <= 1.05: " + ", ".join(f"{k} {'PASS' if v else 'FAIL'}" for k, v in t.items())
                + ". Loss agreement (relative): " + ", ".join(f"{k} {v:.1e}" for k, v in s["loss_sanity"].items()),
                ""]
        if s.get("profile"):
            out += ["Profile (torch.profiler, 3 steps each): GPU kernel time per step (sum of kernels' own times) "
                    "against the step time above, and host syncs per step.", "",
                    "| method | step median (ms) | kernels (ms/step) | kernels / step | stream syncs / step | "
                    "kernel launches / step |", "|---|---:|---:|---:|---:|---:|"]
            for k, p in s["profile"].items():
                if "error" in p:
                    out.append(f"| {k} | profile failed: {p['error']} | | | | |")
                    continue
                med = s["rows"][k]["median_ms"]
                out.append(f"| {k} | {med:.2f} | {p['kernel_ms_per_step']:.2f} | "
                           f"{p['kernel_ms_per_step'] / med:.2f} | {p['stream_syncs_per_step']:.0f} | "
                           f"{p['kernel_launches_per_step']:.0f} |")
            out.append("")
            for k, p in s["profile"].items():
                if "top_ops" in p:
                    out += [f"<details><summary>{k}: top ops</summary>", "", "```", p["top_ops"].rstrip(), "```",
                            "", "</details>", ""]
    return "\n".join(out) + "\n"


def write_atomic(path: Path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main(argv=None, log=print):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(HERE / "results"), help="output folder (default benchmarks/results)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes; runs on CPU")
    ap.add_argument("--device", default=None, help="cuda (default) or cpu (only with --smoke)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per method (default 20; smoke 2)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default 3; smoke 1)")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--profile", action=argparse.BooleanOptionalAction, default=None,
                    help="torch.profiler summary of the fused ops on the first speed shape (default: on with CUDA)")
    args = ap.parse_args(argv)
    steps = args.steps if args.steps is not None else (2 if args.smoke else 20)
    warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 3)
    if steps < 1 or warmup < 0:
        log("gpu_loss_check: --steps must be >= 1 and --warmup >= 0")
        return 2
    name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        log("gpu_loss_check: --device cuda but torch.cuda.is_available() is False")
        return 2
    if not name.startswith("cuda") and not args.smoke:
        log("gpu_loss_check: the full shapes need CUDA; use --smoke for a CPU run")
        return 2
    device = torch.device(name)
    if args.profile is None:
        args.profile = device.type == "cuda" and not args.smoke
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    t0 = time.time()
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "device": str(device), "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                                                  else platform.processor() or "cpu"),
           "float32_matmul_precision": torch.get_float32_matmul_precision(),
           "bf16_reduced_precision_reduction": getattr(torch.backends.cuda.matmul,
                                                                "allow_bf16_reduced_precision_reduction", None)}
    if device.type == "cuda":
        env["capability"] = list(torch.cuda.get_device_capability(device))
    log(f"gpu_loss_check on {env['device_name']} (torch {env['torch']}, cuda {env['cuda']})")
    log("correctness vs float64:")
    corr = [check_case(c, device, log) for c in correctness_cases(args.smoke)]
    if device.type == "cuda":
        torch.cuda.empty_cache()
    corr_pass = all(c["pass"] for c in corr)
    log(f"correctness: {'PASS' if corr_pass else 'FAIL'}")
    sp = []
    if not args.skip_speed:
        log(f"time and memory ({warmup} warm-up rounds, median of {steps}):")
        sp = [speed(s, device, steps, warmup, log, profile=args.profile and i == 0)
              for i, s in enumerate(speed_shapes(args.smoke))]
    rep = {"command": "python benchmarks/gpu_loss_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "time_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"), "env": env,
           "smoke": args.smoke, "correctness": corr, "correctness_pass": corr_pass,
           "timing": {"steps": steps, "warmup": warmup}, "speed": sp, "seconds": round(time.time() - t0, 1)}
    out = Path(args.out)
    stem = f"gpu-loss-{card_tag(device)}{'-smoke' if args.smoke else ''}"
    write_atomic(out / f"{stem}.json", json.dumps(rep, indent=1, default=str) + "\n")
    write_atomic(out / f"{stem}.md", markdown(rep))
    log(f"wrote {out / stem}.json and .md ({rep['seconds']} s); correctness {'PASS' if corr_pass else 'FAIL'}")
    return 0 if corr_pass else 1


if __name__ == "__main__":
    sys.exit(main())
