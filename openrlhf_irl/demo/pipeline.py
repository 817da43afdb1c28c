"""The embedded demo: IQ-Learn SFT and AfD reward extrapolation end to end on a tiny model, on CPU, scored on
held-out prompts.

Every training step runs through OpenRLHF's own CLI flow (``train(args)``, DeepSpeed, its datasets) with the
plug-in trainers; sampling goes through :class:`openrlhf_irl.generation.GenerationPool` (Ray; ``backend="auto"``);
nothing is downloaded. The run is a list of stages (:meth:`Demo.stages`):

1. task      synthetic prompts split into training and held-out prompts, a noisy expert's demonstrations, a golden
             reward (``openrlhf_irl.demo.task``)
2. init      a tiny Llama + BPE tokenizer, briefly pre-trained on prompts followed by careless answers
3. sft       MLE SFT (``--trainer sft``) and IQ-Learn SFT (``--trainer irl_iq``, one run per ``td_weights`` value),
             optionally on demonstration subsets
4. afd       samples of init and MLE-SFT on the training prompts -> one reward model per (AfD variant, trainer):
             Bradley-Terry pairs (``--trainer rm``) and the BCE classifier (``--trainer afd_rm``)
5. spin      (optional) SPIN-style baseline: OpenRLHF's ``train_dpo`` on sft-demo pairs
6. ppo       PPO from MLE SFT on the training prompts with OpenRLHF's own ``train_ppo_ray`` (vLLM rollouts, DeepSpeed
             actor and reference; CPU layer where there is no CUDA), one run per reward in ``ppo_rewards``: an AfD
             reward model and the training-free log-ratio ``log pi_SFT - log pi_init``
7. bon       Best-of-N from MLE SFT on the held-out prompts over every reward model and the log-ratio
8. eval      every registered policy sampled on the held-out prompts (at each of ``temperatures`` for the SFT
             policies): golden reward, win rates against the SFT sample and the demonstration, diversity

The demo's report is one seed of :mod:`openrlhf_irl.demo.report`; ``openrlhf-irl experiment``
(:mod:`openrlhf_irl.demo.experiment`) runs the same stages over several seeds with larger sweeps.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Callable

from openrlhf_irl.utils.stage_log import StageProgress, fmt_duration, log_name, stage_output, write_terminal

# Prompt and answer are joined by a newline in every stage: a trailing space in the prompt would be tokenized apart
# from the answer's first word by byte-level BPE, so generation would start from a state never seen in training.
INPUT_TEMPLATE = "{}\n"

RM_KIND = {"rm": "BT", "afd_rm": "BCE"}  # --trainer -> short label of the reward model's objective
GOLDEN_PREF = "BT golden-pref"  # the scorer name of the golden-labelled comparator (DemoConfig.golden_pref)

# What a run shows as its result (results.json, then the report): a rerun takes the previous run's out of the folder
# before its first stage writes new data, so a rerun that stops never leaves an old report beside new data.
RESULT_FILES = ("best_of_n.png", "policies.png", "quality_diversity.png", "subsets.png", "results.json",
                "report.json", "report.md")


@dataclass
class DemoConfig:
    output_dir: str = "outputs/demo"
    seed: int = 0
    quick: bool = False
    backend: str = "auto"  # GenerationPool backend: auto (vLLM when it runs here, else transformers), hf, vllm
    # task (openrlhf_irl.demo.tasks): "sum", the new-target stress test, "sort" or "bigram"
    task: str = "sum"
    n_train_prompts: int = 1000
    held_out_fraction: float = 0.25  # sum: of each k's targets; sort, bigram: > 0 keeps them out of training
    n_eval_prompts: int = 64  # sort, bigram: held-out prompts drawn (sum holds out a fixed share of its 55 prompts)
    n_pretrain: int = 4000
    expert_noise: float | None = None  # None: the task's DEFAULT_NOISE
    expert_habit: bool = False  # bigram only: the expert prefers to end on a word the reward ignores
    # model
    hidden_size: int = 128
    num_layers: int = 4
    vocab_size: int | None = None  # None: the task's VOCAB_SIZE (sort: 259, a tokenizer with no merges)
    # training
    pretrain_epochs: int = 1
    sft_epochs: int = 16
    sft_lr: float = 3e-3
    td_weight: float = 0.05  # the IQ-Learn policy of the main rows (and of the demonstration-subset rows)
    td_weights: tuple = (0.05,)  # IQ-Learn runs (0 = MLE, trained with --trainer sft)
    # fractions of the demonstrations for extra MLE / IQ-Learn runs, e.g. (0.1, 0.3), each trained for the optimizer
    # steps of the full runs (more epochs: matched_epochs), so data is compared at equal compute
    demo_subsets: tuple = ()
    rm_epochs: int = 2
    rm_backbone: str = "sft_mle"  # the reward models start from this policy (value head added)
    afd_variants: tuple = ("init-sft",)
    rm_trainers: tuple = ("rm", "afd_rm")
    # the comparator beside the AfD reward models: a Bradley-Terry model of the same backbone on pairs of MLE-SFT
    # samples (the AfD samples) ordered by the golden reward (datasets/golden_pref.py), scorer "BT golden-pref"
    golden_pref: bool = True
    spin: bool = False  # SPIN-style DPO baseline on sft-demo pairs
    dpo_epochs: int = 1
    dpo_lr: float = 3e-4
    dpo_beta: float = 0.1
    micro_batch_size: int = 32
    batch_size: int = 32
    # sampling / AfD / evaluation
    afd_prompts: int | None = None  # None: every unique training prompt
    afd_samples_per_prompt: int = 16
    eval_samples_per_prompt: int = 8
    temperatures: tuple = (1.0,)  # sampling temperatures for the SFT policies (others: 1.0)
    sweep_iq_temperatures: bool = True  # False: only MLE SFT at every temperature, IQ-Learn at 1.0 (what the
    # criteria of docs/experiment.md read: IQ-Learn at T = 1 against MLE's temperature curve)
    bon_ns: tuple = (1, 2, 4, 8, 16)
    # PPO over the AfD rewards (OpenRLHF train_ppo_ray), from MLE SFT on the training prompts: one run per reward,
    # named like the Best-of-N scorers ("BCE init-sft", "BT init-sft", "log-ratio"); () skips the stage
    ppo_rewards: tuple = ("BCE init-sft", "log-ratio")
    ppo_steps: int = 8  # rollout batches, one optimiser step each
    ppo_prompts_per_step: int = 16
    ppo_samples_per_prompt: int = 4
    ppo_lr: float = 1e-3
    ppo_kl: float = 0.01  # initial KL coefficient against the MLE SFT reference
    max_new_tokens: int = 24
    num_actors: int = 1  # Ray actors per GenerationPool: the tiny model samples in about a second, an actor's start
    # costs a process with torch (tens of seconds on a busy 2-core machine), so one actor is the faster choice here
    n_boot: int = 2000

    @classmethod
    def make(cls, output_dir: str, seed: int = 0, quick: bool = False, **overrides) -> "DemoConfig":
        if not quick:  # the task's sizes (tasks.py), under any explicit override
            from openrlhf_irl.demo.tasks import load_task

            sized = {**load_task(overrides.get("task", "sum")).SIZES, **overrides}
            return cls(output_dir=output_dir, seed=seed, **sized)
        settings = dict(n_train_prompts=160, n_eval_prompts=16, n_pretrain=600, hidden_size=64, num_layers=2,
                        sft_epochs=2, rm_epochs=1, micro_batch_size=16, batch_size=16, afd_prompts=32,
                        afd_samples_per_prompt=2, eval_samples_per_prompt=2, bon_ns=(1, 2, 4), max_new_tokens=20,
                        n_boot=500, ppo_steps=2, ppo_prompts_per_step=4, ppo_samples_per_prompt=2)
        settings.update(overrides)
        return cls(output_dir=output_dir, seed=seed, quick=True, **settings)

    def __post_init__(self):
        from openrlhf_irl.demo.tasks import load_task

        task = load_task(self.task)  # ValueError naming the tasks
        if self.expert_noise is None:
            self.expert_noise = task.DEFAULT_NOISE
        if self.vocab_size is None:
            self.vocab_size = task.VOCAB_SIZE
        if self.expert_habit and self.task != "bigram":
            raise ValueError(f"expert_habit: only the bigram task has an expert habit, not {self.task!r}")
        known = {"log-ratio", *(f"{RM_KIND[t]} {v}" for t in self.rm_trainers for v in self.afd_variants),
                 *((GOLDEN_PREF,) if self.golden_pref else ())}
        for reward in self.ppo_rewards:
            if reward not in known:
                raise ValueError(f"ppo_rewards: {reward!r} is not one of this run's rewards ({', '.join(sorted(known))})")
        if self.ppo_rewards and min(self.ppo_steps, self.ppo_prompts_per_step, self.ppo_samples_per_prompt) < 1:
            raise ValueError("ppo_steps, ppo_prompts_per_step and ppo_samples_per_prompt must be at least 1")


@dataclass
class Policy:
    """A policy to evaluate: where it is, how the report names it, and which group of rows it belongs to."""

    path: str
    label: str
    group: str = "policy"  # policy | td_sweep | subset | baseline
    sweep_temperatures: bool = False
    info: dict = field(default_factory=dict)


@dataclass
class Stage:
    name: str
    fn: Callable[[], object]
    # starts Ray jobs of its own (PPO): where the demo joined a Ray cluster (RAY_ADDRESS) the jobs run there too, so
    # the run's shared engine is closed first and its CPUs are theirs; on a local Ray the jobs start an instance of
    # their own and the engine stays up
    joins_cluster: bool = False


def param_dtype_used() -> dict:
    """The dtype the demo's training, reward models and vLLM engines run in (``--ds.param_dtype auto``), and why."""
    from openrlhf_irl.compat.param_dtype import resolve

    resolved = resolve("auto")
    return {"dtype": resolved.dtype, "reason": resolved.reason}


def optimizer_steps(epochs: int, n_examples: int, batch_size: int, micro_batch_size: int) -> int:
    """OpenRLHF's optimizer steps for ``epochs`` over ``n_examples`` on one process: its data loader drops the last
    partial micro-batch, and ``batch_size / micro_batch_size`` micro-batches make a step."""
    return epochs * ((n_examples // micro_batch_size) // max(1, batch_size // micro_batch_size))


def matched_epochs(epochs: int, n_full: int, n_subset: int, batch_size: int, micro_batch_size: int) -> int:
    """Epochs over ``n_subset`` examples whose optimizer steps come nearest those of ``epochs`` over ``n_full``."""
    per_epoch = optimizer_steps(1, n_subset, batch_size, micro_batch_size)
    if per_epoch < 1:
        raise ValueError(f"a subset of {n_subset} demonstrations is less than one optimizer step "
                         f"(batch {batch_size}); use a larger fraction")
    return max(1, round(optimizer_steps(epochs, n_full, batch_size, micro_batch_size) / per_epoch))


def iq_name(td: float) -> str:
    return "sft_mle" if td == 0 else f"sft_iq_td{td:g}"


def iq_label(td: float) -> str:
    return "MLE SFT" if td == 0 else f"IQ-Learn SFT (td {td:g})"


class Demo:
    def __init__(self, cfg: DemoConfig, progress=None, verbose: bool = False, label_prefix: str = ""):
        """``progress``: a :class:`openrlhf_irl.utils.stage_log.StageProgress` shared by several runs (the
        experiment's seeds), else one per run; ``verbose``: every stage's output on the terminal instead of
        ``logs/NN-<stage>.log``; ``label_prefix`` starts each stage line (``"seed 2 "``)."""
        self.cfg = cfg
        self.root = os.path.abspath(cfg.output_dir)
        self.timings: dict[str, float] = {}
        self.policies: dict[str, Policy] = {}
        self.backends: set[str] = set()
        self.progress = progress
        self.verbose = verbose
        self.label_prefix = label_prefix
        self.log_dir = os.path.join(self.root, "logs")
        self._unit = None
        self._shared = False  # inside shared_engine()
        self._pool = None  # the pool shared_engine() keeps up

    @property
    def task(self):
        """The task's module (:mod:`openrlhf_irl.demo.tasks`)."""
        from openrlhf_irl.demo.tasks import load_task

        return load_task(self.cfg.task)

    # ------------------------------------------------------------------ helpers
    def path(self, *parts: str) -> str:
        """A path under the output directory, its parent directory created."""
        p = os.path.join(self.root, *parts)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        return p

    def add_policy(self, name: str, policy: Policy) -> None:
        """Register a trained policy for the evaluation stage (a PPO stage would call this too)."""
        self.policies[name] = policy

    def stages(self) -> list[Stage]:
        """The run, in order. A new method (e.g. PPO over the AfD rewards, issue 15) is one more entry here, before
        Best-of-N / evaluation, that trains a policy and calls :meth:`add_policy`."""
        stages = [
            Stage("task", self.make_task),
            Stage("base model + initial policy", self.make_base_and_init),
            Stage("SFT policies (MLE, IQ-Learn)", self.make_sft_policies),
            Stage("AfD samples and reward models", self.make_reward_models),
        ]
        if self.cfg.spin:
            stages.append(Stage("SPIN baseline (OpenRLHF DPO)", self.make_spin))
        if self.cfg.ppo_rewards:
            stages.append(Stage("PPO over the AfD rewards (OpenRLHF train_ppo_ray)", self.make_ppo,
                                joins_cluster=True))
        stages += [
            Stage("Best-of-N", self.best_of_n),
            Stage("evaluate policies", self.evaluate_policies),
        ]
        return stages

    @contextmanager
    def claimed(self):
        """The run's hold on its folder: locked against a second job (:class:`OutputConflict` "another job is
        writing ..."), the previous run's :data:`RESULT_FILES` out of it; the lock is released at the end."""
        from openrlhf_irl.utils.output_guard import OutputUnit, mark_dir

        if self._unit is not None:  # run() holds it around run_stages()
            yield
            return
        os.makedirs(self.root, exist_ok=True)
        mark_dir(self.root, "openrlhf-irl demo")  # ours: a rerun (or the experiment) may replace it
        self._unit = OutputUnit(self.root, RESULT_FILES)
        try:
            self._unit.set_aside()  # never restored: the stages rewrite the data they were computed from
            yield
        finally:
            self._unit.close()
            self._unit = None

    def run_stages(self) -> dict:
        """Run every stage; return the seed's results (written to ``results.json``)."""
        with self.claimed():
            return self._run_stages()

    def _run_stages(self) -> dict:
        from openrlhf_irl.utils.jsonl import atomic_write_json

        self.results = {"seed": self.cfg.seed, "config": asdict(self.cfg), "rows": {}, "refs": {},
                        "param_dtype": param_dtype_used()}
        stages = self.stages()
        progress = self.progress or StageProgress([st.name for st in stages])
        # One engine for the run's sampling, started by the first stage that samples and given each next model's
        # weights; it idles through the stages that train (about 0.03 of a core) and is closed after the last stage,
        # in that stage's time and log, or on an error.
        with self.shared_engine():
            for i, st in enumerate(stages, 1):
                start = time.time()
                with progress.stage(st.name, os.path.join(self.log_dir, log_name(i, st.name)), verbose=self.verbose,
                                    label=f"{self.label_prefix}[{i}/{len(stages)}] {st.name}"):
                    if st.joins_cluster and os.environ.get("RAY_ADDRESS"):
                        self.close_shared_pool()
                    st.fn()
                    if i == len(stages):
                        self.close_shared_pool()
                self.timings[st.name] = round(time.time() - start, 1)
        if not self.verbose:
            self.results["log_dir"] = self.log_dir
        self.results["backend"] = ",".join(sorted(self.backends))
        self.results["timings_s"] = self.timings
        atomic_write_json(os.path.join(self.root, "results.json"), self.results)
        return self.results

    def train(self, task: str, trainer: str, model: str, data: str, out: str, epochs: int, lr: float, *extra: str):
        """One OpenRLHF training run, in process, through the plug-in launcher (real DeepSpeed, ZeRO-2; bf16 where
        the CPU computes it natively, fp32 otherwise: :func:`param_dtype_used`)."""
        from openrlhf_irl.cli.launcher import build_args, train

        train(task, build_args(task, self._common_train_args(trainer, model, data, out, epochs, lr, *extra)))
        return out

    def _common_train_args(self, trainer, model, data, out, epochs, lr, *extra) -> list[str]:
        cfg = self.cfg
        head = ["--trainer", trainer] if trainer else []
        return [
            *head, "--model.model_name_or_path", model, "--data.dataset", data,
            "--data.max_len", "64", "--train.micro_batch_size", str(cfg.micro_batch_size),
            "--train.batch_size", str(cfg.batch_size), "--train.max_epochs", str(epochs),
            "--train.seed", str(cfg.seed), "--ds.zero_stage", "2", "--ds.attn_implementation", "eager",
            "--ds.param_dtype", "auto", "--adam.lr", str(lr), "--lr_warmup_ratio", "0.05",
            "--ckpt.output_dir", out, "--ckpt.path", out + "_ckpt", "--logger.logging_steps", "1000000",
            *extra,
        ]

    def generate(self, model: str, prompts: list[str], n: int, temperature: float, seed: int) -> list:
        """``n`` samples per prompt from ``model`` through the generation pool; completions sorted by
        (prompt_index, sample_index)."""
        return self.generate_at(model, prompts, n, (temperature,), seed)[temperature]

    def generate_at(self, model: str, prompts: list[str], n: int, temperatures: tuple, seed: int) -> dict:
        """:meth:`generate` at each temperature from one pool (one engine start): ``{temperature: completions}``.
        Inside :meth:`shared_engine` the pool stays up and the next model's weights are pushed into it."""
        from openrlhf_irl.generation import SamplingParams

        texts = [INPUT_TEMPLATE.format(p) for p in prompts]
        with self._pool_serving(model) as pool:
            self.backends.add(pool.backend)
            return {t: pool.generate(texts, SamplingParams(n=n, temperature=t, top_p=1.0,
                                                           max_new_tokens=self.cfg.max_new_tokens, seed=seed))
                    for t in temperatures}

    @contextmanager
    def shared_engine(self):
        """Within: every :meth:`generate_at` is served by one pool, each model's weights pushed into its engines
        (vLLM on CPU, models of one architecture and tokenizer) instead of starting new ones; closed on leaving.
        Training between two samplings runs in this process and PPO in a Ray instance of its own, so the pool can
        stay up through them (:meth:`run_stages` keeps one for the whole run). Inside another ``shared_engine`` it
        does nothing: the outer one keeps the pool up."""
        if self._shared:
            yield
            return
        self._shared = True
        try:
            yield
        finally:
            self._shared = False
            self.close_shared_pool()

    def close_shared_pool(self) -> None:
        """Close the pool :meth:`shared_engine` keeps up (if any); the next sampling starts a new one."""
        if self._pool is not None:
            pool, self._pool = self._pool, None
            pool.close()

    @contextmanager
    def _pool_serving(self, model: str):
        from openrlhf_irl.generation import GenerationPool, ensure_ray

        ensure_ray(max(self.cfg.num_actors, os.cpu_count() or 1))  # one Ray for every pool of the run
        if not self._shared:
            with GenerationPool(model, self.cfg.num_actors, self.cfg.backend, batch_size=32) as pool:
                yield pool
            return
        if self._pool is not None:
            try:
                start = time.time()
                self._pool.load_model(model)
                print(f"shared engine: {model} pushed into the running engines in {time.time() - start:.1f} s")
            except ValueError as err:
                print(f"shared engine: starting a new pool ({err})")
                self._pool.close()
                self._pool = None
        if self._pool is None:
            self._pool = GenerationPool(model, self.cfg.num_actors, self.cfg.backend, batch_size=32)
        yield self._pool

    def sample_to_file(self, model: str, prompts: list[str], out: str, n: int, policy: str, seed: int) -> str:
        """Samples in the sampling CLI's record format (what the AfD dataset builder reads)."""
        from openrlhf_irl.utils.jsonl import atomic_write_jsonl

        completions = self.generate(model, prompts, n, 1.0, seed)
        atomic_write_jsonl(out, [{"prompt": prompts[c.prompt_index], "response": c.text, "policy": policy,
                                  "sample_index": c.sample_index, "finished": c.finished, "logprob": c.logprob}
                                 for c in completions])
        return out

    # ------------------------------------------------------------------ stages
    def make_task(self):
        from openrlhf_irl.utils.jsonl import atomic_write_jsonl

        cfg = self.cfg
        habit = {"habit": True} if cfg.expert_habit else {}  # bigram's expert variant (DemoConfig refuses others)
        tcfg = self.task.TaskConfig(seed=cfg.seed, n_train_prompts=cfg.n_train_prompts, n_pretrain=cfg.n_pretrain,
                                    n_eval_prompts=cfg.n_eval_prompts, expert_noise=cfg.expert_noise,
                                    held_out_fraction=cfg.held_out_fraction,
                                    **({"expert_habit": True} if habit else {}))
        task = self.task.build_task(tcfg)
        eval_prompts = task["held_out_prompts"] or list(dict.fromkeys(task["eval_prompts"]))
        train_prompts = list(dict.fromkeys(task["train_prompts"]))
        if cfg.held_out_fraction > 0 and not set(eval_prompts).isdisjoint(train_prompts):
            raise RuntimeError("held-out prompts overlap the training prompts")  # split_prompts guarantees it
        rng = random.Random(cfg.seed + 7)
        demo_eval = [{"prompt": p, "response": self.task.expert_response(p, rng, noise=cfg.expert_noise, **habit),
                      "sample_index": i}
                     for p in eval_prompts for i in range(cfg.eval_samples_per_prompt)]
        demos = task["demonstrations"]
        atomic_write_jsonl(self.path("data", "demos.jsonl"), demos)
        for frac in cfg.demo_subsets:
            atomic_write_jsonl(self.path("data", f"demos_{frac:g}.jsonl"), demos[: max(1, round(frac * len(demos)))])
        atomic_write_jsonl(self.path("data", "train_prompts.jsonl"), [{"prompt": p} for p in train_prompts])
        atomic_write_jsonl(self.path("data", "eval_prompts.jsonl"), [{"prompt": p} for p in eval_prompts])
        atomic_write_jsonl(self.path("data", "demos_eval.jsonl"), demo_eval)
        self.train_prompts, self.eval_prompts = train_prompts, eval_prompts
        self.corpus = self.task.pretrain_corpus(tcfg, sep="\n")
        self.results["prompts"] = {"train": train_prompts, "held_out": eval_prompts}
        self.results["task"] = {"name": cfg.task, "title": self.task.TITLE}
        print(f"{len(demos)} demonstrations on {len(train_prompts)} training prompts; {len(eval_prompts)} held-out "
              f"evaluation prompts; {len(self.corpus)} pre-training lines")

    def make_base_and_init(self):
        from transformers import AutoTokenizer

        from openrlhf_irl.utils.jsonl import atomic_write_jsonl
        from openrlhf_irl.utils.tiny_model import write_tiny_llama

        cfg = self.cfg
        base = write_tiny_llama(self.path("models", "base"), self.corpus, vocab_size=cfg.vocab_size,
                                hidden_size=cfg.hidden_size, num_layers=cfg.num_layers, seed=cfg.seed)
        eos = AutoTokenizer.from_pretrained(base).eos_token
        pretrain = self.path("data", "pretrain.jsonl")
        atomic_write_jsonl(pretrain, [{"text": f"{line} {eos}"} for line in self.corpus])
        self.train("sft", "sft", base, pretrain, self.path("models", "init"), cfg.pretrain_epochs, 3e-3,
                   "--model.pretrain_mode_enable", "--data.input_key", "text")
        self.add_policy("init", Policy(self.path("models", "init"), "initial policy"))

    def make_sft_policies(self):
        from openrlhf_irl.utils.jsonl import read_jsonl

        cfg = self.cfg
        common = ("--data.input_key", "prompt", "--data.output_key", "response",
                  "--data.input_template", INPUT_TEMPLATE)
        init = self.path("models", "init")

        def sft(td: float, data: str, name: str, epochs: int = cfg.sft_epochs):
            if td == 0:
                return self.train("sft", "sft", init, data, self.path("models", name), epochs, cfg.sft_lr, *common)
            return self.train("sft", "irl_iq", init, data, self.path("models", name), epochs, cfg.sft_lr,
                              *common, "--irl.td_weight", str(td), "--irl.td_warmup_steps", "10")

        demos = self.path("data", "demos.jsonl")
        for td in dict.fromkeys((0.0, *cfg.td_weights)):
            name = iq_name(td)
            sft(td, demos, name)
            group = "policy" if td in (0.0, cfg.td_weight) else "td_sweep"
            self.add_policy(name, Policy(self.path("models", name), iq_label(td), group,
                                         sweep_temperatures=td == 0 or cfg.sweep_iq_temperatures,
                                         info={"td_weight": td, "demo_fraction": 1.0}))
        n_full = sum(1 for _ in read_jsonl(demos))
        for frac in cfg.demo_subsets:
            subset = self.path("data", f"demos_{frac:g}.jsonl")
            epochs = matched_epochs(cfg.sft_epochs, n_full, sum(1 for _ in read_jsonl(subset)), cfg.batch_size,
                                    cfg.micro_batch_size)
            for td in (0.0, cfg.td_weight):
                name = f"{iq_name(td)}_{frac:g}"
                sft(td, subset, name, epochs)
                self.add_policy(name, Policy(self.path("models", name), f"{iq_label(td)}, {frac:.0%} of demos",
                                             "subset", info={"td_weight": td, "demo_fraction": frac,
                                                             "sft_epochs": epochs}))

    def make_reward_models(self):
        from openrlhf_irl.datasets.afd import build_afd_dataset, format_report
        from openrlhf_irl.utils.jsonl import atomic_write_jsonl

        cfg = self.cfg
        prompts = self.train_prompts[: cfg.afd_prompts] if cfg.afd_prompts else self.train_prompts
        n = cfg.afd_samples_per_prompt
        with self.shared_engine():
            sources = {
                "init_samples": self.sample_to_file(self.path("models", "init"), prompts,
                                                    self.path("samples", "init.jsonl"), n, "init", cfg.seed * 1000 + 11),
                "sft_samples": self.sample_to_file(self.path("models", "sft_mle"), prompts,
                                                   self.path("samples", "sft.jsonl"), n, "sft", cfg.seed * 1000 + 12),
                "demos": self.path("data", "demos.jsonl"),
            }
        rm_flags = ("--data.prompt_key", "prompt", "--data.input_template", INPUT_TEMPLATE)
        backbone = self.path("models", cfg.rm_backbone)
        for variant in cfg.afd_variants:
            for trainer in cfg.rm_trainers:
                fmt = "pairs" if trainer == "rm" else "labels"
                # The initial policy rarely stops on its own: keep its truncated samples (they are what it does).
                records, report = build_afd_dataset(variant, **sources, fmt=fmt, keep_truncated=True, lenient=True,
                                                    seed=cfg.seed)
                print(format_report(report))
                tag = f"{variant}_{RM_KIND[trainer].lower()}"
                data = self.path("data", f"afd_{tag}.jsonl")
                atomic_write_jsonl(data, records)
                self.train("rm", trainer, backbone, data, self.path("models", f"rm_{tag}"), cfg.rm_epochs, 1e-3,
                           *rm_flags, "--eval.dataset", self.rm_eval_file(data, records))
        if cfg.golden_pref:
            self.make_golden_pref(sources["sft_samples"], backbone, rm_flags)

    def make_golden_pref(self, sft_samples: str, backbone: str, rm_flags: tuple) -> None:
        """The comparator: pairs of the same MLE-SFT samples the AfD models saw, ordered by the golden reward,
        trained like the AfD Bradley-Terry model (same backbone, epochs and learning rate)."""
        from openrlhf_irl.datasets.golden_pref import golden_preference_pairs
        from openrlhf_irl.utils.jsonl import atomic_write_jsonl, read_jsonl

        records, counts = golden_preference_pairs((r for _, r in read_jsonl(sft_samples)), self.task.golden_reward,
                                                  seed=self.cfg.seed)
        print(f"golden-pref: {counts['pairs']} pairs from {counts['samples']} MLE-SFT samples of {counts['prompts']} "
              f"prompts ({counts['ties']} pairs of equal golden reward left out)")
        if not records:
            raise RuntimeError(f"golden-pref: every pair of {sft_samples} has equal golden reward; nothing to train on")
        data = self.path("data", "golden-pref_bt.jsonl")
        atomic_write_jsonl(data, records)
        self.train("rm", "rm", backbone, data, self.reward_model_dir(GOLDEN_PREF), self.cfg.rm_epochs, 1e-3,
                   *rm_flags, "--eval.dataset", self.rm_eval_file(data, records))

    def rm_eval_file(self, data: str, records: list, size: int = 256) -> str:
        """A seeded sample of a reward model's training records for OpenRLHF's per-epoch evaluation (its logged
        accuracy and the reward mean/std it stores). The reward models' real check is on held-out prompts
        (:meth:`check_reward_models`); evaluating on the whole training file cost a third of their training time."""
        import random

        from openrlhf_irl.utils.jsonl import atomic_write_jsonl

        out = data[: -len(".jsonl")] + "_eval.jsonl"
        atomic_write_jsonl(out, random.Random(self.cfg.seed).sample(records, min(size, len(records))))
        return out

    def load_scorers(self) -> dict[str, Callable]:
        """Best-of-N scorers: every trained reward model (its logit / BT score) and the log-ratio."""
        from openrlhf_irl.generation.scoring import LogRatioScorer
        from openrlhf_irl.models.reward import RewardScorer

        scorers = {}
        for variant in self.cfg.afd_variants:
            for trainer in self.cfg.rm_trainers:
                rm = RewardScorer(self.path("models", f"rm_{variant}_{RM_KIND[trainer].lower()}"),
                                  input_template=INPUT_TEMPLATE, batch_size=64)
                scorers[f"{RM_KIND[trainer]} {variant}"] = \
                    lambda recs, rm=rm: rm.score([r["prompt"] for r in recs], [r["response"] for r in recs])
        if self.cfg.golden_pref:
            rm = RewardScorer(self.reward_model_dir(GOLDEN_PREF), input_template=INPUT_TEMPLATE, batch_size=64)
            scorers[GOLDEN_PREF] = lambda recs, rm=rm: rm.score([r["prompt"] for r in recs],
                                                                [r["response"] for r in recs])
        ratio = LogRatioScorer(self.path("models", "sft_mle"), self.path("models", "init"),
                               input_template=INPUT_TEMPLATE)
        scorers["log-ratio"] = lambda recs: ratio.score([r["prompt"] for r in recs], [r["response"] for r in recs],
                                                        add_eos=[r["finished"] for r in recs])
        return scorers

    def make_spin(self):
        """SPIN-style baseline: OpenRLHF's own ``train_dpo`` (through the CPU compat layer) from MLE SFT on
        sft-demo pairs, demonstration chosen and SFT sample rejected; the reference model is MLE SFT."""
        import runpy
        import sys

        from openrlhf_irl import compat
        from openrlhf_irl.datasets.afd import build_afd_dataset
        from openrlhf_irl.utils.jsonl import atomic_write_jsonl

        cfg = self.cfg
        pairs, _ = build_afd_dataset("sft-demo", demos=self.path("data", "demos.jsonl"),
                                     sft_samples=self.path("samples", "sft.jsonl"), fmt="pairs", keep_truncated=True,
                                     lenient=True, seed=cfg.seed)
        data = self.path("data", "spin_pairs.jsonl")
        atomic_write_jsonl(data, pairs)
        out = self.path("models", "spin_dpo")
        argv = self._common_train_args(None, self.path("models", "sft_mle"), data, out, cfg.dpo_epochs, cfg.dpo_lr,
                                       "--data.prompt_key", "prompt", "--data.input_template", INPUT_TEMPLATE,
                                       "--model.beta", str(cfg.dpo_beta))
        module = "openrlhf.cli.train_dpo"
        compat.activate()  # the CPU layer (gloo, flash-attn stand-ins), as for train_sft / train_rm
        old_argv, sys.argv = sys.argv, [module, *argv]
        try:  # OpenRLHF's own CLI, run as __main__: its parser, its argument post-processing, its train(args)
            runpy.run_module(module, run_name="__main__")
        finally:
            sys.argv = old_argv
        self.add_policy("spin_dpo", Policy(out, "SPIN-style DPO (sft-demo pairs)", "baseline"))

    def reward_model_dir(self, reward: str) -> str:
        """The directory of a reward model named like a Best-of-N scorer ("BCE init-sft")."""
        kind, variant = reward.split(" ", 1)
        return self.path("models", f"rm_{variant}_{kind.lower()}")

    def make_ppo(self):
        """PPO from MLE SFT over each reward in ``ppo_rewards``: OpenRLHF's ``train_ppo_ray``, the runs one after the
        other in one subprocess and one Ray instance (:func:`openrlhf_irl.afd.ppo.run_ppo_series`), on the training
        prompts in the SFT prompt format, KL against MLE SFT."""
        from openrlhf_irl.afd.ppo import run_ppo_series

        cfg = self.cfg
        sft, init = self.path("models", "sft_mle"), self.path("models", "init")
        need = cfg.ppo_steps * cfg.ppo_prompts_per_step
        rng = random.Random(cfg.seed + 13)
        prompts = [rng.choice(self.train_prompts) for _ in range(need)] if need > len(self.train_prompts) else \
            rng.sample(self.train_prompts, need)
        names = ["ppo_" + reward.lower().replace(" ", "_") for reward in cfg.ppo_rewards]
        runs = [dict(policy=sft, prompts=prompts, out_dir=self.path("ppo", name, "run"),
                     **({"log_ratio": (sft, init)} if reward == "log-ratio" else
                        {"reward_model": self.reward_model_dir(reward)}),
                     steps=cfg.ppo_steps, prompts_per_step=cfg.ppo_prompts_per_step,
                     samples_per_prompt=cfg.ppo_samples_per_prompt, max_new_tokens=cfg.max_new_tokens,
                     lr=cfg.ppo_lr, kl_coef=cfg.ppo_kl,
                     extra=["--data.input_template", INPUT_TEMPLATE, "--train.seed", str(cfg.seed)])
                for name, reward in zip(names, cfg.ppo_rewards)]
        # its output in the stage's log (the terminal with --verbose)
        results = run_ppo_series(runs, quiet=False)
        logged = self.results.setdefault("ppo", {})
        for name, reward, result in zip(names, cfg.ppo_rewards, results):
            rewards = [step.get("reward") for step in result.logs]
            print(f"PPO ({reward}): {len(result.logs)} steps in {result.seconds:.0f} s; training reward per step "
                  + ", ".join(f"{r:.3f}" for r in rewards if r is not None))
            logged[name] = {"reward": reward, "seconds": round(result.seconds, 1), "logs": result.logs}
            self.add_policy(name, Policy(result.policy, f"PPO ({reward})", "ppo",
                                         info={"ppo_reward": reward, "ppo_steps": len(result.logs)}))

    def best_of_n(self):
        from openrlhf_irl.afd.best_of_n import best_of_n_rows, score_and_select
        from openrlhf_irl.utils.jsonl import atomic_write_jsonl

        cfg = self.cfg
        completions = self.generate(self.path("models", "sft_mle"), self.eval_prompts, max(cfg.bon_ns), 1.0,
                                    cfg.seed * 1000 + 21)
        records = [{"prompt": self.eval_prompts[c.prompt_index], "response": c.text, "sample_index": c.sample_index,
                    "finished": c.finished} for c in completions]
        result = score_and_select(records, self.load_scorers(), cfg.bon_ns, self.task.golden_reward_batch)
        atomic_write_jsonl(self.path("samples", "bon_scored.jsonl"), records)
        self.results["rows"].update(best_of_n_rows(result, cfg.bon_ns))

    def evaluate_policies(self):
        """Every registered policy on the held-out prompts (SFT policies at every temperature), and the
        demonstrator; the MLE SFT samples at temperature 1 and the demonstrations are the win-rate references."""
        from openrlhf_irl.utils.jsonl import read_jsonl

        cfg = self.cfg
        golden_reward = self.task.golden_reward
        rows = self.results["rows"]
        sampled = {}
        with self.shared_engine():  # every policy from one engine start where they share a shape
            for name, pol in self.policies.items():
                temps = cfg.temperatures if pol.sweep_temperatures else (1.0,)
                if 1.0 not in temps:
                    temps = (1.0, *temps)
                sampled[name] = self.generate_at(pol.path, self.eval_prompts, cfg.eval_samples_per_prompt, temps,
                                                 cfg.seed * 1000 + 31)
        for name, pol in self.policies.items():
            for temp, completions in sampled[name].items():
                ent = self._entropies(pol.path, completions, temp)
                row = {"label": pol.label if temp == 1.0 else f"{pol.label} @ T={temp:g}", "group": pol.group,
                       "policy": name, "temperature": temp, **pol.info, "golden": {}, "responses": {},
                       "entropy": {}}
                if temp != 1.0:
                    row["group"] = "temperature"
                for c, (h, k) in zip(completions, ent):
                    p = self.eval_prompts[c.prompt_index]
                    row["golden"].setdefault(p, []).append(golden_reward(p, c.text))
                    row["responses"].setdefault(p, []).append(c.text)
                    acc = row["entropy"].setdefault(p, [0.0, 0])
                    acc[0] += h
                    acc[1] += k
                rows[f"policy:{name}" + ("" if temp == 1.0 else f"@T{temp:g}")] = row
        demo = {"label": "demonstrations (noisy expert)", "group": "policy", "golden": {}, "responses": {}}
        for _, r in read_jsonl(self.path("data", "demos_eval.jsonl")):
            demo["golden"].setdefault(r["prompt"], []).append(golden_reward(r["prompt"], r["response"]))
            demo["responses"].setdefault(r["prompt"], []).append(r["response"])
        rows["demonstrations"] = demo
        self.results["refs"] = {"sft": rows["policy:sft_mle"]["golden"], "demo": demo["golden"]}
        self.check_reward_models()

    def check_reward_models(self):
        """``results["reward_checks"][scorer]``: held-out accuracy on the sources each reward model was trained to
        separate, and the within-prompt Spearman correlation of every scorer with the golden reward on the held-out
        Best-of-N candidates (MLE SFT samples) (:mod:`openrlhf_irl.eval.reward_checks`)."""
        from openrlhf_irl.afd.best_of_n import group_by_prompt
        from openrlhf_irl.datasets.afd import VARIANTS
        from openrlhf_irl.eval.reward_checks import golden_order_accuracy, heldout_accuracy, mean_within_prompt_spearman
        from openrlhf_irl.models.reward import RewardScorer
        from openrlhf_irl.utils.jsonl import read_jsonl

        rows, checks = self.results["rows"], {}
        source_rows = {"init": "policy:init", "sft": "policy:sft_mle", "demo": "demonstrations"}
        groups = group_by_prompt([r for _, r in read_jsonl(self.path("samples", "bon_scored.jsonl"))])
        scorers = [k for k in groups[0][0] if k not in ("prompt", "response", "sample_index", "finished", "golden")]
        for scorer in scorers:
            rho, n = mean_within_prompt_spearman({g[0]["prompt"]: [c[scorer] for c in g] for g in groups},
                                                 {g[0]["prompt"]: [c["golden"] for c in g] for g in groups})
            checks[scorer] = {"spearman_golden": rho, "spearman_prompts": n}
        for variant in self.cfg.afd_variants:
            neg, pos = (rows[source_rows[s]]["responses"] for s in VARIANTS[variant])
            for trainer in self.cfg.rm_trainers:
                name = f"{RM_KIND[trainer]} {variant}"
                rm = RewardScorer(self.path("models", f"rm_{variant}_{RM_KIND[trainer].lower()}"),
                                  input_template=INPUT_TEMPLATE, batch_size=64)
                score = {side: {p: rm.score([p] * len(v), v) for p, v in texts.items()}
                         for side, texts in (("pos", pos), ("neg", neg))}
                acc, n = heldout_accuracy(score["pos"], score["neg"])
                checks.setdefault(name, {}).update(heldout_accuracy=acc, accuracy_prompts=n,
                                                   accuracy_sources=f"{VARIANTS[variant][1]} over {VARIANTS[variant][0]}")
        if self.cfg.golden_pref:  # trained on golden-ordered SFT pairs: held out, the same kind of pairs
            sft = rows["policy:sft_mle"]
            rm = RewardScorer(self.reward_model_dir(GOLDEN_PREF), input_template=INPUT_TEMPLATE, batch_size=64)
            score = {p: rm.score([p] * len(v), v) for p, v in sft["responses"].items()}
            acc, n = golden_order_accuracy(score, sft["golden"])
            checks.setdefault(GOLDEN_PREF, {}).update(heldout_accuracy=acc, accuracy_prompts=n,
                                                      accuracy_sources="golden order of sft samples")
        if self.cfg.td_weight:
            checks[f"IQ-Learn reward (td {self.cfg.td_weight:g})"] = self.iq_reward_recovery(groups)
        self.results["reward_checks"] = {k: {m: (None if isinstance(v, float) and math.isnan(v) else v)
                                             for m, v in c.items()} for k, c in checks.items()}

    def iq_reward_recovery(self, groups: list) -> dict:
        """IQ-Learn's implicit reward (``extract_reward``: the per-token ``Q - gamma V(s')`` summed over a response, at
        the training gamma 1) of the main IQ-Learn policy on the held-out Best-of-N candidates, and its
        within-prompt Spearman correlation with the golden reward and, where the task has one (bigram), with the
        expert's own hidden reward (at gamma 1 the sum is ``log pi(y|x) + V(s_0)``,
        so within a prompt it ranks as the policy's likelihood does). Empty responses are left out: OpenRLHF's SFT
        dataset, which ``extract_reward`` tokenises with, drops them."""
        from openrlhf_irl.utils.jsonl import atomic_write_jsonl

        data = self.path("samples", "iq_reward_in.jsonl")
        candidates = [c for g in groups for c in g]
        kept = [{k: c[k] for k in ("prompt", "response", "finished", "golden")} for c in candidates if c["response"]]
        atomic_write_jsonl(data, kept)
        result = reward_sum_correlations(self.path("models", iq_name(self.cfg.td_weight)), data,
                                         self.path("samples", "iq_reward.jsonl"), self.task)
        return {**result, "left_out_empty": len(candidates) - len(kept)}

    def _entropies(self, model_path: str, completions: list, temperature: float) -> list[tuple[float, int]]:
        from openrlhf_irl.eval.diversity import entropy_sums
        from openrlhf_irl.generation.hf import load_causal_lm, load_tokenizer
        from openrlhf_irl.generation.scoring import encode_prompt

        tok = load_tokenizer(model_path)
        model = load_causal_lm(model_path, dtype="float32", device="cpu")
        prompt_ids = [encode_prompt(tok, INPUT_TEMPLATE.format(self.eval_prompts[c.prompt_index]))
                      for c in completions]
        return entropy_sums(model, prompt_ids, [c.token_ids for c in completions], temperature=temperature,
                            pad_token_id=tok.pad_token_id or 0)

    # ------------------------------------------------------------------ run
    def run(self) -> dict:
        from openrlhf_irl.demo.report import build_report

        with self.claimed():
            results = self.run_stages()
            start = time.time()
            with stage_output(os.path.join(self.log_dir, "report.log"), self.verbose):
                report = build_report(self.root, self.cfg, [results], title=f"openrlhf-irl demo "
                                      f"({'quick' if self.cfg.quick else 'full'}, seed {self.cfg.seed}, "
                                      f"task {self.cfg.task})")
        self.timings["report"] = round(time.time() - start, 1)
        return report


def reward_sum_correlations(model: str, data: str, out: str, task) -> dict:
    """``extract_reward`` of ``model`` at gamma 1 on ``data`` (records with prompt, response, finished, golden; the
    demo's template), written to ``out``; the within-prompt Spearman correlation of each response's reward sum with
    the golden reward and, where ``task`` has one (bigram), with the expert's own hidden reward."""
    from openrlhf_irl.cli import extract_reward
    from openrlhf_irl.eval.reward_checks import mean_within_prompt_spearman
    from openrlhf_irl.utils.jsonl import read_jsonl

    argv = ["--model", model, "--data", data, "--output", out, "--data.input_template", INPUT_TEMPLATE,
            "--data.max_len", "64", "--gamma", "1", "--device", "cpu", "--reference-key", "golden"]
    if extract_reward.main(argv) != 0:
        raise RuntimeError(f"extract_reward failed on {data}")
    rewards, golden, responses = {}, {}, {}
    for _, r in read_jsonl(out):
        rewards.setdefault(r["prompt"], []).append(r["reward"])
        golden.setdefault(r["prompt"], []).append(r["golden"])
        responses.setdefault(r["prompt"], []).append(r["response"])
    rho, n = mean_within_prompt_spearman(rewards, golden)
    result = {"spearman_golden": rho, "spearman_prompts": n}
    hidden_reward = getattr(task, "hidden_reward", None)
    if hidden_reward is not None:  # bigram: the expert's own reward, the one inverse RL should recover
        hidden = {p: [hidden_reward(p, text) for text in responses[p]] for p in rewards}
        result["spearman_hidden"], _ = mean_within_prompt_spearman(rewards, hidden)
    return result


def run_demo(output_dir: str = "outputs/demo", seed: int = 0, quick: bool = False, backend: str = "auto",
             verbose: bool = False, **overrides) -> dict:
    """Run the demo. The terminal gets a line per stage and a progress bar; each stage's own output goes to
    ``<output_dir>/logs/NN-<stage>.log``, what arrives between stages to ``logs/run.log`` (``verbose``: all of it
    on the terminal)."""
    import sys
    from contextlib import ExitStack

    import ray

    from openrlhf_irl.utils.output_guard import OutputConflict

    cfg = DemoConfig.make(output_dir, seed=seed, quick=quick, backend=backend, **overrides)
    demo = Demo(cfg, verbose=verbose)
    kind = "quick" if quick else "full"
    with ExitStack() as claim:
        try:
            claim.enter_context(demo.claimed())  # before anything is written: a second demo into the folder stops
        except OutputConflict as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        if not verbose:
            write_terminal(f"openrlhf-irl demo ({kind}, seed {seed}, task {cfg.task}): {len(demo.stages())} stages "
                           f"into {demo.root}; "
                           f"each stage's output in {demo.log_dir}/ (--verbose shows it here)\n")
        start = time.time()
        with stage_output(os.path.join(demo.log_dir, "run.log"), verbose):
            print(f"openrlhf-irl demo ({kind}): {json.dumps(asdict(cfg))}")
            try:
                report = demo.run()
            finally:
                if ray.is_initialized():
                    ray.shutdown()
    write_terminal(f"demo done in {fmt_duration(time.time() - start)}; report: "
                   f"{os.path.join(demo.root, 'report.md')}\n")
    return report
