#!/usr/bin/env bash
# PPO over the training-free AfD reward log pi_SFT(y|x) - log pi_init(y|x), through OpenRLHF's custom reward-function
# hook (--reward.remote_url pointing at a Python file that defines reward_func). REINFORCE++ needs no critic.
# Submitted as a Ray job to the cluster at RAY_DASHBOARD (see the README's "Scaling out"). Every size, model and path
# below can be set from the environment; the defaults are a 8-GPU node. On a cluster without GPUs:
#   PPO_MODULE=openrlhf_irl.cli.train_ppo GPU_ONLY= ATTN=sdpa ACTOR_GPUS=1 REF_GPUS=1 VLLM_ENGINES=1 VLLM_TP=1 ...
# (tests/test_multinode.py runs this script so, at tiny scale, against a local two-node CPU cluster).
set -euo pipefail

RAY_DASHBOARD=${RAY_DASHBOARD:-http://127.0.0.1:8265}
PPO_MODULE=${PPO_MODULE:-openrlhf.cli.train_ppo_ray}
WORK=${WORK:-runs/afd_harmless}
SFT=${SFT:-checkpoints/gemma-2b-sft-harmless}
INIT=${INIT:-google/gemma-2b}
REWARD_FUNC=${REWARD_FUNC:-openrlhf_irl/afd/ppo_reward_func.py}
PROMPTS=${PROMPTS:-$WORK/data/prompts.jsonl}
OUTPUT=${OUTPUT:-$WORK/ppo_log_ratio}
ACTOR_GPUS=${ACTOR_GPUS:-8}
REF_GPUS=${REF_GPUS:-8}
VLLM_ENGINES=${VLLM_ENGINES:-4}
VLLM_TP=${VLLM_TP:-2}
GPU_ONLY=${GPU_ONLY-"--train.colocate_all --vllm.enable_sleep --ds.enable_sleep"}
ATTN=${ATTN:-flash_attention_2}
MAX_LEN=${MAX_LEN:-1024}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-256}
ROLLOUT_BATCH=${ROLLOUT_BATCH:-128}
ROLLOUT_MICRO=${ROLLOUT_MICRO:-8}
N_SAMPLES=${N_SAMPLES:-4}
TRAIN_BATCH=${TRAIN_BATCH:-128}
TRAIN_MICRO=${TRAIN_MICRO:-4}
ZERO_STAGE=${ZERO_STAGE:-3}
LR=${LR:-5e-7}
DTYPE=${DTYPE:-bf16}

# GPU_ONLY is split into flags on purpose (unquoted)
# shellcheck disable=SC2086
ray job submit --address="$RAY_DASHBOARD" \
   --runtime-env-json="{\"working_dir\": \".\", \"env_vars\": {\"AFD_SFT_MODEL\": \"$SFT\", \"AFD_INIT_MODEL\": \"$INIT\"}}" \
   -- python3 -m $PPO_MODULE \
   --ref.num_nodes 1 \
   --ref.num_gpus_per_node $REF_GPUS \
   --actor.num_nodes 1 \
   --actor.num_gpus_per_node $ACTOR_GPUS \
   --vllm.num_engines $VLLM_ENGINES \
   --vllm.tensor_parallel_size $VLLM_TP \
   $GPU_ONLY \
   --actor.model_name_or_path "$SFT" \
   --reward.remote_url "$REWARD_FUNC" \
   --algo.advantage.estimator reinforce \
   --data.prompt_dataset "$PROMPTS" \
   --data.input_key prompt \
   --data.max_len $MAX_LEN \
   --rollout.max_new_tokens $MAX_NEW_TOKENS \
   --rollout.batch_size $ROLLOUT_BATCH \
   --rollout.micro_batch_size $ROLLOUT_MICRO \
   --rollout.n_samples_per_prompt $N_SAMPLES \
   --train.micro_batch_size $TRAIN_MICRO \
   --train.batch_size $TRAIN_BATCH \
   --train.num_episodes 1 \
   --algo.kl.init_coef 0.05 \
   --ds.zero_stage $ZERO_STAGE \
   --ds.param_dtype $DTYPE \
   --ds.attn_implementation $ATTN \
   --actor.adam.lr $LR \
   --ckpt.output_dir "$OUTPUT" \
   --ckpt.save_hf
