"""Up-front checks of OpenRLHF's training flags (train_sft, train_rm, train_ppo): numbers and output paths.

Numbers: every float flag is finite (except one whose default is infinite, like ``--ckpt.max_mem``), and the
flags below are in range; one line naming the flag. Outputs: ``--ckpt.output_dir`` and ``--ckpt.path`` are never
a model, dataset or reward function the run reads, nor inside one, nor the same directory; an existing non-empty
``--ckpt.output_dir`` must carry this package's marker (left by an earlier run of these CLIs), and an existing
non-empty ``--ckpt.path`` the marker or DeepSpeed's ``latest`` file (an OpenRLHF checkpoint directory, resumable),
unless ``--ckpt.overwrite``. A run claims both (the marker) before training starts.
"""

from __future__ import annotations

import argparse
import math
import os
from types import SimpleNamespace
from typing import Any, Dict, Optional

from openrlhf_irl.utils.output_guard import MARKER, mark_dir

#: flag-name suffix -> (low, high, low_open); checked when the value is not None
RANGES = (
    ("batch_size", 1, None, False), ("micro_batch_size", 1, None, False), ("max_epochs", 1, None, False),
    ("num_episodes", 1, None, False), ("max_len", 1, None, False), ("max_samples", 1, None, False),
    ("n_samples_per_prompt", 1, None, False), ("num_gpus_per_node", 1, None, False), ("num_nodes", 1, None, False),
    ("tensor_parallel_size", 1, None, False), ("ring_attn_size", 1, None, False), ("max_num", 1, None, False),
    ("max_tokens_per_gpu", 1, None, False), ("logging_steps", 1, None, False), ("horizon", 1, None, False),
    ("max_new_tokens", 1, None, False),
    (".lr", 0.0, None, True), ("adam.eps", 0.0, None, True), ("max_norm", 0.0, None, True),
    ("temperature", 0.0, None, False), ("top_p", 0.0, 1.0, True), ("lr_warmup_ratio", 0.0, 1.0, False),
    ("min_lr_ratio", 0.0, 1.0, False), ("advantage.gamma", 0.0, 1.0, False), ("advantage.lambd", 0.0, 1.0, False),
    ("ema_beta", 0.0, 1.0, False), ("lora.dropout", 0.0, 1.0, False), ("weight_decay", 0.0, None, False),
    ("aux_loss_coef", 0.0, None, False), ("init_coef", 0.0, None, False), ("eps_clip", 0.0, None, False),
    ("value_clip", 0.0, None, False), ("zero_stage", 0, 3, False), ("max_mem", 0.0, None, True),
)
INPUT_SUFFIXES = ("model_name_or_path", "dataset", "pretrain_data", "remote_url", "lora_path")
OUTPUTS = ("ckpt.output_dir", "ckpt.path")


def flat(args: Any, prefix: str = "") -> Dict[str, Any]:
    """``{"train.batch_size": 8, ...}`` from a flat (dotted names) or nested (OpenRLHF's hierarchize) namespace."""
    out: Dict[str, Any] = {}
    for key, value in vars(args).items():
        name = f"{prefix}{key}"
        if isinstance(value, (SimpleNamespace, argparse.Namespace)):
            out.update(flat(value, name + "."))
        else:
            out[name] = value
    return out


def _bad(value, low, high, low_open) -> bool:
    if low is not None and (value <= low if low_open else value < low):
        return True
    return high is not None and value > high


def check_numbers(values: Dict[str, Any], defaults: Optional[Dict[str, Any]] = None) -> None:
    """ValueError naming the first flag whose number is not finite or out of range (an infinite default, like
    ``--ckpt.max_mem``'s "no limit", may be given)."""
    defaults = {"ckpt.max_mem": float("inf"), **(defaults or {})}
    for name, value in values.items():
        items = value if isinstance(value, (list, tuple)) else [value]
        for item in items:
            if isinstance(item, bool) or not isinstance(item, (int, float)):
                continue
            default = defaults.get(name)
            if isinstance(item, float) and not math.isfinite(item) and not (
                    isinstance(default, float) and math.isinf(default) and item == default):
                raise ValueError(f"--{name}: must be a finite number, got {item}")
            for suffix, low, high, low_open in RANGES:
                if name.endswith(suffix) and _bad(item, low, high, low_open):
                    lo = "" if low is None else ("(" if low_open else "[") + f"{low:g}"
                    hi = "inf)" if high is None else f"{high:g}]"
                    raise ValueError(f"--{name}: must be in {lo}, {hi}, got {item}")


def path_inputs(values: Dict[str, Any]) -> Dict[str, str]:
    """``{"--model.model_name_or_path": path, "--data.dataset #2": path, ...}``: every path the run reads."""
    out = {}
    for name, value in values.items():
        if not isinstance(value, str) or not value or not name.endswith(INPUT_SUFFIXES):
            continue
        parts = [p.strip() for p in value.split(",") if p.strip()]
        for i, part in enumerate(parts):
            out[f"--{name}" + (f" #{i + 1}" if len(parts) > 1 else "")] = part
    return out


def _ckpt_dir_is_ours(path: str) -> bool:
    return (not os.path.isdir(path) or not os.listdir(path) or os.path.isfile(os.path.join(path, MARKER))
            or os.path.isfile(os.path.join(path, "latest")))


def check_outputs(values: Dict[str, Any]) -> None:
    """ValueError naming the flags when an output collides with an input or is not this package's to write."""
    from openrlhf_irl.cli.common import UsageError, resolve_outputs

    outputs = {f"--{name}": values[name] for name in OUTPUTS if name in values}
    overwrite = bool(values.get("ckpt.overwrite"))
    try:
        resolve_outputs(outputs, path_inputs(values), overwrite=overwrite, managed=("--ckpt.path",),
                        dirs=tuple(outputs))
    except UsageError as err:
        raise ValueError(str(err).replace("pass --overwrite", "pass --ckpt.overwrite")) from None
    path = values.get("ckpt.path")
    saves_ckpt = (values.get("ckpt.save_steps") or -1) > 0 or values.get("ckpt.load_enable")
    if path and saves_ckpt and not overwrite and not _ckpt_dir_is_ours(path):
        raise ValueError(f"--ckpt.path {path}: exists ({len(os.listdir(path))} entries, neither {MARKER} nor "
                         "DeepSpeed's 'latest'), so it was not written by this tool and its subdirectories could be "
                         "retired as old checkpoints; choose another path, or pass --ckpt.overwrite")


def check_training_args(ns, defaults: Optional[Dict[str, Any]] = None) -> None:
    """Both checks on a parsed namespace (flat or nested)."""
    values = flat(ns)
    check_numbers(values, defaults)
    check_outputs(values)


def claim_outputs(args) -> None:
    """Leave the marker in ``--ckpt.output_dir`` (and ``--ckpt.path`` when checkpoints are saved) on rank 0,
    before training writes anything there."""
    values = flat(args)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if values.get("ckpt.output_dir"):
        mark_dir(values["ckpt.output_dir"], "openrlhf_irl training")
    if values.get("ckpt.path") and (values.get("ckpt.save_steps") or -1) > 0:
        mark_dir(values["ckpt.path"], "openrlhf_irl training")


def add_overwrite_argument(parser) -> None:
    """``--ckpt.overwrite`` and the checks above after every parse (defaults read from the parser)."""
    from openrlhf_irl.trainers.plugins import validate_after_parse

    if any("--ckpt.overwrite" in a.option_strings for a in parser._actions):
        return
    parser.add_argument("--ckpt.overwrite", action="store_true", default=False,
                        help="let --ckpt.output_dir / --ckpt.path be an existing non-empty directory this package "
                             "did not write (inputs are never overwritten)")
    validate_after_parse(parser, lambda ns: check_training_args(
        ns, {a.dest: a.default for a in parser._actions if isinstance(a.default, float)}))
