"""The trainers this package registers (entry-point group ``openrlhf.trainers``).

Kept free of heavy imports: trainer and dataset classes are named as strings and imported on use.
"""

import argparse
import math

from openrlhf_irl.registry import TrainerPlugin


def _number(kind, *, low=None, high=None, low_open=False, name=""):
    """argparse ``type`` for a finite number in [low, high] (``low_open``: (low, high]); one-line error otherwise."""

    def convert(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        too_low = low is not None and (value <= low if low_open else value < low)
        if too_low or (high is not None and value > high):
            lo = "" if low is None else ("(" if low_open else "[") + f"{low}"
            hi = "inf)" if high is None else f"{high}]"
            raise argparse.ArgumentTypeError(f"must be in {lo}, {hi}, got {text}")
        return value

    convert.__name__ = name or kind.__name__  # argparse names the type in some messages
    return convert


NONNEG = _number(float, low=0.0)
UNIT = _number(float, low=0.0, high=1.0)
NONNEG_INT = _number(int, low=0)
POS_INT = _number(int, low=1)


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Every trainer: ``--ckpt.overwrite`` and the up-front checks of numbers and output paths
    (:mod:`openrlhf_irl.cli.train_checks`)."""
    from openrlhf_irl.cli.train_checks import add_overwrite_argument

    add_overwrite_argument(parser)


def add_iq_learn_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    group = parser.add_argument_group("IQ-Learn (--trainer irl_iq)")
    group.add_argument("--irl.td_weight", type=NONNEG, default=0.1,
                       help="lambda = 1/(4 alpha_iq): weight of the chi^2 TD term r_t^2 (0 = MLE)")
    group.add_argument("--irl.gamma", type=UNIT, default=1.0, help="discount of the soft Bellman operator, in [0, 1]")
    group.add_argument("--irl.mle_weight", type=NONNEG, default=1.0, help="weight of the -log pi term")
    group.add_argument("--irl.td_warmup_steps", type=NONNEG_INT, default=0,
                       help="optimizer steps over which the TD weight ramps linearly from 0")
    group.add_argument("--irl.fused_loss", action="store_true", default=False,
                       help="chunked lm_head + loss: never materialises [B, T, vocab] logits")
    group.add_argument("--irl.fused_chunk_size", type=POS_INT, default=1024, help="tokens per chunk of the fused loss")
    group.add_argument("--irl.fused_single_pass", action=argparse.BooleanOptionalAction, default=True,
                       help="with --irl.fused_loss: one pass over the vocabulary, gradients computed in the forward "
                            "(default); --no-irl.fused_single_pass: the two-pass reference op, logits recomputed in "
                            "backward (docs/iq_learn.md#fused-gradient)")
    group.add_argument("--irl.truncation", choices=("bootstrap", "drop", "eos"), default="bootstrap",
                       help="responses cut by --data.max_len (and policy samples cut by --irl.max_new_tokens): "
                            "bootstrap the last token's TD target from V of the state after it (default), drop its "
                            "TD term, or eos: OpenRLHF's forced EOS (the cut response is treated as ended)")
    group.add_argument("--irl.online_mix", type=UNIT, default=0.0,
                       help="alpha in [0, 1]: policy share of the mixture the value and chi^2 terms are taken over "
                            "(0 = offline)")
    group.add_argument("--irl.online_refresh_steps", type=POS_INT, default=1,
                       help="optimizer steps between two rounds of policy sampling")
    group.add_argument("--irl.chi2_on_policy", action=argparse.BooleanOptionalAction, default=True,
                       help="online: take the chi^2 term over the expert/policy mixture (IQ-Learn's online "
                            "regulariser; with gamma = 1 the only way policy samples enter the loss)")
    group.add_argument("--irl.skip_nonfinite", action="store_true", default=False,
                       help="skip (zero-loss, count and log) micro-batches whose loss is NaN/inf instead of stopping")
    group.add_argument("--irl.n_samples", type=POS_INT, default=1, help="policy samples per prompt per round")
    group.add_argument("--irl.max_new_tokens", type=POS_INT, default=64, help="length cap of policy samples")
    group.add_argument("--irl.temperature", type=_number(float, low=0.0, low_open=True), default=1.0,
                       help="sampling temperature of policy samples (> 0)")
    group.add_argument("--irl.sampler", type=str, default="auto",
                       help="who draws the online samples: auto (vLLM engines when CUDA and vLLM are there, else "
                            "transformers' generate), hf, vllm, or module:callable returning a PolicySampler")
    group.add_argument("--irl.vllm_num_engines", type=POS_INT, default=1, help="OpenRLHF vLLM engines for online samples")
    group.add_argument("--irl.vllm_tensor_parallel_size", type=POS_INT, default=1, help="GPUs per vLLM engine")
    group.add_argument("--irl.vllm_gpu_memory_utilization", type=_number(float, low=0.0, high=1.0, low_open=True), default=0.3,
                       help="share of an engine GPU's memory vLLM may take (the default leaves room for training "
                            "on the same GPU)")
    group.add_argument("--irl.vllm_weight_sync", choices=("auto", "cuda_ipc", "nccl"), default="auto",
                       help="cuda_ipc: engines on the training GPUs (a local Ray); nccl: engines on GPUs of their "
                            "own (a Ray cluster named by RAY_ADDRESS), weights broadcast from rank 0 (gloo for CPU "
                            "engines); auto: cuda_ipc with CUDA, else nccl")
    group.add_argument("--irl.vllm_enable_sleep", action="store_true", default=False,
                       help="let the engines release GPU memory between sampling rounds")
    group.add_argument("--irl.vllm_enforce_eager", action="store_true", default=False,
                       help="disable CUDA graphs in the engines")
    group.add_argument("--irl.entropy_sample_tokens", type=NONNEG_INT, default=256,
                       help="response tokens per micro-batch whose policy entropy is logged (0 = none)")
    validate_after_parse(parser, check_iq_learn_args)


def validate_after_parse(parser: argparse.ArgumentParser, check) -> None:
    """Run ``check(namespace)`` (flat dotted names) after every parse of ``parser``; a ``ValueError`` it raises
    becomes an argparse error (usage plus one ``error:`` line, exit 2), before any model or data is loaded."""
    parse_known = parser.parse_known_args

    def parse_known_args(args=None, namespace=None):
        namespace, extras = parse_known(args, namespace)
        try:
            check(namespace)
        except ValueError as err:
            parser.error(str(err))
        return namespace, extras

    parser.parse_known_args = parse_known_args


def check_iq_learn_args(ns) -> None:
    """Cross-field checks of ``--trainer irl_iq`` and an up-front pass over local JSON/JSONL datasets."""
    if getattr(ns, "trainer", "irl_iq") != "irl_iq":
        return
    get = lambda name, default=None: getattr(ns, name, default)  # noqa: E731
    from openrlhf_irl.losses.iq_sft import IQConfig, check_online_config

    cfg = IQConfig(**{k: get(f"irl.{k}") for k in IQConfig.__dataclass_fields__ if hasattr(ns, f"irl.{k}")})
    check_online_config(cfg, multiturn=bool(get("data.multiturn")))
    if get("ds.packing_samples"):
        raise ValueError("--trainer irl_iq does not support --ds.packing_samples (the TD term needs V(s_{t+1}) of "
                         "the same sequence); train without packing")
    if get("model.pretrain_mode_enable"):
        raise ValueError("--trainer irl_iq needs prompt/response data; --model.pretrain_mode_enable is MLE only")
    if get("data.dataset") and not get("data.multiturn") and not get("data.output_key"):
        raise ValueError("--trainer irl_iq needs --data.output_key (the response field) unless --data.multiturn")
    from openrlhf_irl.datasets.sft_validation import validate_sft_datasets

    for flag in ("data.dataset", "eval.dataset"):
        if get(flag):
            validate_sft_datasets(
                get(flag), flag=f"--{flag}", input_key=get("data.input_key"), output_key=get("data.output_key"),
                multiturn=bool(get("data.multiturn")), chat_template=bool(get("data.apply_chat_template")),
            )


def add_afd_rm_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    group = parser.add_argument_group("AfD classifier reward model (--trainer afd_rm)")
    group.add_argument("--data.response_key", type=str, default="response", help="JSON key of the response")
    group.add_argument("--data.label_key", type=str, default="label", help="JSON key of the 0/1 label")


SFT = TrainerPlugin(name="sft", task="sft", add_arguments=add_common_arguments,
                    description="OpenRLHF's SFTTrainer (maximum likelihood)")
RM = TrainerPlugin(name="rm", task="rm", add_arguments=add_common_arguments,
                   description="OpenRLHF's RewardModelTrainer (Bradley-Terry on pairs)")
IRL_IQ = TrainerPlugin(
    name="irl_iq",
    task="sft",
    trainer="openrlhf_irl.trainers.iq_learn:IQLearnTrainer",
    dataset="openrlhf_irl.datasets.iq_sft:IQSFTDataset",
    add_arguments=add_iq_learn_arguments,
    description="IQ-Learn as TD-regularised MLE (Wulfmeier et al. 2024)",
)
AFD_RM = TrainerPlugin(
    name="afd_rm",
    task="rm",
    trainer="openrlhf_irl.trainers.afd_rm:AfDRewardTrainer",
    dataset="openrlhf_irl.datasets.labeled_reward:LabeledRewardDataset",
    add_arguments=add_afd_rm_arguments,
    description="AfD demo-vs-sample classifier reward model, binary cross-entropy (Sun & van der Schaar 2024)",
)
