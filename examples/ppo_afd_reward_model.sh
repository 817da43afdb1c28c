#!/usr/bin/env bash
# PPO with OpenRLHF's train_ppo_ray over the AfD reward model (output of afd_hh_rlhf.sh), KL-regularised to the SFT
# policy. Start Ray first (`ray start --head --num-gpus 8`; add nodes with `ray start --address ...`).
# On a machine without GPUs, `python -m openrlhf_irl.cli.train_ppo` takes the same flags (one process per model:
# --*.num_gpus_per_node 1, --vllm.num_engines 1) and starts Ray with the CPU layer itself (see the README).
set -euo pipefail

WORK=${WORK:-runs/afd_harmless}
SFT=${SFT:-checkpoints/gemma-2b-sft-harmless}
RM=${RM:-runs/afd_harmless/rm_afd}

ray job submit --address="http://127.0.0.1:8265" \
   --runtime-env-json='{"working_dir": "."}' \
   -- python3 -m openrlhf.cli.train_ppo_ray \
   --ref.num_nodes 1 \
   --ref.num_gpus_per_node 8 \
   --reward.num_nodes 1 \
   --reward.num_gpus_per_node 8 \
   --critic.num_nodes 1 \
   --critic.num_gpus_per_node 8 \
   --actor.num_nodes 1 \
   --actor.num_gpus_per_node 8 \
   --vllm.num_engines 4 \
   --vllm.tensor_parallel_size 2 \
   --vllm.gpu_memory_utilization 0.5 \
   --train.colocate_all \
   --vllm.enable_sleep \
   --ds.enable_sleep \
   --actor.model_name_or_path "$SFT" \
   --reward.model_name_or_path "$RM" \
   --critic.model_name_or_path "$RM" \
   --data.prompt_dataset "$WORK/data/prompts.jsonl" \
   --data.input_key prompt \
   --data.max_len 1024 \
   --rollout.max_new_tokens 256 \
   --rollout.batch_size 128 \
   --rollout.micro_batch_size 8 \
   --rollout.n_samples_per_prompt 1 \
   --rollout.temperature 1.0 \
   --rollout.top_p 0.95 \
   --train.micro_batch_size 4 \
   --train.batch_size 128 \
   --train.max_epochs 1 \
   --train.num_episodes 1 \
   --algo.kl.init_coef 0.05 \
   --reward.normalize_enable \
   --ds.zero_stage 3 \
   --ds.param_dtype bf16 \
   --ds.attn_implementation flash_attention_2 \
   --actor.adam.lr 5e-7 \
   --critic.adam.lr 9e-6 \
   --actor.gradient_checkpointing_enable \
   --ckpt.output_dir "$WORK/ppo_rm_afd" \
   --ckpt.save_hf
