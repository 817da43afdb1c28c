"""The benchmark's fused-MLE baseline (benchmarks/fused_mle.py) equals plain cross-entropy: value and gradients."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from fused_mle import fused_linear_cross_entropy  # noqa: E402


@pytest.mark.parametrize("chunk", [1, 7, 1000])
@pytest.mark.parametrize("weighted", [False, True])
def test_fused_mle_equals_cross_entropy_fp32(chunk, weighted):
    gen = torch.Generator().manual_seed(chunk)
    n, h, v = 23, 16, 50
    h0, w0 = torch.randn(n, h, generator=gen), torch.randn(v, h, generator=gen) / 2
    labels = torch.randint(0, v, (n,), generator=gen)
    tw = torch.rand(n, generator=gen) if weighted else None
    hidden, weight = h0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
    loss = fused_linear_cross_entropy(hidden, weight, labels, tw, chunk_size=chunk)
    (2.5 * loss).backward()  # backward scales the gradients computed in forward

    rh, rw = h0.double().requires_grad_(True), w0.double().requires_grad_(True)
    ce = F.cross_entropy(rh @ rw.T, labels, reduction="none")
    ref = (ce * tw.double()).sum() if weighted else ce.mean()
    (2.5 * ref).backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hidden.grad.double(), rh.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(weight.grad.double(), rw.grad, rtol=1e-4, atol=1e-6)


def test_fused_mle_bf16_close():
    gen = torch.Generator().manual_seed(0)
    h0, w0 = torch.randn(40, 32, generator=gen), torch.randn(64, 32, generator=gen) / 4
    labels = torch.randint(0, 64, (40,), generator=gen)
    hidden, weight = h0.bfloat16().requires_grad_(True), w0.bfloat16().requires_grad_(True)
    fused_linear_cross_entropy(hidden, weight, labels, chunk_size=16).backward()
    assert hidden.grad.dtype == weight.grad.dtype == torch.bfloat16
    rh, rw = h0.bfloat16().double().requires_grad_(True), w0.bfloat16().double().requires_grad_(True)
    F.cross_entropy(rh @ rw.T, labels).backward()
    for got, ref in ((hidden.grad, rh.grad), (weight.grad, rw.grad)):
        assert float((got.double() - ref).norm() / ref.norm()) < 2e-2


@pytest.mark.slow
def test_benchmark_runs_on_a_tiny_config_and_reports_fused_ratios():
    """benchmarks/iq_vs_mle.py end to end on a tiny config: every row measured, the fused-MLE and fused IQ rows carry
    their ratios and targets, and the sanity losses agree (fused MLE = OpenRLHF MLE; fused IQ = plain IQ)."""
    import dataclasses

    import iq_vs_mle as bench

    cfg = dataclasses.replace(bench.CONFIGS["cpu-small"], name="tiny", vocab_size=512, hidden_size=64, num_heads=2,
                              num_kv_heads=2, intermediate_size=128, num_layers=1, batch_size=2, seq_len=32, steps=1,
                              warmup=0, fused_chunk_size=16)
    report = bench.run(cfg, seed=0, ablations=True, log=lambda *_: None)
    s = report["sanity"]
    assert s["mle_fused_loss"] == pytest.approx(s["mle_loss"], rel=1e-5)
    assert s["iq_fused_loss"] == pytest.approx(s["iq_plain_loss"], rel=1e-5)
    methods = report["methods"]
    assert methods["mle_fused"]["fused_time_ratio"] == 1.0 and methods["mle_fused"]["fused_memory_ratio"] == 1.0
    assert set(methods["iq_fused"]["targets"]) == {"time_ratio<=1.05", "memory<mle", "time/fused_mle<=1.05",
                                                   "memory/fused_mle<=1.05"}
    assert methods["iq_fused_two_pass"]["step_peak_bytes"] > 0
    text = bench.markdown(report)
    assert "time / fused MLE" in text and "IQ-Learn fused, single pass" in text
