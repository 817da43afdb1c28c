"""vLLM's AMX kernels and Linux's AMX permission (:mod:`openrlhf_irl.compat.vllm_amx`): every vLLM process asks for
the AMX state before its first kernel, and where Linux refuses it vLLM runs its AVX-512 kernels instead of dying with
SIGILL. Each case is a fresh process (``helpers.amx_probe``): the permission is per process and only ever granted."""

from __future__ import annotations

import json
import signal

import pytest
from helpers import TESTS, run_python

from openrlhf_irl.compat.param_dtype import cpu_flags
from openrlhf_irl.compat.vllm_amx import GRANTED, NO_AMX, REFUSED, ensure_amx_permission

needs_amx = pytest.mark.skipif("amx_tile" not in (cpu_flags() or set()), reason="this CPU has no AMX")


@pytest.mark.parametrize("amx, granted, outcome", [(False, False, NO_AMX), (True, True, GRANTED),
                                                     (True, False, REFUSED)])
def test_ensure_amx_permission_tells_vllm_no_amx_only_when_refused(monkeypatch, amx, granted, outcome):
    """On any CPU: the three outcomes, with torch's probe and request stubbed (the real ones: the tests below)."""
    import torch

    requests = []
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_amx_fp16_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_init_amx", lambda: requests.append(1) or granted)
    assert ensure_amx_permission() == outcome
    assert requests == ([1] if amx else [])
    assert torch.cpu._is_amx_tile_supported() is (outcome == GRANTED)
    assert torch.cpu._is_amx_fp16_supported() is (outcome == GRANTED)


def _probe(*args: str, compat: bool = True, timeout: int = 300):
    env = {"PYTHONPATH": str(TESTS), "OPENRLHF_IRL_COMPAT": "1" if compat else "0"}
    proc = run_python(["-m", "helpers.amx_probe", *args], env=env, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("AMX_PROBE ")]
    report = json.loads(lines[-1].split(" ", 1)[1]) if lines else None
    return proc, report


@needs_amx
def test_vllm_processes_hold_amx_permission_before_any_model_runs(vllm_ready):
    proc, report = _probe("plugin")
    assert report is not None, proc.stderr[-4000:]
    assert report == {"permitted_at_start": False, "attention_isa_bf16": "amx", "permitted": True,
                      "amx_reported": True}
    # without the plugin's request nothing in loading vLLM asks for it: the first model run would
    proc, off = _probe("plugin", compat=False)
    assert off is not None, proc.stderr[-4000:]
    assert off["permitted"] is False and off["attention_isa_bf16"] == "amx"


@needs_amx
def test_refused_amx_permission_turns_vllm_to_its_avx512_kernels(vllm_ready):
    proc, report = _probe("plugin", "--small-altstack")
    assert report is not None, proc.stderr[-4000:]
    assert report == {"permitted_at_start": False, "attention_isa_bf16": "vec", "permitted": False,
                      "amx_reported": False}


@needs_amx
@pytest.mark.slow
def test_bf16_engine_without_amx_permission_samples_instead_of_dying(tiny_model, vllm_ready):
    proc, report = _probe("generate", tiny_model, "--small-altstack")
    assert proc.returncode == 0 and report is not None, proc.stderr[-4000:]
    assert report["tokens"] == [6, 6] and report["permitted"] is False
    # the same engine without the layer: vLLM's AMX attention runs without permission and Linux kills it
    proc, report = _probe("generate", tiny_model, "--small-altstack", compat=False)
    assert proc.returncode == -signal.SIGILL and report is None, (proc.returncode, proc.stderr[-2000:])
