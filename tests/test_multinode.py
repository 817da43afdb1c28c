"""Jobs that join a Ray cluster of several nodes (issue #22): a head and a worker node on this machine
(``local_ray_cluster`` in conftest.py), jobs submitted with the ``ray job submit`` CLI as the examples do.

The cluster has no GPUs and 2 + 2 logical CPUs: a PPO job of actor + reference + one vLLM engine holds 3 of them
(and needs a 4th free to place its controller), more than one node has, so it runs on both nodes or not at all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from helpers import REPO, corpus_prompts
from openrlhf_irl.compat import ray_ppo

RAY = str(Path(sys.executable).with_name("ray"))
REWARD_FUNC = str(REPO / "openrlhf_irl" / "afd" / "ppo_reward_func.py")
needs_cpu_layer = pytest.mark.skipif(not ray_ppo.needed(), reason="the CPU layer is off (CUDA present or disabled)")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def submit(cluster, entrypoint: list[str], env_vars: dict, timeout_s: float = 900) -> tuple[str, str, str]:
    """``ray job submit --no-wait`` (the CLI), then poll the job until it ends; returns (submission id, status,
    logs). A job still running at ``timeout_s`` is stopped."""
    from ray.job_submission import JobSubmissionClient

    sid = f"test-{uuid.uuid4().hex[:12]}"
    cmd = [RAY, "job", "submit", "--address", cluster.dashboard_url, "--submission-id", sid, "--no-wait",
           "--runtime-env-json", json.dumps({"env_vars": env_vars}), "--", *entrypoint]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=str(REPO))
    assert proc.returncode == 0, f"ray job submit failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    client = JobSubmissionClient(cluster.dashboard_url)
    deadline = time.monotonic() + timeout_s
    while (status := str(client.get_job_status(sid).value)) not in TERMINAL:
        if time.monotonic() > deadline:
            client.stop_job(sid)
            break
        time.sleep(2)
    logs = client.get_job_logs(sid)
    if status != "SUCCEEDED" and cluster.dead_services():
        logs += f"\n[test] cluster services no longer running: {cluster.dead_services()}"
    return sid, status, logs


def job_actors(cluster, sid: str) -> tuple[list, list]:
    """The job's actors and placement groups (dead ones included), from the cluster's state API."""
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_actors, list_placement_groups

    job_id = JobSubmissionClient(cluster.dashboard_url).get_job_info(sid).job_id
    actors = list_actors(address=cluster.dashboard_url, filters=[("job_id", "=", job_id)], detail=True,
                         limit=10000, raise_on_missing_output=False)
    groups = [g for g in list_placement_groups(address=cluster.dashboard_url, detail=True, limit=10000,
                                               raise_on_missing_output=False) if g.creator_job_id == job_id]
    return actors, groups


# ---------------------------------------------------------------------------------------------- the cluster itself
@pytest.mark.slow
def test_local_cluster_has_two_nodes_with_their_own_resources(local_ray_cluster):
    per_node = local_ray_cluster.available()
    assert set(per_node) == set(local_ray_cluster.node_ids.values())
    for name, node_id in local_ray_cluster.node_ids.items():
        assert per_node[node_id]["CPU"] == local_ray_cluster.node_cpus[name]
        assert per_node[node_id][name] == 1  # the custom resource naming the node is on that node only
        assert not any(other in per_node[node_id] for other in local_ray_cluster.node_ids if other != name)
    assert "GPU" not in local_ray_cluster.total()


@pytest.mark.slow
def test_a_submitted_job_joins_this_cluster_while_another_ray_runs_beside_it(local_ray_cluster):
    """A job's supervisor hands its driver the cluster named by ``ray_current_cluster`` in its node's temp folder;
    without that file it took whichever GCS process it found on the machine (3 of 4 jobs went to the other Ray)."""
    other = subprocess.Popen(
        [sys.executable, "-c", "import ray, sys; ray.init(address='local', num_cpus=1, include_dashboard=False); "
         "print(ray.get_runtime_context().gcs_address, flush=True); sys.stdin.read(); ray.shutdown()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        other_address = other.stdout.readline().strip()
        assert other_address and other_address != local_ray_cluster.address
        for _ in range(4):
            _, status, logs = submit(local_ray_cluster, ["python", "-c",
                                                         "import os; print('joins', os.environ['RAY_ADDRESS'])"], {})
            assert status == "SUCCEEDED", logs[-3000:]
            assert f"joins {local_ray_cluster.address}" in logs, logs[-3000:]
    finally:
        other.communicate(timeout=60)


# --------------------------------------------------------------------------------------------------------- PPO
def _ppo_entrypoint(models, out: Path, n_prompts: int = 8, extra=()) -> list[str]:
    from openrlhf_irl.afd.ppo import ppo_argv

    out.mkdir(parents=True, exist_ok=True)
    prompt_file = out / "prompts.jsonl"
    prompt_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in corpus_prompts(n_prompts)))
    argv = ppo_argv(models[0], str(prompt_file), str(out), reward_func=REWARD_FUNC, steps=2, lr=1e-3, extra=extra)
    return ["python", "-m", "openrlhf_irl.cli.train_ppo", *argv]


def _ppo_env(models) -> dict:
    return {"AFD_SFT_MODEL": models[0], "AFD_INIT_MODEL": models[1], "AFD_DEVICE": "cpu", "HF_HUB_OFFLINE": "1"}


@pytest.mark.slow
@needs_cpu_layer
def test_ppo_job_submitted_to_two_nodes_succeeds_and_leaves_the_cluster_as_it_was(local_ray_cluster, models,
                                                                                   tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    cluster = local_ray_cluster
    before = cluster.available()
    out = tmp_path / "ppo"
    sid, status, logs = submit(cluster, _ppo_entrypoint(models, out), _ppo_env(models))
    assert status == "SUCCEEDED", logs[-6000:]

    trained = AutoModelForCausalLM.from_pretrained(str(out / "policy"))
    start = AutoModelForCausalLM.from_pretrained(models[0])
    moved = max((a.float() - b.float()).abs().max().item() for a, b in zip(trained.parameters(), start.parameters()))
    assert moved > 1e-4, "PPO left the policy unchanged"
    assert torch.isfinite(trained(torch.tensor([[1, 5, 9]])).logits).all()

    actors, groups = job_actors(cluster, sid)
    by_class = {}
    for actor in actors:
        by_class.setdefault(actor.class_name, set()).add(actor.node_id)
    assert {"PolicyModelActor", "ReferenceModelActor", "RolloutRayActor", "PPOTrainer"} <= set(by_class), by_class
    placed = {n for c in ("PolicyModelActor", "ReferenceModelActor", "RolloutRayActor") for n in by_class[c]}
    assert placed == set(cluster.node_ids.values()), f"the job's models ran on {placed} only"
    # nothing of the job is left on the cluster: its actors dead, its placement groups removed, every resource free
    assert all(a.state == "DEAD" for a in actors), [(a.class_name, a.state) for a in actors if a.state != "DEAD"]
    assert groups and all(g.state == "REMOVED" for g in groups), [(g.placement_group_id, g.state) for g in groups]
    assert cluster.wait_available(before) == before


@pytest.mark.slow
@needs_cpu_layer
def test_ppo_job_on_a_cluster_too_small_is_refused_in_one_line(local_ray_cluster, models, tmp_path):
    cluster = local_ray_cluster
    before = cluster.available()
    sid, status, logs = submit(cluster, _ppo_entrypoint(models, tmp_path / "ppo", extra=("--vllm.num_engines", "3")),
                               _ppo_env(models), timeout_s=300)
    assert status == "FAILED"
    errors = [line for line in logs.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "4 of 4 CPUs free" in errors[0] and "needs 6" in errors[0], logs[-3000:]
    assert "Traceback" not in logs
    actors, groups = job_actors(cluster, sid)
    assert not actors and not groups, "the refused job placed something"
    assert cluster.wait_available(before) == before


# ------------------------------------------------------------------------------------------------ what it uses
def _args(**over):
    n = dict(actor=1, ref=1, critic=0, reward=0, engines=1, tp=1, colocate_all=False, async_enable=False)
    n.update(over)
    return SimpleNamespace(
        actor=SimpleNamespace(num_nodes=1, num_gpus_per_node=n["actor"], model_name_or_path="x"),
        ref=SimpleNamespace(num_nodes=1, num_gpus_per_node=n["ref"]),
        critic=SimpleNamespace(num_nodes=1, num_gpus_per_node=1, model_name_or_path="c" if n["critic"] else None),
        reward=SimpleNamespace(num_nodes=1, num_gpus_per_node=1, model_name_or_path="r" if n["reward"] else None,
                               remote_url=None if n["reward"] else "f.py"),
        vllm=SimpleNamespace(num_engines=n["engines"], tensor_parallel_size=n["tp"]),
        algo=SimpleNamespace(advantage=SimpleNamespace(estimator="reinforce"), kl=SimpleNamespace(init_coef=0.01)),
        train=SimpleNamespace(colocate_all=n["colocate_all"], colocate_actor_ref=False,
                              colocate_critic_reward=False, async_enable=n["async_enable"]),
        ds=SimpleNamespace(ring_attn_size=1, tensor_parallel_size=1),
    )


def test_cluster_shortfall_counts_cpus_gpus_and_memory():
    args = _args(actor=2, engines=2)  # 2 actor + 1 ref processes, 2 engines, the controller
    assert ray_ppo.required_cpus(args) == 6
    assert ray_ppo.cluster_shortfall(args, {"CPU": 6}) is None
    msg = ray_ppo.cluster_shortfall(args, {"CPU": 8}, {"CPU": 5})
    assert msg.startswith("the Ray cluster has 5 of 8 CPUs free and this PPO job needs 6")
    msg = ray_ppo.cluster_shortfall(args, {"CPU": 8, "GPU": 2})
    assert "2 of 2 GPUs free" in msg and "reserves 3" in msg  # a GPU cluster: OpenRLHF's own placement
    msg = ray_ppo.cluster_shortfall(args, {"CPU": 8, "memory": 4 * 2**30}, memory_gib=6.0)
    assert "4.0 GiB of memory free" in msg and "about 6.0 GiB" in msg
    assert ray_ppo.cluster_shortfall(_args(colocate_all=True, engines=1), {"CPU": 2}) is None  # engines share


def test_placement_asks_for_gpus_only_where_the_cluster_has_them(monkeypatch):
    calls = []

    def placement_group(bundles, strategy="PACK"):
        calls.append(bundles)

    class Actor:
        @staticmethod
        def options(**kwargs):
            calls.append(kwargs)

    patched = ray_ppo._placement_group_for_cluster(placement_group)
    bundles = [{"GPU": 1, "CPU": 1}, {"GPU": 1, "CPU": 1, "node_w1": 1}]
    for has_gpus in (False, True):
        monkeypatch.setattr(ray_ppo, "cluster_has_gpus", lambda: has_gpus)
        calls.clear()
        patched(bundles, strategy="PACK")
        ray_ppo._ActorClassForCluster(Actor).options(num_cpus=0.2, num_gpus=0.2, resources=None)
        if has_gpus:
            assert calls == [bundles, {"num_cpus": 0.2, "num_gpus": 0.2, "resources": None}]
        else:
            assert calls == [[{"CPU": 1}, {"CPU": 1, "node_w1": 1}], {"num_cpus": 0.2, "num_gpus": 0, "resources": None}]


def test_cluster_runtime_env_merges_with_the_job_s_own(monkeypatch):
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR
    from ray.runtime_env.runtime_env import _merge_runtime_env

    env = {"DS_ACCELERATOR": "cpu", "NCCL_DEBUG": "WARN", ray_ppo.RUN_TAG_ENV: "fresh"}
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    monkeypatch.setenv("RAY_OVERRIDE_JOB_RUNTIME_ENV", "0")  # restored after the test
    monkeypatch.delenv(RAY_JOB_CONFIG_JSON_ENV_VAR, raising=False)
    assert ray_ppo.job_run_tag() is None  # outside a job: the user's tag (or a new one) as before
    assert ray_ppo.cluster_init_kwargs(env)["runtime_env"] == {"worker_process_setup_hook": ray_ppo.SETUP_HOOK,
                                                              "env_vars": env}
    job = {"env_vars": {"AFD_SFT_MODEL": "/m", "NCCL_DEBUG": "INFO"}}
    monkeypatch.setenv(RAY_JOB_CONFIG_JSON_ENV_VAR, json.dumps({"runtime_env": job}))
    assert ray_ppo.job_run_tag() not in (None, "fresh")
    ours = ray_ppo.cluster_init_kwargs(env)["runtime_env"]
    merged = _merge_runtime_env(job, ours, override=os.environ.get("RAY_OVERRIDE_JOB_RUNTIME_ENV") == "1")
    assert merged is not None, "Ray would refuse to merge the job's runtime env with ours"
    assert merged["worker_process_setup_hook"] == ray_ppo.SETUP_HOOK
    assert merged["env_vars"] == {"AFD_SFT_MODEL": "/m", "NCCL_DEBUG": "INFO", "DS_ACCELERATOR": "cpu",
                                  ray_ppo.RUN_TAG_ENV: "fresh"}
    # a job that sets its own hook and tag: ours run first, theirs after; our tag marks our run's processes
    job = {"worker_process_setup_hook": "mine.hook", "env_vars": {ray_ppo.RUN_TAG_ENV: "the-job's"}}
    monkeypatch.setenv(RAY_JOB_CONFIG_JSON_ENV_VAR, json.dumps({"runtime_env": job}))
    ours = ray_ppo.cluster_init_kwargs(env)["runtime_env"]
    merged = _merge_runtime_env(job, ours, override=os.environ.get("RAY_OVERRIDE_JOB_RUNTIME_ENV") == "1")
    assert merged["worker_process_setup_hook"] == ray_ppo.SETUP_HOOK
    assert merged["env_vars"][ray_ppo.EXTRA_HOOK_ENV] == "mine.hook"
    assert merged["env_vars"][ray_ppo.RUN_TAG_ENV] == "fresh"


# ---------------------------------------------------------------------------------------------------- sampling
@pytest.mark.slow
def test_sampling_job_submitted_to_two_nodes_writes_every_record_once(local_ray_cluster, models, tmp_path):
    """The AfD sampling job with 3 transformers actors (1 CPU each: more than a node has), submitted as a job."""
    cluster = local_ray_cluster
    before = cluster.available()
    prompts = [f"count from {i}" for i in range(6)]
    prompt_file = tmp_path / "prompts.jsonl"
    prompt_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    output = tmp_path / "samples.jsonl"
    entry = ["python", "-m", "openrlhf_irl.cli.sample", "--model", models[1], "--prompts", str(prompt_file),
             "--rollout.n_samples_per_prompt", "2", "--rollout.max_new_tokens", "8", "--num-actors", "3",
             "--backend", "hf",
             "--policy-name", "init", "--output", str(output)]
    sid, status, logs = submit(cluster, entry, {"HF_HUB_OFFLINE": "1"}, timeout_s=600)
    assert status == "SUCCEEDED", logs[-6000:]
    records = [json.loads(line) for line in output.read_text().splitlines()]
    keys = [(r["prompt"], r["sample_index"]) for r in records]
    assert sorted(keys) == sorted((p, s) for p in prompts for s in range(2)), "a record lost or duplicated"
    assert all(r["policy"] == "init" and isinstance(r["response"], str) for r in records)
    actors, groups = job_actors(cluster, sid)
    workers = [a for a in actors if a.class_name == "HFWorker"]
    assert len(workers) == 3 and {a.node_id for a in workers} == set(cluster.node_ids.values())
    assert all(a.state == "DEAD" for a in actors)
    assert cluster.wait_available(before) == before


# ------------------------------------------------------------------------------------------ the example, as written
@pytest.mark.slow
@needs_cpu_layer
def test_example_ppo_log_ratio_script_runs_against_the_cluster(local_ray_cluster, models, tmp_path):
    """``examples/ppo_afd_log_ratio.sh`` as written (``ray job submit`` with ``working_dir: .``), its cluster,
    sizes and models set from the environment: tiny scale, CPU settings, 2 steps of 4 prompts x 2 samples."""
    from transformers import AutoModelForCausalLM

    cluster = local_ray_cluster
    before = cluster.available()
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in corpus_prompts(8)))
    out = tmp_path / "ppo"
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
           "RAY_DASHBOARD": cluster.dashboard_url, "PPO_MODULE": "openrlhf_irl.cli.train_ppo", "GPU_ONLY": "",
           "ATTN": "sdpa", "DTYPE": "auto", "SFT": models[0], "INIT": models[1], "PROMPTS": str(prompts),
           "OUTPUT": str(out), "ACTOR_GPUS": "1", "REF_GPUS": "1", "VLLM_ENGINES": "1", "VLLM_TP": "1",
           "MAX_LEN": "128", "MAX_NEW_TOKENS": "16", "ROLLOUT_BATCH": "4", "ROLLOUT_MICRO": "4", "N_SAMPLES": "2",
           "TRAIN_BATCH": "8", "TRAIN_MICRO": "4", "ZERO_STAGE": "2", "LR": "1e-3"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(["bash", str(REPO / "examples" / "ppo_afd_log_ratio.sh")], env=env, cwd=str(REPO),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{proc.stdout[-5000:]}\n{proc.stderr[-3000:]}"
    assert "Job 'raysubmit_" in proc.stdout and "succeeded" in proc.stdout.lower()
    AutoModelForCausalLM.from_pretrained(str(out))  # the checkpoint reloads
    assert cluster.wait_available(before) == before
