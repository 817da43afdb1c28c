#!/usr/bin/env bash
# AfD (Sun & van der Schaar 2024) on Anthropic HH-RLHF harmless: sample the initial and the SFT policy, build the
# init-sft demo-vs-sample reward-model dataset, train the reward model (Bradley-Terry and the BCE classifier),
# extrapolate with Best-of-N, then PPO with OpenRLHF's train_ppo_ray (scripts ppo_afd_*.sh).
# Inputs: a local, gunzipped harmless-base/train.jsonl; an SFT model trained on the demonstrations
# (e.g. examples/iq_learn_sft.sh with --trainer sft or irl_iq). On GPUs the sampling runs on OpenRLHF's vLLM engines.
set -euo pipefail

HH=${HH:-data/harmless-base/train.jsonl}
WORK=${WORK:-runs/afd_harmless}
INIT=${INIT:-google/gemma-2b}
SFT=${SFT:-checkpoints/gemma-2b-sft-harmless}
GOLDEN=${GOLDEN:-checkpoints/gpt2-large-harmless-reward}
ENGINES=${ENGINES:-8}
NUM_GPUS=${NUM_GPUS:-8}

python -m openrlhf_irl.cli.prepare_hh_rlhf --input "$HH" --output-dir "$WORK/data" --lenient

for POLICY in init sft; do
   if [ "$POLICY" = init ]; then MODEL=$INIT; else MODEL=$SFT; fi
   python -m openrlhf_irl.cli.sample \
      --model "$MODEL" \
      --prompts "$WORK/data/prompts.jsonl" \
      --rollout.n_samples_per_prompt 2 \
      --rollout.temperature 1.0 \
      --rollout.top_p 0.95 \
      --rollout.max_new_tokens 256 \
      --num-actors "$ENGINES" \
      --backend auto \
      --policy-name "$POLICY" \
      --output "$WORK/samples/$POLICY.jsonl"
done

python -m openrlhf_irl.cli.build_afd_dataset \
   --variant init-sft \
   --init-samples "$WORK/samples/init.jsonl" \
   --sft-samples "$WORK/samples/sft.jsonl" \
   --format pairs \
   --output "$WORK/data/afd_pairs.jsonl"
python -m openrlhf_irl.cli.build_afd_dataset \
   --variant init-sft \
   --init-samples "$WORK/samples/init.jsonl" \
   --sft-samples "$WORK/samples/sft.jsonl" \
   --format labels \
   --output "$WORK/data/afd_labels.jsonl"

deepspeed --num_gpus "$NUM_GPUS" --module openrlhf_irl.cli.train_rm \
   --trainer rm \
   --model.model_name_or_path "$SFT" \
   --data.dataset "$WORK/data/afd_pairs.jsonl" \
   --data.prompt_key prompt \
   --data.max_len 1024 \
   --train.micro_batch_size 4 \
   --train.batch_size 128 \
   --train.max_epochs 1 \
   --ds.zero_stage 3 \
   --ds.param_dtype bf16 \
   --ds.attn_implementation flash_attention_2 \
   --adam.lr 9e-6 \
   --ckpt.output_dir "$WORK/rm_bt"

deepspeed --num_gpus "$NUM_GPUS" --module openrlhf_irl.cli.train_rm \
   --trainer afd_rm \
   --model.model_name_or_path "$SFT" \
   --data.dataset "$WORK/data/afd_labels.jsonl" \
   --data.prompt_key prompt \
   --data.response_key response \
   --data.label_key label \
   --data.max_len 1024 \
   --train.micro_batch_size 8 \
   --train.batch_size 128 \
   --train.max_epochs 1 \
   --ds.zero_stage 3 \
   --ds.param_dtype bf16 \
   --ds.attn_implementation flash_attention_2 \
   --adam.lr 9e-6 \
   --ckpt.output_dir "$WORK/rm_afd"

python -m openrlhf_irl.cli.best_of_n \
   --policy "$SFT" \
   --prompts "$WORK/data/prompts.jsonl" \
   --max-prompts 500 \
   --n 1,2,4,8,16,32,64 \
   --reward-model "$WORK/rm_bt" \
   --reward-model "$WORK/rm_afd" \
   --log-ratio-init "$INIT" \
   --golden "$GOLDEN" \
   --rollout.temperature 1.0 \
   --rollout.top_p 0.95 \
   --rollout.max_new_tokens 256 \
   --num-actors "$ENGINES" \
   --output-dir "$WORK/best_of_n"
