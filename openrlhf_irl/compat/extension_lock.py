"""A JIT extension build lock that a killed process cannot leave behind (torch's ``FileBaton``).

DeepSpeed's ops (``deepspeed_shm_comm`` on CPU, ``cpu_adam``, ...) load through
``torch.utils.cpp_extension.load``, which takes ``<TORCH_EXTENSIONS_DIR>/<op>/lock`` around every load (the build
and the no-op ninja check alike) by creating the file with ``O_EXCL``; a waiter polls until the file is gone. A
process killed inside that window (Ctrl-C or SIGKILL while a job starts, an OOM kill) leaves the file, and every
later job of the machine that loads the op then waits forever without a word.

:class:`FlockBaton` keeps torch's protocol (the same file, created the same way, removed on release), and while it
owns the lock it holds an ``flock`` on the file (the kernel drops it when the owner dies) and writes :data:`MARK`
into it. A lock file that nobody holds an ``flock`` on is a dead owner's when it carries the mark and is older than
:data:`STALE_AFTER_S` (the gap between torch's create and our ``flock``); an unmarked one may be a live torch
process without this module (``OPENRLHF_IRL_COMPAT=0``) building the op, and counts as dead only after
:data:`UNMARKED_STALE_AFTER_S`. A waiter removes a dead owner's file and goes on; ``try_acquire`` takes it over.
:func:`install` swaps the class into ``torch.utils.cpp_extension`` (the only user of ``FileBaton`` in torch).
"""

from __future__ import annotations

import fcntl
import os
import time

__all__ = ["FlockBaton", "install", "STALE_AFTER_S", "UNMARKED_STALE_AFTER_S", "MARK"]

STALE_AFTER_S = 2.0
UNMARKED_STALE_AFTER_S = 900.0  # longer than any op build seen here (a few minutes on 2 cores)
MARK = b"openrlhf-irl flock baton\n"
_MARK = "_openrlhf_irl_flock_baton"


def _base():
    from torch.utils.file_baton import FileBaton

    return FileBaton


class FlockBaton(_base()):
    """torch's ``FileBaton`` plus an ``flock`` held while owned; a dead owner's lock file is recovered."""

    def try_acquire(self) -> bool:
        if super().try_acquire():
            fcntl.flock(self.fd, fcntl.LOCK_EX)  # ours: nobody else can flock a file we just created
            with open(self.lock_file_path, "wb") as f:  # torch opened it read-only
                f.write(MARK)
            return True
        fd = self._take_over_stale()
        if fd is None:
            return False
        self.fd = fd
        return True

    def wait(self) -> None:
        while os.path.exists(self.lock_file_path):
            fd = self._take_over_stale()
            if fd is not None:  # the owner died: drop its lock and go on as after a release
                self.fd = fd
                self.release()
                return
            time.sleep(self.wait_seconds)

    def release(self) -> None:
        if self.fd is not None:
            try:
                os.remove(self.lock_file_path)  # before the close: a waiter never sees an unheld, fresh file
            except FileNotFoundError:
                pass
            os.close(self.fd)
            self.fd = None
            return
        super().release()

    def _take_over_stale(self):
        """An fd holding the flock of a lock file whose owner is gone (no flock held, old enough), else None."""
        try:
            fd = os.open(self.lock_file_path, os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # a live owner holds it
            os.close(fd)
            return None
        try:
            st_file, st_fd = os.stat(self.lock_file_path), os.fstat(fd)
            same = (st_file.st_ino, st_file.st_dev) == (st_fd.st_ino, st_fd.st_dev)
            marked = os.pread(fd, len(MARK), 0) == MARK
            stale = time.time() - st_fd.st_mtime > (STALE_AFTER_S if marked else UNMARKED_STALE_AFTER_S)
        except OSError:  # released meanwhile
            same = stale = False
        if same and stale:
            return fd
        os.close(fd)  # a new owner between its create and its flock, or a file replaced meanwhile
        return None


def install() -> bool:
    """Use :class:`FlockBaton` for torch's JIT extension builds (idempotent). Returns whether it is installed."""
    from torch.utils import cpp_extension

    if getattr(cpp_extension.FileBaton, _MARK, False):
        return True
    if cpp_extension.FileBaton is not _base():  # someone else replaced it: leave theirs alone
        return False
    setattr(FlockBaton, _MARK, True)
    cpp_extension.FileBaton = FlockBaton
    return True
