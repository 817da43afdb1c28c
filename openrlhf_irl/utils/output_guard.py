"""Which outputs this package wrote: a marker it leaves in (or beside) each output, and the overlap of paths.

A directory output holds :data:`MARKER`; a file output has a ``<file>.provenance.json`` sidecar (the sampling job's
own provenance, or a short one naming the tool). A tool writes into, over, or deletes only what carries its marker
(or what does not exist yet / is an empty directory) unless the user says ``--overwrite``. Paths are compared as
real paths, so a symlink is judged by what it points to.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from typing import Optional, Sequence

from openrlhf_irl.utils.jsonl import atomic_write_json

__all__ = ["MARKER", "OutputConflict", "real", "is_ours", "overlap", "mark_dir", "mark_file", "check_target",
           "STAGING", "OutputUnit"]

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


STAGING = ".openrlhf-irl-staging"  # inside an output directory: the unit being written (only this package makes it)


class OutputUnit:
    """The files ``names`` of one run in ``directory``, written as a unit.

    Creating it locks ``directory`` (``flock``, held until :meth:`close` or the process ends: a second job gets
    :class:`OutputConflict` "another job is writing ...") and removes the staging folder a killed earlier run left.
    The run writes each new file to :meth:`path` (in the staging folder); :meth:`commit` removes the previous run's
    files of the unit, then moves the new ones in. ``names`` is in writing order and its last file says the unit is
    complete: it leaves first and arrives last, so a kill at any point leaves the old unit whole, the new one whole,
    or a unit without its last file, never an old file beside a new one. :meth:`set_aside` takes the previous run's
    files out of sight at once (for a run that first changes what they were computed from); ``close(restore=True)``
    puts them back when nothing was committed.
    """

    def __init__(self, directory: str, names: Sequence[str], flag: str = "--output-dir") -> None:
        self.dir, self.names, self.committed = real(directory), tuple(names), False
        self.fd = os.open(self.dir, os.O_RDONLY)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise OutputConflict(f"{flag} {directory}: another job is writing into this directory (it is locked); "
                                 f"wait for it or choose another {flag}") from None
        self.staging = os.path.join(self.dir, STAGING)
        shutil.rmtree(self.staging, ignore_errors=True)  # a killed earlier run's unit, never committed
        os.makedirs(os.path.join(self.staging, "new"))

    def path(self, name: str) -> str:
        """Where the run writes ``name`` (moved into ``directory`` by :meth:`commit`)."""
        return os.path.join(self.staging, "new", name)

    def set_aside(self) -> None:
        """Move the previous run's files of the unit out of ``directory`` (last name first)."""
        os.makedirs(os.path.join(self.staging, "old"), exist_ok=True)
        for name in reversed(self.names):
            if os.path.lexists(os.path.join(self.dir, name)):
                os.replace(os.path.join(self.dir, name), os.path.join(self.staging, "old", name))

    def commit(self) -> None:
        """Remove the previous run's files (last name first), then move the new ones in (last name last)."""
        for name in reversed(self.names):
            if os.path.lexists(os.path.join(self.dir, name)):
                os.unlink(os.path.join(self.dir, name))
        for name in self.names:
            if os.path.lexists(self.path(name)):
                os.replace(self.path(name), os.path.join(self.dir, name))
        os.fsync(self.fd)
        self.committed = True

    def close(self, restore: bool = False) -> None:
        """Remove the staging folder (with ``restore`` and nothing committed, the set-aside files go back first) and
        release the lock."""
        if self.fd is None:
            return
        old = os.path.join(self.staging, "old")
        if restore and not self.committed and os.path.isdir(old):
            for name in self.names:
                if os.path.lexists(os.path.join(old, name)):
                    os.replace(os.path.join(old, name), os.path.join(self.dir, name))
        shutil.rmtree(self.staging, ignore_errors=True)
        os.close(self.fd)  # closing drops the flock
        self.fd = None

    def __enter__(self) -> "OutputUnit":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
