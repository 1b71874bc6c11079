"""`python -m erc_verl.main_ppo`: verl's CLI with the ERC config; bad values stop before Ray starts."""

import subprocess
import sys

import pytest
import yaml

from erc_verl.main_ppo import ERCTaskRunnerV1


def cli(module, *args, cwd=None):
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def launchable(tmp_path):
    """Overrides the driver's checks need (`--cfg job` runs them too): data files, a hub model id, a rollout."""
    (tmp_path / "train.parquet").touch()
    return [f"data.train_files={tmp_path}/train.parquet", f"data.val_files={tmp_path}/train.parquet",
            "actor_rollout_ref.model.path=deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "algorithm.adv_estimator=grpo",
            "actor_rollout_ref.rollout.name=vllm", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
            "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2"]


@pytest.mark.integration
def test_cfg_job_prints_composed_config_with_erc_keys(tmp_path):
    out = cli("erc_verl.main_ppo", "--cfg", "job", "actor_rollout_ref.actor.policy_loss.loss_mode=gppo_erc",
              "actor_rollout_ref.actor.entropy_mask_low=0.9", *launchable(tmp_path), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    actor = yaml.safe_load(out.stdout)["actor_rollout_ref"]["actor"]
    assert (actor["entropy_mask_low"], actor["entropy_mask_high"]) == (0.9, 1.05)
    assert actor["policy_loss"]["loss_mode"] == "gppo_erc"
    assert actor["_target_"] == "erc_verl.algorithm.config.ERCFSDPActorConfig"


@pytest.mark.integration
def test_stock_verl_rejects_the_keys_which_is_why_the_entry_point_exists():
    out = cli("verl.trainer.main_ppo", "--cfg", "job", "actor_rollout_ref.actor.entropy_mask_low=0.9")
    assert out.returncode != 0 and "entropy_mask_low" in out.stderr


@pytest.mark.integration
@pytest.mark.parametrize("dry_run", [[], ["--cfg", "job"]], ids=["launch", "cfg-job"])
def test_bad_bounds_fail_on_the_driver_before_ray(tmp_path, dry_run):
    out = cli("erc_verl.main_ppo", "actor_rollout_ref.actor.policy_loss.loss_mode=grpo_erc",
              "actor_rollout_ref.actor.entropy_mask_low=1.2", *launchable(tmp_path), *dry_run, cwd=tmp_path)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.splitlines()[-1].startswith(
        "erc-verl: error: ERC needs 0 <= entropy_mask_low < entropy_mask_high, got low=1.2, high=1.05.")
    assert "ray init kwargs" not in out.stdout + out.stderr and "Traceback" not in out.stderr


V1_MODES = ["sync", "colocate_async", "separate_async"]  # the trainers verl 0.9.1 registers


class _Built(Exception):
    """Raised from PPOTrainer.init to stop TaskRunnerV1.run once the trainer object exists."""


def _trainer_built_by(runner_cls, mode, monkeypatch):
    """Run a V1 task runner's real ``run`` in this process up to the trainer's construction.

    Mocked, because they cannot run here: TransferQueue's init/close (they start Ray actors and storage
    units) and ``PPOTrainer.init`` (it builds GPU worker groups); it raises with the trainer built.
    """
    import transfer_queue
    from hydra import compose, initialize_config_dir

    from verl.trainer.ppo.v1.trainer_base import PPOTrainer

    from erc_verl.configs import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        config = compose(config_name="erc_ppo_trainer", overrides=[
            "actor_rollout_ref.actor.policy_loss.loss_mode=grpo_erc", f"trainer.v1.trainer_mode={mode}",
            # what separate_async asserts in its __init__
            "data.train_batch_size=16", "actor_rollout_ref.actor.ppo_mini_batch_size=4",
            "actor_rollout_ref.rollout.nnodes=1", "actor_rollout_ref.rollout.n_gpus_per_node=1",
            "actor_rollout_ref.rollout.checkpoint_engine.backend=nccl",
        ])

    def stop(self):
        raise _Built(self)

    monkeypatch.setattr(transfer_queue, "init", lambda *a, **k: None)
    monkeypatch.setattr(transfer_queue, "close", lambda *a, **k: None)
    monkeypatch.setattr(PPOTrainer, "init", stop)
    with pytest.raises(_Built) as built:
        runner_cls.__ray_actor_class__().run(config)
    return built.value.args[0]


@pytest.mark.parametrize("mode", V1_MODES)
def test_erc_v1_runner_builds_the_erc_trainer_under_the_users_trainer_mode(mode, monkeypatch):
    """verl's trainer branches on the trainer_mode string (replay buffer, resume, trainer.v1[<mode>]): the
    ERC run must see the same string, and so the same choices, as the baseline run."""
    from verl.trainer.main_ppo import TaskRunnerV1
    from verl.trainer.ppo.v1 import get_trainer_cls

    from erc_verl.seams.trainer import ERCTrainerV1Mixin

    verl_cls = get_trainer_cls(mode)
    stock = _trainer_built_by(TaskRunnerV1, mode, monkeypatch)
    erc = _trainer_built_by(ERCTaskRunnerV1, mode, monkeypatch)
    assert type(stock) is verl_cls
    assert isinstance(erc, ERCTrainerV1Mixin) and isinstance(erc, verl_cls)
    assert erc.trainer_mode == stock.trainer_mode == mode
    assert erc.config.trainer.v1.trainer_mode == mode
    assert type(erc.replay_buffer) is type(stock.replay_buffer)
    assert erc.parameter_sync_step == stock.parameter_sync_step
    assert get_trainer_cls(mode) is verl_cls  # nothing left behind in verl's registry


def test_registry_override_refuses_a_verl_runner_that_picks_its_trainer_differently(monkeypatch):
    from verl.trainer.main_ppo import TaskRunnerV1

    from erc_verl.seams.trainer import erc_trainer_registered

    def run(self, config):  # a future verl that no longer looks the trainer up by trainer_mode
        return config

    monkeypatch.setattr(TaskRunnerV1.__ray_actor_class__, "run", run)
    with pytest.raises(RuntimeError, match="no longer picks its trainer"):
        with erc_trainer_registered("sync"):
            pass


def test_driver_refuses_an_unsupported_verl_before_ray_starts(monkeypatch):
    import ray
    from hydra import compose, initialize_config_dir

    import verl

    import erc_verl.main_ppo as entry
    from erc_verl.configs import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        config = compose(config_name="erc_ppo_trainer",
                         overrides=["actor_rollout_ref.actor.policy_loss.loss_mode=grpo_erc"])
    monkeypatch.setattr(verl, "__version__", "0.10.0")
    monkeypatch.setattr(entry, "run_ppo", lambda *args, **kwargs: pytest.fail("Ray would start"))
    with pytest.raises(RuntimeError, match="written for verl 0.9.x, found verl 0.10.0"):
        entry.run(config)
    assert not ray.is_initialized()
