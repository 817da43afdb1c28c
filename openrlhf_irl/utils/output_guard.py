"""Which outputs this package wrote: a marker it leaves in (or beside) each output, and the overlap of paths.

A directory output holds :data:`MARKER`; a file output has a ``<file>.provenance.json`` sidecar (the sampling job's
own provenance, or a short one naming the tool). A tool writes into, over, or deletes only what carries its marker
(or what does not exist yet / is an empty directory) unless the user says ``--overwrite``. Paths are compared as
real paths, so a symlink is judged by what it points to.
"""

from __future__ import annotations

import os
from typing import Optional

from openrlhf_irl.utils.jsonl import atomic_write_json

__all__ = ["MARKER", "OutputConflict", "real", "is_ours", "overlap", "mark_dir", "mark_file", "check_target"]

MARKER = ".openrlhf-irl-output.json"


class OutputConflict(ValueError):
    """An output that would overwrite or delete something this package did not write; one line."""


def real(path: str) -> str:
    """The absolute real path (symlinks resolved, also through a missing last component)."""
    return os.path.realpath(os.path.abspath(os.path.expanduser(path)))


def _sidecar(path: str) -> str:
    return f"{real(path)}.provenance.json"


def is_ours(path: str) -> bool:
    """``path`` is missing, an empty directory, a directory holding :data:`MARKER`, or a file with a sidecar."""
    path = real(path)
    if not os.path.lexists(path):
        return True
    if os.path.isdir(path):
        return not os.listdir(path) or os.path.isfile(os.path.join(path, MARKER))
    return os.path.isfile(_sidecar(path))


def overlap(output: str, other: str) -> Optional[str]:
    """How ``output`` collides with ``other`` (an input or another output): ``"is"`` (the same path or the same
    file through a hard link), ``"lies inside"``, or None."""
    a, b = real(output), real(other)
    if a == b:
        return "is"
    if os.path.exists(a) and os.path.exists(b):
        try:
            if os.path.samefile(a, b):
                return "is"
        except OSError:
            pass
    if a.startswith(b.rstrip(os.sep) + os.sep):
        return "lies inside"
    return None


def _write_marker(path: str, tool: str) -> None:
    from openrlhf_irl import __version__

    atomic_write_json(path, {"written_by": tool, "tool_version": __version__})


def mark_dir(path: str, tool: str) -> None:
    """Create ``path`` if needed and leave the marker in it (kept if there is one)."""
    os.makedirs(real(path), exist_ok=True)
    marker = os.path.join(real(path), MARKER)
    if not os.path.exists(marker):
        _write_marker(marker, tool)


def mark_file(path: str, tool: str) -> None:
    """Leave a provenance sidecar next to the file ``path`` (an existing one, e.g. the sampler's, is kept)."""
    if not os.path.exists(_sidecar(path)):
        _write_marker(_sidecar(path), tool)


def _describe(path: str) -> str:
    if os.path.isdir(path):
        return f"a directory with {len(os.listdir(path))} entries and no {MARKER}"
    return f"a file without {os.path.basename(_sidecar(path))}"


def check_target(path: str, label: str, overwrite: bool) -> None:
    """:class:`OutputConflict` when ``path`` exists and is not :func:`is_ours` (and not ``overwrite``)."""
    if overwrite or is_ours(path):
        return
    shown = path if real(path) == os.path.abspath(path) else f"{path} (-> {real(path)})"
    raise OutputConflict(f"{label} {shown}: exists ({_describe(real(path))}), so it was not written by this "
                         "tool and is left as it is; choose another path, or pass --overwrite to write over it")
