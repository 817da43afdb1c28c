#!/usr/bin/env bash
# IQ-Learn SFT (Wulfmeier et al. 2024): TD-regularised MLE on a demonstrations dataset, OpenRLHF's DeepSpeed stack.
# Data: JSONL with prompt/response fields, e.g. GSM8K ("question"/"answer") or HH-RLHF chosen answers prepared with
#   python -m openrlhf_irl.cli.prepare_hh_rlhf --input harmless-base/train.jsonl --output-dir data/hh_harmless
# Several nodes: add `--hostfile hostfile --num_nodes N` to the deepspeed launcher (same flags otherwise).
set -euo pipefail

MODEL=${MODEL:-Qwen/Qwen2.5-0.5B}
DATA=${DATA:-data/gsm8k_train.jsonl}
INPUT_KEY=${INPUT_KEY:-question}
OUTPUT_KEY=${OUTPUT_KEY:-answer}
OUT=${OUT:-checkpoints/qwen2.5-0.5b-iq-learn}
NUM_GPUS=${NUM_GPUS:-8}

deepspeed --num_gpus "$NUM_GPUS" --module openrlhf_irl.cli.train_sft \
   --trainer irl_iq \
   --irl.td_weight 0.1 \
   --irl.gamma 1.0 \
   --irl.td_warmup_steps 100 \
   --irl.fused_loss \
   --irl.fused_chunk_size 2048 \
   --model.model_name_or_path "$MODEL" \
   --data.dataset "$DATA" \
   --data.input_key "$INPUT_KEY" \
   --data.output_key "$OUTPUT_KEY" \
   --data.apply_chat_template \
   --data.max_len 2048 \
   --train.micro_batch_size 4 \
   --train.batch_size 128 \
   --train.max_epochs 2 \
   --ds.zero_stage 2 \
   --ds.param_dtype bf16 \
   --ds.attn_implementation flash_attention_2 \
   --model.gradient_checkpointing_enable \
   --adam.lr 1e-5 \
   --ckpt.output_dir "$OUT" \
   --ckpt.save_steps -1 \
   --logger.logging_steps 1 \
   --eval.steps -1

# Online variant (policy samples from vLLM engines in the value term, alpha_mix = 0.1 in the paper):
#   see iq_learn_sft_online.sh
# Per-token rewards of the trained policy, and their rank correlation with a reference score column:
python -m openrlhf_irl.cli.extract_reward \
   --model "$OUT" \
   --data "$DATA" \
   --data.input_key "$INPUT_KEY" \
   --data.output_key "$OUTPUT_KEY" \
   --data.apply_chat_template \
   --output "$OUT/token_rewards.jsonl" \
   --report "$OUT/token_rewards_report.json"
