#!/usr/bin/env bash
# Shared launcher for the paper recipes (sourced by recipe/<method>.sh after it sets METHOD_ARGS).
# Everything site-specific comes from environment variables; any Hydra override can be appended:
#   bash recipe/dapo_erc.sh trainer.total_epochs=1 actor_rollout_ref.actor.entropy_mask_high=1.1
# ERC_DRY_RUN=1 runs a launch's checks (config, data and model paths; not the GPU count), prints the composed
# config (`--cfg job`) and exits without Ray or GPUs; a refusal is one line `erc-verl: error: ...`, exit 2.
# Defaults follow the authors' launch scripts (Kwai-Klear/ERC recipe/dapo/*_erc_1_05.sh) where verl 0.9.1 can;
# docs/fidelity.md (rendered from recipe/fidelity.yaml) lists every setting and every difference.
set -euo pipefail

PYTHON=${PYTHON:-python3}
MODEL_SIZE=${MODEL_SIZE:-1.5b}                      # 1.5b | 7b (the paper's two DeepSeek-R1-Distill-Qwen sizes)
# reference scripts: vLLM TP 2 for both sizes; vLLM memory 0.6 (1.5B) / 0.5 (7B)
case "${MODEL_SIZE,,}" in                           # 7B and 7b alike
  1.5b) DEFAULT_MODEL=deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B; DEFAULT_GPU_MEM=0.6 ;;
  7b)   DEFAULT_MODEL=deepseek-ai/DeepSeek-R1-Distill-Qwen-7B;   DEFAULT_GPU_MEM=0.5 ;;
  *) echo "MODEL_SIZE must be 1.5b or 7b, got '$MODEL_SIZE'" >&2; exit 2 ;;
esac
MODEL_PATH=${MODEL_PATH:-$DEFAULT_MODEL}            # HF id or local checkpoint directory
DATA_DIR=${DATA_DIR:-data/erc}                      # output of scripts/prepare_data.py
TRAIN_FILE=${TRAIN_FILE:-$DATA_DIR/train.parquet}
VAL_FILES=${VAL_FILES:-"['$DATA_DIR/aime2024.parquet','$DATA_DIR/aime2025.parquet']"}
CKPT_DIR=${CKPT_DIR:-checkpoints}
NNODES=${NNODES:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
TP_SIZE=${TP_SIZE:-2}                               # vLLM tensor parallel size (reference: 2)
SP_SIZE=${SP_SIZE:-4}                               # actor Ulysses sequence parallel size (reference: 4)
GPU_MEM=${GPU_MEM:-$DEFAULT_GPU_MEM}                # vLLM gpu_memory_utilization
OFFLOAD=${OFFLOAD:-True}                            # FSDP param/optimizer offload (reference: True)
# Not in the paper: the reference scripts' extra NLL on responses scored 1 (postive_loss_coeff=0.1 there)
POSITIVE_NLL_COEFF=${POSITIVE_NLL_COEFF:-0}
LOGGER=${LOGGER:-"['console']"}                     # e.g. "['console','wandb']"
PROJECT_NAME=${PROJECT_NAME:-erc-verl}
PNLL_SUFFIX=""
[[ "$POSITIVE_NLL_COEFF" =~ ^0*\.?0*$ ]] || PNLL_SUFFIX="-pnll${POSITIVE_NLL_COEFF}"
EXPERIMENT_NAME=${EXPERIMENT_NAME:-${METHOD}-${MODEL_SIZE}${PNLL_SUFFIX}}
MAX_PROMPT_LEN=${MAX_PROMPT_LEN:-4096}               # reference: 4k prompts
MAX_RESPONSE_LEN=${MAX_RESPONSE_LEN:-16384}         # paper: 16k responses in training
VAL_MAX_RESPONSE_LEN=${VAL_MAX_RESPONSE_LEN:-32768} # vLLM sized for the paper's 32k AIME eval (scripts/evaluate.py)
# per GPU, times SP_SIZE per sequence-parallel group: one longest sequence per group (reference: (4k+16k)/4)
MAX_TOKENS_PER_GPU=${MAX_TOKENS_PER_GPU:-$(( (MAX_PROMPT_LEN + MAX_RESPONSE_LEN) / SP_SIZE ))}
REWARD_FN_PATH=${REWARD_FN_PATH:-pkg://erc_verl.paper.reward}     # verl resolves pkg:// on every node

COMMON_ARGS=(
  # data: 128 prompts per step, validation on AIME
  data.train_files="$TRAIN_FILE"
  data.val_files="$VAL_FILES"
  data.train_batch_size=128
  data.max_prompt_length="$MAX_PROMPT_LEN"
  data.max_response_length="$MAX_RESPONSE_LEN"
  data.filter_overlong_prompts=True
  data.truncation=left
  # model and FSDP actor: lr 1e-6, mini-batches of 16 prompts (8 off-policy updates per step), no KL, no entropy bonus
  actor_rollout_ref.model.path="$MODEL_PATH"
  actor_rollout_ref.model.use_remove_padding=True
  actor_rollout_ref.model.enable_gradient_checkpointing=True
  actor_rollout_ref.actor.strategy=fsdp2
  actor_rollout_ref.actor.optim.lr=1e-6
  # reference scripts, not in the paper: 10 warm-up steps (linear from 0), AdamW weight decay 0.1, grad-norm clip 1
  actor_rollout_ref.actor.optim.lr_warmup_steps=10
  actor_rollout_ref.actor.optim.weight_decay=0.1
  actor_rollout_ref.actor.optim.clip_grad=1.0
  actor_rollout_ref.actor.fsdp_config.ulysses_sequence_parallel_size="$SP_SIZE"
  actor_rollout_ref.actor.positive_nll_coeff="$POSITIVE_NLL_COEFF"
  actor_rollout_ref.actor.ppo_mini_batch_size=16
  actor_rollout_ref.actor.use_dynamic_bsz=True
  actor_rollout_ref.actor.ppo_max_token_len_per_gpu="$MAX_TOKENS_PER_GPU"
  actor_rollout_ref.actor.loss_agg_mode=token-mean
  actor_rollout_ref.actor.use_kl_loss=False
  actor_rollout_ref.actor.kl_loss_coef=0.0
  actor_rollout_ref.actor.entropy_coeff=0
  actor_rollout_ref.actor.clip_ratio_c=10.0
  actor_rollout_ref.actor.fsdp_config.param_offload="$OFFLOAD"
  actor_rollout_ref.actor.fsdp_config.optimizer_offload="$OFFLOAD"
  actor_rollout_ref.ref.fsdp_config.param_offload="$OFFLOAD"
  actor_rollout_ref.actor.checkpoint.save_contents="['model']"
  # vLLM rollout: 8 responses per prompt
  actor_rollout_ref.rollout.name=vllm
  actor_rollout_ref.rollout.n=8
  actor_rollout_ref.rollout.temperature=1.0
  actor_rollout_ref.rollout.top_p=1.0
  actor_rollout_ref.rollout.top_k=-1
  actor_rollout_ref.rollout.tensor_model_parallel_size="$TP_SIZE"
  actor_rollout_ref.rollout.gpu_memory_utilization="$GPU_MEM"
  actor_rollout_ref.rollout.enable_chunked_prefill=True
  actor_rollout_ref.rollout.max_model_len=$(( MAX_PROMPT_LEN + VAL_MAX_RESPONSE_LEN ))
  actor_rollout_ref.rollout.max_num_batched_tokens=$(( MAX_PROMPT_LEN + VAL_MAX_RESPONSE_LEN ))
  actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=True
  actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu="$MAX_TOKENS_PER_GPU"
  actor_rollout_ref.ref.log_prob_use_dynamic_bsz=True
  actor_rollout_ref.ref.log_prob_max_token_len_per_gpu="$MAX_TOKENS_PER_GPU"
  # validation: avg@32 at temperature 0.6 / top-p 0.95
  actor_rollout_ref.rollout.val_kwargs.n=32
  actor_rollout_ref.rollout.val_kwargs.do_sample=True
  actor_rollout_ref.rollout.val_kwargs.temperature=0.6
  actor_rollout_ref.rollout.val_kwargs.top_p=0.95
  actor_rollout_ref.rollout.val_kwargs.top_k=-1
  # GRPO advantages, no KL in the reward
  algorithm.adv_estimator=grpo
  algorithm.use_kl_in_reward=False
  algorithm.kl_ctrl.kl_coef=0.0
  # reward: the last \boxed{} checked with math-verify (1/0, logged as `acc`); DAPO manager, no overlong penalty
  reward.reward_manager.name=dapo
  reward.custom_reward_function.path="$REWARD_FN_PATH"
  reward.custom_reward_function.name=compute_score
  # trainer
  trainer.logger="$LOGGER"
  trainer.project_name="$PROJECT_NAME"
  trainer.experiment_name="$EXPERIMENT_NAME"
  trainer.default_local_dir="$CKPT_DIR/$PROJECT_NAME/$EXPERIMENT_NAME"
  trainer.nnodes="$NNODES"
  trainer.n_gpus_per_node="$GPUS_PER_NODE"
  trainer.val_before_train=${VAL_BEFORE_TRAIN:-False}
  trainer.test_freq=10
  trainer.save_freq=${SAVE_FREQ:-10}
  trainer.resume_mode=auto
  trainer.total_epochs=${TOTAL_EPOCHS:-10}
)

# DAPO-style dynamic sampling: drop prompt groups whose `acc` is all equal. verl 0.9.1's V1 sampler refills
# prompt by prompt until 128 groups survive (it ignores data.gen_batch_size and max_num_gen_batches); 2 train
# batches in flight = the reference's 256-prompt generation batch.
if [[ "${DYNAMIC_SAMPLING:-0}" == "1" ]]; then
  COMMON_ARGS+=(
    algorithm.filter_groups.enable=True
    algorithm.filter_groups.metric=acc
    algorithm.filter_groups.max_inflight_gen_batches=2
  )
fi

if [[ "${ERC_DRY_RUN:-0}" == "1" ]]; then
  exec "$PYTHON" -m erc_verl.main_ppo "${COMMON_ARGS[@]}" "${METHOD_ARGS[@]}" "$@" --cfg job
fi
exec "$PYTHON" -m erc_verl.main_ppo "${COMMON_ARGS[@]}" "${METHOD_ARGS[@]}" "$@"
