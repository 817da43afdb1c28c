"""``openrlhf-irl experiment``: the demo's stages (:class:`openrlhf_irl.demo.pipeline.Demo`) over K seeds with the
papers' comparisons, every row reported as mean with a 95% interval (seeds, then held-out prompts, resampled).

Per seed (each seed draws its own held-out split, demonstrations, models and samples):

* IQ-Learn: MLE SFT (td_weight 0) and IQ-Learn at each ``td_weights`` value, sampled at each of ``temperatures``
  (quality: golden reward; diversity: within-prompt self-BLEU, distinct-n, per-token entropy); MLE and IQ-Learn
  (``td_weight``) on demonstration subsets.
* AfD: reward models for every variant (init-sft, init-demo, sft-demo) x {Bradley-Terry pairs, BCE classifier},
  plus the log-ratio; Best-of-N from MLE SFT for N up to 64; a SPIN-style baseline (OpenRLHF ``train_dpo`` on
  sft-demo pairs).
* Win rates of every policy and Best-of-N pick against the SFT sample and the demonstration.

Each seed writes ``seed_<s>/results.json``; a rerun with the same settings reuses finished seeds and redoes a seed
whose settings differ (its directory is cleared first, so results never mix). The report is rebuilt after every
seed, so an interrupted run still leaves a report of the seeds it finished.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import time
from dataclasses import asdict, replace

from openrlhf_irl.demo.pipeline import RESULT_FILES, Demo, DemoConfig
from openrlhf_irl.demo.tasks import load_task
from openrlhf_irl.utils.output_guard import OutputUnit

# Wall time per seed on this project's 2-core CPU machine shared with other jobs (measured 2026-11-27), stated
# before a run starts; an idle machine is faster.
MINUTES_PER_SEED = {"quick": 15.0, "small": 18.0, "full": 120.0}


SCALES = ("quick", "small", "full")
# The comparisons a run makes at the small and full scales. "criteria": what the criteria of docs/experiment.md read
# (MLE's temperature curve with every IQ-Learn td_weight at T = 1, the demonstration subsets, init-sft reward models
# beside golden-pref, Best-of-N up to 16, PPO over BCE init-sft and golden-pref), with the AfD data sized at about
# 4000 pairs; "all": also the init-demo and sft-demo models, IQ-Learn at every temperature, the SPIN baseline,
# Best-of-N up to 64, PPO over the log-ratio, and 16 AfD samples per training prompt.
SWEEPS = ("criteria", "all")
AFD_PAIRS = 4000  # "criteria": AfD samples per training prompt chosen so that each AfD data set has about this many


def experiment_config(output_dir: str, quick: bool = False, backend: str = "auto", spin: bool = True,
                      scale: str | None = None, task: str = "sum", expert_habit: bool = False,
                      sweeps: str = "criteria") -> DemoConfig:
    """The experiment's sweeps at a scale: ``full`` = the demo's task, model and data (SFT epochs halved);
    ``small`` = every sweep on a smaller model and data set (for a busy 2-core machine); ``quick`` (or
    ``quick=True``) = tiny models, data and sweeps for CI. ``sweeps``: see :data:`SWEEPS`."""
    scale = scale or ("quick" if quick else "full")
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if sweeps not in SWEEPS:
        raise ValueError(f"sweeps must be one of {SWEEPS}, got {sweeps!r}")
    common = dict(td_weights=(0.01, 0.05, 0.1, 0.3), temperatures=(0.7, 1.0, 1.3), demo_subsets=(0.1, 0.3),
                  task=task, expert_habit=expert_habit)
    if sweeps == "all":
        common.update(afd_variants=("init-sft", "init-demo", "sft-demo"), spin=spin, bon_ns=(1, 2, 4, 8, 16, 32, 64),
                      ppo_rewards=("BCE init-sft", "log-ratio", "BT golden-pref"))
    else:
        common.update(afd_variants=("init-sft",), spin=False, bon_ns=(1, 2, 4, 8, 16), sweep_iq_temperatures=False,
                      ppo_rewards=("BCE init-sft", "BT golden-pref"))
    if scale == "small":
        small = dict(hidden_size=64, num_layers=2, n_train_prompts=400, n_pretrain=1500, sft_epochs=6, rm_epochs=1)
        per_prompt = 8 if sweeps == "all" else max(2, round(AFD_PAIRS / small["n_train_prompts"]))
        return DemoConfig.make(output_dir, backend=backend, afd_samples_per_prompt=per_prompt, **small, **common)
    if scale == "quick":
        return DemoConfig.make(output_dir, quick=True, backend=backend, td_weights=(0.05,), temperatures=(0.7, 1.0),
                               demo_subsets=(0.3,), afd_variants=("init-sft", "sft-demo"), spin=spin,
                               bon_ns=(1, 2, 4), n_boot=500, task=task, expert_habit=expert_habit)
    # The demo's task, model and data; for sum, SFT epochs halved (16 -> 8) so that several seeds fit in an hour on a
    # shared 2-core machine (chosen for time before any result was seen); a sized task keeps its sizes.
    module = load_task(task)
    sized = module.SIZES
    halved = {} if sized else {"sft_epochs": 8}
    if sweeps == "criteria":  # AfD samples every distinct training prompt (sum: 40 prompts under 1000 demonstrations)
        n_train = sized.get("n_train_prompts", DemoConfig.n_train_prompts)
        distinct = getattr(module, "distinct_training_prompts", lambda n: n)(n_train)
        common["afd_samples_per_prompt"] = max(2, round(AFD_PAIRS / distinct))
    return DemoConfig.make(output_dir, backend=backend, **halved, **common)


def _jsonable(cfg: DemoConfig) -> dict:
    return json.loads(json.dumps(asdict(cfg)))


def _finished(path: str, cfg: DemoConfig) -> dict | None:
    """The seed's stored results if they were made with exactly ``cfg``."""
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            stored = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    return stored if stored.get("config") == _jsonable(cfg) else None


def settings_md(cfg: DemoConfig, seeds: list[int], command: str, wall_s: float, seed_times: dict,
                wall_label: str = "Wall time of this invocation") -> list[str]:
    return [
        "## How this was made", "",
        f"Command: `{command}`", "",
        f"{wall_label}: {wall_s / 60:.1f} min; per seed (s): "
        + ", ".join(f"seed {s}: {t:.0f}" for s, t in seed_times.items()) + ".", "",
        "Settings (every setting tried is listed; none was tuned toward a result):", "",
        f"- task: {cfg.task}; {cfg.n_train_prompts} demonstrations (expert noise {cfg.expert_noise}) on the training "
        "prompts; " + (f"a seeded {cfg.held_out_fraction:.0%} of each k's targets held out for evaluation"
                       if cfg.task == "sum" else f"{cfg.n_eval_prompts} fresh held-out prompts for evaluation"),
        f"- model: Llama, hidden {cfg.hidden_size}, {cfg.num_layers} layers, {cfg.vocab_size}-token byte-level BPE"
        f"{' (no merges: character level)' if cfg.vocab_size <= 259 else ''}; "
        f"pre-training {cfg.pretrain_epochs} epoch on {cfg.n_pretrain} lines",
        f"- SFT: {cfg.sft_epochs} epochs, lr {cfg.sft_lr}, batch {cfg.batch_size}; IQ-Learn td_weight in "
        f"{{0 (= MLE, --trainer sft), {', '.join(f'{t:g}' for t in cfg.td_weights)}}}, gamma 1, offline",
        f"- sampling temperatures for {'the SFT policies' if cfg.sweep_iq_temperatures else 'MLE SFT (IQ-Learn at 1)'}: "
        f"{', '.join(f'{t:g}' for t in cfg.temperatures)} "
        f"(top-p 1, {cfg.max_new_tokens} new tokens, {cfg.eval_samples_per_prompt} samples per held-out prompt)",
        f"- demonstration subsets: {', '.join(f'{f:.0%}' for f in cfg.demo_subsets) or 'none'} (more epochs, so "
        "as many optimizer steps as the full runs), MLE and IQ-Learn at td_weight " + f"{cfg.td_weight:g}",
        f"- AfD: {cfg.afd_samples_per_prompt} samples per training prompt from init and MLE SFT; variants "
        f"{', '.join(cfg.afd_variants)}, each as Bradley-Terry pairs (--trainer rm) and BCE classifier "
        f"(--trainer afd_rm), {cfg.rm_epochs} epochs, lr 1e-3, started from {cfg.rm_backbone}; log-ratio "
        "log pi_SFT - log pi_init",
        ("- comparator golden-pref: Bradley-Terry on disjoint pairs of the same MLE-SFT samples ordered by the golden "
         "reward (ties left out), trained like the AfD ones" if cfg.golden_pref else "- golden-pref: skipped"),
        f"- Best-of-N from MLE SFT, N in {', '.join(map(str, cfg.bon_ns))}",
        (f"- PPO (OpenRLHF train_ppo_ray) from MLE SFT over {', '.join(cfg.ppo_rewards)}: {cfg.ppo_steps} steps of "
         f"{cfg.ppo_prompts_per_step} prompts x {cfg.ppo_samples_per_prompt} samples, lr {cfg.ppo_lr}, KL "
         f"{cfg.ppo_kl} against MLE SFT" if cfg.ppo_rewards else "- PPO: skipped"),
        (f"- SPIN-style baseline: OpenRLHF train_dpo from MLE SFT (reference MLE SFT), sft-demo pairs "
         f"(demonstration chosen, SFT sample rejected), beta {cfg.dpo_beta}, lr {cfg.dpo_lr}, {cfg.dpo_epochs} epoch"
         if cfg.spin else "- SPIN baseline: skipped"),
        f"- intervals: Student's t over the per-seed means (seeds {', '.join(map(str, seeds))}); with one seed "
        f"{cfg.n_boot} bootstrap draws over its held-out prompts", "",
    ]


def run_experiment(output_dir: str, seeds: list[int], quick: bool = False, backend: str = "auto",
                   spin: bool = True, command: str | None = None, scale: str | None = None,
                   verbose: bool = False, task: str = "sum", expert_habit: bool = False,
                   sweeps: str = "criteria") -> dict:
    """The seeds in turn; the terminal gets a line per stage and a bar over every seed's stages, each stage's output
    goes to ``seed_<s>/logs/NN-<stage>.log`` and the rest to ``<output_dir>/logs/run.log`` (``verbose``: all of it
    on the terminal)."""
    import ray

    from openrlhf_irl.demo.report import build_report
    from openrlhf_irl.utils.stage_log import StageProgress, stage_output

    root = os.path.abspath(output_dir)
    scale = scale or ("quick" if quick else "full")
    base = experiment_config(root, backend=backend, spin=spin, scale=scale, task=task, expert_habit=expert_habit,
                             sweeps=sweeps)
    command = command or "openrlhf-irl " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    stage_names = [st.name for st in Demo(base).stages()]
    n_stages = len(stage_names)
    per_seed = MINUTES_PER_SEED[scale]
    print(f"openrlhf-irl experiment ({scale}): seeds {seeds}, {n_stages} stages per seed; "
          f"about {per_seed:g} min per seed on a busy 2-core CPU, so about {per_seed * len(seeds):.0f} min in all"
          + ("." if verbose else f"; each stage's output in seed_<s>/logs/ under {root} (--verbose shows it here)."),
          flush=True)
    start = time.time()
    results, seed_times = [], {}
    progress = StageProgress(stage_names * len(seeds))
    os.makedirs(root, exist_ok=True)
    # locked against a second experiment; the previous run's top-level report out of sight before any seed runs,
    # so a rerun with other seeds that stops never shows the old report beside the new seeds' data
    unit = OutputUnit(root, RESULT_FILES)
    unit.set_aside()
    with stage_output(os.path.join(root, "logs", "run.log"), verbose):
        try:
            for s in seeds:
                cfg = replace(base, seed=s, output_dir=os.path.join(root, f"seed_{s}"))
                path = os.path.join(cfg.output_dir, "results.json")
                done = _finished(path, cfg)
                if done is None:
                    if os.path.exists(cfg.output_dir):
                        from openrlhf_irl.utils.output_guard import OutputConflict, is_ours

                        if not is_ours(cfg.output_dir):  # the CLI checked this up front; never delete a stranger's
                            raise OutputConflict(f"{cfg.output_dir}: not written by this tool; not replaced")
                        shutil.rmtree(cfg.output_dir)  # settings changed or the seed was cut short: start it clean
                    seed_start = time.time()
                    done = Demo(cfg, progress=progress, verbose=verbose, label_prefix=f"seed {s} ").run_stages()
                    seed_times[s] = time.time() - seed_start
                else:
                    timings = done.get("timings_s", {})
                    progress.skip({name: timings.get(name, 0.0) for name in stage_names},
                                  f"seed {s}: reusing {path} (same settings)")
                    seed_times[s] = sum(timings.values())
                results.append(done)
                stage_means = {k: round(sum(r["timings_s"].get(k, 0) for r in results) / len(results), 1)
                               for k in results[0]["timings_s"]}
                report = build_report(
                    root, replace(base, seed=seeds[0]), results,
                    title=f"openrlhf-irl experiment ({scale} scale, {len(results)} seed"
                          f"{'s' if len(results) > 1 else ''})",
                    extra_md=settings_md(base, [r["seed"] for r in results], command, time.time() - start, seed_times),
                    timings={f"{k} (mean per seed)": v for k, v in stage_means.items()})
        finally:
            unit.close()
            if ray.is_initialized():
                ray.shutdown()
    print(f"experiment: {len(results)} seed(s) in {(time.time() - start) / 60:.1f} min; report: "
          f"{os.path.join(root, 'report.md')}")
    return report
