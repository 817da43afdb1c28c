#!/usr/bin/env bash
# Online IQ-Learn SFT: the value term also sees policy samples (alpha_mix = --irl.online_mix), drawn every
# --irl.online_refresh_steps optimizer steps from OpenRLHF's vLLM engines after a weight push from the trainer.
#
# Engines on the training GPUs (one node; the default below): the trainer starts a local Ray, the engines take
# --irl.vllm_gpu_memory_utilization of a GPU each and weights travel by CUDA IPC.
# Engines on GPUs of their own: start a Ray cluster on those GPUs first, e.g.
#   CUDA_VISIBLE_DEVICES=6,7 ray start --head --num-gpus 2
# then run with RAY_ADDRESS=auto, NUM_GPUS=6 (deepspeed --include localhost:0,1,2,3,4,5), ENGINES=2, SYNC=nccl.
# Without vLLM (or on CPU) pass --irl.sampler hf: transformers' generate on the live model.
set -euo pipefail

MODEL=${MODEL:-Qwen/Qwen2.5-0.5B}
DATA=${DATA:-data/gsm8k_train.jsonl}
INPUT_KEY=${INPUT_KEY:-question}
OUTPUT_KEY=${OUTPUT_KEY:-answer}
OUT=${OUT:-checkpoints/qwen2.5-0.5b-iq-learn-online}
NUM_GPUS=${NUM_GPUS:-8}
ENGINES=${ENGINES:-1}
SYNC=${SYNC:-cuda_ipc}

deepspeed --num_gpus "$NUM_GPUS" --module openrlhf_irl.cli.train_sft \
   --trainer irl_iq \
   --irl.td_weight 0.1 \
   --irl.td_warmup_steps 100 \
   --irl.online_mix 0.1 \
   --irl.online_refresh_steps 8 \
   --irl.n_samples 1 \
   --irl.max_new_tokens 256 \
   --irl.temperature 1.0 \
   --irl.sampler vllm \
   --irl.vllm_num_engines "$ENGINES" \
   --irl.vllm_tensor_parallel_size 1 \
   --irl.vllm_gpu_memory_utilization 0.3 \
   --irl.vllm_weight_sync "$SYNC" \
   --irl.vllm_enable_sleep \
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
