"""Argument types and up-front checks shared by the plug-in's own CLIs.

Every check raises :class:`UsageError` with one line naming the flag and the value, so a CLI can print
``error: <message>`` and exit 2 before any expensive work (model loading, Ray, sampling).
"""

from __future__ import annotations

import argparse
import errno
import functools
import json
import os
import re
import socket
import sys
import tempfile
from typing import Any, Callable, Optional

from openrlhf_irl.utils.signals import Terminated, sigterm_unwinds, terminated

__all__ = [
    "UsageError", "positive_int", "nonnegative_int", "check_output_dir", "claim_output_unit", "check_output_file",
    "check_model", "check_lora", "check_device", "check_not_same_file", "model_context_length",
    "load_checked_tokenizer", "resolve_outputs", "finite_float", "temperature", "top_p", "cli_main",
    "user_error_line", "check_weights", "check_vocab", "add_flag",
]


class UsageError(ValueError):
    """A user mistake found before the work starts; its message is one line naming the flag."""


#: OSErrors that are the user's machine or paths, not a bug: a full disk or quota, permissions, a read-only
#: mount, a path under a regular file, a missing file or folder, a name too long, a file too large.
USER_OS_ERRORS = frozenset(getattr(errno, name) for name in (
    "ENOSPC", "EDQUOT", "EACCES", "EPERM", "EROFS", "ENOTDIR", "EISDIR", "ENOENT", "EEXIST", "ENOTEMPTY",
    "ENAMETOOLONG", "EFBIG", "EMFILE", "ENFILE", "EIO", "EXDEV", "ELOOP") if hasattr(errno, name))


def user_error_line(err: BaseException) -> Optional[str]:
    """One line for an exception that is a user's mistake or machine (:class:`UsageError`, a
    :class:`~openrlhf_irl.utils.jsonl.DataError`, an OSError such as a full disk naming its file); None for anything
    else, which is a bug and keeps its traceback."""
    from openrlhf_irl.utils.jsonl import DataError
    from openrlhf_irl.utils.output_guard import OutputConflict

    if isinstance(err, (UsageError, DataError, OutputConflict)):
        text = " ".join(str(err).split("\n")).strip()
        return text or type(err).__name__
    if isinstance(err, OSError) and err.errno in USER_OS_ERRORS:
        where = " -> ".join(str(f) for f in (err.filename, err.filename2) if f is not None)
        reason = err.strerror or os.strerror(err.errno)
        return f"{where}: {reason}" if where else reason
    return None


def cli_main(prog: str, *, resume_hint: str = "", usage_code: int = 2) -> Callable:
    """Decorator for a CLI's ``main(argv=None)``: Ctrl-C (KeyboardInterrupt) or SIGTERM (:func:`sigterm_unwinds`)
    ends it, after its clean-up, with ``interrupted: ...`` and exit 130 (143 for SIGTERM); a user's mistake found at any point (``UsageError``,
    ``DataError``: exit ``usage_code``; a user-facing OSError such as ENOSPC naming the file: exit 1) with one
    ``error: ...`` line. Any other exception propagates with its traceback: a bug is never hidden. The function's
    own return value (an exit code, or None) is returned unchanged."""

    def decorate(func: Callable) -> Callable:
        @functools.wraps(func)
        def main(argv=None):
            try:
                with sigterm_unwinds():
                    return func(argv)
            except KeyboardInterrupt as err:
                hint = f"; {resume_hint}" if resume_hint else ""
                by_sigterm = isinstance(err, Terminated) or terminated()
                _say(f"interrupted: {prog} stopped by {'SIGTERM' if by_sigterm else 'Ctrl-C'}{hint}")
                raise SystemExit(143 if by_sigterm else 130) from None
            except Exception as err:
                line = user_error_line(err)
                if line is None:
                    raise
                _say(f"error: {line}")
                raise SystemExit(1 if isinstance(err, OSError) else usage_code) from None

        return main

    return decorate


def _install_startup_interrupt_hook() -> None:
    """Under ``python -m openrlhf_irl...`` (or the ``openrlhf-irl`` script) only: a Ctrl-C that no
    :func:`cli_main` catches (while the CLI module still imports torch and transformers, or in a CLI without the
    decorator) prints one ``interrupted:`` line instead of a traceback; Python still ends the process by SIGINT
    (exit status 130 in a shell), after its normal clean-up. Other exceptions go to the previous hook."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    name = str(getattr(spec, "name", "") or "")
    if not name and os.path.basename(sys.argv[0] if sys.argv else "").startswith("openrlhf-irl"):
        name = "openrlhf_irl.__main__"
    if not name.startswith("openrlhf_irl") or getattr(sys.excepthook, "_openrlhf_irl", False):
        return
    previous = sys.excepthook
    prog = name.rsplit(".", 1)[-1] if name.count(".") > 1 else "openrlhf-irl"

    def hook(kind, value, tb):
        if issubclass(kind, KeyboardInterrupt):
            _say(f"interrupted: {prog} stopped by Ctrl-C")
            return
        previous(kind, value, tb)

    hook._openrlhf_irl = True
    sys.excepthook = hook


def _say(line: str) -> None:
    try:
        sys.stdout.flush()
    except Exception:  # a closed or broken stdout: the message still goes to stderr
        pass
    try:
        print(line, file=sys.stderr, flush=True)
    except Exception:
        pass


class _DeprecatedSpelling(argparse.Action):
    """A flag's old spelling: one ``warning:`` line on stderr, then the primary flag's own action does the work
    (so the value lands in the same ``dest``, through the same type, choices and mutually exclusive group)."""

    def __init__(self, option_strings, dest, *, primary: argparse.Action, **kw) -> None:
        super().__init__(option_strings, dest, nargs=primary.nargs, type=primary.type, choices=primary.choices,
                         metavar=primary.metavar, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        self.primary = primary

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        new = self.primary.option_strings[0]
        _say(f"warning: {option_string} is deprecated, use {new}; the old spelling goes in the next release")
        self.primary(parser, namespace, values, new)


def add_flag(parser, new: str, *old: str, **kw) -> argparse.Action:
    """``parser.add_argument(new, **kw)`` where ``new`` is OpenRLHF's spelling of a flag that means the same
    there (``--data.input_key``), plus the ``old`` spellings of this package (``--input-key``) as hidden aliases
    that still work for one release and print one deprecation line each time they are used. ``dest`` defaults to
    the first old spelling's (``input_key``), so code reading ``args.input_key`` is unchanged. ``parser`` may be
    an argument group or a mutually exclusive group: the aliases join it too."""
    if "dest" not in kw:
        kw["dest"] = (old[0] if old else new).lstrip("-").replace("-", "_").replace(".", "_")
    if old and kw.get("help") != argparse.SUPPRESS:
        note = f"(deprecated: {', '.join(old)})"
        kw["help"] = f"{kw['help']} {note}" if kw.get("help") else note
    primary = parser.add_argument(new, **kw)
    if old:
        parser.add_argument(*old, action=_DeprecatedSpelling, dest=primary.dest, primary=primary)
    return primary


def _int_at_least(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
    return value


def positive_int(text: str) -> int:
    return _int_at_least(text, 1)


def nonnegative_int(text: str) -> int:
    return _int_at_least(text, 0)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def _probe_writable(directory: str) -> bool:
    """Whether a file can be created in ``directory`` (a real probe: ``os.access`` says yes to root on a
    read-only mount)."""
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".write_probe.")
    except OSError:
        return False
    os.close(fd)
    os.unlink(tmp)
    return True


def check_output_dir(path: str, flag: str = "--output-dir", create: bool = True) -> str:
    """``path`` as a usable output directory: created if missing (with its parents), refused when it is a file,
    cannot be created, or is not writable."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{flag} {path}: exists and is not a directory")
    if not os.path.isdir(path):
        if not create:
            raise UsageError(f"{flag} {path}: no such directory")
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as err:
            raise UsageError(f"{flag} {path}: cannot create the directory ({err.strerror})") from None
    if not _probe_writable(path):
        raise UsageError(f"{flag} {path}: directory is not writable")
    return path


def claim_output_unit(path: str, names, tool: str, flag: str = "--output-dir"):
    """The output folder of a multi-file result, made ready and held: created (writable), marked as ``tool``'s, and
    locked as an :class:`~openrlhf_irl.utils.output_guard.OutputUnit` of ``names`` (a second job is refused with
    ``OutputConflict``). Call it last among the up-front checks: the caller releases it from then on."""
    from openrlhf_irl.utils.output_guard import OutputUnit, mark_dir

    check_output_dir(path, flag)
    mark_dir(path, tool)
    return OutputUnit(path, names, flag)


def check_output_file(path: str, flag: str = "--output") -> str:
    """``path`` as an output file: not a directory; its directory is created if missing and must be writable."""
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path}: is a directory, expected a file path")
    directory = os.path.dirname(os.path.abspath(path))
    check_output_dir(directory, f"{flag} {path}: its directory")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise UsageError(f"{flag} {path}: file is not writable")
    return path


def check_not_same_file(output: str, inputs: dict, flag: str = "--output") -> None:
    """Refuse an output path that names one of the ``inputs`` (``{flag: path}``) - it would be overwritten."""
    out = os.path.realpath(output)
    for in_flag, path in inputs.items():
        if not path:
            continue
        same = os.path.realpath(path) == out
        if not same and os.path.exists(path) and os.path.exists(output):
            same = os.path.samefile(path, output)
        if same:
            raise UsageError(f"{flag} {output} is the same file as {in_flag} {path}: it would be overwritten; "
                             "choose another output path")


def resolve_outputs(outputs: dict, inputs: dict, *, overwrite: bool = False, managed: tuple = (),
                    dirs: tuple = ()) -> dict:
    """Check every output (``{flag: path}``) before any work: not empty; not the same as, nor inside, any input
    (``{flag: path}``; None and "" skipped) or another output (real paths: symlinks and hard links resolved); and,
    unless ``overwrite`` or its flag is in ``managed`` (a CLI that checks that output itself), not an existing
    file or non-empty directory this package did not write (see :mod:`openrlhf_irl.utils.output_guard`). The
    flags in ``dirs`` name directories, the others files.
    Returns ``{flag: real path}``; :class:`UsageError` naming both flags otherwise."""
    from openrlhf_irl.utils.output_guard import OutputConflict, check_target, overlap, real

    for flag, path in outputs.items():
        if path is None or not str(path).strip():
            raise UsageError(f"{flag}: empty path; give a file or directory name")
    for flag, path in outputs.items():
        for in_flag, in_path in inputs.items():
            if in_path is None or not str(in_path).strip():
                continue
            how = overlap(path, in_path)
            if how == "is":
                raise UsageError(f"{flag} {path} is the same file as {in_flag} {in_path}: it would be overwritten; "
                                 "choose another output path")
            if how:
                raise UsageError(f"{flag} {path} lies inside {in_flag} {in_path}: writing it would change that "
                                 "input; choose an output path outside it")
    flags = list(outputs)
    for i, flag in enumerate(flags):
        for other in flags[i + 1:]:
            if overlap(outputs[flag], outputs[other]) == "is":
                raise UsageError(f"{flag} {outputs[flag]} and {other} {outputs[other]} are the same path: one would "
                                 "overwrite the other")
    for flag, path in outputs.items():
        if flag in dirs and os.path.exists(path) and not os.path.isdir(path):
            raise UsageError(f"{flag} {path}: exists and is not a directory")
        if flag not in dirs and flag not in managed and os.path.isdir(path):
            raise UsageError(f"{flag} {path}: is a directory, expected a file path")
        if flag not in managed:
            try:
                check_target(path, flag, overwrite)
            except OutputConflict as err:
                raise UsageError(str(err)) from None
    return {flag: real(path) for flag, path in outputs.items()}


def finite_float(low: Optional[float] = None, high: Optional[float] = None, *, low_open: bool = False,
                 high_open: bool = False):
    """argparse ``type``: a finite number in the given range (``low_open``/``high_open`` exclude the bound)."""
    import math

    def convert(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        bad = not math.isfinite(value)
        bad = bad or (low is not None and (value <= low if low_open else value < low))
        bad = bad or (high is not None and (value >= high if high_open else value > high))
        if bad:
            lo = "(-inf" if low is None else ("(" if low_open else "[") + f"{low:g}"
            hi = "inf)" if high is None else f"{high:g}" + (")" if high_open else "]")
            raise argparse.ArgumentTypeError(f"must be a finite number in {lo}, {hi}, got {text}")
        return value

    convert.__name__ = "number"
    return convert


MIN_TEMPERATURE = 1e-3  # below it the logits / temperature overflow to inf in bf16/fp32: use 0 for greedy


def temperature(text: str) -> float:
    """argparse ``type`` for a sampling temperature: 0 (greedy) or a finite number in [1e-3, 100]."""
    value = finite_float(0.0, 100.0)(text)
    if 0 < value < MIN_TEMPERATURE:
        raise argparse.ArgumentTypeError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE:g}, got {text}")
    return value


top_p = finite_float(0.0, 1.0, low_open=True)


_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hub_reachable(timeout: float = 3.0) -> bool:
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def check_model(path: str, flag: str = "--model") -> str:
    """``path`` as something ``from_pretrained`` can load at once: a local directory with a ``config.json``, or a
    hub name that is cached or reachable. A hub name with ``HF_HUB_OFFLINE`` set (and not cached) or without a
    network fails here in seconds instead of after a minute of retries."""
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            hint = " (it holds a LoRA adapter: pass it with --lora)" if os.path.isfile(
                os.path.join(path, "adapter_config.json")) else ""
            raise UsageError(f"{flag} {path}: not a model directory (no config.json){hint}")
        try:
            with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
                json.load(f)
        except (OSError, ValueError) as err:
            raise UsageError(f"{flag} {path}: unreadable config.json ({_first_line(err)})") from None
        rows = check_weights(path, flag)
        check_vocab(path, flag, rows=rows)
        return path
    if os.path.exists(path):
        raise UsageError(f"{flag} {path}: is a file, expected a model directory")
    if not _HUB_NAME.match(path):  # "./x", "/a/b", "a/b/c": a local path, not a hub name
        raise UsageError(f"{flag} {path}: no such model directory")
    try:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(path, "config.json"), str):
            return path
    except Exception:  # pragma: no cover - an old or broken hub client: just go on to the network checks
        pass
    if _offline():
        raise UsageError(f"{flag} {path}: no such local directory, and HF_HUB_OFFLINE is set so the hub model "
                         "cannot be downloaded (download it first, or give a local path)")
    if not _hub_reachable():
        raise UsageError(f"{flag} {path}: no such local directory, and the Hugging Face hub is not reachable "
                         "(no network?): give a local path")
    return path


_EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _safetensors_header(file: str, flag: str, model: str) -> dict:
    """The header of a ``.safetensors`` file, refused (one line) when the file is shorter than the header says."""
    name = os.path.basename(file)
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UsageError(f"{flag} {model}: {name} is truncated or corrupt ({size} bytes, not a safetensors file)")
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise UsageError(f"{flag} {model}: {name} is truncated or corrupt ({size} bytes, its header alone "
                             f"needs {n + 8})")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise UsageError(f"{flag} {model}: {name} is corrupt (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise UsageError(f"{flag} {model}: {name} is corrupt (its header is not a table of tensors)")
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise UsageError(f"{flag} {model}: {name} is corrupt (tensor {key!r} has no valid data_offsets)")
        end = max(end, offsets[1])
    if 8 + n + end > size:
        raise UsageError(f"{flag} {model}: {name} is truncated ({size} bytes, its tensors need {8 + n + end}); "
                         "copy or download the model again")
    return header


def check_weights(path: str, flag: str = "--model") -> Optional[int]:
    """The weight files of a local model directory are whole, read from their headers only (seconds, no
    loading): every ``.safetensors`` file holds all the bytes its header names, a zip-format ``.bin``/``.pt`` has
    its central directory, every shard an ``*.index.json`` names exists. Returns the rows of the input embedding
    when the headers show it (None otherwise); :class:`UsageError` naming the model and the file."""
    import zipfile

    rows: Optional[int] = None
    names = sorted(os.listdir(path))
    for name in names:
        if not name.endswith(".index.json"):
            continue
        try:
            with open(os.path.join(path, name), encoding="utf-8") as f:
                shards = set((json.load(f).get("weight_map") or {}).values())
        except (OSError, ValueError, AttributeError) as err:
            raise UsageError(f"{flag} {path}: unreadable {name} ({_first_line(err)})") from None
        missing = sorted(s for s in shards if not os.path.isfile(os.path.join(path, str(s))))
        if missing:
            raise UsageError(f"{flag} {path}: {name} names {len(missing)} missing weight file(s), e.g. {missing[0]}")
    for name in names:
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            continue
        if name.endswith(".safetensors"):
            header = _safetensors_header(file, flag, path)
            for key, info in header.items():
                shape = info.get("shape") if isinstance(info, dict) else None
                if key.endswith(_EMBEDDING_SUFFIXES) and isinstance(shape, list) and shape:
                    rows = shape[0] if rows is None else min(rows, shape[0])
        elif name.endswith((".bin", ".pt", ".pth")):
            with open(file, "rb") as f:
                zipped = f.read(4) == b"PK\x03\x04"
            if zipped:
                try:
                    zipfile.ZipFile(file).close()
                except (zipfile.BadZipFile, OSError, ValueError):
                    raise UsageError(f"{flag} {path}: {name} is truncated or corrupt ({os.path.getsize(file)} "
                                     "bytes); copy or download the model again") from None
    return rows


def check_vocab(path: str, flag: str = "--model", tokenizer_path: Optional[str] = None,
                tokenizer_flag: Optional[str] = None, rows: Optional[int] = None) -> None:
    """The tokenizer (``tokenizer_path``, the model's own by default) has no more tokens than the model has
    embedding rows (``rows``, from :func:`check_weights`) and ``vocab_size``: a token id beyond them fails deep
    inside the model (an index error) or, on vLLM, in an engine. :class:`UsageError` naming both paths. A tokenizer
    that cannot be loaded is left to the CLI's own tokenizer check."""
    tokenizer_path = tokenizer_path or path
    tokenizer_flag = tokenizer_flag or flag
    if not (os.path.isdir(tokenizer_path)
            and any(os.path.isfile(os.path.join(tokenizer_path, f)) for f in _TOKENIZER_FILES)):
        return
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return
    vocab_size = config.get("vocab_size") if isinstance(config, dict) else None
    if not isinstance(vocab_size, int) and isinstance(config, dict):
        vocab_size = (config.get("text_config") or {}).get("vocab_size")
    limits = [v for v in (vocab_size, rows) if isinstance(v, int) and v > 0]
    if not limits:
        return
    try:
        from transformers import AutoTokenizer

        n = len(AutoTokenizer.from_pretrained(tokenizer_path))
    except Exception:  # reported by load_checked_tokenizer where the CLI loads it
        return
    if n > min(limits):
        what = f"vocab_size {vocab_size}" + (f", {rows} embedding rows" if rows is not None else "")
        who = ("its tokenizer" if tokenizer_path == path and tokenizer_flag == flag
               else f"the tokenizer of {tokenizer_flag} {tokenizer_path}")
        raise UsageError(f"{flag} {path}: {who} has {n} tokens but the model only {min(limits)} ({what}): the "
                         "tokenizer and the model do not belong together")


def check_lora(path: Optional[str], flag: str = "--lora") -> Optional[str]:
    if path is None:
        return None
    if not os.path.isdir(path):
        raise UsageError(f"{flag} {path}: no such adapter directory")
    if not os.path.isfile(os.path.join(path, "adapter_config.json")):
        raise UsageError(f"{flag} {path}: not a PEFT adapter (no adapter_config.json)")
    check_weights(path, flag)  # a truncated adapter_model.safetensors, before the base model loads
    return path


def check_device(device: str, flag: str = "--device") -> str:
    """A torch device string that exists on this machine (``cuda`` needs a visible GPU)."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as err:
        raise UsageError(f"{flag} {device!r}: not a device ({_first_line(err)})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"{flag} {device}: CUDA is not available on this machine (use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"{flag} {device}: only {torch.cuda.device_count()} GPU(s) visible")
    return device


def model_context_length(config: Any) -> Optional[int]:
    """The longest sequence (prompt + response) the model takes, from its config; None if it does not say."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    text_config = getattr(config, "text_config", None)
    return model_context_length(text_config) if text_config is not None else None


def load_checked_tokenizer(path: str, flag: str = "--model", need_eos: bool = True) -> Any:
    """The model's tokenizer (pad falls back to EOS), or :class:`UsageError` when it cannot be loaded or has no
    EOS token (generation could never end and sequence rewards are read at EOS)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as err:  # transformers raises many types for a broken directory
        raise UsageError(f"{flag} {path}: cannot load its tokenizer ({_first_line(err)})") from None
    if need_eos and tokenizer.eos_token_id is None:
        raise UsageError(f"{flag} {path}: its tokenizer has no EOS token (set eos_token in "
                         "tokenizer_config.json / special_tokens_map.json)")
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_checked_config(path: str, flag: str = "--model") -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except Exception as err:
        raise UsageError(f"{flag} {path}: cannot load its config ({_first_line(err)})") from None


def check_rm_eval_split(argv: list) -> Optional[str]:
    """For ``train_rm`` without ``--eval.dataset``: OpenRLHF evaluates on the first 1% of the training records
    (the reward mean/std saved with the model come from there), which is empty below 100 records and fails deep
    inside the dataset code. Returns a one-line message for a local JSON/JSONL ``--data.dataset`` that small."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--data.dataset", dest="dataset")
    pre.add_argument("--eval.dataset", dest="eval_dataset")
    pre.add_argument("--data.max_samples", dest="max_samples", type=float, default=1e8)
    known, _ = pre.parse_known_args(argv)
    path = known.dataset
    if known.eval_dataset or not path or "," in path or not os.path.isfile(path):
        return None
    if not path.endswith((".jsonl", ".json")):
        return None
    try:
        with open(path, "rb") as f:
            n = sum(1 for line in f if line.strip()) if path.endswith(".jsonl") else len(json.load(f))
    except (OSError, ValueError, TypeError):
        return None  # OpenRLHF's loader will report it
    n = min(n, int(known.max_samples))
    if int(n * 0.01) == 0:
        return (f"--data.dataset {path}: {n} records, and without --eval.dataset OpenRLHF evaluates on 1% of "
                "them (0 records here); pass --eval.dataset (a held-out file, or the training file itself) or "
                "use at least 100 records")
    return None


_install_startup_interrupt_hook()
