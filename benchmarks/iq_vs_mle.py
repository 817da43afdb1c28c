#!/usr/bin/env python
"""IQ-Learn vs MLE: time and peak memory of one SFT optimizer step, same model, same batches, one run.

Methods (all: forward + loss + backward + ``torch.optim.AdamW`` step + ``loss.item()``, as in ``SFTTrainer.fit``):

  mle       OpenRLHF 0.11.2: ``Actor(..., return_output=True, return_logprobs=True)`` + ``openrlhf.models.SFTLoss``
  mle_fused fused-MLE baseline: the same model call as the fused IQ loss, then ``benchmarks/fused_mle.py``'s chunked
            single-pass linear cross-entropy on the response rows (gradients in forward, as Liger; plain PyTorch)
  iq_plain  ``IQLearnTrainer.policy_forward`` + ``IQLearnSFTLoss`` (full fp32 logits), td_weight 0.1
  iq_fused  same with ``fused_loss=True``: the single-pass fused op (``linear_iq_objective``), td_weight 0.1
  mle_liger MLE with Liger-Kernel's fused linear cross-entropy on the response rows (CUDA + liger_kernel only)

Targets: IQ fused <= 1.05 x fused MLE in step time and in step peak memory (and both IQ losses <= 1.05 x OpenRLHF's
MLE step time). Ablations (``--ablations``; same loss and gradients, only the logging or the algorithm differs): the
plain loss with its logged entropy on every response token (``entropy_sample_tokens`` = all) and on none (0); the
fused loss with no entropy logged; the fused loss with the two-pass reference op (logits recomputed in backward).

Timing: ``--warmup`` steps per method, then ``--steps`` timed steps, methods interleaved round-robin (the starting
method rotates every round) so that load drift on a shared machine hits all of them alike; medians reported.
Wall time everywhere; on CPU also the process CPU time (``time.process_time``), which is what the time ratio uses
there: on a shared machine it is far steadier than wall time (cpu-small runs 1 torch thread by default).
Memory: one separate, untimed step per method. CUDA: ``torch.cuda.max_memory_allocated`` after
``reset_peak_memory_stats`` (absolute) and minus ``memory_allocated`` at the step's start ("step peak").
CPU: ``torch.profiler.profile(profile_memory=True)``; the step peak is the maximum of the running sum of the
allocator's ``[memory]`` events (+ on allocation, - on free) over the step, i.e. the peak bytes of tensors the step
itself allocated above what was live when it began (RSS is too noisy for this). Ratios use the step peak.

Writes ``benchmarks/results/<config>-<device>.md`` and ``.json`` (atomically: temp file + ``os.replace``).
Run: ``.venv/bin/python benchmarks/iq_vs_mle.py [--config cpu-small|gpu-0.5b]``; see ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# torch's, DeepSpeed's and triton's build caches into the package's cache, as the CLIs do (``import deepspeed``,
# reached through ``openrlhf.models``, creates ``$TMPDIR/torchinductor_<user>`` otherwise)
from openrlhf_irl.utils.cache_dir import apply_cache_defaults  # noqa: E402

apply_cache_defaults()

import torch  # noqa: E402

from openrlhf_irl import compat  # noqa: E402

compat.activate()  # CPU: flash-attn stand-ins so that `import openrlhf.models` works; no-op with CUDA

from openrlhf.models import Actor, SFTLoss  # noqa: E402

from openrlhf_irl.losses.iq_sft import IQConfig, IQLearnSFTLoss  # noqa: E402
from openrlhf_irl.trainers.iq_learn import IQLearnTrainer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fused_mle import fused_linear_cross_entropy  # noqa: E402

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
TD_WEIGHT = 0.1
TIME_RATIO_TARGET = 1.05
FUSED_RATIO_TARGET = 1.05  # IQ fused / fused MLE, time and memory


# ---- configurations -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchConfig:
    name: str
    device: str
    arch: str  # "llama" | "qwen2"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    tie_word_embeddings: bool
    batch_size: int
    seq_len: int
    dtype: str  # "fp32" | "bf16"
    steps: int
    warmup: int
    n_batches: int = 4
    attn_implementation: str = "sdpa"
    fused_chunk_size: int = 1024
    lr: float = 1e-5
    threads: int | None = None  # torch.set_num_threads; None keeps torch's default


CONFIGS = {
    # Tiny Llama, but a real 32k vocabulary so the fused-memory claim is tested where the logits dominate.
    "cpu-small": BenchConfig(
        name="cpu-small", device="cpu", arch="llama", vocab_size=32_000, hidden_size=256, num_layers=2,
        num_heads=4, num_kv_heads=4, intermediate_size=688, tie_word_embeddings=False,
        batch_size=4, seq_len=256, dtype="fp32", steps=10, warmup=1, threads=1,
    ),
    # The same small body with Qwen2's 151,936-token vocabulary: where the lm_head dominates even more.
    "cpu-152k": BenchConfig(
        name="cpu-152k", device="cpu", arch="llama", vocab_size=151_936, hidden_size=256, num_layers=2,
        num_heads=4, num_kv_heads=4, intermediate_size=688, tie_word_embeddings=False,
        batch_size=4, seq_len=256, dtype="fp32", steps=8, warmup=1, threads=1,
    ),
    # Qwen2-0.5B's shapes (random weights built from the config: nothing is downloaded).
    "gpu-0.5b": BenchConfig(
        name="gpu-0.5b", device="cuda", arch="qwen2", vocab_size=151_936, hidden_size=896, num_layers=24,
        num_heads=14, num_kv_heads=2, intermediate_size=4864, tie_word_embeddings=True,
        batch_size=4, seq_len=2048, dtype="bf16", steps=20, warmup=3,
    ),
}

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build_model(cfg: BenchConfig, seed: int):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=max(cfg.seq_len, 2048), tie_word_embeddings=cfg.tie_word_embeddings,
        pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID, use_cache=False,
    )
    if cfg.arch == "qwen2":
        hf_cfg = Qwen2Config(rope_theta=1_000_000.0, rms_norm_eps=1e-6, **common)
    else:
        hf_cfg = LlamaConfig(**common)
    torch.manual_seed(seed)
    with torch.device(cfg.device):
        model = AutoModelForCausalLM.from_config(hf_cfg, attn_implementation=cfg.attn_implementation)
    model.to(DTYPES[cfg.dtype])
    model.config.use_cache = False
    model.train()
    actor = Actor(model)
    actor.packing_samples = False  # Actor only sets it when it loads the model itself
    actor.train()
    return actor


# ---- data -----------------------------------------------------------------------------------------------------
def make_batches(cfg: BenchConfig, seed: int):
    """Right-padded (inputs, attention_mask, loss_mask) as OpenRLHF's SFT collate builds them: prompt ~25% of each
    row, response ending with EOS; one row in four is cut at seq_len without EOS (not terminal)."""
    g = torch.Generator().manual_seed(seed)
    B, T = cfg.batch_size, cfg.seq_len
    batches = []
    for _ in range(cfg.n_batches):
        inputs = torch.full((B, T), PAD_ID, dtype=torch.long)
        attn = torch.zeros((B, T), dtype=torch.long)
        loss_mask = torch.zeros((B, T), dtype=torch.float32)
        for i in range(B):
            truncated = i % 4 == 3
            length = T if truncated else int(torch.randint(T // 2, T + 1, (1,), generator=g))
            frac = 0.15 + 0.2 * float(torch.rand((), generator=g))  # prompt share, mean 25%
            p_len = min(max(2, round(frac * length)), length - 2)
            ids = torch.randint(3, cfg.vocab_size, (length,), generator=g)
            ids[0] = BOS_ID
            if not truncated:
                ids[-1] = EOS_ID
            inputs[i, :length] = ids
            attn[i, :length] = 1
            loss_mask[i, p_len - 1: length - 1] = 1  # shifted: loss_mask[:, :-1] marks response labels
        batches.append(tuple(t.to(cfg.device) for t in (inputs, attn, loss_mask)))
    return batches


# ---- methods --------------------------------------------------------------------------------------------------
def bare_trainer(actor, **cfg) -> IQLearnTrainer:
    """The real ``IQLearnTrainer`` forward on a plain Actor, without OpenRLHF's trainer set-up, and the loss
    (``IQLearnSFTLoss``) built directly as ``iq_loss``."""
    trainer = object.__new__(IQLearnTrainer)
    trainer.model = actor
    trainer._actor_forward = actor.forward
    trainer.iq_config = IQConfig(**cfg)
    trainer.eos_token_id = EOS_ID
    trainer.iq_loss = IQLearnSFTLoss(trainer.iq_config, EOS_ID)
    return trainer


@dataclass
class Method:
    key: str
    label: str
    loss: object  # callable(inputs, attn, loss_mask) -> scalar loss tensor
    ablation: bool = False
    skipped: str | None = None
    targets: tuple = ()  # of "time" (vs MLE), "memory" (vs MLE), "fused_time", "fused_memory" (vs fused MLE)


def make_methods(actor, cfg: BenchConfig, ablations: bool) -> list[Method]:
    sft_loss = SFTLoss()

    def mle(inputs, attn, loss_mask):
        logp, _ = actor(inputs, attention_mask=attn, return_output=True, return_logprobs=True)
        return sft_loss(logp, loss_mask[:, :-1])

    hf = actor.model

    def mle_fused(inputs, attn, loss_mask):
        # the model call of the trainer's fused path, then the fused cross-entropy on the response rows (mean)
        position_ids = attn.long().cumsum(-1) - 1
        position_ids.masked_fill_(attn == 0, 1)
        out = hf(inputs, attention_mask=attn, position_ids=position_ids, output_hidden_states=True, logits_to_keep=1)
        mask = loss_mask[:, :-1].bool()
        return fused_linear_cross_entropy(out.hidden_states[-1][:, :-1][mask], hf.get_output_embeddings().weight,
                                          inputs[:, 1:][mask], chunk_size=cfg.fused_chunk_size)

    def iq(fused: bool, entropy_tokens: int | None = None, single_pass: bool = True):
        kw = {} if entropy_tokens is None else {"entropy_sample_tokens": entropy_tokens}
        kw["fused_single_pass"] = single_pass
        trainer = bare_trainer(actor, td_weight=TD_WEIGHT, fused_loss=fused, fused_chunk_size=cfg.fused_chunk_size,
                               **kw)

        def loss(inputs, attn, loss_mask):
            fwd, _ = trainer.policy_forward(inputs, attention_mask=attn, return_output=True,
                                                 return_logprobs=True)
            out = trainer.iq_loss(fwd, loss_mask[:, :-1])
            trainer.iq_loss.pop_stats()  # the trainer pops them at logging steps; keep the lists from growing
            return out

        return loss

    ent = IQConfig().entropy_sample_tokens
    all_tokens = cfg.batch_size * cfg.seq_len
    methods = [
        Method("mle", "MLE: OpenRLHF Actor + SFTLoss", mle),
        Method("iq_plain", f"IQ-Learn plain (td_weight {TD_WEIGHT}; entropy logged on {ent} tokens)", iq(False),
               targets=("time",)),
        Method("mle_fused", f"MLE fused: chunked single-pass linear cross-entropy (chunk {cfg.fused_chunk_size})",
               mle_fused),
        Method("iq_fused", f"IQ-Learn fused, single pass (td_weight {TD_WEIGHT}, chunk {cfg.fused_chunk_size}; "
               f"entropy logged on {ent} tokens)", iq(True), targets=("time", "memory", "fused_time", "fused_memory")),
    ]
    methods.append(_liger_method(actor, cfg))
    if ablations:
        methods += [
            Method("iq_plain_fullent", "ablation: IQ plain, entropy logged on all response tokens",
                   iq(False, entropy_tokens=all_tokens), ablation=True),
            Method("iq_plain_noent", "ablation: IQ plain, no entropy logged", iq(False, entropy_tokens=0),
                   ablation=True),
            Method("iq_fused_noent", "ablation: IQ fused, no entropy logged", iq(True, entropy_tokens=0),
                   ablation=True),
            Method("iq_fused_two_pass", "ablation: IQ fused, two-pass reference op (logits recomputed in backward)",
                   iq(True, single_pass=False), ablation=True),
        ]
    return methods


def _liger_method(actor, cfg: BenchConfig) -> Method:
    key, label = "mle_liger", "MLE: Liger fused linear cross-entropy"
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available here"
        return Method(key, label, None, skipped=f"liger_kernel not importable ({type(exc).__name__}: {exc})")
    if cfg.device != "cuda":
        return Method(key, label, None, skipped="liger_kernel needs CUDA (Triton kernels)")
    lce = LigerFusedLinearCrossEntropyLoss(reduction="mean")
    hf = actor.model

    def loss(inputs, attn, loss_mask):
        # Same model body as the Actor (no Liger kernel patches: only the loss differs), then the fused
        # lm_head + cross-entropy on the response rows only, like the fused IQ loss.
        position_ids = attn.long().cumsum(-1) - 1
        position_ids.masked_fill_(attn == 0, 1)
        hidden = hf.base_model(inputs, attention_mask=attn, position_ids=position_ids).last_hidden_state[:, :-1]
        mask = loss_mask[:, :-1].bool()
        out = lce(hf.get_output_embeddings().weight, hidden[mask], inputs[:, 1:][mask])
        return out[0] if isinstance(out, tuple) else out

    return Method(key, label, loss)


# ---- measurement ----------------------------------------------------------------------------------------------
def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def train_step(method: Method, actor, optimizer, batch) -> float:
    optimizer.zero_grad(set_to_none=True)
    loss = method.loss(*batch)
    loss.backward()
    optimizer.step()
    return loss.item()


def cpu_step_peak_bytes(fn) -> int:
    """Peak of the running sum of CPU allocator events during ``fn()`` (bytes above what was live at its start)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")]
    events.sort(key=lambda x: x[0])
    cur = peak = 0
    for _, nbytes in events:
        cur += nbytes
        peak = max(peak, cur)
    return peak


def measure_memory(method, actor, optimizer, batch, device) -> dict:
    # Free the previous step's gradients first, so that on both devices the step peak includes the gradients.
    optimizer.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        train_step(method, actor, optimizer, batch)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return {"step_peak_bytes": peak - base, "peak_allocated_bytes": peak, "base_allocated_bytes": base}
    return {"step_peak_bytes": cpu_step_peak_bytes(lambda: train_step(method, actor, optimizer, batch))}


@torch.no_grad()
def sanity(actor, cfg, batch) -> dict:
    """Loss values of the three losses on one batch before training: IQ's nll equals MLE's loss, fused == plain."""
    inputs, attn, loss_mask = batch
    mask = loss_mask[:, :-1]
    logp = actor(inputs, attention_mask=attn, return_logprobs=True)
    out = {"mle_loss": float(SFTLoss()(logp, mask))}
    fused_mle = next(m for m in make_methods(actor, cfg, False) if m.key == "mle_fused")
    out["mle_fused_loss"] = float(fused_mle.loss(inputs, attn, loss_mask))
    for key, fused in (("iq_plain", False), ("iq_fused", True)):
        trainer = bare_trainer(actor, td_weight=TD_WEIGHT, fused_loss=fused, fused_chunk_size=cfg.fused_chunk_size)
        out[f"{key}_loss"] = float(trainer.iq_loss(trainer.policy_forward(inputs, attention_mask=attn), mask))
        out[f"{key}_nll"] = trainer.iq_loss.pop_stats()["nll"]
    return out


def run(cfg: BenchConfig, seed: int, ablations: bool, log=print) -> dict:
    actor = build_model(cfg, seed)
    batches = make_batches(cfg, seed + 1)
    methods = make_methods(actor, cfg, ablations)
    active = [m for m in methods if m.skipped is None]
    for m in methods:
        if m.skipped:
            log(f"[skip] {m.key}: {m.skipped}")
    optimizer = torch.optim.AdamW(actor.parameters(), lr=cfg.lr)
    n_params = sum(p.numel() for p in actor.parameters())
    resp_tokens = [int(b[2][:, :-1].sum()) for b in batches]
    log(f"[setup] {cfg.name} on {cfg.device}: {n_params / 1e6:.1f}M params, {cfg.dtype}, batch {cfg.batch_size} x "
        f"{cfg.seq_len}, response tokens/batch {resp_tokens}, torch threads {torch.get_num_threads()}")

    checks = sanity(actor, cfg, batches[0])
    log("[sanity] " + ", ".join(f"{k}={v:.4f}" for k, v in checks.items()))

    t_start = time.perf_counter()
    for i in range(cfg.warmup):
        for m in active:
            train_step(m, actor, optimizer, batches[i % len(batches)])
    times = {m.key: [] for m in active}
    cpu_times = {m.key: [] for m in active}
    losses = {m.key: [] for m in active}
    for i in range(cfg.steps):
        batch = batches[i % len(batches)]
        shift = i % len(active)
        for m in active[shift:] + active[:shift]:
            _sync(cfg.device)
            t0, c0 = time.perf_counter(), time.process_time()
            losses[m.key].append(train_step(m, actor, optimizer, batch))
            _sync(cfg.device)
            times[m.key].append(time.perf_counter() - t0)
            cpu_times[m.key].append(time.process_time() - c0)
        log(f"[step {i + 1}/{cfg.steps}] " + ", ".join(
            f"{k} {times[k][-1] * 1e3:.0f} ms (cpu {cpu_times[k][-1] * 1e3:.0f})" for k in times))
    memory = {m.key: measure_memory(m, actor, optimizer, batches[0], cfg.device) for m in active}
    wall = time.perf_counter() - t_start

    results = {}
    # The time ratio: wall time on CUDA; process CPU time on CPU (steadier on a shared machine, see module doc).
    basis = "wall" if cfg.device == "cuda" else "cpu"
    ratio_times = times if basis == "wall" else cpu_times
    mle_time = statistics.median(ratio_times["mle"])
    mle_wall = statistics.median(times["mle"])
    mle_mem = memory["mle"]["step_peak_bytes"]
    fused_time = statistics.median(ratio_times["mle_fused"])
    fused_mem = memory["mle_fused"]["step_peak_bytes"]
    for m in methods:
        r = {"label": m.label, "ablation": m.ablation, "skipped": m.skipped}
        if m.skipped is None:
            med = statistics.median(times[m.key])
            r.update(
                median_s=med, min_s=min(times[m.key]), max_s=max(times[m.key]), times_s=times[m.key],
                median_cpu_s=statistics.median(cpu_times[m.key]), cpu_times_s=cpu_times[m.key],
                losses=losses[m.key], **memory[m.key],
                time_ratio=statistics.median(ratio_times[m.key]) / mle_time, time_ratio_basis=basis,
                wall_time_ratio=med / mle_wall, memory_ratio=memory[m.key]["step_peak_bytes"] / mle_mem,
                fused_time_ratio=statistics.median(ratio_times[m.key]) / fused_time,
                fused_time_ratio_min=min(ratio_times[m.key]) / min(ratio_times["mle_fused"]),
                fused_memory_ratio=memory[m.key]["step_peak_bytes"] / fused_mem,
            )
            r["targets"] = {}
            if "time" in m.targets:
                r["targets"]["time_ratio<=1.05"] = r["time_ratio"] <= TIME_RATIO_TARGET
            if "memory" in m.targets:
                r["targets"]["memory<mle"] = r["memory_ratio"] < 1.0
            if "fused_time" in m.targets:
                r["targets"]["time/fused_mle<=1.05"] = r["fused_time_ratio"] <= FUSED_RATIO_TARGET
            if "fused_memory" in m.targets:
                r["targets"]["memory/fused_mle<=1.05"] = r["fused_memory_ratio"] <= FUSED_RATIO_TARGET
        results[m.key] = r
    return {
        "config": dataclasses.asdict(cfg),
        "env": environment(cfg),
        "params": n_params,
        "response_tokens_per_batch": resp_tokens,
        "td_weight": TD_WEIGHT,
        "sanity": checks,
        "wall_s": wall,
        "methods": results,
    }


def environment(cfg) -> dict:
    from importlib.metadata import version

    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "openrlhf": version("openrlhf"),
        "torch_threads": torch.get_num_threads(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "optimizer": "torch.optim.AdamW (shared by all methods), no DeepSpeed",
        "memory_method": ("torch.cuda.max_memory_allocated after reset_peak_memory_stats" if cfg.device == "cuda"
                          else "torch.profiler profile_memory: peak running sum of CPU allocator events"),
    }
    if cfg.device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    try:
        env["liger_kernel"] = version("liger-kernel")
    except Exception:  # noqa: BLE001
        env["liger_kernel"] = None
    return env


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---- report ---------------------------------------------------------------------------------------------------
def _mib(n):
    return f"{n / 2**20:,.1f}"


def markdown(report: dict) -> str:
    cfg, env = report["config"], report["env"]
    dev = env.get("gpu") or f"{env['cpu']}, torch threads: {env['torch_threads']}"
    lines = [
        f"# IQ-Learn vs MLE: `{cfg['name']}` on {cfg['device']}",
        "",
        f"- {env['date']}; {dev}; torch {env['torch']}, transformers {env['transformers']}, "
        f"openrlhf {env['openrlhf']}",
        f"- model: random {cfg['arch']} from config, vocab {cfg['vocab_size']:,}, hidden {cfg['hidden_size']}, "
        f"{cfg['num_layers']} layers, {cfg['num_heads']} heads / {cfg['num_kv_heads']} KV, intermediate "
        f"{cfg['intermediate_size']}, tied {cfg['tie_word_embeddings']}, {report['params'] / 1e6:.1f}M params, "
        f"{cfg['dtype']}, attention {cfg['attn_implementation']}",
        f"- batch {cfg['batch_size']} x {cfg['seq_len']} tokens, response tokens per batch "
        f"{report['response_tokens_per_batch']}; {cfg['warmup']} warm-up + {cfg['steps']} timed steps per method, "
        f"interleaved; {env['optimizer']}",
        f"- command: `{report.get('command', 'benchmarks/iq_vs_mle.py')}`; seed {report.get('seed', 0)}",
        f"- memory: {env['memory_method']}; \"step peak\" = peak bytes above what was live when the step began "
        "(params and optimizer states excluded, gradients included)",
        f"- time / MLE: ratio of median {'wall' if cfg['device'] == 'cuda' else 'process CPU'} times"
        + ("" if cfg["device"] == "cuda" else " (the wall-time ratio is in parentheses; wall time on this shared "
           "machine moves with other jobs' load)"),
        "",
        "| method | median wall (ms) | min wall (ms) | median CPU (ms) | step peak (MiB) | time / MLE | "
        "memory / MLE | time / fused MLE | memory / fused MLE | targets |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for key, r in report["methods"].items():
        if r["skipped"]:
            lines.append(f"| {r['label']} | skipped: {r['skipped']} | | | | | | | | |")
            continue
        targets = []
        if "time_ratio<=1.05" in r["targets"]:
            targets.append(f"time <= 1.05: {'PASS' if r['targets']['time_ratio<=1.05'] else 'FAIL'}")
        if "memory<mle" in r["targets"]:
            targets.append(f"memory < MLE: {'PASS' if r['targets']['memory<mle'] else 'FAIL'}")
        for key, text in (("time/fused_mle<=1.05", "time / fused MLE <= 1.05"),
                          ("memory/fused_mle<=1.05", "memory / fused MLE <= 1.05")):
            if key in r["targets"]:
                targets.append(f"{text}: {'PASS' if r['targets'][key] else 'FAIL'}")
        peak = _mib(r["step_peak_bytes"])
        if "peak_allocated_bytes" in r:
            peak += f" ({_mib(r['peak_allocated_bytes'])} abs.)"
        cpu = "n/a" if cfg["device"] == "cuda" else f"{r['median_cpu_s'] * 1e3:,.1f}"
        ratio = f"{r['time_ratio']:.3f}"
        if r["time_ratio_basis"] != "wall":
            ratio += f" ({r['wall_time_ratio']:.3f})"
        lines.append(
            f"| {r['label']} | {r['median_s'] * 1e3:,.1f} | {r['min_s'] * 1e3:,.1f} | {cpu} | {peak} | "
            f"{ratio} | {r['memory_ratio']:.3f} | {r['fused_time_ratio']:.3f} | {r['fused_memory_ratio']:.3f} | "
            f"{'; '.join(targets)} |"
        )
    liger, fused = report["methods"].get("mle_liger", {}), report["methods"].get("iq_fused", {})
    if liger and not liger["skipped"] and fused and not fused["skipped"]:
        lines += ["", f"IQ-Learn fused / Liger MLE: time {fused['median_s'] / liger['median_s']:.3f} (wall), "
                      f"step peak memory {fused['step_peak_bytes'] / liger['step_peak_bytes']:.3f}."]
    if fused and not fused["skipped"] and "fused_time_ratio_min" in fused:
        lines += ["", f"IQ-Learn fused / fused MLE, ratio of the fastest steps ({'wall' if cfg['device'] == 'cuda' else 'CPU'}"
                      f" time): {fused['fused_time_ratio_min']:.3f}."]
    s = report["sanity"]
    lines += [
        "",
        f"Sanity (batch 0, before training): MLE loss {s['mle_loss']:.4f} (fused MLE {s['mle_fused_loss']:.4f}); IQ nll {s['iq_plain_nll']:.4f} (plain) / "
        f"{s['iq_fused_nll']:.4f} (fused); IQ loss {s['iq_plain_loss']:.4f} (plain) / {s['iq_fused_loss']:.4f} "
        f"(fused). Total measured wall time {report['wall_s']:.1f} s.",
        "",
    ]
    if report.get("load"):
        lines[-1:-1] = [f"Machine load while it ran (1-min load average of /proc/loadavg, {env['cpu_count']} "
                        f"logical CPUs): start {report['load']['start']}, end {report['load']['end']}.", ""]
    return "\n".join(lines)


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help=f"one or more of {', '.join(sorted(CONFIGS))}, comma-separated; default: "
                   "gpu-0.5b when CUDA is available, else cpu-small,cpu-152k")
    p.add_argument("--steps", type=int, help="timed steps per method (after warm-up)")
    p.add_argument("--warmup", type=int, help="warm-up steps per method")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--dtype", choices=sorted(DTYPES))
    p.add_argument("--chunk-size", type=int, help="fused loss chunk (tokens)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads on CPU (cpu-small default: 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ablations", action="store_true",
                   help="also time the IQ losses without the logging-only entropy (two more rows)")
    p.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--no-write", action="store_true", help="print only; do not write the results files")
    return p.parse_args(argv)


def _loadavg() -> str | None:
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return None


def main(argv=None) -> int:
    args = parse_args(argv)
    names = (args.config or ("gpu-0.5b" if torch.cuda.is_available() else "cpu-small,cpu-152k")).split(",")
    bad = [n for n in names if n not in CONFIGS]
    if bad:
        print(f"--config: unknown {', '.join(bad)}; choose from {', '.join(sorted(CONFIGS))}", file=sys.stderr)
        return 2
    summary = []
    for name in names:
        cfg = CONFIGS[name]
        if cfg.device == "cuda" and not torch.cuda.is_available():
            print(f"--config {name} needs CUDA, which this machine lacks; run --config cpu-small here.",
                  file=sys.stderr)
            return 2
        overrides = {k: v for k, v in {
            "steps": args.steps, "warmup": args.warmup, "batch_size": args.batch_size, "seq_len": args.seq_len,
            "dtype": args.dtype, "fused_chunk_size": args.chunk_size,
        }.items() if v is not None}
        cfg = dataclasses.replace(cfg, **overrides)
        if args.threads:
            cfg = dataclasses.replace(cfg, threads=args.threads)
        if cfg.threads and cfg.device == "cpu":
            torch.set_num_threads(cfg.threads)

        load_start = _loadavg()
        report = run(cfg, args.seed, ablations=args.ablations)
        report["load"] = {"start": load_start, "end": _loadavg()}
        report["seed"] = args.seed
        report["command"] = " ".join(["benchmarks/iq_vs_mle.py", *(sys.argv[1:] if argv is None else argv)])
        text = markdown(report)
        print()
        print(text)
        if not args.no_write:
            stem = Path(args.out_dir) / f"{cfg.name}-{cfg.device}"
            write_atomic(Path(f"{stem}.json"), json.dumps(report, indent=1) + "\n")
            write_atomic(Path(f"{stem}.md"), text)
            print(f"wrote {stem}.md and {stem}.json")
        r = report["methods"]["iq_fused"]
        summary.append(f"{name} (vocab {cfg.vocab_size:,}): IQ fused / fused MLE: time {r['fused_time_ratio']:.3f} "
                       f"(ratio of the fastest steps: {r['fused_time_ratio_min']:.3f}), "
                       f"step peak memory {r['fused_memory_ratio']:.3f} (targets <= {FUSED_RATIO_TARGET}: "
                       f"{'PASS' if r['fused_time_ratio'] <= FUSED_RATIO_TARGET else 'FAIL'}, "
                       f"{'PASS' if r['fused_memory_ratio'] <= FUSED_RATIO_TARGET else 'FAIL'})")
    print()
    print("\n".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
