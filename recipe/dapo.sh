#!/usr/bin/env bash
# DAPO baseline: PPO-clip 0.2 / 0.28, token-mean, dynamic sampling (group filtering).
METHOD=${METHOD:-dapo}
DYNAMIC_SAMPLING=1
METHOD_ARGS=(
  actor_rollout_ref.actor.policy_loss.loss_mode=vanilla
  actor_rollout_ref.actor.clip_ratio_low=0.2
  actor_rollout_ref.actor.clip_ratio_high=0.28
  ${EXTRA_METHOD_ARGS:-}
)
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
