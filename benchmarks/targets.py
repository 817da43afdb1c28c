#!/usr/bin/env python
"""The wall-time targets of the main job on this machine: ``make demo`` (at most 5 min), ``openrlhf-irl demo --quick``
(at most 2 min) and ``make test`` (at most 15 min of tests), each run in turn as a user runs it, with the CPU's model
and flags and the dtype ``auto`` picks, the load average before and after (the targets are for an idle machine).

Writes ``benchmarks/results/targets-<cpu>.md`` and ``.json`` (``<cpu>``: ``amx``, ``avx512-bf16`` or ``no-bf16``),
keeping the rows of runs not repeated (same CPU model); each run's whole output goes to ``targets-<cpu>.<run>.log``.
Run: ``.venv/bin/python benchmarks/targets.py [--only demo,quick,test]``. The demos write into a temporary folder,
removed afterwards; ``make test`` runs in this checkout.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from openrlhf_irl.compat.param_dtype import NATIVE_BF16_FLAGS, cpu_flags, resolve  # noqa: E402
from openrlhf_irl.utils.jsonl import atomic_write_json, atomic_writer  # noqa: E402

TARGETS_S = {"demo": 300.0, "quick": 120.0, "test": 900.0}
SHOWN_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_tag(flags: set[str]) -> str:
    if "amx_bf16" in flags:
        return "amx"
    return "avx512-bf16" if "avx512_bf16" in flags else "no-bf16"


def commands(out_dir: str) -> dict[str, list[str]]:
    py = str(REPO / ".venv" / "bin" / "python")
    return {"demo": [py, "-m", "openrlhf_irl", "demo", "--output-dir", os.path.join(out_dir, "demo")],
            "quick": [py, "-m", "openrlhf_irl", "demo", "--quick", "--output-dir", os.path.join(out_dir, "quick")],
            "test": ["make", "test"]}


def test_seconds(output: str) -> float | None:
    """pytest's own count of the test time ('... passed ... in 1234.56s'), without creating the environment."""
    found = re.findall(r"passed.* in ([0-9.]+)s", output)
    return float(found[-1]) if found else None


def stage_lines(output: str) -> list[str]:
    """The demo's finished-stage lines ('[4/7] AfD samples and reward models ...... 1 m 52 s'): where the time went."""
    return [m.group(0).strip() for m in re.finditer(r"^\[\d+/\d+\] .*? \.{3,} .*$", output, flags=re.M)]


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def run(name: str, argv: list[str]) -> dict:
    load_before = os.getloadavg()[0]
    started = now()
    start = time.time()
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True)
    wall = time.time() - start
    row = {"name": name, "command": " ".join(argv), "returncode": proc.returncode, "wall_s": round(wall, 1),
           "load_before": load_before, "load_after": os.getloadavg()[0], "target_s": TARGETS_S[name],
           "started": started}
    if name == "test":
        row["test_s"] = test_seconds(proc.stdout)
    else:
        row["stages"] = stage_lines(proc.stdout)
    measured = row.get("test_s") or wall
    row["measured_s"] = round(measured, 1)
    row["met"] = proc.returncode == 0 and measured <= TARGETS_S[name]
    if proc.returncode != 0:
        row["tail"] = (proc.stdout + proc.stderr)[-2000:]
    row["output"] = proc.stdout + proc.stderr  # written beside the results (main), not into the json
    return row


def merge_rows(previous: dict | None, env: dict, rows: list[dict]) -> list[dict]:
    """This run's rows, plus the earlier rows of the runs it did not repeat when they were measured on the same CPU
    model (``--only test`` after ``--only demo,quick`` keeps the demos' rows); in the order of ``TARGETS_S``."""
    names = {r["name"] for r in rows}
    kept = []
    if previous and previous.get("env", {}).get("cpu_model") == env["cpu_model"]:
        kept = [r for r in previous.get("rows", []) if r.get("name") in TARGETS_S and r["name"] not in names]
    order = list(TARGETS_S)
    return sorted(kept + rows, key=lambda r: order.index(r["name"]))


def markdown(env: dict, rows: list[dict]) -> str:
    lines = [f"# Wall-time targets on {env['cpu_model']}", "",
             f"{env['date']}; {env['cores']} cores; flags {', '.join(env['flags'])}; dtype auto -> {env['dtype']} "
             f"({env['dtype_reason']})", "",
             "| run | measured | target | met | load before / after | started (UTC) | command |",
             "|---|---:|---:|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['measured_s']:.0f} s | {r['target_s']:.0f} s | "
                     f"{'yes' if r['met'] else 'no'}{'' if r['returncode'] == 0 else ' (failed)'} | "
                     f"{r['load_before']:.1f} / {r['load_after']:.1f} | {r.get('started', '')} | `{r['command']}` |")
    for r in rows:
        if r.get("stages"):
            lines += ["", f"`{r['name']}` by stage:", "", "```", *r["stages"], "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="demo,quick,test", help="comma-separated: demo, quick, test (default: all)")
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in TARGETS_S]
    if unknown or not names:
        p.error(f"--only: expected some of {', '.join(TARGETS_S)}, got {args.only!r}")
    flags = cpu_flags() or set()
    resolved = resolve("auto", cuda=False)
    env = {"cpu_model": cpu_model(), "cores": os.cpu_count(), "flags": [f for f in SHOWN_FLAGS if f in flags],
           "native_bf16_flags": sorted(set(NATIVE_BF16_FLAGS) & flags), "dtype": resolved.dtype,
           "dtype_reason": resolved.reason, "date": now()}
    out_dir = tempfile.mkdtemp(prefix="oirl_targets_")
    try:
        cmds = commands(out_dir)
        rows = []
        for name in names:
            print(f"{name}: {' '.join(cmds[name])}", flush=True)
            rows.append(run(name, cmds[name]))
            print(f"  {rows[-1]['measured_s']:.0f} s (target {TARGETS_S[name]:.0f} s), exit {rows[-1]['returncode']}",
                  flush=True)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    stem = REPO / "benchmarks" / "results" / f"targets-{cpu_tag(flags)}"
    json_path = f"{stem}.json"
    previous = None
    if os.path.exists(json_path):
        with open(json_path, encoding="utf-8") as f:
            previous = json.load(f)
    rows = merge_rows(previous, env, rows)
    text = markdown(env, rows)
    print(text)
    if not args.no_write:
        for r in rows:  # each run's whole output: pytest's slowest tests, the demo's stage lines
            if "output" in r:
                with atomic_writer(f"{stem}.{r['name']}.log") as f:
                    f.write(r["output"])
        rows = [{k: v for k, v in r.items() if k != "output"} for r in rows]
        atomic_write_json(json_path, {"env": env, "rows": rows})
        with atomic_writer(f"{stem}.md") as f:
            f.write(text)
    return 0 if all(r["returncode"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
