#!/usr/bin/env bash
# GPPO baseline: gradient-preserving clip 0.2 / 0.2, token-mean, dynamic sampling.
METHOD=${METHOD:-gppo}
DYNAMIC_SAMPLING=1
METHOD_ARGS=(
  actor_rollout_ref.actor.policy_loss.loss_mode=gppo
  actor_rollout_ref.actor.clip_ratio_low=0.2
  actor_rollout_ref.actor.clip_ratio_high=0.2
  ${EXTRA_METHOD_ARGS:-}
)
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
