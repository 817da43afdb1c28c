"""The trainers this package registers (entry-point group ``openrlhf.trainers``).

Kept free of heavy imports: trainer and dataset classes are named as strings and imported on use.
"""

import argparse

from openrlhf_irl.registry import TrainerPlugin


def add_iq_learn_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("IQ-Learn (--trainer irl_iq)")
    group.add_argument("--irl.td_weight", type=float, default=0.1,
                       help="lambda: weight of the chi^2 TD term r_t^2 (0 = MLE)")
    group.add_argument("--irl.gamma", type=float, default=1.0, help="discount of the soft Bellman operator")
    group.add_argument("--irl.mle_weight", type=float, default=1.0, help="weight of the -log pi term")
    group.add_argument("--irl.td_warmup_steps", type=int, default=0,
                       help="optimizer steps over which the TD weight ramps linearly from 0")
    group.add_argument("--irl.fused_loss", action="store_true", default=False,
                       help="chunked lm_head + loss: never materialises [B, T, vocab] logits")
    group.add_argument("--irl.fused_chunk_size", type=int, default=1024, help="tokens per chunk of the fused loss")
    group.add_argument("--irl.online_mix", type=float, default=0.0,
                       help="alpha_mix: share of the value term taken on policy samples (0 = offline)")
    group.add_argument("--irl.online_refresh_steps", type=int, default=1,
                       help="optimizer steps between two rounds of policy sampling")
    group.add_argument("--irl.chi2_on_policy", action="store_true", default=False,
                       help="apply the chi^2 term to policy samples too")
    group.add_argument("--irl.n_samples", type=int, default=1, help="policy samples per prompt per round")
    group.add_argument("--irl.max_new_tokens", type=int, default=64, help="length cap of policy samples")
    group.add_argument("--irl.temperature", type=float, default=1.0, help="sampling temperature of policy samples")
    group.add_argument("--irl.sampler", type=str, default="auto",
                       help="who draws the online samples: auto (vLLM engines when CUDA and vLLM are there, else "
                            "transformers' generate), hf, vllm, or module:callable returning a PolicySampler")
    group.add_argument("--irl.vllm_num_engines", type=int, default=1, help="OpenRLHF vLLM engines for online samples")
    group.add_argument("--irl.vllm_tensor_parallel_size", type=int, default=1, help="GPUs per vLLM engine")
    group.add_argument("--irl.vllm_gpu_memory_utilization", type=float, default=0.3,
                       help="share of an engine GPU's memory vLLM may take (the default leaves room for training "
                            "on the same GPU)")
    group.add_argument("--irl.vllm_weight_sync", choices=("cuda_ipc", "nccl"), default="cuda_ipc",
                       help="cuda_ipc: engines on the training GPUs (a local Ray); nccl: engines on GPUs of their "
                            "own (a Ray cluster named by RAY_ADDRESS), weights broadcast from rank 0")
    group.add_argument("--irl.vllm_enable_sleep", action="store_true", default=False,
                       help="let the engines release GPU memory between sampling rounds")
    group.add_argument("--irl.vllm_enforce_eager", action="store_true", default=False,
                       help="disable CUDA graphs in the engines")
    group.add_argument("--irl.entropy_sample_tokens", type=int, default=256,
                       help="response tokens per micro-batch whose policy entropy is logged (0 = none)")
    group.add_argument("--irl.keep_truncation", action=argparse.BooleanOptionalAction, default=True,
                       help="keep the last real token of responses cut by max_len instead of OpenRLHF's forced "
                            "EOS, so truncated responses are not treated as terminal")


def add_afd_rm_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("AfD classifier reward model (--trainer afd_rm)")
    group.add_argument("--data.response_key", type=str, default="response", help="JSON key of the response")
    group.add_argument("--data.label_key", type=str, default="label", help="JSON key of the 0/1 label")


SFT = TrainerPlugin(name="sft", task="sft", description="OpenRLHF's SFTTrainer (maximum likelihood)")
RM = TrainerPlugin(name="rm", task="rm", description="OpenRLHF's RewardModelTrainer (Bradley-Terry on pairs)")
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
