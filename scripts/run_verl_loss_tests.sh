#!/usr/bin/env bash
# Run verl's own CPU policy-loss tests against the installed verl, with erc-verl installed (plugin active).
# The tests ship inside verl's wheel; we fetch the wheel of the installed version from the package index.
set -euo pipefail
version=$(python -c "import verl; print(verl.__version__)")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python -m pip download -q --no-deps --only-binary=:all: "verl==$version" -d "$work"
python -m zipfile -e "$work"/verl-"$version"-*.whl "$work/wheel"
python -c "import verl; from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY as R; assert 'grpo_erc' in R, 'plugin not active'"
cd "$work/wheel"
python -m pytest -q -p no:cacheprovider \
  tests/trainer/ppo/test_core_algos_on_cpu.py \
  tests/trainer/ppo/test_dynamic_policy_losses_on_cpu.py \
  tests/trainer/ppo/test_loss_aggregation_on_cpu.py
