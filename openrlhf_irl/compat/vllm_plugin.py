"""vLLM general plugin (entry point ``vllm.general_plugins: openrlhf_irl``): vLLM calls :func:`register` at the start
of each of its processes (API server, EngineCore, workers). It is the one route into the vLLM worker process, which
vLLM spawns itself, so it is where the CPU engine-side fixes of :mod:`openrlhf_irl.compat.vllm_cpu` are installed,
and where each vLLM process on an AMX CPU asks for the AMX state before its first kernel (:mod:`.vllm_amx`) and
takes a thread lock for its progress bars (:mod:`.tqdm_lock`).

It does nothing on a GPU platform, with ``OPENRLHF_IRL_COMPAT=0`` or for a vLLM version the layer was not written
for (:mod:`.versions`); for an unsupported OpenRLHF it makes only the AMX request and sets the tqdm lock. It imports
nothing from OpenRLHF itself: the patches apply when vLLM imports OpenRLHF's worker extension
(``--worker-extension-cls openrlhf.trainer.ray.vllm_worker_wrap.WorkerWrap``).
"""

from __future__ import annotations

import os


def register() -> None:
    from openrlhf_irl import compat

    if os.environ.get(compat.ENV_SWITCH, "1") == "0":
        return
    from vllm.platforms import current_platform

    from .versions import supported

    if not (current_platform.is_cpu() and supported("vllm")):
        return  # the driver refuses an unsupported vLLM in one line (generation.vllm.require_vllm)
    from .vllm_amx import ensure_amx_permission

    ensure_amx_permission()  # before any model runs in this process
    from .tqdm_lock import use_thread_lock

    use_thread_lock()  # a killed worker would leave tqdm's process lock in /dev/shm
    if not supported("openrlhf"):
        return
    from .vllm_cpu import WORKER_PATCHES, install_import_hooks

    install_import_hooks(WORKER_PATCHES)
