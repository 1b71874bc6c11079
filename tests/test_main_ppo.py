"""`python -m erc_verl.main_ppo`: verl's CLI with the ERC config; bad values stop before Ray starts."""

import json
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
    """Raised from a mocked step of a task runner's ``run``: stops it there (with the trainer object, once built)."""


def _compose(*overrides: str):
    from hydra import compose, initialize_config_dir

    from erc_verl.configs import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose(config_name="erc_ppo_trainer", overrides=list(overrides))


def _trainer_built_by(runner_cls, mode, monkeypatch, *overrides: str, until: str = "init"):
    """Run a V1 task runner's real ``run`` in this process up to the trainer's construction (``until="init"``), or
    on to the start of ``fit`` (``until="fit"``, past the runner's ``init_agent_loop_manager``).

    Mocked, because they cannot run here: TransferQueue's init/close (they start Ray actors and storage
    units), ``PPOTrainer.init`` (it builds GPU worker groups) and verl's ``init_agent_loop_manager`` (it starts
    the rollout's agent loop workers); ``until`` raises with the trainer built.
    """
    import transfer_queue

    from verl.trainer.main_ppo import TaskRunnerV1
    from verl.trainer.ppo.v1.trainer_base import PPOTrainer

    config = _compose(
        "actor_rollout_ref.actor.policy_loss.loss_mode=grpo_erc", f"trainer.v1.trainer_mode={mode}",
        # what separate_async asserts in its __init__
        "data.train_batch_size=16", "actor_rollout_ref.actor.ppo_mini_batch_size=4",
        "actor_rollout_ref.rollout.nnodes=1", "actor_rollout_ref.rollout.n_gpus_per_node=1",
        "actor_rollout_ref.rollout.checkpoint_engine.backend=nccl", *overrides,
    )

    def stop(self, *args):
        raise _Built(self)

    monkeypatch.setattr(transfer_queue, "init", lambda *a, **k: None)
    monkeypatch.setattr(transfer_queue, "close", lambda *a, **k: None)
    if until == "fit":
        monkeypatch.setattr(PPOTrainer, "init", lambda self: None)
        monkeypatch.setattr(TaskRunnerV1.__ray_actor_class__, "init_agent_loop_manager", lambda self: None)
    monkeypatch.setattr(PPOTrainer, until, stop)
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


@pytest.mark.parametrize("loss_mode", ["grpo_erc", "vanilla"])
def test_v1_runner_writes_the_run_identity_next_to_the_metrics(loss_mode, tmp_path, monkeypatch):
    """Once the trainer is built: what was built, as JSON, at verl's file-logger path with .identity.json."""
    from erc_verl.seams.run_identity import read_run_identity

    metrics = tmp_path / "run" / "metrics.jsonl"
    monkeypatch.setenv("VERL_FILE_LOGGER_PATH", str(metrics))
    _trainer_built_by(ERCTaskRunnerV1, "colocate_async", monkeypatch,
                      f"actor_rollout_ref.actor.policy_loss.loss_mode={loss_mode}", "trainer.logger=['console','file']",
                      until="fit")
    erc = loss_mode == "grpo_erc"
    assert json.loads((tmp_path / "run" / "metrics.identity.json").read_text()) == read_run_identity(str(metrics)) == {
        "trainer": "ERCPPOTrainerColocateAsync" if erc else "PPOTrainerColocateAsync", "use_v1": True,
        "trainer_mode": "colocate_async", "replay_buffer": "ReplayBufferAsync", "erc": erc, "loss_mode": loss_mode}


def test_no_identity_file_without_the_file_logger(tmp_path, monkeypatch, capsys):
    """verl's default path (no $VERL_FILE_LOGGER_PATH) is <root>/<project>/<experiment>.jsonl; without the file logger
    nothing is written there, and the console line is all."""
    monkeypatch.delenv("VERL_FILE_LOGGER_PATH", raising=False)
    monkeypatch.setenv("VERL_FILE_LOGGER_ROOT", str(tmp_path))
    _trainer_built_by(ERCTaskRunnerV1, "sync", monkeypatch, "trainer.logger=['console']",
                      "trainer.project_name=p", "trainer.experiment_name=e", until="fit")
    assert list(tmp_path.iterdir()) == [] and '"trainer": "ERCPPOTrainerSync"' in capsys.readouterr().out
    _trainer_built_by(ERCTaskRunnerV1, "sync", monkeypatch, "trainer.logger=['console','file']",
                      "trainer.project_name=p", "trainer.experiment_name=e", until="fit")
    assert json.loads((tmp_path / "p" / "e.identity.json").read_text())["trainer"] == "ERCPPOTrainerSync"


def test_v0_runner_writes_the_identity_of_the_erc_trainer_it_binds(tmp_path, monkeypatch):
    """The legacy runner builds the trainer inside verl's ``run`` with no hook after it: the identity is written as
    that ``run`` starts (stopped here at its first step, which starts Ray workers)."""
    from verl.trainer import main_ppo_v0

    import erc_verl.main_ppo as entry

    metrics = tmp_path / "metrics.jsonl"
    monkeypatch.setenv("VERL_FILE_LOGGER_PATH", str(metrics))

    def stop(self, config):
        raise _Built(self)

    monkeypatch.setattr(main_ppo_v0.TaskRunner.__ray_actor_class__, "add_actor_rollout_worker", stop)
    config = _compose("actor_rollout_ref.actor.policy_loss.loss_mode=gppo_erc", "trainer.use_v1=False",
                      "trainer.logger=['console','file']")
    with pytest.raises(_Built):
        entry._erc_task_runner_v0().__ray_actor_class__().run(config)
    assert json.loads((tmp_path / "metrics.identity.json").read_text()) == {
        "trainer": "ERCRayPPOTrainer", "use_v1": False, "trainer_mode": None, "replay_buffer": None, "erc": True,
        "loss_mode": "gppo_erc"}


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
