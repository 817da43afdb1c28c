"""JSONL reading with precise error messages, atomic writes, and crash-tolerant appends.

Errors are :class:`DataError` (a ``ValueError``) whose message names the file, the 1-based line
number and, where one is involved, the field: ``data.jsonl, line 3, field 'prompt': missing``.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import tempfile
from collections import Counter
from contextlib import contextmanager
from typing import IO, Any, Iterable, Iterator, Optional, Sequence, Tuple, Union

PathLike = Union[str, "os.PathLike[str]"]

__all__ = [
    "DataError",
    "read_jsonl",
    "atomic_writer",
    "atomic_write_jsonl",
    "atomic_write_json",
    "append_jsonl",
    "read_jsonl_tolerant_tail",
]


class DataError(ValueError):
    """A problem with input data, located by file, line and field.

    ``reason`` is a short key (``invalid_json``, ``missing_field``, ...) used to count lenient skips.
    """

    def __init__(
        self,
        message: str,
        *,
        path: Optional[PathLike] = None,
        line_no: Optional[int] = None,
        field: Optional[str] = None,
        reason: str = "error",
    ) -> None:
        super().__init__(message)
        self.path = None if path is None else os.fspath(path)
        self.line_no = line_no
        self.field = field
        self.reason = reason


def data_error(
    path: PathLike, line_no: Optional[int], problem: str, *, field: Optional[str] = None, reason: str
) -> DataError:
    """Build a :class:`DataError` with the standard ``file, line N, field 'f': problem`` message."""
    where = os.fspath(path)
    if line_no is not None:
        where += f", line {line_no}"
    if field is not None:
        where += f", field '{field}'"
    return DataError(f"{where}: {problem}", path=path, line_no=line_no, field=field, reason=reason)


def _parse_line(path: PathLike, line_no: int, raw: bytes, required: Sequence[str]) -> Optional[dict]:
    """Decode one raw line; ``None`` for a blank line, :class:`DataError` for a bad one."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise data_error(path, line_no, f"not valid UTF-8 (byte {e.start}: {e.reason})", reason="non_utf8") from None
    if line_no == 1:
        text = text.lstrip("\ufeff")
    if not text.strip():
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise data_error(path, line_no, f"invalid JSON ({e.msg} at column {e.colno})", reason="invalid_json") from None
    if not isinstance(record, dict):
        raise data_error(
            path, line_no, f"expected a JSON object, got {type(record).__name__}", reason="not_object"
        )
    for key in required:
        if key not in record:
            raise data_error(path, line_no, "missing", field=key, reason="missing_field")
        if not isinstance(record[key], str):
            got = type(record[key]).__name__
            raise data_error(path, line_no, f"expected a string, got {got}", field=key, reason="non_string_field")
    return record


def read_jsonl(
    path: PathLike,
    *,
    required: Sequence[str] = (),
    lenient: bool = False,
    skipped: Optional[Counter] = None,
) -> Iterator[Tuple[int, dict]]:
    """Yield ``(line_no, record)`` for each non-blank line of a JSONL file (line numbers are 1-based).

    Every record must be a JSON object whose ``required`` fields are strings. A bad line raises
    :class:`DataError`; with ``lenient=True`` it is skipped and counted in ``skipped[reason]``
    (reasons: ``non_utf8``, ``invalid_json``, ``not_object``, ``missing_field``, ``non_string_field``).
    """
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                record = _parse_line(path, line_no, raw, required)
            except DataError as e:
                if not lenient:
                    raise
                if skipped is not None:
                    skipped[e.reason] += 1
                continue
            if record is not None:
                yield line_no, record


def _nonfinite_field(obj: Any, prefix: str = "") -> Optional[Tuple[str, float]]:
    """The dotted path and value of the first NaN/inf float in ``obj``, None if there is none."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return prefix or "(value)", obj
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for key, value in items:
        found = _nonfinite_field(value, f"{prefix}.{key}" if prefix else str(key))
        if found:
            return found
    return None


def _dumps(obj: Any, path: PathLike, line_no: Optional[int], **kwargs: Any) -> str:
    """Strict JSON (no ``NaN``/``Infinity``, which JSON does not have): :class:`DataError` naming the field."""
    try:
        return json.dumps(obj, ensure_ascii=False, allow_nan=False, **kwargs)
    except ValueError:
        found = _nonfinite_field(obj)
        if found is None:
            raise
        field, value = found
        raise data_error(path, line_no, f"{value} is not a finite number, and JSON cannot hold it; nothing "
                         "written", field=field, reason="nonfinite") from None


def _dump_line(record: Any, path: PathLike = "<jsonl>", line_no: Optional[int] = None) -> str:
    return _dumps(record, path, line_no) + "\n"


def _fsync_dir(directory: str) -> None:
    """Persist a rename; best effort (not every platform can open a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _target_mode(path: str) -> int:
    """Permissions for the new file: the existing target's, else the umask default."""
    try:
        return os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


TEMP_SUFFIX = ".openrlhf-irl.tmp"  # the temp files of atomic_writer: ".<target name>.<random>.openrlhf-irl.tmp"


def _remove_dead_temps(directory: str, name: str) -> None:
    """Remove the temp files an :func:`atomic_writer` of ``name`` left when its process was killed: those of this
    name and suffix on which no live process holds the writer's flock."""
    for entry in os.listdir(directory):
        if not (entry.startswith(f".{name}.") and entry.endswith(TEMP_SUFFIX)):
            continue
        path = os.path.join(directory, entry)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.unlink(path)
        except OSError:  # locked: a live writer's
            pass
        finally:
            os.close(fd)


@contextmanager
def atomic_writer(path: PathLike, mode: str = "w") -> Iterator[IO]:
    """Open a temp file next to ``path``; on a clean exit fsync it and ``os.replace`` it onto ``path``.

    On an exception the temp file is removed and ``path`` is left untouched; the temp file a killed process left
    (no exception runs then) is removed by the next write of ``path``. ``mode`` is ``"w"``
    (UTF-8 text) or ``"wb"``.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_writer mode must be 'w' or 'wb', got {mode!r}")
    target = os.path.realpath(os.path.abspath(os.fspath(path)))  # through a symlink: its target gets the content
    directory, name = os.path.split(target)
    _remove_dead_temps(directory, name)
    while True:  # a live writer holds an flock on its temp file, so another writer's clean-up leaves it alone
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=TEMP_SUFFIX)
        fcntl.flock(fd, fcntl.LOCK_EX)
        if os.fstat(fd).st_nlink:
            break
        os.close(fd)  # removed by a clean-up in the instant before the flock: take another
    try:
        encoding = None if mode == "wb" else "utf-8"
        with open(fd, mode, encoding=encoding, closefd=False) as f:  # fd, and its flock, kept until replaced
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _target_mode(target))
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    finally:
        os.close(fd)
    _fsync_dir(directory)


def atomic_write_jsonl(path: PathLike, records: Iterable[Any]) -> int:
    """Atomically replace ``path`` with one JSON line per record; return the number written."""
    n = 0
    with atomic_writer(path) as f:
        for record in records:
            n += 1
            f.write(_dump_line(record, path, n))
    return n


def atomic_write_json(path: PathLike, obj: Any, *, indent: int = 2) -> None:
    """Atomically replace ``path`` with ``obj`` as a JSON document."""
    text = _dumps(obj, path, None, indent=indent)
    with atomic_writer(path) as f:
        f.write(text + "\n")


def append_jsonl(path: PathLike, records: Iterable[Any]) -> int:
    """Append complete JSON lines to ``path`` (created if missing), then flush and fsync.

    A crash during the write may leave a partial last line; call :func:`read_jsonl_tolerant_tail`
    before appending again. Appending after a partial line raises :class:`DataError` rather than
    gluing the new record onto it. Returns the number of records appended.
    """
    data = "".join(_dump_line(r, path) for r in records).encode("utf-8")
    with open(path, "a+b") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                raise data_error(
                    path,
                    None,
                    "last line is incomplete; call read_jsonl_tolerant_tail() before appending",
                    reason="partial_tail",
                )
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return data.count(b"\n")


def read_jsonl_tolerant_tail(
    path: PathLike, *, truncate: bool = True, skipped: Optional[Counter] = None
) -> list:
    """Return the complete records of a JSONL file written by :func:`append_jsonl`.

    A trailing line without its newline is the remnant of an interrupted append: it is ignored
    (counted as ``skipped["partial_tail"]``) and, with ``truncate=True``, cut off the file so later
    appends start on a clean line. Bad complete lines raise :class:`DataError`. A missing file
    reads as no records.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return []
    end = data.rfind(b"\n") + 1
    if end < len(data):
        if skipped is not None:
            skipped["partial_tail"] += 1
        if truncate:
            with open(path, "r+b") as f:
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())
    records = []
    for line_no, raw in enumerate(data[:end].split(b"\n")[:-1], start=1):
        record = _parse_line(path, line_no, raw, ())
        if record is not None:
            records.append(record)
    return records
