"""Clean-up of what a job's processes leave behind: vLLM's shared-memory segments and a tagged job's processes.

vLLM's engine processes create ``/dev/shm/psm_*`` buffers (160 MiB each) and ``sem.mp-*`` semaphores and unlink
them only when they shut down cleanly; an engine killed by ``ray.kill``, ``ray.shutdown`` or Ctrl-C leaves them.
The rule here: a segment is *ours* only if one of our own processes mapped it (another job on the machine may be
creating one this instant and not have mapped it yet), and it is removed only once no live process maps it.

* :class:`ShmReaper` / :func:`owned_shm_cleanup`: while running, a background thread records (every
  ``interval_s``, and on :meth:`ShmReaper.note`) the segments this process and its descendants map - a local Ray's
  raylet is a child of the driver that started it, its workers the raylet's, vLLM's engine processes the workers'.
  On exit (normal, exception, Ctrl-C) it waits briefly for the processes that mapped them, then removes those of
  them that no live process maps. A segment created and dropped between two samples is missed.
* :func:`tagged_processes`, :func:`kill_tagged`, :func:`start_reaper`: the processes of a job whose environment
  carries ``RUN_TAG_ENV=tag`` (the PPO launcher's Ray workers, wherever Ray put them), and a watchdog that kills
  them once the driver is gone.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

__all__ = ["SHM_DIR", "SHM_PREFIXES", "RUN_TAG_ENV", "shm_segments", "shm_mapped_by", "remove_stale_shm",
           "ShmReaper", "owned_shm_cleanup", "tagged_processes", "kill_tagged", "start_reaper"]

SHM_DIR = "/dev/shm"
SHM_PREFIXES = ("psm_", "sem.mp-")  # vLLM's shared-memory broadcast buffers, multiprocessing semaphores
RUN_TAG_ENV = "OPENRLHF_IRL_PPO_RUN"


# -------------------------------------------------------------------------------------------- shared memory
def shm_segments() -> set[str]:
    """Names of the segments in :data:`SHM_DIR` with one of :data:`SHM_PREFIXES`."""
    try:
        return {n for n in os.listdir(SHM_DIR) if n.startswith(SHM_PREFIXES)}
    except OSError:
        return set()


def _mapped(pids=None) -> dict[int, str]:
    """``{pid: text of /proc/pid/maps}`` for ``pids`` (every process when None)."""
    out = {}
    for entry in (os.listdir("/proc") if pids is None else map(str, pids)):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/maps", encoding="utf-8", errors="replace") as f:
                out[int(entry)] = f.read()
        except OSError:
            continue
    return out


def _segments_in(maps_text: str) -> set[str]:
    names = set()
    for line in maps_text.splitlines():
        path = line.rsplit(None, 1)[-1] if line.strip() else ""
        if path.startswith(SHM_DIR + "/") and os.path.basename(path).startswith(SHM_PREFIXES):
            names.add(os.path.basename(path))
    return names


def shm_mapped_by(pids) -> set[str]:
    """The shared-memory segments (:data:`SHM_PREFIXES`) that the processes ``pids`` map now."""
    names = set()
    for text in _mapped(pids).values():
        names |= _segments_in(text)
    return names


def remove_stale_shm(candidates: set[str]) -> list[str]:
    """Remove those of ``candidates`` (segments a job's own processes mapped, :func:`shm_mapped_by`) that no live
    process maps any more; returns their names. Only a job's own segments may be candidates."""
    candidates = {n for n in candidates if os.path.exists(os.path.join(SHM_DIR, n))}
    if not candidates:
        return []
    in_use = set()
    for text in _mapped().values():
        in_use.update(n for n in candidates if f"{SHM_DIR}/{n}" in text)
    removed = []
    for name in sorted(candidates - in_use):
        try:
            os.unlink(os.path.join(SHM_DIR, name))
            removed.append(name)
        except OSError:
            pass
    return removed


class ShmReaper:
    """Records the segments this process and its descendants map; :meth:`close` removes those no process maps.

    Use as a context manager (:func:`owned_shm_cleanup`), or :meth:`start` / :meth:`close`. Call :meth:`note` where
    the engines are known to be alive (right after they are ready): the thread samples only every ``interval_s``.
    :meth:`close` waits up to ``wait_s`` for the processes that mapped the segments to exit (``ray.kill`` returns
    before they do).
    """

    def __init__(self, interval_s: float = 1.5, wait_s: float = 10.0) -> None:
        self.interval_s, self.wait_s = interval_s, wait_s
        self.owned: set[str] = set()  # segment names our processes were seen mapping
        self._holders: dict[int, object] = {}  # pid -> psutil.Process that mapped one of them (not this process)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None

    def note(self) -> set[str]:
        """Record, now, the segments this process and its live descendants map; returns them."""
        import psutil

        me = psutil.Process()
        try:
            procs = [me, *me.children(recursive=True)]
        except psutil.Error:
            procs = [me]
        found, holders = set(), {}
        for proc in procs:
            names = shm_mapped_by([proc.pid])
            if names:
                found |= names
                if proc.pid != me.pid:
                    holders[proc.pid] = proc
        with self._lock:
            self.owned |= found
            self._holders.update(holders)
        return found

    def _wait_unmapped(self) -> None:
        """Wait up to ``wait_s`` until no process that mapped our segments maps one any more (or is gone). Polls:
        ``psutil.wait_procs`` would reap a child of this process that its owner (subprocess, multiprocessing)
        waits for."""
        import psutil

        deadline = time.monotonic() + self.wait_s
        while True:
            with self._lock:
                holders, owned = list(self._holders.values()), set(self.owned)
            live = []
            for proc in holders:
                try:
                    if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                        live.append(proc.pid)
                except psutil.Error:
                    pass
            if not (shm_mapped_by(live) & owned) or time.monotonic() >= deadline:
                return
            time.sleep(0.2)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.note()
            except Exception:  # pragma: no cover - a /proc race must not end the sampling
                pass

    def start(self) -> "ShmReaper":
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, name="shm-reaper", daemon=True)
            self._thread.start()
        return self

    def close(self) -> list[str]:
        """Stop sampling, wait for the recorded processes, remove the recorded segments nothing maps any more."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        interrupted = False
        try:
            self.note()
            self._wait_unmapped()
        except KeyboardInterrupt:  # a second Ctrl-C: skip the wait, still remove what is free
            interrupted = True
        except Exception:  # pragma: no cover - best effort
            pass
        with self._lock:
            owned = set(self.owned)
        removed = remove_stale_shm(owned)
        if interrupted:
            raise KeyboardInterrupt
        return removed

    def __enter__(self) -> "ShmReaper":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def owned_shm_cleanup(interval_s: float = 1.5, wait_s: float = 10.0) -> ShmReaper:
    """``with owned_shm_cleanup(): ...``: a started :class:`ShmReaper` for the block."""
    return ShmReaper(interval_s, wait_s).start()


# ------------------------------------------------------------------------------------------- tagged processes
def tagged_processes(tag: str, exclude: tuple[int, ...] = ()) -> list[int]:
    """Pids whose environment carries ``RUN_TAG_ENV=tag``: every Ray worker of the job and what it spawned (vLLM's
    EngineCore and workers inherit it). Ray renames its workers (``ray::PolicyModelActor``), so a command line does
    not name the job; the environment does."""
    needle = f"{RUN_TAG_ENV}={tag}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in exclude:
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    pids.append(int(entry))
        except OSError:
            continue
    return pids


def kill_tagged(tag: str, exclude: tuple[int, ...] = (), grace_s: float = 5.0) -> int:
    """SIGTERM, then SIGKILL after ``grace_s``, every process of the job (:func:`tagged_processes`)."""
    import psutil

    from openrlhf_irl.utils.ray_watchdog import terminate_then_kill

    procs = []
    for pid in tagged_processes(tag, exclude=(os.getpid(), *exclude)):
        try:
            procs.append(psutil.Process(pid))
        except psutil.Error:
            pass
    return terminate_then_kill(procs, grace_s)


_WATCHDOG = """
import sys
from openrlhf_irl.utils.reaper import kill_tagged
sys.stdin.buffer.read()
kill_tagged(sys.argv[1], exclude=(int(sys.argv[2]),))
"""


def start_reaper(tag: str) -> subprocess.Popen:
    """A process in its own session that kills the job's processes once the driver's pipe closes (normal exit,
    Ctrl-C or SIGKILL of the driver alike). Returns it: close its ``stdin`` to trigger the clean-up."""
    return subprocess.Popen([sys.executable, "-c", _WATCHDOG, tag, str(os.getpid())], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            close_fds=True, env={**os.environ, RUN_TAG_ENV: ""})
