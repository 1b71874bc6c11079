"""``python -m erc_verl.main_ppo``: verl's ``main_ppo`` with the ERC config and plumbing.

Same CLI as ``python -m verl.trainer.main_ppo`` (Hydra overrides, ``--cfg job``); the config is verl's
``ppo_trainer`` plus the ERC keys (configs/erc_ppo_trainer.yaml). With a non-ERC loss the run is
verl's own. With an ERC loss the task runner builds the ERC trainer (erc_verl.seams.trainer).

As the run starts (V1: once the trainer is built; V0: as verl's run begins, the trainer class being ours), the task
runner writes the run identity (trainer class, ``use_v1``, trainer mode, replay
buffer, ERC on/off, loss mode) to ``<metrics path without .jsonl>.identity.json`` next to verl's file-logger metrics
(erc_verl.seams.run_identity; e.g. ``$VERL_FILE_LOGGER_PATH=run/metrics.jsonl`` -> ``run/metrics.identity.json``). The
task runner is a Ray actor: on a cluster the file lands on its node, like verl's metrics file.

Before Ray starts, the driver checks the config (erc_verl.seams.preflight): verl's ``validate_config`` (which
converts the actor section to its dataclass, so misspelt keys and wrong types fail there), local data and model
paths, ERC's own rules; ``--cfg job`` runs the same checks
before it prints. A refusal is one line, ``erc-verl: error: <message>`` on stderr, exit status 2.
"""

from __future__ import annotations

import hydra
import ray

from verl.trainer.main_ppo import TaskRunnerV1, run_ppo

from erc_verl.configs import CONFIG_DIR
from erc_verl.seams.cpu.platform import cpu_mode_selected
from erc_verl.seams.cpu.settings import apply_cpu_mode
from erc_verl.seams.engine import check_verl_version
from erc_verl.seams.preflight import GPUCheckedRunner, check_sizes, check_config, launch, refusing_config_errors
from erc_verl.seams.run_identity import write_run_identity
from erc_verl.seams.trainer import ERCRayPPOTrainer, erc_trainer_registered, plugin_actor_loss_enabled


@ray.remote
class ERCTaskRunnerV1(TaskRunnerV1.__ray_actor_class__):
    """verl's V1 task runner; with an ERC loss it builds the ERC variant of the trainer for the same
    ``trainer_mode`` (the mode string stays the user's: verl's trainer branches on it)."""

    def run(self, config):
        if not plugin_actor_loss_enabled(config):  # ERC, or a baseline with positive_nll_coeff > 0
            return super().run(config)
        with erc_trainer_registered(config.trainer.v1.trainer_mode):
            return super().run(config)

    def init_agent_loop_manager(self):
        """verl calls this between building the trainer and ``fit``: write what was built (the run identity), so
        an ERC run and its baseline can be seen to run the same trainer mode and replay buffer."""
        super().init_agent_loop_manager()
        trainer = self.trainer
        write_run_identity(trainer.config, trainer=type(trainer).__name__, trainer_mode=trainer.trainer_mode,
                           replay_buffer=type(trainer.replay_buffer).__name__)


def _erc_task_runner_v0():
    from verl.trainer import main_ppo_v0
    from verl.trainer.ppo.ray_trainer import RayPPOTrainer

    if main_ppo_v0.RayPPOTrainer is not RayPPOTrainer:
        raise RuntimeError("verl.trainer.main_ppo_v0 no longer builds RayPPOTrainer; erc_verl/main_ppo.py needs updating.")

    @ray.remote
    class ERCTaskRunnerV0(main_ppo_v0.TaskRunner.__ray_actor_class__):
        """verl 0.9's legacy task runner builds ``RayPPOTrainer`` by name; in this (dedicated) actor process,
        that name is the ERC trainer.

        The name is rebound in the globals verl's ``run`` executes with, not in the module: verl's runner
        class is not importable by name (that name is Ray's wrapper), so Ray ships it by value, with its own
        copy of the globals, and a module attribute set here would never be seen (ERC then ran as plain
        verl and the ERC loss refused to run without entropies)."""

        def run(self, config):
            verl_globals = super().run.__func__.__globals__
            if verl_globals.get("RayPPOTrainer") not in (RayPPOTrainer, ERCRayPPOTrainer):
                raise RuntimeError("verl's legacy TaskRunner.run no longer builds RayPPOTrainer; update erc_verl/main_ppo.py.")
            verl_globals["RayPPOTrainer"] = ERCRayPPOTrainer
            # verl builds it inside its run, with no hook after: the identity of the class bound here, written first
            write_run_identity(config, trainer=ERCRayPPOTrainer.__name__, trainer_mode=None, replay_buffer=None)
            return super().run(config)

    return ERCTaskRunnerV0


def prepare_on_driver(config) -> None:
    """Everything a launch does on the driver before Ray starts; ``--cfg job`` (ERC_DRY_RUN=1) runs it too.

    Checks (erc_verl.seams.preflight: ERC keys, local paths, verl's validate_config, then ERC's) and CPU mode's settings.
    """
    check_verl_version()  # before Ray starts, not only in the workers
    check_sizes(config)  # CPU mode's settings count GPUs from these
    if cpu_mode_selected():
        print("erc-verl CPU mode (VERL_PLATFORM=cpu) sets: " + ", ".join(apply_cpu_mode(config)), flush=True)
    check_config(config)


def run(config) -> None:
    """prepare_on_driver, then start Ray; the GPU count is checked right after ray.init, before the task runner."""
    prepare_on_driver(config)
    runner = ERCTaskRunnerV1 if config.trainer.use_v1 else _erc_task_runner_v0()
    run_ppo(config, task_runner_class=GPUCheckedRunner(runner, config))


@hydra.main(config_path=str(CONFIG_DIR), config_name="erc_ppo_trainer", version_base=None)
def hydra_main(config):
    with refusing_config_errors():
        run(config)


def main():
    """The command line: config mistakes are refused as one line (exit 2) before Ray starts, ``--cfg job`` included."""
    launch(hydra_main, check=prepare_on_driver)


if __name__ == "__main__":
    main()
