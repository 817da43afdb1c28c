"""OpenRLHF's own Ray PPO (``train_ppo_ray``) on CPU through ``openrlhf_irl.cli.train_ppo``: real vLLM rollouts,
DeepSpeed actor and reference, the AfD log-ratio reward through ``--reward.remote_url``; bad input refused up front."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest
import torch

from helpers import REPO, TESTS, corpus_prompts, interruptible
from openrlhf_irl.compat import ray_ppo
from openrlhf_irl.utils import reaper
from openrlhf_irl.utils.cache_dir import cache_dir

needs_cpu_layer = pytest.mark.skipif(not ray_ppo.needed(), reason="the CPU layer is off (CUDA present or disabled)")

RECORDING_REWARD = """
import json, os
from openrlhf_irl.afd.ppo_reward_func import check_environment, reward_func as afd_reward_func

def reward_func(queries, prompts, labels):
    out = afd_reward_func(queries, prompts, labels)
    with open(os.environ["PPO_TEST_REWARD_LOG"], "a") as f:
        for q, p, r in zip(queries, prompts, out["rewards"].tolist()):
            f.write(json.dumps({"query": q, "prompt": p, "reward": r}) + "\\n")
    return out
"""


@pytest.fixture(scope="module")
def ppo_series(models, tmp_path_factory):
    """Two PPO runs, 2 steps of 4 prompts x 2 samples each, one after the other in one process and one Ray
    instance (``run_ppo_series``, as the demo runs them): over the log-ratio reward (SFT = the policy) in fp32 (what
    ``--ds.param_dtype auto`` picks on a CPU without bf16: actor, reference, vLLM engine and weight push in fp32),
    then over a reward model (the policy's backbone with a random ``score`` head, the layout ``train_rm`` /
    ``afd_rm`` save) in the default dtype (bf16 where the CPU has it natively). The second run can start only once
    the first one's actors and engine are gone (their logical GPUs and CPUs back)."""
    import shutil
    import time

    from openrlhf_irl.afd.ppo import run_ppo_series

    policy, init = models
    out = tmp_path_factory.mktemp("ppo_series")
    reward_file = out / "recording_reward.py"
    reward_file.write_text(RECORDING_REWARD)
    rm = out / "rm"
    shutil.copytree(policy, rm)
    _add_score_head(str(rm), scale=1.0)
    tag = f"test-ppo-{uuid.uuid4().hex}"
    logs = {"log_ratio": out / "rewards.jsonl", "rm": out / "rm_rewards.jsonl"}
    start = time.monotonic()
    log_ratio, by_rm = run_ppo_series(
        [dict(policy=policy, prompts=corpus_prompts(8), out_dir=str(out / "log_ratio"), log_ratio=(policy, init),
              reward_func=str(reward_file), steps=2, lr=1e-3, extra=("--ds.param_dtype", "fp32")),
         dict(policy=policy, prompts=corpus_prompts(8), out_dir=str(out / "rm_run"), reward_model=str(rm), steps=2,
              lr=1e-3)],
        env={"PPO_TEST_REWARD_LOG": str(logs["log_ratio"]), "PPO_TEST_RM_LOG": str(logs["rm"]),
             ray_ppo.RUN_TAG_ENV: tag, ray_ppo.EXTRA_HOOK_ENV: "helpers.record_rewards.install",
             "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)]), "HF_HUB_OFFLINE": "1"},
        timeout_s=900)
    seconds = time.monotonic() - start
    leftovers = reaper.tagged_processes(tag)
    reaper.kill_tagged(tag)
    return {"log_ratio": (log_ratio, logs["log_ratio"]), "rm": (by_rm, logs["rm"], rm), "leftovers": leftovers,
            "seconds": seconds}


@pytest.fixture(scope="module")
def log_ratio_run(ppo_series):
    result, reward_log = ppo_series["log_ratio"]
    return result, reward_log, ppo_series["leftovers"]


@pytest.mark.slow
@needs_cpu_layer
def test_a_series_runs_each_ppo_run_in_turn_in_one_job(ppo_series):
    """Each run of the series is timed on its own and trained its steps; the job's processes are all gone."""
    runs = [ppo_series["log_ratio"][0], ppo_series["rm"][0]]
    assert ppo_series["leftovers"] == [], "Ray/vLLM processes of the job outlived it"
    assert [len(r.logs) for r in runs] == [2, 2]
    assert all(0 < r.seconds for r in runs) and sum(r.seconds for r in runs) < ppo_series["seconds"]
    assert runs[0].policy != runs[1].policy and all(os.path.isfile(os.path.join(r.policy, "config.json"))
                                                    for r in runs)


def test_a_series_refuses_log_ratio_runs_over_different_models(tmp_path, monkeypatch):
    from openrlhf_irl.afd import ppo

    monkeypatch.setattr(ray_ppo, "needed", lambda: True)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ppo.subprocess, "run", lambda *a, **k: pytest.fail("started a run"))
    runs = [dict(policy="sft", prompts=["p"] * 8, out_dir=str(tmp_path / name), log_ratio=("sft", init), steps=2)
            for name, init in (("a", "init_a"), ("b", "init_b"))]
    with pytest.raises(ValueError, match="share their models"):
        ppo.run_ppo_series(runs)
    assert list(tmp_path.iterdir()) == []  # refused before a prompt file was written


def test_a_series_in_a_joined_cluster_is_one_job_per_run(tmp_path, monkeypatch):
    from openrlhf_irl.afd import ppo

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    calls = []
    monkeypatch.setattr(ppo, "run_ppo", lambda **kw: calls.append(kw["out_dir"]) or kw["out_dir"])
    runs = [dict(policy="sft", prompts=["p"] * 8, out_dir=str(tmp_path / n), reward_model="rm") for n in "ab"]
    assert ppo.run_ppo_series(runs) == calls == [str(tmp_path / "a"), str(tmp_path / "b")]


def test_train_ppo_series_refuses_several_runs_in_a_joined_cluster(monkeypatch, capsys):
    from openrlhf_irl.cli.train_ppo import run_cpu_series

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert run_cpu_series([["--x"], ["--y"]]) == 2
    assert "submit one job per run" in capsys.readouterr().err


def test_ppo_series_entry_point_refuses_a_malformed_spec(capsys):
    from openrlhf_irl.afd import ppo_series

    with pytest.raises(SystemExit) as exit_info:
        ppo_series.main(["not json"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: give one argument: a JSON list")


@pytest.mark.slow
@needs_cpu_layer
def test_ppo_log_ratio_trains_saves_and_cleans_up(log_ratio_run, models):
    from transformers import AutoModelForCausalLM

    result, _, leftovers = log_ratio_run
    assert leftovers == [], "Ray/vLLM processes of the job outlived it"
    assert len(result.logs) == 2 and all("reward" in step and "policy_loss" in step for step in result.logs)
    from safetensors import safe_open

    with safe_open(os.path.join(result.policy, "model.safetensors"), framework="pt") as h:
        assert {h.get_tensor(k).dtype for k in h.keys()} == {torch.float32}, "--ds.param_dtype fp32 trained another"
    trained = AutoModelForCausalLM.from_pretrained(result.policy)
    start = AutoModelForCausalLM.from_pretrained(models[0])
    moved = max((a.float() - b.float()).abs().max().item()
                for a, b in zip(trained.parameters(), start.parameters()))
    assert moved > 1e-4, "PPO left the policy unchanged"
    ids = torch.tensor([[1, 5, 9]])
    assert torch.isfinite(trained(ids).logits).all()


def _log_ratio(sft, init, tok, prompt: str, response_ids: list[int]) -> float:
    """log pi_SFT(y|x) - log pi_init(y|x) by plain teacher forcing (the reward's definition)."""
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p_ids + response_ids])
    total = 0.0
    for model, sign in ((sft, 1.0), (init, -1.0)):
        with torch.no_grad():
            lp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        total += sign * float(sum(lp[len(p_ids) - 1 + i, t] for i, t in enumerate(response_ids)))
    return total


@pytest.mark.slow
@needs_cpu_layer
def test_ppo_logged_reward_is_the_log_ratio_of_its_responses(log_ratio_run, models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result, reward_log, _ = log_ratio_run
    records = [json.loads(line) for line in reward_log.read_text().splitlines()]
    check_call = records.pop(0)  # the launcher's up-front call: the first prompt, an empty response
    assert check_call["query"] == check_call["prompt"] == corpus_prompts(8)[0]
    assert len(records) == 16  # 2 steps x 4 prompts x 2 samples
    tok = AutoTokenizer.from_pretrained(models[0])
    sft = AutoModelForCausalLM.from_pretrained(models[0]).eval()
    init = AutoModelForCausalLM.from_pretrained(models[1]).eval()
    own = []
    for rec in records:
        assert rec["query"].startswith(rec["prompt"])
        response = rec["query"][len(rec["prompt"]):]
        ended = response.endswith(tok.eos_token)
        text = response[: -len(tok.eos_token)] if ended else response
        ids = tok(text, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if ended else [])
        own.append(_log_ratio(sft, init, tok, rec["prompt"], ids))
    assert [r["reward"] for r in records] == pytest.approx(own, abs=1e-3)
    for step, logged in enumerate(result.logs):
        mean = sum(own[8 * step: 8 * step + 8]) / 8
        assert logged["reward"] == pytest.approx(mean, abs=1e-3)
    assert any(abs(x) > 1e-2 for x in own), "the two models agree: the check would not see a wrong reward"


# ------------------------------------------------------------------------------------------ refused up front
def _run_cli(argv, capsys):
    from openrlhf_irl.cli.train_ppo import run_cpu

    rc = run_cpu(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err


def _argv(policy, prompts, *extra):
    return ["--actor.model_name_or_path", policy, "--data.prompt_dataset", prompts, "--data.input_key", "prompt",
            "--actor.num_gpus_per_node", "1", "--ref.num_gpus_per_node", "1", "--reward.num_gpus_per_node", "1",
            "--critic.num_gpus_per_node", "1", "--vllm.num_engines", "1", *extra]


@pytest.fixture()
def prompt_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in corpus_prompts()))
    return str(path)


@needs_cpu_layer
def test_reward_func_that_fails_to_import_is_refused(models, prompt_file, tmp_path, capsys):
    bad = tmp_path / "bad_reward.py"
    bad.write_text("import no_such_module_for_ppo\n")
    rc, err = _run_cli(_argv(models[0], prompt_file, "--reward.remote_url", str(bad)), capsys)
    assert rc == 2 and len(err) == 1
    assert "--reward.remote_url" in err[0] and "no_such_module_for_ppo" in err[0]


@needs_cpu_layer
@pytest.mark.parametrize("body,expected", [
    ("return {'rewards': torch.zeros(len(queries) + 1)}", "'rewards' holds 2 values for 1 query"),
    ("return {'rewards': torch.zeros(len(queries), 3)}", "'rewards' has shape (1, 3) for 1 query"),
    ("return [0.0] * len(queries)", "must return a dict with 'rewards', got list"),
    ("return {'rewards': torch.full((len(queries),), float('nan'))}", "must be finite numbers"),
    ("raise KeyError('label')", "fails on a test call with the first prompt (KeyError: 'label')"),
])
def test_reward_func_that_returns_the_wrong_thing_is_refused(models, prompt_file, tmp_path, capsys, body, expected):
    """OpenRLHF would log the error inside a vLLM engine and go on without rewards; the launcher calls the function
    once on the first prompt and refuses what PPO could not use."""
    bad = tmp_path / "bad_shape.py"
    bad.write_text(f"import torch\ndef reward_func(queries, prompts, labels):\n    {body}\n")
    rc, err = _run_cli(_argv(models[0], prompt_file, "--reward.remote_url", str(bad)), capsys)
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"error: --reward.remote_url {bad}: ")
    assert expected in err[0], err[0]


def test_reward_func_output_check_accepts_what_openrlhf_uses():
    from openrlhf_irl.cli.train_ppo import check_reward_output

    check_reward_output("f.py", {"rewards": torch.tensor([0.5, -1.0]), "scores": None}, 2)
    check_reward_output("f.py", {"rewards": [1, 2.5]}, 2)


@needs_cpu_layer
def test_log_ratio_reward_without_its_models_is_refused(models, prompt_file, capsys, monkeypatch):
    monkeypatch.delenv("AFD_SFT_MODEL", raising=False)
    monkeypatch.setenv("AFD_INIT_MODEL", models[1])
    rc, err = _run_cli(_argv(models[0], prompt_file, "--reward.remote_url",
                             str(REPO / "openrlhf_irl/afd/ppo_reward_func.py")), capsys)
    assert rc == 2 and len(err) == 1 and "AFD_SFT_MODEL" in err[0]


@needs_cpu_layer
def test_reward_model_with_another_tokenizer_is_refused(models, prompt_file, tmp_path, capsys):
    from openrlhf_irl.utils.tiny_model import write_tiny_llama

    other = write_tiny_llama(str(tmp_path / "other_vocab"), ["zebra quartz " * 20] * 50, seed=2)
    _add_score_head(other)
    capsys.readouterr()
    rc, err = _run_cli(_argv(models[0], prompt_file, "--reward.model_name_or_path", other), capsys)
    assert rc == 2 and len(err) == 1
    assert "--reward.model_name_or_path" in err[0] and "tokenizer differs" in err[0]


@needs_cpu_layer
def test_reward_model_without_a_head_is_refused(models, prompt_file, capsys):
    rc, err = _run_cli(_argv(models[0], prompt_file, "--reward.model_name_or_path", models[1]), capsys)
    assert rc == 2 and len(err) == 1 and "score.weight" in err[0]


@needs_cpu_layer
def test_too_many_processes_for_the_cores_is_refused(models, prompt_file, capsys, monkeypatch):
    monkeypatch.setenv("AFD_SFT_MODEL", models[0])
    monkeypatch.setenv("AFD_INIT_MODEL", models[1])
    argv = _argv(models[0], prompt_file, "--reward.remote_url", str(REPO / "openrlhf_irl/afd/ppo_reward_func.py"))
    argv[argv.index("--actor.num_gpus_per_node") + 1] = str(8 * (os.cpu_count() or 1))
    rc, err = _run_cli(argv, capsys)
    assert rc == 2 and len(err) == 1 and "CPU core" in err[0]


@needs_cpu_layer
def test_flash_attention_and_nccl_are_refused_on_cpu(models, prompt_file, capsys):
    func = str(REPO / "openrlhf_irl/afd/ppo_reward_func.py")
    rc, err = _run_cli(_argv(models[0], prompt_file, "--reward.remote_url", func,
                             "--ds.attn_implementation", "flash_attention_2"), capsys)
    assert rc == 2 and "--ds.attn_implementation" in err[0]
    rc, err = _run_cli(_argv(models[0], prompt_file, "--reward.remote_url", func, "--vllm.sync_backend", "nccl"),
                       capsys)
    assert rc == 2 and "--vllm.sync_backend" in err[0]
    rc, err = _run_cli(_argv(models[0], prompt_file, "--reward.remote_url", func, "--ds.param_dtype", "fp16"), capsys)
    assert rc == 2 and err[0].startswith("error: --ds.param_dtype fp16:") and "fp32" in err[0]


def _add_score_head(path: str, scale: float = 0.0) -> None:
    """Give a causal LM directory a ``score.weight`` tensor (the key OpenRLHF's reward models carry)."""
    from safetensors.torch import load_file, save_file

    file = os.path.join(path, "model.safetensors")
    state = load_file(file)
    hidden = state["model.embed_tokens.weight"].shape[1]
    state["score.weight"] = scale * torch.randn(1, hidden, generator=torch.Generator().manual_seed(0))
    save_file(state, file, metadata={"format": "pt"})


def test_logical_gpus_cover_what_train_ppo_ray_reserves():
    from types import SimpleNamespace as NS

    def args(estimator="gae", kl=0.01, remote=None, **train):
        group = NS(num_nodes=1, num_gpus_per_node=2)
        flags = {**dict(colocate_all=False, colocate_actor_ref=False, colocate_critic_reward=False), **train}
        return NS(actor=group, ref=group, critic=group, reward=group, train=NS(**flags),
                  algo=NS(advantage=NS(estimator=estimator), kl=NS(init_coef=kl)), reward_remote=remote)

    def with_remote(a, url):
        a.reward = NS(num_nodes=1, num_gpus_per_node=2, remote_url=url)
        return a

    assert ray_ppo.required_gpus(with_remote(args(), None)) == 8  # actor, ref, critic, reward: 2 each
    assert ray_ppo.required_gpus(with_remote(args(estimator="reinforce", kl=0), "f.py")) == 2  # actor only
    assert ray_ppo.required_gpus(with_remote(args(colocate_actor_ref=True), None)) == 6
    assert ray_ppo.required_gpus(with_remote(args(colocate_critic_reward=True), None)) == 6
    assert ray_ppo.required_gpus(with_remote(args(colocate_all=True), None)) == 2


# ------------------------------------------------------------------------------------------ the reward-model route
@pytest.mark.slow
@needs_cpu_layer
def test_ppo_over_a_reward_model_logs_the_models_own_scores(ppo_series):
    """``--reward.model_name_or_path``: a reward model (the policy's backbone with a random ``score`` head, the
    layout ``train_rm`` / ``afd_rm`` save) scores the rollouts in its own Ray actor. Every score it returned (recorded
    in the actor by ``tests/helpers/record_rewards.py``) equals a plain fp32 transformers pass over the same tokens,
    hidden state of the last token times the head, and the reward PPO logs per step is their mean."""
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoModelForCausalLM

    result, log, rm = ppo_series["rm"]
    assert len(result.logs) == 2
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(records) == 16  # 2 steps x 4 prompts x 2 samples, each scored once
    backbone = AutoModel.from_pretrained(rm).float().eval()
    head = load_file(str(rm / "model.safetensors"))["score.weight"].float()
    own = []
    for rec in records:
        with torch.no_grad():
            hidden = backbone(torch.tensor([rec["ids"]])).last_hidden_state[0, -1]
        own.append(float(head[0] @ hidden))
    scale = max(abs(x) for x in own)
    assert scale > 1.0, "scores near zero: the check would not see a wrong one"
    # the actor runs bf16: its error is a fraction of the terms summed (|head| |hidden|), not of the result, so the
    # tolerance is 3% of the largest score (about 0.3 here), against scores spread over several units
    assert [r["reward"] for r in records] == pytest.approx(own, abs=0.03 * scale)
    for step, logged in enumerate(result.logs):
        recorded = [r["reward"] for r in records[8 * step: 8 * step + 8]]
        assert logged["reward"] == pytest.approx(sum(recorded) / 8, abs=1e-4)
    AutoModelForCausalLM.from_pretrained(result.policy)


# ------------------------------------------------------------------------------------------------ interrupted
def _start_and_wait_for_actors(models, tmp_path):
    """Start a CPU PPO job; return (process, tag, {name: pid}) once its policy and reference actors have been
    created and while the vLLM engine actor is still starting (the job's longest phase, ~20 s here; the training
    steps after it take about 2 s in all). Ray titles a worker ``ray::<Class>.__init__`` while it builds the actor
    and ``ray::<Class>`` or ``ray::<Class>.<method>`` after."""
    import subprocess
    import sys
    import time

    from openrlhf_irl.afd.ppo import ppo_argv

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in corpus_prompts(8)))
    tag = f"test-ppo-{uuid.uuid4().hex}"
    env = {**os.environ, ray_ppo.RUN_TAG_ENV: tag, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
           "AFD_SFT_MODEL": models[0], "AFD_INIT_MODEL": models[1], "AFD_DEVICE": "cpu"}
    argv = ppo_argv(models[0], str(prompts), str(tmp_path / "run"),
                    reward_func=str(REPO / "openrlhf_irl/afd/ppo_reward_func.py"))
    proc = subprocess.Popen([sys.executable, "-m", "openrlhf_irl.cli.train_ppo", *argv], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, preexec_fn=interruptible)
    deadline = time.monotonic() + 600
    created_at = None
    while time.monotonic() < deadline and proc.poll() is None:
        titles = _actor_titles(tag, proc.pid)
        actors = {key: pid for key in ("PolicyModelActor", "ReferenceModelActor", "RolloutRayActor")
                  for pid, title in titles.items() if title.split(".")[0] == f"ray::{key}"}
        created = len(actors) == 3 and all(titles[actors[key]] != f"ray::{key}.__init__"
                                           for key in ("PolicyModelActor", "ReferenceModelActor"))
        if created and created_at is None:
            created_at = time.monotonic()
        # a second more: the creation's reply reaches Ray after the worker's title changes
        if created and time.monotonic() - created_at > 1.0:
            engine = titles[actors["RolloutRayActor"]]
            assert engine == "ray::RolloutRayActor.__init__", f"the engine had started already ({engine}): too late"
            return proc, tag, actors
        time.sleep(0.3)
    proc.kill()
    raise AssertionError(f"the PPO job did not start its actors: {proc.stderr.read()[-2000:]}")


def _actor_titles(tag, driver_pid) -> dict[int, str]:
    """pid -> process title of the job's processes (Ray pads a worker's title with spaces)."""
    titles = {}
    for pid in reaper.tagged_processes(tag, exclude=(driver_pid,)):
        try:
            titles[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").strip("\0 ")
        except OSError:
            pass
    return titles


@pytest.mark.slow
@needs_cpu_layer
@pytest.mark.parametrize("fault", ["ctrl_c", "killed_actor"])
def test_interrupt_or_dead_actor_ends_the_job_with_one_line_and_no_orphans(models, tmp_path, fault):
    import signal

    proc, tag, actors = _start_and_wait_for_actors(models, tmp_path)
    try:
        if fault == "ctrl_c":
            proc.send_signal(signal.SIGINT)
        else:
            # the reference actor, alive and idle: its first use comes after the engine has started
            os.kill(actors["ReferenceModelActor"], signal.SIGKILL)
        _, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
        leftovers = reaper.tagged_processes(tag)
        reaper.kill_tagged(tag)
    last = err.strip().splitlines()[-1]
    if fault == "ctrl_c":
        assert proc.returncode == 130 and last.startswith("interrupted: train_ppo stopped by Ctrl-C")
    else:
        assert proc.returncode == 1 and last.startswith("error: PPO failed:") and "Actor" in last, err[-3000:]
    assert leftovers == []


# ------------------------------------------------------------------------------------ the upstream patch (0005)
PATCHED_DRIVER = """
import runpy, sys
import ray
ray.init(address="local", num_cpus=8, include_dashboard=False)  # logical CPUs: one per model process and engine
sys.argv = ["train_ppo_ray", *sys.argv[1:]]
runpy.run_module("openrlhf.cli.train_ppo_ray", run_name="__main__")
"""


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU path")
@pytest.mark.skipif(os.environ.get("OPENRLHF_IRL_TEST_PATCHED_PPO") != "1",
                    reason="opt-in (OPENRLHF_IRL_TEST_PATCHED_PPO=1): passed when written, then hung once in a "
                           "fresh-clone run (PPO and engine idle, cause not found yet); kept out of CI until fixed")
def test_patched_openrlhf_runs_ppo_on_cpu_without_the_compat_layer(models, tmp_path):
    """patches/0001-0006 applied to a copy of OpenRLHF 0.11.2: its own ``train_ppo_ray`` on a Ray cluster without
    GPUs, with ``OPENRLHF_IRL_COMPAT=0`` (no run-time layer, no vLLM plugin, no worker setup hook)."""
    import shutil
    import subprocess
    import sys
    from importlib.util import find_spec

    from openrlhf_irl.afd.ppo import ppo_argv

    root = tmp_path / "patched"
    source = Path(list(find_spec("openrlhf").submodule_search_locations)[0])
    shutil.copytree(source, root / "openrlhf", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    git_env = {**os.environ, "GIT_CEILING_DIRECTORIES": str(tmp_path)}
    for patch in sorted((REPO / "patches").glob("*.patch")):
        applied = subprocess.run(["git", "apply", str(patch)], cwd=root, env=git_env, capture_output=True, text=True)
        assert applied.returncode == 0, f"{patch.name}: {applied.stderr}"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in corpus_prompts(8)))
    script = tmp_path / "driver.py"
    script.write_text(PATCHED_DRIVER)
    import tempfile

    run_dir = Path(tempfile.mkdtemp(prefix="ppo5_"))  # short: Ray's sockets go under TMPDIR (AF_UNIX <= 107 bytes)
    tag = f"test-ppo-{uuid.uuid4().hex}"
    cache = cache_dir()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "RAY_ADDRESS")}
    env.update({ray_ppo.RUN_TAG_ENV: tag, "OPENRLHF_IRL_COMPAT": "0", "HF_HUB_OFFLINE": "1",
                "PYTHONPATH": os.pathsep.join([str(root), str(REPO)]), "VLLM_CPU_KVCACHE_SPACE": "1",
                "TORCHDYNAMO_DISABLE": "1", "VLLM_RPC_BASE_PATH": str(run_dir), "VLLM_CACHE_ROOT": str(cache / "vllm"),
                "TMPDIR": str(run_dir), "TORCH_EXTENSIONS_DIR": str(cache / "torch_extensions"),
                "TRITON_HOME": str(cache / "triton"), "AFD_SFT_MODEL": models[0], "AFD_INIT_MODEL": models[1],
                "AFD_DEVICE": "cpu"})
    out = tmp_path / "run"
    argv = ppo_argv(models[0], str(prompts), str(out), reward_func=str(REPO / "openrlhf_irl/afd/ppo_reward_func.py"),
                    lr=1e-3, extra=["--ds.attn_implementation", "sdpa", "--vllm.enforce_eager",
                                    "--vllm.sync_backend", "gloo"])
    try:
        proc = subprocess.run([sys.executable, str(script), *argv], env=env, capture_output=True, text=True,
                              timeout=900)
    finally:
        reaper.kill_tagged(tag)
        shutil.rmtree(run_dir, ignore_errors=True)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert "Global step 2" in output
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(out / "policy")
    start = AutoModelForCausalLM.from_pretrained(models[0])
    assert max((a.float() - b.float()).abs().max().item()
               for a, b in zip(trained.parameters(), start.parameters())) > 1e-4


# ------------------------------------------------------------------------------------------- the layer itself
@needs_cpu_layer
def test_worker_layer_gives_the_replay_buffer_and_the_broadcast_a_cpu_device():
    from openrlhf_irl import compat

    compat.activate()
    ray_ppo.install()
    from openrlhf.trainer.ppo_utils.replay_buffer import NaiveReplayBuffer

    buffer = NaiveReplayBuffer(2, 0, True, False, False)  # stock 0.11.2: "Invalid device string: 'cuda:cpu'"
    assert buffer.target_device == torch.device("cpu")
    assert torch.cuda.current_stream() is None  # what PolicyModelActor.broadcast_to_vllm hands the gloo group


def test_setup_hook_is_what_ray_loads_into_every_worker():
    from types import SimpleNamespace as NS

    from ray._common.utils import load_class

    assert load_class(ray_ppo.SETUP_HOOK) is ray_ppo.setup_worker
    group = NS(num_nodes=1, num_gpus_per_node=1)
    args = NS(actor=group, ref=group, critic=group, reward=NS(num_nodes=1, num_gpus_per_node=1, remote_url=["f.py"]),
              train=NS(colocate_all=False, colocate_actor_ref=False, colocate_critic_reward=False),
              algo=NS(advantage=NS(estimator="reinforce"), kl=NS(init_coef=0.01)),
              vllm=NS(num_engines=1, tensor_parallel_size=1))
    env = ray_ppo.worker_env(run_tag="t")
    kwargs = ray_ppo.ray_init_kwargs(args, env)
    assert kwargs["num_gpus"] == 2 and kwargs["num_cpus"] >= 3  # actor + ref; one engine bundle
    assert kwargs["runtime_env"]["worker_process_setup_hook"] == ray_ppo.SETUP_HOOK
    assert kwargs["runtime_env"]["env_vars"][ray_ppo.RUN_TAG_ENV] == "t"
    assert not kwargs["runtime_env"]["env_vars"]["TORCH_EXTENSIONS_DIR"].startswith(os.path.expanduser("~"))
