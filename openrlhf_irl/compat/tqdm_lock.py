"""tqdm's write lock in vLLM's processes: a thread lock, not a multiprocessing one.

tqdm guards its bars with a ``multiprocessing.RLock`` made at the first bar of a process. On Linux that is a named
POSIX semaphore, ``/dev/shm/sem.mp-*``, unlinked only when the lock is finalised. vLLM's worker opens a bar while it
loads the weights, so a worker killed by a signal (an engine that dies of SIGILL, a job killed at once) leaves that
32-byte file behind. vLLM starts its processes with spawn, where such a lock is never shared with another process
anyway, so a thread lock keeps every guarantee the bars had. :func:`use_thread_lock` is called by the vLLM plugin at
the start of each vLLM process; upstream, tqdm would not create a process lock that no other process can reach.
"""

from __future__ import annotations

import threading


def use_thread_lock() -> None:
    """tqdm's public ``set_lock`` with a thread lock, before the process opens its first bar."""
    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())
