"""Hydra composition of the ERC config and its conversion to verl's actor dataclass (as workers do it)."""

import math

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from verl.utils.config import omega_conf_to_dataclass
from verl.workers.config import FSDPActorConfig

from erc_verl.algorithm.config import ERCDiagnosticsConfig, ERCFSDPActorConfig, validate_erc_config
from erc_verl.configs import CONFIG_DIR


def compose_erc(*overrides):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose(config_name="erc_ppo_trainer", overrides=list(overrides))


def test_defaults_are_the_paper_bounds_on_top_of_verl_ppo_trainer():
    cfg = compose_erc()
    actor = cfg.actor_rollout_ref.actor
    assert (actor.entropy_mask_low, actor.entropy_mask_high) == (0.95, 1.05)
    assert cfg.trainer.use_v1 is True and actor.strategy == "fsdp"  # verl's own defaults, untouched
    assert OmegaConf.is_missing(cfg.actor_rollout_ref.rollout, "name")  # verl leaves the rollout to the user


def test_actor_section_converts_to_erc_dataclass_with_cli_overrides():
    cfg = compose_erc(
        "actor_rollout_ref.actor.policy_loss.loss_mode=gppo_erc",
        "actor_rollout_ref.actor.entropy_mask_low=0.9",
        "actor_rollout_ref.actor.entropy_mask_high=1.2",
        "actor_rollout_ref.actor.erc_diagnostics.dir=/some/where",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
    )
    actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    assert isinstance(actor, ERCFSDPActorConfig) and isinstance(actor, FSDPActorConfig)
    assert (actor.entropy_mask_low, actor.entropy_mask_high) == (0.9, 1.2)
    assert isinstance(actor.erc_diagnostics, ERCDiagnosticsConfig) and actor.erc_diagnostics.dir == "/some/where"
    assert actor.policy_loss.loss_mode == "gppo_erc"
    assert actor.engine is actor.fsdp_config  # verl's FSDPActorConfig post-init still ran


def test_unknown_keys_are_still_rejected():
    with pytest.raises(Exception, match="entropy_mask_lo"):
        compose_erc("actor_rollout_ref.actor.entropy_mask_lo=0.9")


def _valid(**overrides):
    args = ["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2"]
    args += [f"{k}={v}" for k, v in overrides.items()]
    return compose_erc(*args)


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"actor_rollout_ref.actor.entropy_mask_low": 1.2}, "0 <= entropy_mask_low < entropy_mask_high"),
        ({"actor_rollout_ref.actor.entropy_mask_high": 0.5}, "0 <= entropy_mask_low < entropy_mask_high"),
        ({"actor_rollout_ref.actor.entropy_mask_low": -0.1}, "0 <= entropy_mask_low"),
        ({"actor_rollout_ref.actor.policy_loss.loss_mode": "grpo_erx"}, "not a registered verl policy loss"),
        ({"actor_rollout_ref.actor.policy_loss.loss_mode": "erc"}, "erc_base_loss_mode"),
        ({"actor_rollout_ref.actor.policy_loss.loss_mode": "grpo_erc",
          "algorithm.rollout_correction.bypass_mode": True}, "bypass_mode"),
        ({"actor_rollout_ref.actor.erc_diagnostics.tokens_per_step": 0}, "tokens_per_step"),
        ({"actor_rollout_ref.actor.erc_diagnostics.seed": "x"}, r"erc_diagnostics\.seed must be an integer, got 'x'"),
        ({"actor_rollout_ref.actor.erc_diagnostics.dir": 5}, r"erc_diagnostics\.dir must be a string"),
        ({"actor_rollout_ref.actor.positive_nll_coeff": "x"}, r"positive_nll_coeff must be finite and >= 0, got 'x'"),
        ({"actor_rollout_ref.actor.erc_diagnostics.dir": "/tmp/diag"}, "only ERC losses compute"),
    ],
)
def test_bad_values_are_refused_on_the_driver(overrides, message):
    with pytest.raises(ValueError, match=message):
        validate_erc_config(_valid(**overrides))


def test_valid_configs_pass_and_open_bounds_are_allowed():
    validate_erc_config(_valid(**{"actor_rollout_ref.actor.policy_loss.loss_mode": "grpo_erc"}))
    validate_erc_config(_valid(**{"actor_rollout_ref.actor.policy_loss.loss_mode": "grpo_erc",
                                  "actor_rollout_ref.actor.erc_diagnostics.dir": "/tmp/diag"}))
    validate_erc_config(_valid(**{"actor_rollout_ref.actor.policy_loss.loss_mode": "erc",
                                  "actor_rollout_ref.actor.erc_base_loss_mode": "gspo",
                                  "actor_rollout_ref.actor.entropy_mask_low": 0.0,
                                  "actor_rollout_ref.actor.entropy_mask_high": math.inf}))


def test_stock_actor_target_is_refused():
    cfg = _valid()
    OmegaConf.update(cfg, "actor_rollout_ref.actor._target_", "verl.workers.config.FSDPActorConfig")
    with pytest.raises(Exception, match="entropy_mask_low|ERCFSDPActorConfig"):
        validate_erc_config(cfg)


@pytest.mark.parametrize("strategy", ["megatron", "veomni"])
def test_non_fsdp_strategies_are_refused_only_for_erc_losses(strategy):
    """Non-ERC runs are verl's own: the FSDP-only ERC seam must not stop them."""
    validate_erc_config(_valid(**{"actor_rollout_ref.actor.strategy": strategy,
                                  "actor_rollout_ref.actor.policy_loss.loss_mode": "vanilla"}))
    with pytest.raises(ValueError, match=rf"actor_rollout_ref\.actor\.strategy.*{strategy}.*grpo_erc"):
        validate_erc_config(_valid(**{"actor_rollout_ref.actor.strategy": strategy,
                                      "actor_rollout_ref.actor.policy_loss.loss_mode": "grpo_erc"}))


@pytest.mark.parametrize("overrides,message", [
    ({"actor_rollout_ref.actor.positive_nll_coeff": -0.1}, "positive_nll_coeff must be finite and >= 0"),
    ({"actor_rollout_ref.actor.positive_nll_coeff": 0.1, "distillation.enabled": True}, "does not support distillation"),
    ({"actor_rollout_ref.actor.positive_nll_coeff": 0.1, "actor_rollout_ref.actor.strategy": "megatron"},
     r"positive_nll_coeff > 0 supports FSDP actors.*megatron"),
])
def test_positive_nll_coeff_is_refused_on_the_driver_where_it_cannot_run(overrides, message):
    with pytest.raises(ValueError, match=message):
        validate_erc_config(_valid(**overrides))
    validate_erc_config(_valid(**{**overrides, "actor_rollout_ref.actor.positive_nll_coeff": 0.0}))  # the term is why
