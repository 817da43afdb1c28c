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

__all__ = ["write_then_retire", "retire_old_checkpoints", "NonFiniteWeightsError", "check_finite_weights",
           "safe_save_model", "STAGING"]

STAGING = ".openrlhf-irl-saving"  # where a model is written before it replaces the one in the output directory
_WEIGHT_FILE = (".safetensors", ".bin", ".pt", ".pth", ".index.json")
_WEIGHT_PREFIX = ("model", "pytorch_model", "adapter_model")


class NonFiniteWeightsError(RuntimeError):
    """The model to be saved holds NaN/inf weights; nothing was written."""


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


def check_finite_weights(strategy, model, where: str) -> None:
    """:class:`NonFiniteWeightsError` (on every rank) when any rank's share of ``model``'s parameters holds a
    NaN or inf (the non-finite loss check runs on the next forward, so the last step's update is checked here)."""
    import torch

    bad = None
    for name, param in strategy._unwrap_model(model).named_parameters():
        data = getattr(param, "ds_tensor", None) if hasattr(param, "ds_id") else param.data  # ZeRO-3: own shard
        if data is not None and data.numel() and not bool(torch.isfinite(data).all()):
            bad = name
            break
    flag = float(bad is not None)
    import torch.distributed as dist

    if dist.is_initialized():
        flag = strategy.all_reduce(flag, "max")
    if flag > 0:
        raise NonFiniteWeightsError(f"the trained weights hold NaN/inf ({bad or 'on another rank'}), so they were "
                                    f"not saved to {where} (an earlier model there is kept); lower --adam.lr or "
                                    "check the data")


def _swap_in(staging: str, output_dir: str) -> None:
    """Move every file of a complete save from ``staging`` into ``output_dir`` (one rename each), then drop the
    earlier model's weight files that the new save does not have (e.g. shards of another layout)."""
    new = set(os.listdir(staging))
    for name in sorted(new, key=lambda n: n == "config.json"):  # config last: weights first, then what names them
        src, dst = os.path.join(staging, name), os.path.join(output_dir, name)
        if os.path.isdir(dst) and not os.path.islink(dst):
            shutil.rmtree(dst)
        os.replace(src, dst)
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        if (name not in new and name.endswith(_WEIGHT_FILE) and name.startswith(_WEIGHT_PREFIX)
                and os.path.isfile(path)):
            os.unlink(path)
    os.rmdir(staging)


def safe_save_model(strategy) -> None:
    """Make ``strategy.save_model`` check the weights are finite, write the model into a staging directory inside
    the output directory and only then move its files in: a save that fails (a full disk, an error while the
    tokenizer is written, a kill) leaves the earlier model there whole, config included (idempotent)."""
    original = getattr(strategy, "save_model", None)
    if original is None or getattr(original, "safe_save", False):
        return
    strategy.save_model = guarded_save(strategy, original)


def guarded_save(strategy, original):
    """``original(model, tokenizer, output_dir, **kwargs)`` (a strategy's bound ``save_model``) made safe as
    :func:`safe_save_model` describes; returns the wrapper."""

    def save_model(model, tokenizer, output_dir, **kwargs):
        check_finite_weights(strategy, model, output_dir)
        staging = os.path.join(output_dir, STAGING)
        rank0 = strategy.is_rank_0()
        if rank0:
            shutil.rmtree(staging, ignore_errors=True)  # a killed save's leftovers
        try:
            original(model, tokenizer, staging, **kwargs)
            if rank0:
                _swap_in(staging, output_dir)
        except BaseException:
            if rank0:
                shutil.rmtree(staging, ignore_errors=True)
            raise

    save_model.safe_save = True
    return save_model
