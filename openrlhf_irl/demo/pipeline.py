"""The embedded demo: IQ-Learn SFT and AfD reward extrapolation end to end on a tiny model, on CPU.

Every training step runs through OpenRLHF's own CLI flow (``train(args)``, DeepSpeed, its datasets) with the
plug-in trainers; sampling for AfD runs on Ray actors; nothing is downloaded. Stages:

1. task      synthetic prompts, a noisy expert's demonstrations, a golden reward (``openrlhf_irl.demo.task``)
2. base      a tiny Llama + BPE tokenizer trained on the task's text
3. init      the initial policy: brief pre-training on prompts followed by careless answers
4. sft       MLE SFT (``--trainer sft``) and IQ-Learn SFT (``--trainer irl_iq``) on the demonstrations
5. afd       samples of init and MLE-SFT (Ray) -> init-sft pairs -> Bradley-Terry reward model (``--trainer rm``)
             and the AfD classifier (``--trainer afd_rm``)
6. bon       Best-of-N over the reward models and the log-ratio log pi_SFT - log pi_init, N in 1..16
7. report    golden reward and diversity for every policy and Best-of-N row: terminal table, report.md/json, PNGs
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import asdict, dataclass

# Prompt and answer are joined by a newline in every stage: a trailing space in the prompt would be tokenized apart
# from the answer's first word by byte-level BPE, so generation would start from a state never seen in training.
INPUT_TEMPLATE = "{}\n"


@dataclass
class DemoConfig:
    output_dir: str = "outputs/demo"
    seed: int = 0
    quick: bool = False
    # task
    n_train_prompts: int = 1000
    n_eval_prompts: int = 55
    n_pretrain: int = 4000
    expert_noise: float = 0.4
    # model
    hidden_size: int = 128
    num_layers: int = 4
    vocab_size: int = 300
    # training
    pretrain_epochs: int = 1
    sft_epochs: int = 16
    sft_lr: float = 3e-3
    td_weight: float = 0.05
    rm_epochs: int = 2
    rm_backbone: str = "sft_mle"  # the reward models start from this policy (value head added)
    micro_batch_size: int = 32
    batch_size: int = 32
    # sampling / AfD / evaluation
    afd_prompts: int | None = None  # None: every unique training prompt
    afd_samples_per_prompt: int = 16
    eval_samples_per_prompt: int = 4
    bon_ns: tuple = (1, 2, 4, 8, 16)
    max_new_tokens: int = 24
    num_actors: int = 2

    @classmethod
    def make(cls, output_dir: str, seed: int = 0, quick: bool = False) -> "DemoConfig":
        if not quick:
            return cls(output_dir=output_dir, seed=seed)
        return cls(output_dir=output_dir, seed=seed, quick=True, n_train_prompts=160, n_eval_prompts=12,
                   n_pretrain=600, hidden_size=64, num_layers=2, sft_epochs=2, rm_epochs=1, micro_batch_size=16,
                   batch_size=16, afd_prompts=32, afd_samples_per_prompt=2, eval_samples_per_prompt=2,
                   bon_ns=(1, 2, 4), max_new_tokens=20)


class Demo:
    def __init__(self, cfg: DemoConfig):
        self.cfg = cfg
        self.root = os.path.abspath(cfg.output_dir)
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------------ helpers
    def path(self, *parts: str) -> str:
        """A path under the output directory, its parent directory created."""
        p = os.path.join(self.root, *parts)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        return p

    def stage(self, name: str, fn, *args):
        print(f"\n=== [{len(self.timings) + 1}/7] {name} ===", flush=True)
        start = time.time()
        result = fn(*args)
        self.timings[name] = round(time.time() - start, 1)
        print(f"=== {name}: {self.timings[name]} s ===", flush=True)
        return result

    def train(self, task: str, trainer: str, model: str, data: str, out: str, epochs: int, lr: float, *extra: str):
        """One OpenRLHF training run, in process, through the plug-in launcher (real DeepSpeed, ZeRO-2, bf16)."""
        from openrlhf_irl.cli.launcher import build_args, train

        cfg = self.cfg
        argv = [
            "--trainer", trainer, "--model.model_name_or_path", model, "--data.dataset", data,
            "--data.max_len", "64", "--train.micro_batch_size", str(cfg.micro_batch_size),
            "--train.batch_size", str(cfg.batch_size), "--train.max_epochs", str(epochs),
            "--train.seed", str(cfg.seed), "--ds.zero_stage", "2", "--ds.attn_implementation", "eager",
            "--ds.param_dtype", "bf16", "--adam.lr", str(lr), "--lr_warmup_ratio", "0.05",
            "--ckpt.output_dir", out, "--ckpt.path", out + "_ckpt", "--logger.logging_steps", "1000000",
            *extra,
        ]
        train(task, build_args(task, argv))
        return out

    # ------------------------------------------------------------------ stages
    def make_task(self):
        from openrlhf_irl.demo.task import TaskConfig, build_task, expert_response, pretrain_corpus
        from openrlhf_irl.utils.jsonl import atomic_write_jsonl

        cfg = self.cfg
        tcfg = TaskConfig(seed=cfg.seed, n_train_prompts=cfg.n_train_prompts, n_eval_prompts=cfg.n_eval_prompts,
                          n_pretrain=cfg.n_pretrain, expert_noise=cfg.expert_noise)
        task = build_task(tcfg)
        eval_prompts = list(dict.fromkeys(task["eval_prompts"]))
        rng = random.Random(cfg.seed + 7)
        demo_eval = [{"prompt": p, "response": expert_response(p, rng, noise=cfg.expert_noise), "sample_index": i}
                     for p in eval_prompts for i in range(cfg.eval_samples_per_prompt)]
        atomic_write_jsonl(self.path("data", "demos.jsonl"), task["demonstrations"])
        atomic_write_jsonl(self.path("data", "train_prompts.jsonl"),
                           [{"prompt": p} for p in dict.fromkeys(task["train_prompts"])])
        atomic_write_jsonl(self.path("data", "eval_prompts.jsonl"), [{"prompt": p} for p in eval_prompts])
        atomic_write_jsonl(self.path("data", "demos_eval.jsonl"), demo_eval)
        self.corpus = pretrain_corpus(tcfg, sep="\n")
        print(f"{len(task['demonstrations'])} demonstrations, {len(eval_prompts)} eval prompts, "
              f"{len(self.corpus)} pre-training lines")

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

    def make_sft_policies(self):
        cfg = self.cfg
        common = ("--data.input_key", "prompt", "--data.output_key", "response",
                  "--data.input_template", INPUT_TEMPLATE)
        init, demos = self.path("models", "init"), self.path("data", "demos.jsonl")
        self.train("sft", "sft", init, demos, self.path("models", "sft_mle"), cfg.sft_epochs, cfg.sft_lr, *common)
        self.train("sft", "irl_iq", init, demos, self.path("models", "sft_iq"), cfg.sft_epochs, cfg.sft_lr, *common,
                   "--irl.td_weight", str(cfg.td_weight), "--irl.td_warmup_steps", "10")

    def sample(self, model: str, prompts: str, out: str, n: int, policy: str, max_prompts: int | None = None):
        from openrlhf_irl.cli import sample as sample_cli

        argv = ["--model", model, "--prompts", prompts, "--input-template", INPUT_TEMPLATE, "--n-samples", str(n),
                "--temperature", "1.0", "--top-p", "1.0", "--max-new-tokens", str(self.cfg.max_new_tokens),
                "--num-actors", str(self.cfg.num_actors), "--policy-name", policy, "--output", out,
                "--seed", str(self.cfg.seed), "--batch-size", "32"]
        if max_prompts:
            argv += ["--max-prompts", str(max_prompts)]
        if sample_cli.main(argv) != 0:
            raise RuntimeError(f"sampling {policy} failed")
        return out

    def make_reward_models(self):
        from openrlhf_irl.datasets.afd import build_afd_dataset, format_report
        from openrlhf_irl.utils.jsonl import atomic_write_jsonl

        cfg = self.cfg
        prompts = self.path("data", "train_prompts.jsonl")
        n = cfg.afd_samples_per_prompt
        init_s = self.sample(self.path("models", "init"), prompts, self.path("samples", "init.jsonl"), n, "init",
                             cfg.afd_prompts)
        sft_s = self.sample(self.path("models", "sft_mle"), prompts, self.path("samples", "sft.jsonl"), n, "sft",
                            cfg.afd_prompts)
        # The initial policy rarely stops on its own: keep its truncated samples (they are what it does).
        pairs, report = build_afd_dataset("init-sft", init_samples=init_s, sft_samples=sft_s, fmt="pairs",
                                          keep_truncated=True, lenient=True, seed=cfg.seed)
        labels, _ = build_afd_dataset("init-sft", init_samples=init_s, sft_samples=sft_s, fmt="labels",
                                      keep_truncated=True, lenient=True, seed=cfg.seed)
        print(format_report(report))
        pairs_path, labels_path = self.path("data", "afd_pairs.jsonl"), self.path("data", "afd_labels.jsonl")
        atomic_write_jsonl(pairs_path, pairs)
        atomic_write_jsonl(labels_path, labels)
        rm_flags = ("--data.prompt_key", "prompt", "--data.input_template", INPUT_TEMPLATE)
        backbone = self.path("models", cfg.rm_backbone)
        self.train("rm", "rm", backbone, pairs_path, self.path("models", "rm_bt"), cfg.rm_epochs, 1e-3, *rm_flags,
                   "--eval.dataset", pairs_path)
        self.train("rm", "afd_rm", backbone, labels_path, self.path("models", "rm_afd"), cfg.rm_epochs, 1e-3, *rm_flags,
                   "--eval.dataset", labels_path)

    def best_of_n(self):
        from openrlhf_irl.afd.best_of_n import score_and_select
        from openrlhf_irl.demo.task import golden_reward_batch
        from openrlhf_irl.generation.scoring import LogRatioScorer
        from openrlhf_irl.models.reward import RewardScorer
        from openrlhf_irl.utils.jsonl import atomic_write_jsonl, read_jsonl

        cfg = self.cfg
        out = self.sample(self.path("models", "sft_mle"), self.path("data", "eval_prompts.jsonl"),
                          self.path("samples", "bon_sft.jsonl"), max(cfg.bon_ns), "sft")
        records = [r for _, r in read_jsonl(out)]
        ratio = LogRatioScorer(self.path("models", "sft_mle"), self.path("models", "init"),
                               input_template=INPUT_TEMPLATE)
        scorers = {"log_ratio": lambda recs: ratio.score([r["prompt"] for r in recs], [r["response"] for r in recs],
                                                         add_eos=[r["finished"] for r in recs])}
        for name in ("rm_bt", "rm_afd"):
            rm = RewardScorer(self.path("models", name), input_template=INPUT_TEMPLATE, batch_size=64)
            scorers[name] = lambda recs, rm=rm: rm.score([r["prompt"] for r in recs], [r["response"] for r in recs])
        result = score_and_select(records, scorers, cfg.bon_ns, golden_reward_batch)
        atomic_write_jsonl(self.path("samples", "bon_scored.jsonl"), records)
        selected = {name: {n: [r["response"] for r in recs] for n, recs in by_n.items()}
                    for name, by_n in result["selected"].items()}
        return result["curves"], selected

    def evaluate_policies(self):
        """Golden reward and diversity of init, MLE SFT, IQ-Learn SFT samples and of the demonstrator."""
        from openrlhf_irl.demo.task import golden_reward
        from openrlhf_irl.generation import HFGenerator, SamplingParams, format_prompt
        from openrlhf_irl.utils.jsonl import read_jsonl

        cfg = self.cfg
        prompts = [r["prompt"] for _, r in read_jsonl(self.path("data", "eval_prompts.jsonl"))]
        params = SamplingParams(n=cfg.eval_samples_per_prompt, temperature=1.0, top_p=1.0,
                                max_new_tokens=cfg.max_new_tokens, seed=cfg.seed + 1)
        samples = {}
        for name in ("init", "sft_mle", "sft_iq"):
            gen = HFGenerator(self.path("models", name), batch_size=64)
            texts = [format_prompt(gen.tokenizer, p, input_template=INPUT_TEMPLATE) for p in prompts]
            samples[name] = [(prompts[c.prompt_index], c.text) for c in gen.generate(texts, params)]
        samples["demonstrations"] = [(r["prompt"], r["response"])
                                     for _, r in read_jsonl(self.path("data", "demos_eval.jsonl"))]
        return {name: [(p, r, golden_reward(p, r)) for p, r in rows] for name, rows in samples.items()}

    # ------------------------------------------------------------------ run
    def run(self) -> dict:
        from openrlhf_irl.demo.report import build_report

        os.makedirs(self.root, exist_ok=True)
        self.stage("task", self.make_task)
        self.stage("base model + initial policy", self.make_base_and_init)
        self.stage("MLE and IQ-Learn SFT", self.make_sft_policies)
        self.stage("AfD samples and reward models", self.make_reward_models)
        curves, selected = self.stage("Best-of-N", self.best_of_n)
        policy_rows = self.stage("evaluate policies", self.evaluate_policies)
        return self.stage("report", build_report, self.root, self.cfg, policy_rows, curves, selected,
                          self.timings)


def run_demo(output_dir: str = "outputs/demo", seed: int = 0, quick: bool = False) -> dict:
    import ray

    cfg = DemoConfig.make(output_dir, seed=seed, quick=quick)
    print(f"openrlhf-irl demo ({'quick' if quick else 'full'}): {json.dumps(asdict(cfg))}")
    try:
        return Demo(cfg).run()
    finally:
        if ray.is_initialized():
            ray.shutdown()
