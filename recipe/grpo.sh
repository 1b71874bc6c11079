#!/usr/bin/env bash
# GRPO baseline: symmetric PPO-clip 0.2, no dynamic sampling.
METHOD=grpo
METHOD_ARGS=(
  actor_rollout_ref.actor.policy_loss.loss_mode=vanilla
  actor_rollout_ref.actor.clip_ratio_low=0.2
  actor_rollout_ref.actor.clip_ratio_high=0.2
)
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
