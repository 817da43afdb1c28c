"""SIGTERM as a Ctrl-C: a job stopped by ``kill`` or a scheduler runs its clean-up (engines, Ray, shared memory)
instead of ending at once."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

_handler = None  # the handler sigterm_unwinds() installed, while it is active
_received = False  # whether SIGTERM arrived inside sigterm_unwinds()


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like a Ctrl-C so that every ``finally`` runs."""


def _terminate(signum, frame):
    global _received
    _received = True
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM does not cut the clean-up short
    raise Terminated()


def terminated() -> bool:
    """Whether SIGTERM stopped the current :func:`sigterm_unwinds` block (libraries such as Ray's ``get`` may turn
    :class:`Terminated` into a plain KeyboardInterrupt on its way up)."""
    return _received


@contextmanager
def sigterm_unwinds():
    """While inside: SIGTERM raises :class:`Terminated` in the main thread instead of ending the process at once,
    which would skip every clean-up. Outside the main thread, nothing changes."""
    global _handler, _received
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminate)
    _handler, _received = _terminate, False
    try:
        yield
    finally:
        _handler = None
        signal.signal(signal.SIGTERM, previous)


def reclaim_sigterm() -> None:
    """Install :func:`sigterm_unwinds`'s handler again where a library replaced it: ``ray.init`` puts in Ray's
    failure handler, which logs the signal and aborts the driver without any clean-up."""
    if _handler is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _handler)
