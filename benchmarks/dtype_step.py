#!/usr/bin/env python
"""bf16 against fp32 on this CPU: what ``--ds.param_dtype auto`` decides, and what the choice costs.

Measured in one run, same threads, same inputs:
  (a) a 1024x128 @ 128x512 matmul;
  (b) a forward + backward step of the demo's Llama (hidden 128, 4 layers, vocab 300) on 32 x 40 tokens, with
      AdamW's step, the weights in the dtype under test (what DeepSpeed trains in bf16 or fp32).
Each: warm-up, then the median of ``--repeats`` timings. Prints the ratio bf16 / fp32 and the CPU's bf16 flags, and
writes ``benchmarks/results/dtype-<cpu>.md`` and ``.json`` (``<cpu>``: ``amx``, ``avx512-bf16`` or ``no-bf16``).
Run: ``.venv/bin/python benchmarks/dtype_step.py [--threads 2 --repeats 10]``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from openrlhf_irl.compat.param_dtype import NATIVE_BF16_FLAGS, cpu_flags, resolve  # noqa: E402
from openrlhf_irl.utils.jsonl import atomic_write_json, atomic_writer  # noqa: E402


def median_seconds(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_case(dtype: torch.dtype):
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(1024, 128, generator=gen).to(dtype)
    b = torch.randn(128, 512, generator=gen).to(dtype)
    return lambda: a @ b


def training_step_case(dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    model = LlamaForCausalLM(config).to(dtype).train()
    model.config._attn_implementation = "eager"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, 300, (32, 40), generator=torch.Generator().manual_seed(1))

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()

    return step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--no-write", action="store_true", help="print only (the tests' smoke run)")
    args = parser.parse_args(argv)
    if args.threads < 1 or args.repeats < 1:
        parser.error("--threads and --repeats must be >= 1")
    torch.set_num_threads(args.threads)

    flags = cpu_flags() or set()
    bf16_flags = sorted(f for f in NATIVE_BF16_FLAGS if f in flags)
    auto = resolve("auto", cuda=False)
    rows = {}
    for name, case in (("matmul 1024x128 @ 128x512", matmul_case),
                       ("Llama h128 x4 layers, 32x40 tokens, fwd+bwd+AdamW", training_step_case)):
        seconds = {dt: median_seconds(case(getattr(torch, full)), args.repeats)
                   for dt, full in (("fp32", "float32"), ("bf16", "bfloat16"))}
        rows[name] = {"fp32_s": seconds["fp32"], "bf16_s": seconds["bf16"],
                      "bf16_over_fp32": seconds["bf16"] / seconds["fp32"]}
        print(f"{name}: fp32 {seconds['fp32'] * 1e3:.2f} ms, bf16 {seconds['bf16'] * 1e3:.2f} ms, "
              f"bf16/fp32 {rows[name]['bf16_over_fp32']:.2f}x")
    print(f"CPU bf16 flags: {', '.join(bf16_flags) or 'none'}; torch capability "
          f"{torch.backends.cpu.get_cpu_capability()}; auto picks {auto.dtype} ({auto.reason})")
    if args.no_write:
        return 0
    kind = "amx" if "amx_bf16" in bf16_flags else "avx512-bf16" if bf16_flags else "no-bf16"
    model_name = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo", errors="replace")
                       if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() \
        else platform.processor()
    result = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "cpu": model_name,
              "bf16_flags": bf16_flags, "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "threads": args.threads, "repeats": args.repeats, "torch": torch.__version__,
              "auto": {"dtype": auto.dtype, "reason": auto.reason}, "rows": rows}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / f"dtype-{kind}.json", result)
    lines = [f"# bf16 vs fp32 on {model_name}", "",
             f"{result['date']}, torch {torch.__version__}, {args.threads} threads, median of {args.repeats}. "
             f"bf16 flags: {', '.join(bf16_flags) or 'none'}; `--ds.param_dtype auto` picks **{auto.dtype}** "
             f"({auto.reason}).", "", "| case | fp32 | bf16 | bf16 / fp32 |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['fp32_s'] * 1e3:.2f} ms | {v['bf16_s'] * 1e3:.2f} ms | {v['bf16_over_fp32']:.2f}x |"
              for k, v in rows.items()]
    with atomic_writer(out / f"dtype-{kind}.md") as f:
        f.write("\n".join(lines) + "\n")
    print(f"written: {out / f'dtype-{kind}.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
