"""The Ray session a sampling job or trainer uses: joined when ``RAY_ADDRESS`` names one, else started locally."""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Optional

import ray

from openrlhf_irl.utils.signals import reclaim_sigterm

__all__ = ["ensure_ray", "release_each"]


def ensure_ray(num_cpus: Optional[int] = None) -> bool:
    """Start a local Ray instance unless one is initialised; returns whether this call started it.

    ``RAY_ADDRESS`` (when set) names a cluster to join; otherwise a fresh local instance is started
    (``address="local"``: never attach to a stale cluster a killed job left behind), with its session files in
    this process's private run directory (removed at exit) instead of a ``/tmp/ray/session_*`` left behind.
    """
    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    kwargs = dict(include_dashboard=False, ignore_reinit_error=True, log_to_driver=True)
    if address:
        ray.init(address=address, **kwargs)
    else:
        from openrlhf_irl.utils.run_dir import private_run_dir

        ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1,
                 _temp_dir=os.path.join(private_run_dir(), "ray"), **kwargs)
    reclaim_sigterm()  # ray.init replaced a CLI's SIGTERM clean-up with its own abort
    return True


def release_each(release: Callable[[Any], Any], handles: Iterable) -> None:
    """``release(handle)`` for every handle (``ray.kill`` an actor, ``ray.cancel`` a task, remove a placement
    group), best effort: one that fails does not stop the others."""
    for handle in handles:
        try:
            release(handle)
        except Exception:  # pragma: no cover - best effort
            pass
