"""A terminal a person can read during a long multi-stage run.

:func:`stage_output` sends everything written to file descriptors 1 and 2 while a stage runs (this process's
prints and ``logging``, C libraries, child processes, Ray's log forwarding) to the stage's log file, and on failure
shows the log's last lines; :class:`StageProgress` writes one line per stage and a plain-text progress bar to the
terminal that was there before any redirection. Redirections nest: a run-level log can catch what arrives between
stages while each stage has its own file.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import sys
import threading
import time
from typing import Callable, Iterator

# (stdout, stderr) duplicates of what each active redirection replaced, outermost first: [0] is the terminal.
_saved: list[tuple[int, int]] = []


def _flush() -> None:
    """Flush Python's and C stdio's buffers, so that nothing written before a switch lands after it."""
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):
        pass


def write_terminal(text: str, err: bool = False) -> None:
    """Write ``text`` to the terminal as it was before every active :func:`stage_output` (unbuffered)."""
    if not _saved:
        stream = sys.stderr if err else sys.stdout
        stream.write(text)
        stream.flush()
        return
    data = text.encode(errors="replace")
    fd = _saved[0][1 if err else 0]
    while data:
        data = data[os.write(fd, data):]


def terminal_is_tty() -> bool:
    try:
        return os.isatty(_saved[0][0]) if _saved else sys.stdout.isatty()
    except (AttributeError, OSError, ValueError):
        return False


def tail_lines(path: str, n: int = 20) -> list[str]:
    """The last ``n`` non-empty lines of a log; of a line redrawn with carriage returns (progress bars), the last
    drawing."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 65536))
            text = f.read().decode(errors="replace")
    except OSError:
        return []
    lines = [[seg for seg in line.split("\r") if seg.strip()] for line in text.split("\n")]
    return [segs[-1].rstrip() for segs in lines if segs][-n:]


def shown_path(path: str) -> str:
    """``path`` relative to the working directory when it lies below it, else absolute."""
    rel = os.path.relpath(os.path.abspath(path))
    return path if rel.startswith("..") else rel


@contextlib.contextmanager
def stage_output(log_path: str, verbose: bool = False, tail: int = 20,
                 on_error: Callable[[BaseException], None] | None = None) -> Iterator[str | None]:
    """Send fds 1 and 2 to ``log_path`` (truncated) for the block's duration; yields the path (``None`` when
    ``verbose``: nothing is redirected). If the block raises, ``on_error(exc)`` runs once the fds are back, then the
    log's last ``tail`` lines and its path go to the terminal's stderr, and the exception propagates (an enclosing
    ``stage_output`` does not show it again)."""
    if verbose:
        try:
            yield None
        except BaseException as exc:
            if on_error and not getattr(exc, "_stage_log_shown", False):
                on_error(exc)
            raise
        return
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    _flush()
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
    saved = (os.dup(1), os.dup(2))
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    _saved.append(saved)
    try:
        yield log_path
    except BaseException as exc:
        _restore(saved)
        if not getattr(exc, "_stage_log_shown", False):
            if on_error:
                on_error(exc)
            where = shown_path(log_path)
            if isinstance(exc, KeyboardInterrupt):
                write_terminal(f"interrupted; log: {where}\n", err=True)
            else:
                body = "".join(f"  | {line}\n" for line in tail_lines(log_path, tail))
                write_terminal(f"--- last lines of {where} ---\n{body}--- full log: {where} ---\n", err=True)
            with contextlib.suppress(AttributeError, TypeError):
                exc._stage_log_shown = True
        raise
    else:
        _restore(saved)


def _restore(saved: tuple[int, int]) -> None:
    _flush()
    os.dup2(saved[0], 1)
    os.dup2(saved[1], 2)
    _saved.remove(saved)
    os.close(saved[0])
    os.close(saved[1])


def log_name(index: int, stage: str) -> str:
    """``03-afd-samples-and-reward-models.log`` for stage 3 "AfD samples and reward models (...)"."""
    slug = re.sub(r"[^a-z0-9]+", "-", stage.split("(")[0].lower()).strip("-")[:40].rstrip("-")
    return f"{index:02d}-{slug or 'stage'}.log"


def fmt_duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    s = int(round(seconds))
    return f"{s // 60} m {s % 60:02d} s" if s < 3600 else f"{s // 3600} h {s % 3600 // 60:02d} m"


class StageProgress:
    """One line per stage and a progress bar over ``plan`` (stage names in run order, repeated per seed), e.g.::

        [3/8] AfD samples and reward models .............. 41.2 s
        [########------------] 3/8 stages, 1 m 52 s elapsed

    Plain lines when the terminal is not a TTY (CI logs) or in verbose mode, where a start line names the stage's
    log; on a TTY the running stage's line counts its seconds in place instead. Once every remaining stage name has
    run, the bar adds an estimate of the time left (the mean time of each remaining stage)."""

    def __init__(self, plan: list[str], unit: str = "stages", bar_width: int = 20):
        self.plan, self.unit, self.bar_width = list(plan), unit, bar_width
        self.done, self.start = 0, time.time()
        self.seconds: dict[str, list[float]] = {}
        self.width = max(map(len, self.plan), default=20) + 12
        self.tty = terminal_is_tty()
        self._stop: threading.Event | None = None
        self._ticker: threading.Thread | None = None

    def _dots(self, label: str) -> str:
        return f"{label} {'.' * max(3, self.width - len(label) - 1)} "

    def bar(self) -> str:
        total = len(self.plan)
        filled = round(self.bar_width * self.done / total) if total else self.bar_width
        text = (f"[{'#' * filled}{'-' * (self.bar_width - filled)}] {self.done}/{total} {self.unit}, "
                f"{fmt_duration(time.time() - self.start)} elapsed")
        rest = self.plan[self.done:]
        if rest and all(name in self.seconds for name in rest):
            left = sum(sum(self.seconds[n]) / len(self.seconds[n]) for n in rest)
            text += f", about {fmt_duration(left)} left"
        return text

    def _finish(self, name: str | None, line: str, seconds: float | None) -> None:
        if name is not None:
            self.done += 1
            if seconds is not None:
                self.seconds.setdefault(name, []).append(seconds)
        write_terminal(f"{line}\n{self.bar()}\n")

    def skip(self, names: dict[str, float], label: str) -> None:
        """Count stages that need not run (a reused seed) with their recorded seconds; one line for all of them."""
        for name, sec in names.items():
            self.done += 1
            self.seconds.setdefault(name, []).append(sec)
        write_terminal(f"{label}\n{self.bar()}\n")

    def message(self, text: str) -> None:
        write_terminal(text.rstrip("\n") + "\n")

    def _tick(self, label: str, started: float, stop: threading.Event) -> None:
        while not stop.wait(1.0):
            write_terminal(f"\r{self._dots(label)}{fmt_duration(time.time() - started)}\x1b[K")

    def _stop_ticker(self) -> None:
        if self._ticker is not None:
            self._stop.set()
            self._ticker.join()
            self._ticker = None

    @contextlib.contextmanager
    def stage(self, name: str, log_path: str, verbose: bool = False, label: str | None = None) -> Iterator[None]:
        """Run one stage inside :func:`stage_output` (``verbose``: no redirection), with its stage line."""
        label = label or name
        started = time.time()
        live = self.tty and not verbose
        if live:
            write_terminal(self._dots(label))
            self._stop = threading.Event()
            self._ticker = threading.Thread(target=self._tick, args=(label, started, self._stop), daemon=True)
            self._ticker.start()
        else:
            write_terminal(f"{label}" + ("" if verbose else f" (log: {shown_path(log_path)})") + "\n")

        def failed(exc: BaseException) -> None:
            what = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
            self._finish(None, ("\r" if live else "") + self._dots(label) + f"{what} after "
                         f"{fmt_duration(time.time() - started)}" + ("\x1b[K" if live else ""), None)

        with stage_output(log_path, verbose, on_error=failed):
            try:
                yield
            finally:
                self._stop_ticker()
        seconds = time.time() - started
        self._finish(name, ("\r" if live else "") + self._dots(label) + fmt_duration(seconds)
                     + ("\x1b[K" if live else ""), seconds)
