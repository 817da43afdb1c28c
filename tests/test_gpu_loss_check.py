"""benchmarks/gpu_loss_check.py in --smoke mode (tiny shapes, CPU): every op passes against its float64 truth, the
report files are written, and a truth with the cut-row bootstrap deleted makes every fp32 check fail."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import gpu_loss_check as glc  # noqa: E402


def test_smoke_passes_and_writes_reports(tmp_path):
    lines = []
    rc = glc.main(["--smoke", "--device", "cpu", "--out", str(tmp_path)], log=lines.append)
    assert rc == 0, "\n".join(lines)
    rep = json.loads((tmp_path / "gpu-loss-cpu-smoke.json").read_text())
    assert rep["correctness_pass"] and len(rep["correctness"]) == 5
    for case in rep["correctness"]:
        assert set(case["ops"]) == {"single", "two_pass", "plain"} and all(r["pass"] for r in case["ops"].values())
    (speed,) = rep["speed"]
    assert set(speed["rows"]) == {"iq_fused", "iq_fused_two_pass", "mle_fused", "mle_plain", "iq_plain",
                                  "iq_fused_no_entropy"}
    assert speed["profile"] is None  # the profiler runs only on CUDA (or with --profile)
    assert speed["rows"]["mle_fused"]["time_ratio_vs_mle_fused"] == 1.0
    assert max(speed["loss_sanity"].values()) < 1e-5  # fused = plain loss, IQ and MLE
    assert "**Correctness: PASS**" in (tmp_path / "gpu-loss-cpu-smoke.md").read_text()


def test_check_fails_when_the_truth_drops_the_bootstrap(tmp_path, monkeypatch):
    table = glc.next_state_table

    def no_bootstrap(mask, term, cut):
        return table(mask, term, cut & False)

    monkeypatch.setattr(glc, "next_state_table", no_bootstrap)
    lines = []
    assert glc.main(["--smoke", "--device", "cpu", "--skip-speed", "--out", str(tmp_path)], log=lines.append) == 1
    rep = json.loads((tmp_path / "gpu-loss-cpu-smoke.json").read_text())
    fp32 = [c for c in rep["correctness"] if " fp32 " in c["name"]]
    assert len(fp32) == 3 and not any(r["pass"] for c in fp32 for r in c["ops"].values())  # bf16's 2e-2 is looser
    # each fp32 check on its own catches it: loss, and both gradients under the scaled gradient criterion
    assert not any(r[k]["pass"] for c in fp32 for r in c["ops"].values() for k in ("loss", "grad_hidden", "grad_weight"))


def test_fp32_gradient_criterion_is_scaled_not_elementwise():
    """A gradient entry where large terms cancel (ref ~ 0) with an error at fp32 rounding of the tensor's scale
    passes (the elementwise rtol test, still reported, fails it); an error of 1e-3 of the largest entry fails."""
    import torch

    ref = torch.linspace(-258.0, 258.0, 1001, dtype=torch.float64)
    ref[500] = 1e-3  # a cancelled entry
    rounding = ref.clone()
    rounding[500] += 1.6e-4  # 6e-7 of max |ref|, as fp32 cuBLAS gave on the H100
    e = glc.errors(rounding, ref, 1e-4, 1e-5)
    assert not e["allclose"] and glc.fp32_pass("grad_weight", e)
    wrong = ref.clone()
    wrong[-1] *= 1 + 1e-3
    e = glc.errors(wrong, ref, 1e-4, 1e-5)
    assert not glc.fp32_pass("grad_weight", e)
    assert glc.fp32_pass("loss", glc.errors(torch.tensor(2.0 + 1e-6), torch.tensor(2.0), 1e-5, 1e-6))
    assert not glc.fp32_pass("loss", glc.errors(torch.tensor(2.0 + 1e-3), torch.tensor(2.0), 1e-5, 1e-6))


def test_single_pass_with_zero_B_rows_logs_entropy_and_keeps_gradients():
    """Reward-only weights make B_t = 0 on each sequence's first row: the sync-free op runs those rows with B_t = 1
    for the logged entropy and zeroes their gradient rows. Entropy and gradients against the float64 truth."""
    import torch

    from openrlhf_irl.losses.fused_iq_objective import IQTermWeights

    gen = torch.Generator().manual_seed(3)
    mask, term, cut, labels = glc.build_batch(12, 40, gen)
    kind, index = glc.next_state_table(mask, term, cut)
    weights = IQTermWeights(rewards=torch.randn(mask.shape, generator=gen) * mask)
    h0, w0 = torch.randn(mask.shape[0], 13, 16, generator=gen), torch.randn(40, 16, generator=gen) / 2
    rh, rw = h0.double().requires_grad_(True), w0.double().requires_grad_(True)
    ref, ref_ent = glc.truth(rh, rw, labels, mask, kind, index, weights, 0.9, glc.HeadTransform())
    ref.backward()
    hidden, weight = h0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
    loss, ent = glc.loss_single(hidden, weight, labels, mask, term, cut, weights, 0.9, glc.HeadTransform(), 5,
                                entropy_mask=mask)
    loss.backward()
    torch.testing.assert_close(ent.double(), ref_ent, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    for x, y in ((hidden.grad, rh.grad), (weight.grad, rw.grad)):
        assert glc.fp32_pass("grad", glc.errors(x, y))
