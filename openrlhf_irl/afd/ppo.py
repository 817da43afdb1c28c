"""PPO over an AfD reward with OpenRLHF's ``train_ppo_ray``, from Python (the demo's PPO stage, the tests).

:func:`run_ppo` writes the prompts, runs ``python -m openrlhf_irl.cli.train_ppo`` in a subprocess (Ray and vLLM
stay out of the caller's process; on a CPU machine the launcher applies the CPU layer) and returns the trained
policy's directory with the per-step logs OpenRLHF wrote to TensorBoard. The reward is either an AfD reward model
(``reward_model``: an ``afd_rm`` or BT checkpoint) or the log-ratio ``log pi_SFT(y|x) - log pi_init(y|x)``
(``log_ratio=(sft, init)``, through :mod:`openrlhf_irl.afd.ppo_reward_func`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

REWARD_FUNC = str(Path(__file__).with_name("ppo_reward_func.py"))


@dataclass
class PPOResult:
    policy: str  # the trained policy (HF format)
    logs: list[dict] = field(default_factory=list)  # one dict per PPO step: OpenRLHF's train/* scalars
    seconds: float = 0.0


def ppo_argv(policy: str, prompt_file: str, out_dir: str, *, reward_model: str | None = None,
             reward_func: str | None = None, prompts_per_step: int = 4, samples_per_prompt: int = 2,
             steps: int = 2, max_new_tokens: int = 16, max_len: int = 128, lr: float = 1e-4,
             kl_coef: float = 0.01, estimator: str = "reinforce", input_key: str = "prompt",
             extra: Sequence[str] = ()) -> list[str]:
    """``train_ppo`` flags for a small single-process-per-model run: ``steps`` rollout batches of
    ``prompts_per_step`` prompts x ``samples_per_prompt`` samples, one optimiser step each."""
    if (reward_model is None) == (reward_func is None):
        raise ValueError("give exactly one of reward_model, reward_func")
    batch = prompts_per_step * samples_per_prompt
    argv = [
        "--actor.model_name_or_path", policy,
        "--actor.num_gpus_per_node", "1", "--ref.num_gpus_per_node", "1",
        "--critic.num_gpus_per_node", "1", "--reward.num_gpus_per_node", "1",
        "--vllm.num_engines", "1",
        "--algo.advantage.estimator", estimator, "--algo.kl.init_coef", str(kl_coef),
        "--data.prompt_dataset", prompt_file, "--data.input_key", input_key, "--data.max_len", str(max_len),
        "--data.max_samples", str(prompts_per_step * steps),
        "--rollout.max_new_tokens", str(max_new_tokens), "--rollout.batch_size", str(prompts_per_step),
        "--rollout.micro_batch_size", str(min(batch, 4)), "--rollout.n_samples_per_prompt", str(samples_per_prompt),
        "--train.micro_batch_size", str(min(batch, 4)), "--train.batch_size", str(batch),
        "--train.max_epochs", "1", "--train.num_episodes", "1",
        "--ds.zero_stage", "2", "--actor.adam.lr", str(lr),
        "--logger.tensorboard_dir", os.path.join(out_dir, "tensorboard"), "--logger.wandb.run_name", "ppo",
        "--ckpt.output_dir", os.path.join(out_dir, "policy"), "--ckpt.path", os.path.join(out_dir, "checkpoints"),
        "--ckpt.save_hf",
    ]
    if reward_model is not None:
        argv += ["--reward.model_name_or_path", reward_model]
    else:
        argv += ["--reward.remote_url", reward_func]
    return argv + list(extra)


def read_logs(tensorboard_dir: str) -> list[dict]:
    """OpenRLHF's ``train/*`` scalars per global step (1-based, in order)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps: dict[int, dict] = {}
    for root, _, files in os.walk(tensorboard_dir):
        if not any(f.startswith("events.out.tfevents") for f in files):
            continue
        acc = EventAccumulator(root, size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            for event in acc.Scalars(tag):
                steps.setdefault(event.step, {})[tag.removeprefix("train/")] = event.value
    return [steps[k] for k in sorted(steps)]


def lost_port_race(stderr: str | None) -> bool:
    """Whether a failed run's output shows a socket that could not bind its port (EADDRINUSE): OpenRLHF chooses a
    free port for its process groups, closes it and binds it later, and another process can take it in between."""
    text = stderr or ""
    return "EADDRINUSE" in text or "address already in use" in text.lower()


def _prepare(policy: str, prompts: Sequence[str], out_dir: str, *, reward_model: str | None = None,
             log_ratio: tuple[str, str] | None = None, reward_func: str | None = None, **kwargs) -> tuple:
    """A run's prompt file written and its stale outputs removed: ``(train_ppo argv, env updates, out dir)``."""
    need = kwargs.get("prompts_per_step", 4) * kwargs.get("steps", 2)
    if len(prompts) < need:
        raise ValueError(f"{kwargs.get('steps', 2)} PPO steps of {kwargs.get('prompts_per_step', 4)} prompts need "
                         f"{need} prompts, got {len(prompts)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prompt_file = out / "prompts.jsonl"
    with open(prompt_file, "w", encoding="utf-8") as f:
        for prompt in prompts:
            f.write(json.dumps({"prompt": prompt}) + "\n")
    env = {}
    if log_ratio is not None:
        env.update(AFD_SFT_MODEL=str(log_ratio[0]), AFD_INIT_MODEL=str(log_ratio[1]), AFD_DEVICE="cpu")
        reward_func = reward_func or REWARD_FUNC
    argv = ppo_argv(str(policy), str(prompt_file), str(out), reward_model=reward_model, reward_func=reward_func,
                    **kwargs)
    _remove_outputs([out])
    return argv, env, out


def _remove_outputs(outs) -> None:
    for out in outs:  # a rerun never reads the logs or weights of an earlier one
        for stale in ("tensorboard", "policy", "seconds.json"):
            path = Path(out) / stale
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            elif path.exists():
                path.unlink()


def _launch(cmd: list[str], env: dict, outs: list, *, quiet: bool, timeout_s: float | None,
            port_retries: int) -> subprocess.CompletedProcess:
    """Run ``cmd``; again (its outputs removed) after a lost port race, up to ``port_retries`` times."""
    for attempt in range(1 + port_retries):
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE if quiet else None, stderr=subprocess.PIPE,
                              text=True, timeout=timeout_s)
        if not quiet and proc.stderr:  # kept for the error line below; shown (or logged: the demo's stage log) too
            sys.stderr.write(proc.stderr)
            sys.stderr.flush()
        if proc.returncode == 0 or not lost_port_race(proc.stderr) or attempt == port_retries:
            break
        # OpenRLHF picks a free port, closes it and binds it later; another job on the machine can take it between
        print(f"PPO: a port chosen by OpenRLHF was taken before it was bound (EADDRINUSE); run again "
              f"({attempt + 2} of {1 + port_retries})", flush=True)
        _remove_outputs(outs)
    if proc.returncode != 0:
        errors = [line for line in (proc.stderr or "").splitlines() if line.startswith("error:")]
        tail = errors[-1] if errors else (proc.stderr or "").strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"PPO failed (exit {proc.returncode}): {tail if isinstance(tail, str) else tail[0]}")
    return proc


def run_ppo(policy: str, prompts: Sequence[str], out_dir: str, *, reward_model: str | None = None,
            log_ratio: tuple[str, str] | None = None, reward_func: str | None = None,
            env: dict | None = None, timeout_s: float | None = None, quiet: bool = True, port_retries: int = 1,
            **kwargs) -> PPOResult:
    """Run PPO on ``prompts`` from ``policy``; the reward is ``reward_model``, the AfD log-ratio
    ``log_ratio=(sft_dir, init_dir)`` or a ``reward_func`` file. ``kwargs`` go to :func:`ppo_argv`. ``quiet``: the
    run's output is not shown (else its stdout as it comes and its stderr once it ends). A run that fails because a
    port OpenRLHF chose was taken before it bound it (:func:`lost_port_race`) is run again, up to ``port_retries``
    times. Raises ``RuntimeError`` with the launcher's error line when the run fails."""
    argv, run_env, out = _prepare(policy, prompts, out_dir, reward_model=reward_model, log_ratio=log_ratio,
                                  reward_func=reward_func, **kwargs)
    start = time.monotonic()
    _launch([sys.executable, "-m", "openrlhf_irl.cli.train_ppo", *argv], {**os.environ, **(env or {}), **run_env},
            [out], quiet=quiet, timeout_s=timeout_s, port_retries=port_retries)
    return PPOResult(policy=str(out / "policy"), logs=read_logs(str(out / "tensorboard")),
                     seconds=time.monotonic() - start)


def run_ppo_series(runs: Sequence[dict], *, env: dict | None = None, timeout_s: float | None = None,
                   quiet: bool = True, port_retries: int = 1) -> list[PPOResult]:
    """:func:`run_ppo` for each of ``runs`` (dicts of its arguments: ``policy``, ``prompts``, ``out_dir``, the
    reward and :func:`ppo_argv`'s settings), one after the other in one process and one Ray instance where the CPU
    layer starts Ray itself (``python -m openrlhf_irl.afd.ppo_series``): the second run skips the driver's start
    and Ray's. Elsewhere (CUDA, a Ray cluster named by ``RAY_ADDRESS``) each run is a :func:`run_ppo` of its own.
    Log-ratio runs of one series share their two models (the reward reads them from the environment). Each
    result's ``seconds`` is its run's own time (the first run's includes the start)."""
    from openrlhf_irl.compat import ray_ppo

    if len(runs) < 2 or not ray_ppo.needed() or os.environ.get("RAY_ADDRESS"):
        return [run_ppo(**run, env=env, timeout_s=timeout_s, quiet=quiet, port_retries=port_retries) for run in runs]
    pairs = sorted({tuple(map(str, run["log_ratio"])) for run in runs if run.get("log_ratio") is not None})
    if len(pairs) > 1:  # before anything is written
        raise ValueError(f"the log-ratio runs of one PPO series must share their models (sft, init), got {pairs}; "
                         "run them with run_ppo")
    prepared = [_prepare(**run) for run in runs]
    run_env = {}
    for _, updates, _ in prepared:
        run_env.update(updates)
    spec = [{"argv": argv, "seconds_file": str(out / "seconds.json")} for argv, _, out in prepared]
    outs = [out for _, _, out in prepared]
    _launch([sys.executable, "-m", "openrlhf_irl.afd.ppo_series", json.dumps(spec)],
            {**os.environ, **(env or {}), **run_env}, outs, quiet=quiet, timeout_s=timeout_s,
            port_retries=port_retries)
    results = []
    for out in outs:
        with open(out / "seconds.json", encoding="utf-8") as f:
            seconds = json.load(f)["seconds"]
        results.append(PPOResult(policy=str(out / "policy"), logs=read_logs(str(out / "tensorboard")),
                                 seconds=seconds))
    return results
