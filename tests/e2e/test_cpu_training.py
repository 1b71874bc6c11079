"""verl's whole trainer on CPU, through erc_verl's entry point and recipes: the product's real path.

Each fixture below is one real run on one rank (2 steps, a tiny warmed-up Qwen2 that earns the math reward, so
advantages and gradients are non-zero). ERC runs use a band tight enough to act at this scale
(0.995 / 1.002: the paper's 0.95 / 1.05 clips nothing on a 2-layer model in 2 steps). Several ranks, two Ray
nodes, and the colocate_async and legacy V0 trainers (killed and resumed) are in test_cluster_path.py.
"""

from __future__ import annotations

import pytest

from e2e_harness import (POSITIVE_NLL, TIGHT_BAND, check_erc_acted, check_learning_signal, check_no_erc,
                         check_positive_nll, main_ppo, recipe, run_training)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def vanilla_run(tiny_world, workdir):
    return run_training("vanilla_sync", main_ppo(tiny_world), workdir)


@pytest.fixture(scope="module")
def grpo_erc_run(tiny_world, workdir):
    diagnostics = workdir / "grpo_erc_tokens"
    run = run_training("grpo_erc_sync", main_ppo(
        tiny_world, "actor_rollout_ref.actor.policy_loss.loss_mode=grpo_erc", *TIGHT_BAND,
        f"actor_rollout_ref.actor.erc_diagnostics.dir={diagnostics}",
        "actor_rollout_ref.actor.erc_diagnostics.tokens_per_step=64"), workdir)
    run.diagnostics = diagnostics
    return run


def test_vanilla_trains_without_erc(vanilla_run):
    check_learning_signal(vanilla_run)
    check_no_erc(vanilla_run)


def test_grpo_erc_trains_and_gates(grpo_erc_run):
    check_learning_signal(grpo_erc_run)
    check_erc_acted(grpo_erc_run)


def test_erc_runs_the_baselines_trainer_mode_and_replay_buffer(vanilla_run, grpo_erc_run):
    """ERC must differ from its baseline only by the ERC plumbing: same mode string, same replay buffer."""
    base = vanilla_run.identity()
    assert base == {"trainer": "PPOTrainerSync", "use_v1": True, "trainer_mode": "sync",
                    "replay_buffer": "ReplayBuffer", "erc": False, "loss_mode": "vanilla"}
    assert grpo_erc_run.identity() == {**base, "trainer": "ERCPPOTrainerSync", "erc": True, "loss_mode": "grpo_erc"}


def test_old_entropy_is_the_one_compute_log_prob_made(grpo_erc_run):
    """In each step's first mini-batch the weights are those compute_log_prob ran with, so the entropy the
    loss receives as old_entropy must equal the current entropy of the same tokens: rho == 1. A wrong
    field, a shifted token or an entropy computed another way (bf16 vs float32) moves rho off 1."""
    import json

    records = [json.loads(line) for path in grpo_erc_run.diagnostics.glob("*.jsonl")
               for line in path.read_text().splitlines()]
    # 16 responses per mini-batch in one micro-batch: loss calls 0, 2 are on-policy, 1, 3 off-policy
    on_policy = [r for r in records if r["call"] % 2 == 0]
    off_policy = [r for r in records if r["call"] % 2 == 1]
    assert len(on_policy) >= 64 and off_policy
    deviations = sorted(abs(r["entropy_ratio"] - 1.0) for r in on_policy)
    worst, median = deviations[-1], deviations[len(deviations) // 2]
    # Typical tokens: exactly 1. A confident token can move ~1e-3 when the bf16 forward packs its sequence
    # differently (seen once in 128); the bugs this guards against put rho at 0.6..9.
    assert median < 1e-5 and worst < 1e-2, f"on-policy entropy ratio off 1: median {median}, worst {worst}"
    assert all(r["ratio"] == pytest.approx(1.0, abs=1e-4) for r in on_policy)  # same weights: same log-probs too
    assert max(abs(r["entropy_ratio"] - 1.0) for r in off_policy) > worst  # and the update did move the policy


def test_gppo_erc_trains_and_gates(tiny_world, workdir):
    run = run_training("gppo_erc_sync", main_ppo(
        tiny_world, "actor_rollout_ref.actor.policy_loss.loss_mode=gppo_erc", *TIGHT_BAND, *POSITIVE_NLL), workdir)
    check_learning_signal(run)
    check_erc_acted(run)
    check_positive_nll(run)  # the scores reach the update batch through TransferQueue (V1)


@pytest.fixture(scope="module")
def dapo_erc_recipe_run(workdir, tiny_world):
    return run_training("recipe_dapo_erc", recipe("dapo_erc"), workdir, env={
        "TINY_DIR": str(workdir / "recipe_world"), "LOGGER": "['console','file']",
        "ENTROPY_MASK_LOW": "0.995", "ENTROPY_MASK_HIGH": "1.002"})


@pytest.fixture(scope="module")
def dapo_recipe_run(workdir, dapo_erc_recipe_run):
    return run_training("recipe_dapo", recipe("dapo"), workdir, env={
        "TINY_DIR": str(workdir / "recipe_world"), "LOGGER": "['console','file']"})


def test_dapo_erc_recipe_runs_with_dynamic_sampling(dapo_erc_recipe_run):
    run = dapo_erc_recipe_run
    check_learning_signal(run)
    check_erc_acted(run)
    assert any("training/filter_groups/evicted_samples" in step for step in run.steps), "dynamic sampling was off"


def test_dapo_recipe_baseline_matches_its_erc_arm(dapo_recipe_run, dapo_erc_recipe_run):
    check_learning_signal(dapo_recipe_run)
    check_no_erc(dapo_recipe_run)
    assert any("training/filter_groups/evicted_samples" in step for step in dapo_recipe_run.steps)
    base, erc = dapo_recipe_run.identity(), dapo_erc_recipe_run.identity()
    assert (base["erc"], erc["erc"]) == (False, True)
    # the same use_v1, trainer mode and replay buffer
    assert {**erc, "trainer": base["trainer"], "erc": False, "loss_mode": base["loss_mode"]} == base


def test_separate_async_is_refused_on_the_driver_in_cpu_mode(tiny_world, workdir):
    """Its weight sync needs a collective checkpoint engine (nccl/nixl/mooncake): none runs on CPU."""
    run = run_training("grpo_erc_separate_async", main_ppo(
        tiny_world, "actor_rollout_ref.actor.policy_loss.loss_mode=grpo_erc",
        "trainer.v1.trainer_mode=separate_async"), workdir)
    assert run.returncode == 2
    last = run.output.strip().splitlines()[-1]
    assert last.startswith("erc-verl: error: trainer.v1.trainer_mode=separate_async is not supported in CPU mode")
    assert "Started a local Ray instance" not in run.output and "Traceback" not in run.output
