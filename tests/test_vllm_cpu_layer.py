"""The CPU layer for OpenRLHF's vLLM engine path (``openrlhf_irl/compat/vllm_cpu.py``) on doubles of the objects it
patches: no vLLM needed, so these run (and fail) wherever the engine tests skip. The real engines are exercised in
``test_vllm_engines.py``, ``test_online_sampler.py`` and ``test_patch_vllm.py``."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from openrlhf_irl.compat import vllm_cpu


class _Group:
    """Stands in for the broadcast group: fills the receive buffer from a queue of tensors."""

    def __init__(self, *sent, fail_at=None):
        self.sent, self.fail_at, self.calls = list(sent), fail_at, 0

    def broadcast(self, tensor, src=0, stream=None):
        self.calls += 1
        if self.fail_at == self.calls:
            raise RuntimeError("peer died")
        tensor.copy_(self.sent.pop(0))


class _Runner:
    def __init__(self):
        self.reloads = []

    def reload_weights(self, weights_iterator, is_checkpoint_format):
        assert is_checkpoint_format
        self.reloads.append([(n, t.clone()) for n, t in weights_iterator])


def _worker_class():
    class WorkerWrap:
        def init_process_group(self, *args, **kwargs):
            self.inited = args

        def update_weight(self, name, dtype, shape, empty_cache=False):
            self.gpu_path = name

        def update_weight_cuda_ipc(self, name, dtype, shape, ipc_handles=None, empty_cache=False):
            return "ipc"

    module = types.SimpleNamespace(WorkerWrap=WorkerWrap)
    vllm_cpu.patch_worker_wrap(module)
    vllm_cpu.patch_worker_wrap(module)  # idempotent
    return WorkerWrap


def _worker(cls, group):
    w = cls()
    w.device = torch.device("cpu")
    w.model_config = types.SimpleNamespace(dtype=torch.bfloat16)
    w.model_runner = _Runner()
    w._model_update_group = group
    w._model_update_with_ray = False
    return w


def test_cpu_worker_buffers_a_push_and_applies_it_once_on_the_last_tensor():
    a, b = torch.randn(2, 3).bfloat16(), torch.randn(4).bfloat16()
    w = _worker(_worker_class(), _Group(a, b))
    w.update_weight("x.weight", torch.bfloat16, (2, 3))
    assert w.model_runner.reloads == []  # nothing applied before the sender marks the last tensor
    w.update_weight("y.bias", torch.bfloat16, (4,), empty_cache=True)
    (applied,) = w.model_runner.reloads
    assert [n for n, _ in applied] == ["x.weight", "y.bias"]
    assert torch.equal(applied[0][1], a) and torch.equal(applied[1][1], b)


def test_cpu_worker_drops_a_broken_push_and_refuses_after_receiving():
    cls = _worker_class()
    good = torch.ones(2).bfloat16()
    w = _worker(cls, _Group(good, good, fail_at=2))
    w.update_weight("x", torch.bfloat16, (2,))
    with pytest.raises(RuntimeError, match="peer died"):
        w.update_weight("y", torch.bfloat16, (2,))
    w._model_update_group = _Group(good * 3)
    w.update_weight("z", torch.bfloat16, (2,), empty_cache=True)
    assert [n for n, _ in w.model_runner.reloads[0]] == ["z"]  # "x" of the broken push is gone
    group = _Group(torch.ones(2))
    w._model_update_group = group
    with pytest.raises(ValueError, match="dtype torch.float32 differs"):
        w.update_weight("f", torch.float32, (2,))
    assert group.calls == 1  # the tensor was received first: the sender is not left waiting
    w._model_update_with_ray = True
    with pytest.raises(RuntimeError, match="sync_with_ray"):
        w.update_weight("x", torch.bfloat16, (2,))
    with pytest.raises(RuntimeError, match="CUDA IPC"):
        w.update_weight_cuda_ipc("x", torch.bfloat16, (2,))


def test_cpu_worker_starts_a_new_group_with_an_empty_buffer_and_leaves_gpu_workers_alone():
    cls = _worker_class()
    w = _worker(cls, _Group(torch.ones(2).bfloat16(), torch.ones(2).bfloat16()))
    w.update_weight("stale", torch.bfloat16, (2,))
    w.init_process_group("127.0.0.1", 1, 1, 2, "g", "gloo", False)
    w.update_weight("fresh", torch.bfloat16, (2,), empty_cache=True)
    assert [n for n, _ in w.model_runner.reloads[0]] == ["fresh"]
    gpu = _worker(cls, None)
    gpu.device = torch.device("meta")  # any non-CPU device takes OpenRLHF's own path
    gpu.update_weight("w", torch.bfloat16, (2,))
    assert gpu.gpu_path == "w" and gpu.update_weight_cuda_ipc("w", torch.bfloat16, (2,)) == "ipc"


def test_stateless_group_is_gloo_on_cpu_and_a_disabled_communicator_is_refused():
    class Disabled:
        disabled = True

    module = types.SimpleNamespace(stateless_init_process_group=lambda *a: Disabled())
    vllm_cpu.patch_distributed_util(module)
    from openrlhf_irl.utils.distributed import free_port

    group = module.stateless_init_process_group("127.0.0.1", free_port("127.0.0.1"), 0, 1, torch.device("cpu"))
    assert isinstance(group, vllm_cpu.GlooBroadcastGroup)
    t = torch.arange(3.0)
    group.broadcast(t, src=0)  # a one-rank group: the tensor stays as it is
    assert t.tolist() == [0.0, 1.0, 2.0]
    with pytest.raises(RuntimeError, match="disabled itself"):
        module.stateless_init_process_group("127.0.0.1", 1, 0, 2, "cuda:0")


def test_engine_placement_asks_for_no_gpu_and_runs_engines_eagerly_without_chunked_prefill():
    seen = {}

    class ActorOptions:
        def remote(self, *args, **kwargs):
            seen["engine_kwargs"] = kwargs

    class ActorClass:
        def options(self, **kwargs):
            seen["options"] = kwargs
            return ActorOptions()

    module = types.SimpleNamespace(placement_group=lambda bundles, **kw: bundles, RolloutRayActor=ActorClass())
    vllm_cpu.patch_engine_placement(module)
    assert module.placement_group([{"GPU": 1, "CPU": 1}, {"GPU": 1}], strategy="PACK") == [{"CPU": 1}, {"CPU": 1}]
    module.RolloutRayActor.options(num_cpus=1, num_gpus=1).remote(model="m", enforce_eager=False)
    assert seen["options"]["num_gpus"] == 0
    env = seen["options"]["runtime_env"]["env_vars"]
    assert env["VLLM_CPU_KVCACHE_SPACE"] and env["VLLM_RPC_BASE_PATH"] == vllm_cpu.engine_run_dir()
    assert seen["engine_kwargs"]["enforce_eager"] is True and seen["engine_kwargs"]["enable_chunked_prefill"] is False


def test_import_hook_patches_a_module_when_it_is_first_imported(tmp_path, monkeypatch):
    (tmp_path / "oirl_hook_target.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("oirl_hook_target", None)

    def patch(module):
        module.VALUE += 41

    def other(module):
        module.OTHER = True

    vllm_cpu.install_import_hooks({"oirl_hook_target": patch})
    vllm_cpu.install_import_hooks({"oirl_hook_target": other})  # two hooks for one module: no recursion, both run
    import oirl_hook_target

    assert oirl_hook_target.VALUE == 42 and oirl_hook_target.OTHER
    vllm_cpu.install_import_hooks({"oirl_hook_target": patch})  # already imported: patched at once
    assert oirl_hook_target.VALUE == 83
    sys.modules.pop("oirl_hook_target", None)
