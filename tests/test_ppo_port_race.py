"""run_ppo runs OpenRLHF's PPO again when the run lost a port race (EADDRINUSE: OpenRLHF picks a free port, closes it,
binds it later), once by default, and never for any other failure. The subprocess is a stand-in here; the real runs
are in test_ppo_cpu.py."""

from __future__ import annotations

import subprocess

import pytest

import openrlhf_irl.afd.ppo as ppo

RACE = ("error: PPO failed: RayTaskError(DistNetworkError): torch.distributed.DistNetworkError: The server socket has "
        "failed to listen on any local network address. port: 53199, useIpv6: false, code: -98, name: EADDRINUSE")


@pytest.fixture
def runs(monkeypatch, tmp_path):
    outcomes, calls = [], []

    def fake_run(argv, **kwargs):
        calls.append(argv)
        code, stderr = outcomes.pop(0)
        (tmp_path / "out" / "policy").mkdir(parents=True, exist_ok=True)  # what a run leaves behind
        return subprocess.CompletedProcess(argv, code, stdout=None, stderr=stderr)

    monkeypatch.setattr(ppo.subprocess, "run", fake_run)
    monkeypatch.setattr(ppo, "read_logs", lambda path: [{"reward": 0.5}])
    return outcomes, calls, tmp_path / "out"


def _run(out, **kw):
    return ppo.run_ppo("sft", ["p"] * 8, str(out), reward_model="rm", steps=2, prompts_per_step=4, **kw)


def test_a_lost_port_race_runs_again_and_the_second_run_counts(runs, capsys):
    outcomes, calls, out = runs
    outcomes += [(1, RACE), (0, "")]
    result = _run(out)
    assert len(calls) == 2 and calls[0] == calls[1] and result.logs == [{"reward": 0.5}]
    assert "EADDRINUSE" in capsys.readouterr().out


def test_other_failures_and_a_second_lost_race_raise(runs):
    outcomes, calls, out = runs
    outcomes += [(1, "error: reward model not found")]
    with pytest.raises(RuntimeError, match="reward model not found"):
        _run(out)
    assert len(calls) == 1
    outcomes += [(1, RACE), (1, RACE)]
    with pytest.raises(RuntimeError, match="EADDRINUSE"):
        _run(out)
    assert len(calls) == 3
    outcomes += [(1, RACE)]
    with pytest.raises(RuntimeError, match="EADDRINUSE"):
        _run(out, port_retries=0)
    assert len(calls) == 4


def test_lost_port_race_reads_both_spellings():
    assert ppo.lost_port_race(RACE) and ppo.lost_port_race("OSError: [Errno 98] Address already in use")
    assert not ppo.lost_port_race("error: out of memory") and not ppo.lost_port_race(None)
