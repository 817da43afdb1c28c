#!/usr/bin/env bash
# PPO over the training-free AfD reward log pi_SFT(y|x) - log pi_init(y|x), through OpenRLHF's custom reward-function
# hook (--reward.remote_url pointing at a Python file that defines reward_func). REINFORCE++ needs no critic.
# On a machine without GPUs, `python -m openrlhf_irl.cli.train_ppo` takes the same flags (one process per model:
# --*.num_gpus_per_node 1, --vllm.num_engines 1) and starts Ray with the CPU layer itself (see the README).
set -euo pipefail

WORK=${WORK:-runs/afd_harmless}
SFT=${SFT:-checkpoints/gemma-2b-sft-harmless}
INIT=${INIT:-google/gemma-2b}
REWARD_FUNC=${REWARD_FUNC:-openrlhf_irl/afd/ppo_reward_func.py}

ray job submit --address="http://127.0.0.1:8265" \
   --runtime-env-json="{\"working_dir\": \".\", \"env_vars\": {\"AFD_SFT_MODEL\": \"$SFT\", \"AFD_INIT_MODEL\": \"$INIT\"}}" \
   -- python3 -m openrlhf.cli.train_ppo_ray \
   --ref.num_nodes 1 \
   --ref.num_gpus_per_node 8 \
   --actor.num_nodes 1 \
   --actor.num_gpus_per_node 8 \
   --vllm.num_engines 4 \
   --vllm.tensor_parallel_size 2 \
   --train.colocate_all \
   --vllm.enable_sleep \
   --ds.enable_sleep \
   --actor.model_name_or_path "$SFT" \
   --reward.remote_url "$REWARD_FUNC" \
   --algo.advantage.estimator reinforce \
   --data.prompt_dataset "$WORK/data/prompts.jsonl" \
   --data.input_key prompt \
   --data.max_len 1024 \
   --rollout.max_new_tokens 256 \
   --rollout.batch_size 128 \
   --rollout.micro_batch_size 8 \
   --rollout.n_samples_per_prompt 4 \
   --train.micro_batch_size 4 \
   --train.batch_size 128 \
   --train.num_episodes 1 \
   --algo.kl.init_coef 0.05 \
   --ds.zero_stage 3 \
   --ds.param_dtype bf16 \
   --ds.attn_implementation flash_attention_2 \
   --actor.adam.lr 5e-7 \
   --ckpt.output_dir "$WORK/ppo_log_ratio" \
   --ckpt.save_hf
