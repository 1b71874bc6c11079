#!/usr/bin/env bash
# GPPO + Entropy Ratio Clipping (paper Table 3): GPPO with the ERC gate, bounds 0.95 / 1.05.
METHOD=gppo_erc
EXTRA_METHOD_ARGS="actor_rollout_ref.actor.policy_loss.loss_mode=gppo_erc
  actor_rollout_ref.actor.entropy_mask_low=${ENTROPY_MASK_LOW:-0.95}
  actor_rollout_ref.actor.entropy_mask_high=${ENTROPY_MASK_HIGH:-1.05}"
source "$(dirname "${BASH_SOURCE[0]}")/gppo.sh"
