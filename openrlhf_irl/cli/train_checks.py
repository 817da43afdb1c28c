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


def _file_above(path: str) -> Optional[str]:
    """The nearest existing ancestor of ``path`` when it is not a directory (``path`` cannot be created there)."""
    current = os.path.dirname(os.path.abspath(path))
    while True:
        if os.path.exists(current):
            return None if os.path.isdir(current) else current
        parent = os.path.dirname(current)
        if parent == current:
            return None
        current = parent


def check_output_parents(values: Dict[str, Any]) -> None:
    """ValueError when an output would have to be created under a regular file (found only at the first save)."""
    for name in OUTPUTS:
        path = values.get(name)
        if isinstance(path, str) and path.strip():
            above = _file_above(path)
            if above is not None:
                raise ValueError(f"--{name} {path}: cannot be created, {above} is a file, not a directory")


#: model flags and the flag whose tokenizer reads them (OpenRLHF's PPO feeds the actor's token ids to every model)
MODEL_SUFFIX = "model_name_or_path"


def check_models(values: Dict[str, Any]) -> None:
    """Every model the run loads, before any of them is: a model directory whose config.json parses, whose weight
    files are whole (a truncated ``model.safetensors`` is found here, not after start-up), and whose tokenizer fits
    its embedding (:func:`openrlhf_irl.cli.common.check_model`). With an actor (PPO), the reference model and the
    critic read the actor's token ids: its tokenizer must fit them too. UsageError (a ValueError) naming the flag."""
    from openrlhf_irl.cli.common import check_model, check_vocab

    models = {name: value for name, value in values.items()
              if name.endswith(MODEL_SUFFIX) and isinstance(value, str) and value.strip()}
    for name, path in models.items():
        check_model(path, f"--{name}")
    actor = models.get("actor.model_name_or_path")
    if actor and os.path.isdir(actor):
        for name in ("ref.model_name_or_path", "critic.model_name_or_path"):
            path = models.get(name)
            if path and os.path.isdir(path) and os.path.realpath(path) != os.path.realpath(actor):
                check_vocab(path, f"--{name}", tokenizer_path=actor, tokenizer_flag="--actor.model_name_or_path")


def _records(path: str):
    """``(where, record)`` of a local JSON-lines or JSON-list file; lines that do not parse are skipped (the
    dataset loader reports them)."""
    import json

    if path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    yield f"line {line_no}", json.loads(line)
                except ValueError:
                    continue
        return
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except ValueError:
        return
    if isinstance(data, list):
        for index, record in enumerate(data):
            yield f"record {index}", record


_READS = {"afd_rm": "labels", "rm": "pairs"}  # the record format each reward trainer reads
_TRAINER = {fmt: trainer for trainer, fmt in _READS.items()}  # and the trainer that reads each


def _missing(at: str, field: str, key_flag: str, record: dict, trainer: str, fields: Dict[str, tuple]) -> ValueError:
    """``field`` (``--data.<key_flag>``) is missing from ``record``; where the record has the other format's fields
    (``fields``: format -> its two keys), the message says so and how to train or rebuild it."""
    reads = _READS[trainer]
    other = "pairs" if reads == "labels" else "labels"
    if all(key in record for key in fields[other]):
        shown = {"labels": "({!r}, {!r})".format(*fields["labels"]), "pairs": "({!r}/{!r})".format(*fields["pairs"])}
        return ValueError(f"{at}, field {field!r}: missing; this is a {other} record {shown[other]} and --trainer "
                          f"{trainer} reads {reads} {shown[reads]}: train {other} with --trainer {_TRAINER[other]}, or "
                          f"build the dataset with build_afd_dataset --format {reads}")
    return ValueError(f"{at}, field {field!r}: missing (--data.{key_flag})")


def check_reward_data(values: Dict[str, Any]) -> None:
    """For ``train_rm``: every record of a local JSON/JSONL ``--data.dataset`` / ``--eval.dataset`` has the shape
    the chosen trainer reads, before the model loads. ``--trainer afd_rm`` reads labels files (``prompt``,
    ``response``, ``label`` 0/1: a number, not a string); ``--trainer rm`` reads pairs (``chosen``, ``rejected``);
    a pairs file given to afd_rm, or a labels file to rm, is named as such. ValueError naming the file, the
    record and the field."""
    trainer = values.get("trainer")
    if trainer not in ("rm", "afd_rm") or "data.chosen_key" not in values:
        return
    chosen = values.get("data.chosen_key") or "chosen"
    rejected = values.get("data.rejected_key") or "rejected"
    label = values.get("data.label_key") or "label"
    response = values.get("data.response_key") or "response"
    fields = {"labels": (response, label), "pairs": (chosen, rejected)}
    for flag in ("data.dataset", "eval.dataset"):
        path = values.get(flag)
        if not isinstance(path, str) or "," in path or not path.endswith((".jsonl", ".json")):
            continue
        if not os.path.isfile(path):
            continue
        for where, record in _records(path):
            if not isinstance(record, dict):
                raise ValueError(f"--{flag} {path}, {where}: expected a JSON object, got {type(record).__name__}")
            if trainer == "afd_rm":
                if label not in record:
                    raise _missing(f"--{flag} {path}, {where}", label, "label_key", record, trainer, fields)
                value = record[label]
                if isinstance(value, bool) or (isinstance(value, (int, float)) and value in (0, 1)):
                    pass
                else:
                    kind = "a string" if isinstance(value, str) else type(value).__name__
                    raise ValueError(f"--{flag} {path}, {where}, field {label!r}: expected the number 0 or 1, got "
                                     f"{value!r} ({kind})")
                if response not in record:
                    raise ValueError(f"--{flag} {path}, {where}, field {response!r}: missing (--data.response_key)")
            else:
                for key_flag, key in (("chosen_key", chosen), ("rejected_key", rejected)):
                    if key not in record:
                        raise _missing(f"--{flag} {path}, {where}", key, key_flag, record, trainer, fields)


def check_training_args(ns, defaults: Optional[Dict[str, Any]] = None) -> None:
    """The checks run at parse time on a namespace (flat or nested): numbers, outputs, reward-model data. The
    models (:func:`check_models`) are checked where the run starts (the launcher's ``get_strategy``, train_ppo's
    own checks): parsing alone, as the examples' tests do, needs no model."""
    values = flat(ns)
    check_numbers(values, defaults)
    check_output_parents(values)
    check_outputs(values)
    check_reward_data(values)


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
