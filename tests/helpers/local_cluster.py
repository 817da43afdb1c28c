"""A Ray cluster of several nodes on this machine, for the multi-node tests (docs/multinode.md).

``ray.cluster_utils.Cluster`` starts a head (GCS, dashboard with the Jobs API, raylet) and one raylet per extra
node, each a "node" of its own with its own logical CPUs and a custom resource naming it (``node_head``,
``node_w1``, ...). :meth:`LocalCluster.shutdown` stops exactly those processes through the cluster's own handle
(never ``ray stop``, which would stop every Ray on the machine) and removes everything the cluster wrote.

Ports: every node's dashboard agent gets a free port of its own (Ray's default, 52365, is taken by the first Ray
started on the machine, and a head whose agent cannot bind it accepts no job: "No available agent to submit job").

Where Ray writes: the nodes' session folders go under ``temp_dir`` (a private folder), but Ray 2.55's ``Cluster``
also writes the head's address to ``<RAY_TMPDIR or TMPDIR or /tmp>/ray/ray_current_cluster`` and fails if that
folder is missing. The folder is created here when missing (and removed at shutdown, only if created here; a
folder that existed before is never removed), and the address file is deleted as soon as the head is up: while it
exists, any ``ray.init()`` without an address on this machine (another test's, another agent's) would join this
cluster instead of starting its own Ray. The same file is written into each node's own temp folder instead, as
``ray start --temp-dir`` does: a submitted job's supervisor reads it there to tell its driver which cluster to join.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import threading
import time
from dataclasses import dataclass, field

import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(roots) -> dict[int, psutil.Process]:
    """``roots`` (``psutil.Process``) and their live descendants, by pid. A ``psutil.Process`` keeps the process's
    start time: this machine's pids wrap around (``pid_max`` 32768) within a test run, so a pid alone may name
    another job's process minutes later (a vLLM worker of a test running beside this one)."""
    out = {}
    for proc in roots:
        try:
            if not proc.is_running():
                continue
            out[proc.pid] = proc
            out.update((child.pid, child) for child in proc.children(recursive=True))
        except psutil.Error:
            pass
    return out


def _alive(procs) -> list[psutil.Process]:
    """Those of ``procs`` still running (the same process: ``is_running`` checks its start time) and not zombies."""
    alive = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except psutil.Error:
            pass
    return alive


@dataclass
class LocalCluster:
    """A running head + workers. ``address``: the GCS address (``RAY_ADDRESS`` for drivers); ``dashboard_url``:
    ``http://127.0.0.1:P`` for ``ray job submit --address``; ``node_ids``: custom resource name -> Ray node id."""

    cluster: object
    address: str
    dashboard_url: str
    temp_dir: str
    node_ids: dict[str, str]
    node_cpus: dict[str, int]
    _created_dirs: list[str] = field(default_factory=list)
    _procs: dict[int, psutil.Process] = field(default_factory=dict)  # pid -> process, start time included
    left_alive: list[int] = field(default_factory=list)
    shm_seen: set[str] = field(default_factory=set)  # /dev/shm segments the cluster's processes were seen mapping
    left_shm: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _watcher: threading.Thread | None = None

    def _note(self) -> None:
        from openrlhf_irl.utils.reaper import shm_mapped_by

        procs = self.processes()
        for pid, proc in procs.items():
            known = self._procs.get(pid)
            if known is None or not known.is_running():  # a pid reused since: the new process is the one now
                self._procs[pid] = proc
        self.shm_seen |= shm_mapped_by(list(procs))

    def _watch(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                self._note()
            except Exception:  # a /proc race must not end the watch
                pass

    def start_watch(self, interval_s: float = 1.5) -> None:
        """Sample, every ``interval_s``, the cluster's processes and the shared-memory segments they map."""
        self._watcher = threading.Thread(target=self._watch, args=(interval_s,), daemon=True, name="cluster-watch")
        self._watcher.start()

    def available(self) -> dict[str, dict]:
        """Free resources per node id (the GCS's view; no driver needed)."""
        return self.cluster.global_state.available_resources_per_node()

    def total(self) -> dict[str, float]:
        return self.cluster.global_state.cluster_resources()

    def wait_available(self, expected: dict[str, dict], timeout_s: float = 60.0) -> dict[str, dict]:
        """Poll until the free resources equal ``expected`` (Ray frees a finished job's resources asynchronously);
        returns the last reading."""
        deadline = time.monotonic() + timeout_s
        while (now := self.available()) != expected and time.monotonic() < deadline:
            time.sleep(0.5)
        return now

    def dead_services(self) -> list[str]:
        """The nodes' Ray services (GCS, raylets, dashboard, ...) no longer running: what a failed job reports."""
        dead = []
        for name, node in [("head", self.cluster.head_node), *[(f"worker{i}", n) for i, n in
                                                                enumerate(self.cluster.worker_nodes, 1)]]:
            for kind, infos in node.all_processes.items():
                dead += [f"{name}:{kind}" for info in infos if info.process is not None and info.process.poll()
                         is not None]
        return dead

    def processes(self) -> dict[int, psutil.Process]:
        """The live processes the cluster's nodes started (GCS, raylets, dashboard, workers, ...), by pid. Only
        services their ``Popen`` still reports running are roots: a dead one's pid may be another process's now."""
        roots = []
        for node in self.cluster.list_all_nodes():
            for infos in node.all_processes.values():
                for info in infos:
                    if info.process is not None and info.process.poll() is None:
                        try:
                            roots.append(psutil.Process(info.process.pid))
                        except psutil.Error:
                            pass
        return _descendants(roots)

    def shutdown(self, timeout_s: float = 30.0) -> list[int]:
        """Stop every node by the cluster's handle; returns the pids of the cluster still alive after
        ``timeout_s`` (none expected; killed, by id), also kept in ``left_alive``. ``left_shm``: the segments the
        cluster's processes mapped that were still in /dev/shm once they had all exited (removed then)."""
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join()
        try:
            self._note()
        except Exception:
            pass
        try:
            self.cluster.shutdown()
        finally:
            deadline = time.monotonic() + timeout_s
            while _alive(self._procs.values()) and time.monotonic() < deadline:
                time.sleep(0.3)
            left = _alive(self._procs.values())
            self.left_alive = [proc.pid for proc in left]
            for proc in left:  # only our own processes: psutil refuses a pid reused since it was recorded
                try:
                    proc.kill()
                except psutil.Error:
                    pass
            from openrlhf_irl.utils.reaper import remove_stale_shm

            self.left_shm = sorted(n for n in self.shm_seen if os.path.exists(os.path.join("/dev/shm", n)))
            remove_stale_shm(set(self.left_shm))  # only segments the cluster's own processes mapped
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            for path in reversed(self._created_dirs):
                shutil.rmtree(path, ignore_errors=True)
        return self.left_alive


def start_local_cluster(temp_dir: str, head_cpus: int = 2, workers: tuple[int, ...] = (2,),
                        object_store_mib: int = 200) -> LocalCluster:
    """A head with ``head_cpus`` logical CPUs and the dashboard on a free port, plus one worker node per entry of
    ``workers`` (its logical CPUs); node ``i`` carries the custom resource ``node_w<i>`` (the head ``node_head``)."""
    from ray._common.utils import get_default_ray_temp_dir, reset_ray_address
    from ray._private.utils import write_ray_address
    from ray.cluster_utils import Cluster

    created = []
    address_dir = get_default_ray_temp_dir()  # where Cluster writes ray_current_cluster
    if not os.path.isdir(address_dir):
        os.makedirs(address_dir)
        created.append(address_dir)
    os.makedirs(temp_dir, exist_ok=True)
    port = free_port()
    store = object_store_mib * 2**20
    cluster = None
    path = os.environ.get("PATH", "")
    # as `ray start` run from an activated virtualenv: a job's `python` is this interpreter
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + path
    try:
        cluster = Cluster(initialize_head=True, shutdown_at_exit=True, head_node_args=dict(
            num_cpus=head_cpus, resources={"node_head": 1}, include_dashboard=True, dashboard_host="127.0.0.1",
            dashboard_port=port, dashboard_agent_listen_port=free_port(), temp_dir=temp_dir,
            object_store_memory=store))
        reset_ray_address()  # nothing joins this cluster by accident (see the module's docstring)
        node_ids = {"node_head": cluster.head_node.node_id}
        node_cpus = {"node_head": head_cpus}
        for i, cpus in enumerate(workers, start=1):
            # a temp dir of its own, as a node on another machine has: sharing the head's session folder, each
            # node's runtime-env agent re-extracts a job's working_dir into the same place (overwrite=True), and a
            # job's driver on one node saw its package's modules vanish while the other node unpacked it
            node = cluster.add_node(num_cpus=cpus, resources={f"node_w{i}": 1}, object_store_memory=store,
                                    dashboard_agent_listen_port=free_port(), temp_dir=os.path.join(temp_dir, f"w{i}"))
            node_ids[f"node_w{i}"] = node.node_id
            node_cpus[f"node_w{i}"] = cpus
        cluster.wait_for_nodes()
        os.environ["PATH"] = path
        for node in cluster.list_all_nodes():
            # where a job's supervisor looks up the cluster to hand its driver (RAY_ADDRESS): without this file it
            # takes any GCS process it finds on the machine, and with another test's Ray running beside this
            # cluster a submitted job's driver joined that Ray and died with it ("Owner's node has crashed")
            write_ray_address(cluster.gcs_address, node.get_temp_dir_path())
    except BaseException:
        os.environ["PATH"] = path
        if cluster is not None:
            cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
        for path in created:
            shutil.rmtree(path, ignore_errors=True)
        raise
    handle = LocalCluster(cluster=cluster, address=cluster.address, dashboard_url=f"http://127.0.0.1:{port}",
                          temp_dir=temp_dir, node_ids=node_ids, node_cpus=node_cpus, _created_dirs=created)
    handle._procs = handle.processes()
    handle.start_watch()
    try:
        _wait_for_jobs_api(handle.dashboard_url)
    except BaseException:
        handle.shutdown()
        raise
    return handle


def _wait_for_jobs_api(url: str, timeout_s: float = 180.0) -> None:
    """The head's Jobs API accepts and runs a job: the dashboard starts after the head's raylet, and its job agent
    later still ("No available agent to submit job" until then). A probe job (``true``) is submitted until it is
    accepted, then waited for."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client = JobSubmissionClient(url)
            job = client.submit_job(entrypoint="true")
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)
    while (status := client.get_job_status(job)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the probe job {job} is still {status}")
        time.sleep(0.5)
    if status != JobStatus.SUCCEEDED:
        raise RuntimeError(f"the probe job {job} ended {status}: {client.get_job_logs(job)[-2000:]}")
