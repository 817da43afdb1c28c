"""Sizing a task before any comparison: MLE SFT's golden reward on validation prompts (the gate of docs/experiment.md).

``openrlhf-irl size-task --task sort --n-train 500,1000 --epochs 8,16 [--seeds 1] [--output-dir D]`` runs the
demo's first stages (task, base model and initial policy, MLE SFT only) for each size and scores MLE SFT on
validation prompts: fresh draws of the training distribution that are neither training nor held-out prompts, so
the held-out prompts stay unseen by the choice of sizes. It prints one line per (size, seed) and writes
``sizing_<task>.json``. The gate asks for a validation golden reward between 0.3 and 0.5.
"""

from __future__ import annotations

import os
import random

__all__ = ["validation_prompts", "validation_golden", "run_sizing"]


def validation_prompts(task, exclude: set, n: int, seed: int) -> list[str]:
    """``n`` distinct prompts of ``task`` (``sort`` or ``bigram``: they draw prompts with ``make_prompt``) from a
    stream of their own, none in ``exclude``."""
    rng = random.Random(f"validation\x00{seed}")
    out: list[str] = []
    while len(out) < n:
        p = task.make_prompt(rng)
        if p not in exclude and p not in out:
            out.append(p)
    return out


def validation_golden(task: str, n_train: int, sft_epochs: int, seed: int, output_dir: str, n_val: int = 64,
                      samples_per_prompt: int = 4, quick: bool = False, backend: str = "auto") -> dict:
    """MLE SFT trained as the demo trains it (``DemoConfig`` with only the sizes changed), scored on validation
    prompts: ``{"golden": mean over prompts of the per-prompt mean, "prompts": n_val, ...}``."""
    from openrlhf_irl.demo.pipeline import Demo, DemoConfig

    cfg = DemoConfig.make(output_dir, seed=seed, quick=quick, backend=backend, task=task, n_train_prompts=n_train,
                          sft_epochs=sft_epochs, td_weights=(), demo_subsets=(), ppo_rewards=())
    demo = Demo(cfg, verbose=True)
    demo.results = {"rows": {}}
    with demo.claimed():
        demo.make_task()
        demo.make_base_and_init()
        demo.make_sft_policies()  # MLE only: no td_weights, no subsets
        mod = demo.task
        prompts = validation_prompts(mod, set(demo.train_prompts) | set(demo.eval_prompts), n_val, seed)
        completions = demo.generate(demo.path("models", "sft_mle"), prompts, samples_per_prompt, 1.0,
                                    seed * 1000 + 41)
    per_prompt: dict[str, list[float]] = {}
    for c in completions:
        per_prompt.setdefault(prompts[c.prompt_index], []).append(mod.golden_reward(prompts[c.prompt_index], c.text))
    means = [sum(v) / len(v) for v in per_prompt.values()]
    return {"task": task, "n_train": n_train, "sft_epochs": sft_epochs, "seed": seed, "quick": quick,
            "golden": sum(means) / len(means), "prompts": len(means), "samples_per_prompt": samples_per_prompt}


def run_sizing(task: str, n_trains: list[int], epochs_list: list[int], seeds: list[int], output_dir: str,
               quick: bool = False, backend: str = "auto") -> list[dict]:
    """Every (size, epochs, seed) in turn, one line each; the rows also go to ``<output_dir>/sizing_<task>.json``."""
    from openrlhf_irl.utils.jsonl import atomic_write_json

    rows = []
    for n_train in n_trains:
        for epochs in epochs_list:
            for seed in seeds:
                out = os.path.join(output_dir, f"{task}_n{n_train}_e{epochs}_s{seed}")
                row = validation_golden(task, n_train, epochs, seed, out, quick=quick, backend=backend)
                rows.append(row)
                print(f"sizing {task}: n_train {n_train}, epochs {epochs}, seed {seed}: MLE SFT validation golden "
                      f"{row['golden']:.3f} over {row['prompts']} prompts", flush=True)
                atomic_write_json(os.path.join(output_dir, f"sizing_{task}.json"), rows)
    return rows
