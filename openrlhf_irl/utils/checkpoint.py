"""Checkpoint rotation that never leaves a run without a complete checkpoint (write the new one, then retire).

OpenRLHF 0.11.2's ``DeepspeedStrategy.save_ckpt`` evicts old checkpoints (``--ckpt.max_num`` /
``--ckpt.max_mem``) *before* writing the new one: with ``--ckpt.max_num 1`` a kill during the save leaves no
valid checkpoint. :func:`write_then_retire` makes a strategy's ``save_ckpt`` call OpenRLHF's own with no
limits (so it deletes nothing), then evict with OpenRLHF's policy, the new checkpoint counted and never evicted:
the ``_retire_old_ckpts`` of ``patches/0006`` when OpenRLHF has it, else :func:`retire_old_checkpoints`.
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import Callable, Optional

__all__ = ["write_then_retire", "retire_old_checkpoints"]


def _dir_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def retire_old_checkpoints(save_dir: str, keep: Optional[str], max_num: int, max_mem: float,
                           read_metric: Callable[[str], Optional[float]], log: Callable[..., None] = print) -> None:
    """Evict regular (not ``best*``) checkpoints of ``save_dir`` other than ``keep`` while more than ``max_num``
    exist or all subdirectories take more than ``max_mem`` GB: no-metric first, then worst metric, then oldest
    (OpenRLHF 0.11.2's order)."""
    while True:
        subdirs = [os.path.join(save_dir, d) for d in os.listdir(save_dir) if os.path.isdir(os.path.join(save_dir, d))]
        regular = [p for p in subdirs if not os.path.basename(p).startswith("best")]
        over_num = len(regular) > max_num
        over_mem = sum(_dir_size(p) for p in subdirs) > max_mem * 1024**3
        if not over_num and not over_mem:
            return
        candidates = []
        for path in regular:
            if os.path.basename(path) == keep:
                continue
            metric = read_metric(path)
            candidates.append((metric is not None, metric if metric is not None else float("-inf"),
                               os.path.getmtime(path), path))
        if not candidates:
            return
        *_, victim = min(candidates)
        shutil.rmtree(victim)
        log(f"Deleted checkpoint {victim} (after saving {keep})")


def write_then_retire(strategy) -> None:
    """Make ``strategy.save_ckpt`` write the new checkpoint before it deletes any old one (idempotent)."""
    original = getattr(strategy, "save_ckpt", None)
    if original is None or getattr(original, "write_then_retire", False):
        return

    def save_ckpt(model, save_dir, tag=None, max_num=3, max_mem=1000, client_state=None, save_latest=True,
                  **kwargs):
        if tag is not None and tag.startswith("best"):  # our trainers save no best tags; keep OpenRLHF's path
            return original(model, save_dir, tag, max_num, max_mem, client_state, save_latest, **kwargs)
        original(model, save_dir, tag, sys.maxsize, float("inf"), client_state, save_latest, **kwargs)
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()  # every rank's shards are on disk before anything is deleted
        if not strategy.is_rank_0():
            return
        if hasattr(strategy, "_retire_old_ckpts"):  # patches/0006
            strategy._retire_old_ckpts(save_dir, tag, False, max_num, max_mem)
            return
        keep = tag
        if keep is None and os.path.isfile(os.path.join(save_dir, "latest")):
            with open(os.path.join(save_dir, "latest")) as f:
                keep = f.read().strip()
        retire_old_checkpoints(save_dir, keep, max_num, max_mem, strategy._read_ckpt_metric, strategy.print)

    save_ckpt.write_then_retire = True
    strategy.save_ckpt = save_ckpt
