"""The vLLM plugin gives tqdm a thread lock in every vLLM process: tqdm's default multiprocessing lock is a named
semaphore in /dev/shm that a vLLM worker killed by a signal left behind (test_reaper's engine-dies case)."""

from __future__ import annotations

import json

import pytest
from helpers import run_python

from openrlhf_irl.compat import versions

PROBE = """
import json, os
from vllm.plugins import load_general_plugins
load_general_plugins()  # what every vLLM process does at its start
from tqdm import tqdm
from tqdm.std import TqdmDefaultWriteLock
for _ in tqdm(range(2), disable=True):  # as vLLM's weight loading opens a bar
    pass
print("TQDM " + json.dumps({"lock": type(tqdm.get_lock()).__name__,
                            "process_lock": getattr(TqdmDefaultWriteLock, "mp_lock", None) is not None}))
"""


def probe(env: dict) -> dict:
    proc = run_python(["-c", PROBE], env=env, timeout=300)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("TQDM ")), None)
    assert line, proc.stderr[-2000:]
    return json.loads(line[5:])


@pytest.mark.skipif(not versions.supported("vllm"), reason="the plugin acts only for a supported vLLM")
def test_vllm_processes_take_a_thread_lock_for_tqdm_and_no_process_lock():
    assert probe({}) == {"lock": "RLock", "process_lock": False}
    # without the CPU layer, tqdm makes its process lock (the semaphore): the probe can tell the two apart
    assert probe({"OPENRLHF_IRL_COMPAT": "0"})["process_lock"] is True
