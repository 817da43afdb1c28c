"""utils.cache_dir: the checkout's outputs/.cache in a source tree, the per-user cache in an installed wheel."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

from helpers import REPO


def _load_as_installed(site: Path):
    """The module as a wheel installs it: <site-packages>/openrlhf_irl/utils/cache_dir.py, no pyproject.toml above."""
    target = site / "openrlhf_irl" / "utils" / "cache_dir.py"
    target.parent.mkdir(parents=True)
    shutil.copy(REPO / "openrlhf_irl" / "utils" / "cache_dir.py", target)
    spec = importlib.util.spec_from_file_location("installed_cache_dir", target)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_source_checkout_uses_its_ignored_outputs_cache(monkeypatch):
    from openrlhf_irl.utils.cache_dir import CACHE_ENV, cache_dir

    monkeypatch.delenv(CACHE_ENV, raising=False)
    assert cache_dir() == REPO / "outputs" / ".cache"
    assert "outputs/" in (REPO / ".gitignore").read_text()


def test_installed_wheel_uses_the_user_cache_not_site_packages(tmp_path, monkeypatch):
    module = _load_as_installed(tmp_path / "site-packages")
    monkeypatch.delenv(module.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert module.cache_dir() == tmp_path / "xdg" / "openrlhf-irl"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert module.cache_dir() == tmp_path / "home" / ".cache" / "openrlhf-irl"


def test_the_environment_wins(tmp_path, monkeypatch):
    from openrlhf_irl.compat import ray_ppo
    from openrlhf_irl.utils.cache_dir import CACHE_ENV, cache_dir

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "mine"))
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)  # a value already set would win over the cache
    assert cache_dir() == tmp_path / "mine"
    assert ray_ppo.worker_env()["TORCH_EXTENSIONS_DIR"] == str(tmp_path / "mine" / "torch_extensions")


def test_commands_leave_nothing_in_tmpdir_or_home(tmp_path):
    """``import deepspeed`` creates ``$TMPDIR/torchinductor_<user>``; a command of the package points it (and the
    other build caches) into the package's cache first."""
    import os
    import subprocess
    import sys

    from openrlhf_irl.utils.cache_dir import build_cache_env

    tmp, home, cache = tmp_path / "tmp", tmp_path / "home", tmp_path / "cache"
    tmp.mkdir()
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in build_cache_env(cache)}
    env.update(TMPDIR=str(tmp), HOME=str(home), OPENRLHF_IRL_CACHE=str(cache))
    out = subprocess.run([sys.executable, "-c", "import openrlhf_irl.cli, deepspeed, os; "
                          "print(os.environ['TORCHINDUCTOR_CACHE_DIR'])"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == str(cache / "torchinductor")
    assert list(tmp.iterdir()) == [] and list(home.iterdir()) == []
