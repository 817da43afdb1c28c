#!/usr/bin/env python
"""Sampling throughput: bare vLLM vs our sampling job on OpenRLHF's engines vs the transformers backend.

Same model, prompts and sampling settings (temperature 1, top-p 1, up to ``--new-tokens`` tokens), one request per
(prompt, sample) with the same per-request seed in every backend, so the vLLM rows draw the same samples; tokens/s
counts the tokens each backend actually generated:

  (a) vllm_bare  ``vllm.LLM(...).generate`` in this process: the ceiling for one engine
  (b) ours_vllm  :class:`openrlhf_irl.generation.GenerationPool` ``backend="vllm"``: OpenRLHF's
                 ``create_vllm_engines`` (Ray actors, one engine), requests streamed as the sampling CLI streams them
  (c) ours_hf    the same pool with ``backend="hf"`` (transformers ``generate`` on ``--hf-actors`` Ray actors)

Each method: start-up (not timed as throughput), one warm-up round, then ``--rounds`` timed rounds; the median
round gives samples/s and generated tokens/s. Ratios are to (a), measured in the same run. Target: (b) >= 0.95 x (a).
Writes ``benchmarks/results/sampling-<device>.md`` and ``.json`` atomically.
Run: ``.venv/bin/python benchmarks/sampling.py [--prompts 64 --n 4 --new-tokens 32]``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
TARGET = 0.95  # (b) / (a), issue 24
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# torch's, DeepSpeed's and triton's build caches into the package's cache, as the CLIs do, before anything imports
# them (``import deepspeed`` alone creates ``$TMPDIR/torchinductor_<user>``)
from openrlhf_irl.utils.cache_dir import apply_cache_defaults  # noqa: E402

apply_cache_defaults()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--n", type=int, default=4, help="samples per prompt")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hf-actors", type=int, default=2)
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--output-dir", default=str(REPO / "benchmarks" / "results"))
    args = p.parse_args(argv)
    for flag in ("prompts", "n", "new_tokens", "rounds", "hidden", "layers", "hf_actors"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    return args


def build_model(root: str, hidden: int, layers: int) -> str:
    from openrlhf_irl.utils.tiny_model import sample_corpus, write_tiny_llama

    return write_tiny_llama(os.path.join(root, "model"), sample_corpus(800), vocab_size=300, hidden_size=hidden,
                            num_layers=layers, num_heads=hidden // 32, max_position_embeddings=512)


def prompts_for(count: int) -> list[str]:
    return [f"User: the robot counts {i} numbers\nAssistant: " for i in range(count)]


def timed_rounds(run_round, rounds: int) -> list[float]:
    run_round()  # warm-up
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        run_round()
        times.append(time.perf_counter() - start)
    return times


def bench_vllm_bare(model, prompts, args):
    import torch
    import vllm

    from openrlhf_irl.compat.vllm_cpu import CPU_ENGINE_ARGS, engine_env
    from openrlhf_irl.generation.params import derive_seed

    for key, value in engine_env().items():  # the same engine settings as the engines of (b) get
        os.environ.setdefault(key, value)
    # this engine runs in this process (engine_env's uni executor, no EngineCore process): its TMPDIR (a private
    # folder removed at exit) must reach tempfile here too, where vLLM puts its file-based process-group rendezvous
    tempfile.tempdir = None
    start = time.perf_counter()
    from openrlhf_irl.compat.param_dtype import vllm_dtype

    extra = CPU_ENGINE_ARGS if not torch.cuda.is_available() else {}
    dtype = vllm_dtype() if not torch.cuda.is_available() else "bfloat16"  # what the engines of (b) run in
    llm = vllm.LLM(model, enforce_eager=True, dtype=dtype, max_model_len=256, seed=0,
                   enable_prefix_caching=True, gpu_memory_utilization=0.5, **extra)
    startup = time.perf_counter() - start
    params = [vllm.SamplingParams(n=1, temperature=1.0, top_p=1.0, top_k=-1, max_tokens=args.new_tokens,
                                  seed=derive_seed(0, i, s), logprobs=1, skip_special_tokens=True)
              for i in range(len(prompts)) for s in range(args.n)]
    texts = [p for p in prompts for _ in range(args.n)]
    tokens = []

    def run_round():
        outs = llm.generate(texts, params, use_tqdm=False)
        tokens.append(sum(len(o.outputs[0].token_ids) for o in outs))

    times = timed_rounds(run_round, args.rounds)
    del llm
    gc.collect()
    return startup, times, tokens[-1]


def bench_pool(model, prompts, args, backend, actors):
    from openrlhf_irl.generation import GenerationPool, SamplingParams

    start = time.perf_counter()
    pool = GenerationPool(model, actors, backend, batch_size=32,
                          vllm_kwargs={"enforce_eager": True, "max_model_len": 256, "gpu_memory_utilization": 0.5})
    startup = time.perf_counter() - start
    params = SamplingParams(n=args.n, max_new_tokens=args.new_tokens, temperature=1.0, top_p=1.0, seed=0)
    tokens = []
    with pool:
        def run_round():
            out = [c for batch in pool.generate_stream(prompts, params) for c in batch]
            tokens.append(sum(len(c.token_ids) for c in out))

        times = timed_rounds(run_round, args.rounds)
    return startup, times, tokens[-1]


def main(argv=None) -> int:
    args = parse_args(argv)
    from openrlhf_irl.compat.vllm_probe import vllm_status

    ok, why = vllm_status()
    if not ok:
        print(f"error: {why}", file=sys.stderr)
        return 2
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    from openrlhf_irl.compat.param_dtype import vllm_dtype

    engine_dtype = vllm_dtype() if device == "cpu" else "bfloat16"
    rows = {}
    from openrlhf_irl.utils.reaper import owned_shm_cleanup

    # owned_shm_cleanup: the shared memory of the engines (a) and (b) start, removed at the end (even on Ctrl-C)
    with tempfile.TemporaryDirectory(prefix="bench_sampling_") as root, owned_shm_cleanup():
        model = build_model(root, args.hidden, args.layers)
        prompts = prompts_for(args.prompts)
        methods = [("vllm_bare", "(a) bare vllm.LLM, one engine in this process", lambda: bench_vllm_bare(model, prompts, args)),
                   ("ours_vllm", "(b) our sampling job: OpenRLHF engines through Ray", lambda: bench_pool(model, prompts, args, "vllm", 1))]
        if not args.skip_hf:
            methods.append(("ours_hf", f"(c) transformers backend, {args.hf_actors} Ray actors",
                            lambda: bench_pool(model, prompts, args, "hf", args.hf_actors)))
        for key, label, run in methods:
            print(f"[bench] {label} ...", flush=True)
            startup, times, tokens = run()
            med = statistics.median(times)
            rows[key] = {"label": label, "startup_s": round(startup, 2), "round_s": [round(t, 4) for t in times],
                         "median_round_s": round(med, 4), "samples_per_s": round(args.prompts * args.n / med, 1),
                         "tokens_per_round": tokens, "tokens_per_s": round(tokens / med, 1)}
            print(f"[bench] {key}: {rows[key]['samples_per_s']} samples/s, {rows[key]['tokens_per_s']} tokens/s "
                  f"(start-up {startup:.1f} s)", flush=True)
    base = rows["vllm_bare"]["samples_per_s"]
    for row in rows.values():
        row["ratio_to_bare"] = round(row["samples_per_s"] / base, 3)
    target = rows["ours_vllm"]["ratio_to_bare"] >= TARGET
    meta = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "device": device,
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "load_average_at_end": os.getloadavg(), "command": " ".join(["benchmarks/sampling.py", *(argv or sys.argv[1:])]),
            "settings": vars(args) | {"model": f"llama hidden {args.hidden}, {args.layers} layers, head_dim 32, "
                                                f"{engine_dtype}"},
            "target": f"(b) >= {TARGET} x (a)", "target_met": target}
    lines = [f"# Sampling throughput on {device}", "",
             f"- {meta['date']}; {meta['cores']} cores; load average at the end {meta['load_average_at_end']}",
             f"- {args.prompts} prompts x {args.n} samples x up to {args.new_tokens} new tokens, temperature 1, the same"
             f" per-request seeds in every backend;"
             f" {args.rounds} timed rounds after one warm-up; medians", f"- model: {meta['settings']['model']}",
             f"- command: `{meta['command']}`", "",
             "| method | samples/s | tokens/s | ratio to (a) | start-up (s) |", "|---|---:|---:|---:|---:|"]
    for row in rows.values():
        lines.append(f"| {row['label']} | {row['samples_per_s']} | {row['tokens_per_s']} | {row['ratio_to_bare']} | "
                     f"{row['startup_s']} |")
    lines += ["", f"Target (b) >= {TARGET} x (a): {'PASS' if target else 'FAIL'} ({rows['ours_vllm']['ratio_to_bare']})"]
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".md", "\n".join(lines) + "\n"), (".json", json.dumps({"meta": meta, "rows": rows}, indent=1))):
        path = out_dir / f"sampling-{device}{suffix}"
        fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    print("\n".join(lines))
    import ray

    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
