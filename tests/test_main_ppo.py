"""`python -m erc_verl.main_ppo`: verl's CLI with the ERC config; bad values stop before Ray starts."""

import subprocess
import sys

import pytest
import yaml

from erc_verl.main_ppo import ERCTaskRunnerV1, _erc_task_runner_v0


def cli(module, *args):
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=300)


@pytest.mark.integration
def test_cfg_job_prints_composed_config_with_erc_keys():
    out = cli("erc_verl.main_ppo", "--cfg", "job", "actor_rollout_ref.actor.policy_loss.loss_mode=gppo_erc",
              "actor_rollout_ref.actor.entropy_mask_low=0.9")
    assert out.returncode == 0, out.stderr[-2000:]
    actor = yaml.safe_load(out.stdout)["actor_rollout_ref"]["actor"]
    assert (actor["entropy_mask_low"], actor["entropy_mask_high"]) == (0.9, 1.05)
    assert actor["policy_loss"]["loss_mode"] == "gppo_erc"
    assert actor["_target_"] == "erc_verl.config.ERCFSDPActorConfig"


@pytest.mark.integration
def test_stock_verl_rejects_the_keys_which_is_why_the_entry_point_exists():
    out = cli("verl.trainer.main_ppo", "--cfg", "job", "actor_rollout_ref.actor.entropy_mask_low=0.9")
    assert out.returncode != 0 and "entropy_mask_low" in out.stderr


@pytest.mark.integration
def test_bad_bounds_fail_on_the_driver_before_ray():
    out = cli("erc_verl.main_ppo", "actor_rollout_ref.actor.policy_loss.loss_mode=grpo_erc",
              "actor_rollout_ref.actor.entropy_mask_low=1.2", "actor_rollout_ref.rollout.name=vllm",
              "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
              "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2")
    assert out.returncode != 0
    assert "0 <= entropy_mask_low < entropy_mask_high" in out.stderr
    assert "ray init kwargs" not in out.stdout + out.stderr


def test_task_runners_wrap_verl_runners():
    from verl.trainer import main_ppo_v0
    from verl.trainer.main_ppo import TaskRunnerV1

    assert issubclass(ERCTaskRunnerV1.__ray_actor_class__, TaskRunnerV1.__ray_actor_class__)
    assert issubclass(_erc_task_runner_v0().__ray_actor_class__, main_ppo_v0.TaskRunner.__ray_actor_class__)
