"""The demo's shared engine (Demo.shared_engine): one pool for the run's sampling, each next model pushed into it,
a new pool where a model cannot be pushed, every pool closed on leaving; outside it a pool per call."""

from __future__ import annotations

import pytest

import openrlhf_irl.generation as generation
from openrlhf_irl.demo.pipeline import Demo, DemoConfig


class FakePool:
    """Records what the demo asks of a pool; refuses to load a model whose name starts with 'other'."""

    log: list = []

    def __init__(self, model, num_actors, backend, batch_size):
        self.model, self.backend = model, "vllm"
        FakePool.log.append(("start", model))

    def load_model(self, model):
        if model.startswith("other"):
            raise ValueError("model config differs in hidden_size")
        FakePool.log.append(("push", model))
        self.model = model

    def generate(self, texts, params):
        return [(self.model, params.temperature)]

    def close(self):
        FakePool.log.append(("close", self.model))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@pytest.fixture
def demo(monkeypatch, tmp_path):
    FakePool.log = []
    monkeypatch.setattr(generation, "GenerationPool", FakePool)
    monkeypatch.setattr(generation, "ensure_ray", lambda *a, **k: False)
    return Demo(DemoConfig.make(str(tmp_path), quick=True))


def test_one_pool_per_stage_with_pushes_and_a_restart_for_another_shape(demo):
    with demo.shared_engine():
        a = demo.generate_at("a", ["p"], 1, (1.0, 0.7), 0)
        b = demo.generate_at("b", ["p"], 1, (1.0,), 0)
        c = demo.generate_at("other", ["p"], 1, (1.0,), 0)
        d = demo.generate_at("d", ["p"], 1, (1.0,), 0)
    assert a == {1.0: [("a", 1.0)], 0.7: [("a", 0.7)]} and b[1.0] == [("b", 1.0)]
    assert c[1.0] == [("other", 1.0)] and d[1.0] == [("d", 1.0)]  # every call sampled the model it named
    assert FakePool.log == [("start", "a"), ("push", "b"), ("close", "b"), ("start", "other"), ("push", "d"),
                            ("close", "d")]
    assert demo._pool is None and not demo._shared


def test_outside_a_shared_engine_each_call_has_its_own_pool(demo):
    demo.generate_at("a", ["p"], 1, (1.0,), 0)
    demo.generate_at("b", ["p"], 1, (1.0,), 0)
    assert FakePool.log == [("start", "a"), ("close", "a"), ("start", "b"), ("close", "b")]


def test_the_shared_pool_is_closed_when_sampling_fails(demo):
    with pytest.raises(RuntimeError):
        with demo.shared_engine():
            demo.generate_at("a", ["p"], 1, (1.0,), 0)
            raise RuntimeError("a stage fails mid-way")
    assert FakePool.log == [("start", "a"), ("close", "a")] and demo._pool is None


def run_with_stages(demo, monkeypatch, plan):
    """Run ``plan`` ([(name, joins_cluster, model or None)]) as the demo's stages; a stage samples ``model`` once and
    logs ("stage", name, pool open?) first."""
    from openrlhf_irl.demo.pipeline import Stage

    def step(name, model):
        def fn():
            FakePool.log.append(("stage", name, demo._pool is not None))
            if model:
                demo.generate_at(model, ["p"], 1, (1.0,), 0)
        return fn

    monkeypatch.setattr(demo, "stages", lambda: [Stage(n, step(n, m), joins_cluster=j) for n, j, m in plan])
    return demo._run_stages()


PLAN = [("afd", False, "init"), ("train", False, None), ("ppo", True, None), ("bon", False, "sft"),
        ("eval", False, "ppo")]


def test_one_engine_for_the_run_kept_up_through_the_stages_that_train(demo, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    run_with_stages(demo, monkeypatch, PLAN)
    assert FakePool.log == [("stage", "afd", False), ("start", "init"),
                            ("stage", "train", True), ("stage", "ppo", True),  # PPO starts a Ray of its own
                            ("stage", "bon", True), ("push", "sft"),
                            ("stage", "eval", True), ("push", "ppo"), ("close", "ppo")]  # one start for the run
    assert demo._pool is None and not demo._shared


def test_in_a_joined_cluster_the_engine_is_closed_before_ppo(demo, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # PPO's jobs would run in the same cluster
    run_with_stages(demo, monkeypatch, PLAN)
    assert FakePool.log == [("stage", "afd", False), ("start", "init"),
                            ("stage", "train", True), ("close", "init"), ("stage", "ppo", False),
                            ("stage", "bon", False), ("start", "sft"),
                            ("stage", "eval", True), ("push", "ppo"), ("close", "ppo")]
    assert demo._pool is None and not demo._shared


def test_a_failing_stage_closes_the_engine_of_the_run(demo, monkeypatch):
    from openrlhf_irl.demo.pipeline import Stage

    def boom():
        raise RuntimeError("eval fails")

    def bon():
        demo.generate_at("sft", ["p"], 1, (1.0,), 0)

    monkeypatch.setattr(demo, "stages", lambda: [Stage("bon", bon), Stage("eval", boom)])
    with pytest.raises(RuntimeError, match="eval fails"):
        demo._run_stages()
    assert FakePool.log == [("start", "sft"), ("close", "sft")] and demo._pool is None and not demo._shared
