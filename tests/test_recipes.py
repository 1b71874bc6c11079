"""Every recipe in ERC_DRY_RUN mode: the composed config carries the paper's settings and passes
verl's own validation (no Ray, no GPU: nothing is launched)."""

import os
import subprocess
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from verl.trainer.ppo.utils import need_critic, need_reference_policy
from verl.utils.config import validate_config

from erc_verl.config import validate_erc_config

RECIPES = Path(__file__).resolve().parents[1] / "recipe"

# method -> (loss_mode, clip low, clip high, dynamic sampling, ERC bounds)
EXPECTED = {
    "dapo": ("vanilla", 0.2, 0.28, True, None),
    "dapo_erc": ("grpo_erc", 0.2, 0.28, True, (0.95, 1.05)),
    "gppo": ("gppo", 0.2, 0.2, True, None),
    "gppo_erc": ("gppo_erc", 0.2, 0.2, True, (0.95, 1.05)),
    "grpo": ("vanilla", 0.2, 0.2, False, None),
}


def dry_run(recipe, *overrides, **env):
    run_env = {**os.environ, "ERC_DRY_RUN": "1", **env}
    out = subprocess.run(["bash", str(RECIPES / f"{recipe}.sh"), *overrides], capture_output=True, text=True,
                         env=run_env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return OmegaConf.create(yaml.safe_load(out.stdout))


@pytest.mark.integration
@pytest.mark.parametrize("recipe", sorted(EXPECTED))
def test_recipe_dry_run_has_paper_settings_and_passes_validation(recipe):
    cfg = dry_run(recipe)
    loss_mode, low, high, dynamic_sampling, bounds = EXPECTED[recipe]
    actor = cfg.actor_rollout_ref.actor
    assert actor.policy_loss.loss_mode == loss_mode
    assert (actor.clip_ratio_low, actor.clip_ratio_high, actor.clip_ratio_c) == (low, high, 10.0)
    if bounds:
        assert (actor.entropy_mask_low, actor.entropy_mask_high) == bounds
    assert cfg.algorithm.filter_groups.enable is dynamic_sampling
    assert actor.optim.lr == 1e-6 and actor.ppo_mini_batch_size == 16 and cfg.data.train_batch_size == 128
    assert cfg.actor_rollout_ref.rollout.n == 8 and cfg.data.max_response_length == 16384
    assert actor.loss_agg_mode == "token-mean" and actor.use_kl_loss is False and actor.entropy_coeff == 0
    assert cfg.algorithm.use_kl_in_reward is False and cfg.algorithm.adv_estimator == "grpo"
    assert cfg.actor_rollout_ref.rollout.name == "vllm" and actor.strategy.startswith("fsdp")
    val = cfg.actor_rollout_ref.rollout.val_kwargs
    assert (val.n, val.temperature, val.top_p, val.do_sample) == (32, 0.6, 0.95, True)
    assert cfg.reward.custom_reward_function.path == "pkg://erc_verl.reward"
    assert cfg.actor_rollout_ref.model.path == "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"
    assert "postive_loss_coeff" not in OmegaConf.to_yaml(cfg)

    validate_config(config=cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))
    validate_erc_config(cfg)


@pytest.mark.integration
def test_site_settings_come_from_env_and_overrides_append():
    cfg = dry_run("gppo_erc", "actor_rollout_ref.actor.entropy_mask_high=1.1", "trainer.total_epochs=1",
                  MODEL_SIZE="7b", NNODES="4", GPUS_PER_NODE="8", DATA_DIR="/data/x", CKPT_DIR="/ckpt",
                  LOGGER="['console','wandb']")
    assert cfg.actor_rollout_ref.model.path == "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"
    assert cfg.actor_rollout_ref.rollout.tensor_model_parallel_size == 2
    assert (cfg.trainer.nnodes, cfg.trainer.n_gpus_per_node, cfg.trainer.total_epochs) == (4, 8, 1)
    assert cfg.data.train_files == "/data/x/train.parquet"
    assert cfg.trainer.default_local_dir.startswith("/ckpt/") and list(cfg.trainer.logger) == ["console", "wandb"]
    assert cfg.actor_rollout_ref.actor.entropy_mask_high == 1.1


@pytest.mark.integration
def test_bad_model_size_is_refused():
    out = subprocess.run(["bash", str(RECIPES / "dapo_erc.sh")], capture_output=True, text=True,
                         env={**os.environ, "ERC_DRY_RUN": "1", "MODEL_SIZE": "3b"})
    assert out.returncode == 2 and "MODEL_SIZE must be 1.5b or 7b" in out.stderr
