"""Where the package keeps what is built once and reused across runs: DeepSpeed's JIT-built CPU ops, triton's cache.

:func:`cache_dir`, in this order: ``$OPENRLHF_IRL_CACHE``; in a source checkout (the package's parent folder holds
``pyproject.toml``, as with ``pip install -e``) its git-ignored ``outputs/.cache``; otherwise (an installed wheel,
whose ``site-packages`` may be read-only or shared) ``$XDG_CACHE_HOME/openrlhf-irl``, by default
``~/.cache/openrlhf-irl``, the per-user cache location that pip and Hugging Face use too.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir", "CACHE_ENV", "build_cache_env", "apply_cache_defaults"]

CACHE_ENV = "OPENRLHF_IRL_CACHE"


def cache_dir() -> Path:
    """The cache folder (not created here)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser().resolve()
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "pyproject.toml").is_file() and (checkout / "openrlhf_irl").is_dir():
        return checkout / "outputs" / ".cache"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "openrlhf-irl"


def build_cache_env(cache: os.PathLike | str | None = None) -> dict[str, str]:
    """The variables that point what torch, DeepSpeed and triton build at run time into ``cache`` (default
    :func:`cache_dir`) instead of ``~/.cache`` or ``$TMPDIR`` (``import deepspeed`` alone creates
    ``$TMPDIR/torchinductor_<user>``)."""
    cache = Path(cache or cache_dir())
    return {"TORCH_EXTENSIONS_DIR": str(cache / "torch_extensions"), "TRITON_HOME": str(cache / "triton"),
            "TRITON_CACHE_DIR": str(cache / "triton" / "cache"),
            "TORCHINDUCTOR_CACHE_DIR": str(cache / "torchinductor")}


def apply_cache_defaults() -> None:
    """:func:`build_cache_env` into this process's environment where the user has not set a value (the package's
    commands call it before torch or DeepSpeed import; their child processes inherit it)."""
    for key, value in build_cache_env().items():
        if not os.environ.get(key):
            os.environ[key] = value
