"""The run identity: what ``erc_verl.main_ppo`` built, as a small JSON file next to verl's metrics file.

verl's file logger (``FileLogger`` in verl/utils/tracking.py) writes the metrics to ``$VERL_FILE_LOGGER_PATH``, else to
``$VERL_FILE_LOGGER_ROOT/<trainer.project_name>/<trainer.experiment_name>.jsonl`` (root: the working directory). The
identity goes to the same path with ``.jsonl`` replaced by ``.identity.json`` (``metrics.jsonl`` ->
``metrics.identity.json``), in runs with the file logger on (``trainer.logger`` lists ``file``)::

    {"trainer": "ERCPPOTrainerSync", "use_v1": true, "trainer_mode": "sync", "replay_buffer": "ReplayBuffer",
     "erc": true, "loss_mode": "grpo_erc"}

(the legacy V0 trainer has neither mode nor replay buffer: ``null``). The task runner writes it, in the same Ray actor
process that opens verl's metrics file, so a relative path resolves alike: on one machine the file lands where the
launching process finds it; on a cluster it lands on the node of the task runner, like verl's metrics file.
Callers compare runs by this file (ERC and its baseline must run the same trainer mode and replay buffer); the
console line printed with it is for people only.
"""

from __future__ import annotations

import json
import os
from typing import Optional

METRICS_SUFFIX = ".jsonl"
IDENTITY_SUFFIX = ".identity.json"


def identity_path(metrics_path: str) -> str:
    """``<metrics path without .jsonl>.identity.json``."""
    stem = metrics_path[: -len(METRICS_SUFFIX)] if metrics_path.endswith(METRICS_SUFFIX) else metrics_path
    return stem + IDENTITY_SUFFIX


def metrics_path(config) -> Optional[str]:
    """Where verl's file logger writes this run's metrics (its own rule, tracking.py), or None when it is off."""
    backends = config.trainer.logger
    if "file" not in ([backends] if isinstance(backends, str) else backends):
        return None
    path = os.getenv("VERL_FILE_LOGGER_PATH")
    if path is None:
        root = os.path.expanduser(os.getenv("VERL_FILE_LOGGER_ROOT", "."))
        path = os.path.join(root, config.trainer.project_name, f"{config.trainer.experiment_name}{METRICS_SUFFIX}")
    return path


def write_run_identity(config, *, trainer: str, trainer_mode: Optional[str], replay_buffer: Optional[str]) -> dict:
    """Write the identity file (when the file logger is on) and say so in one console line; returns the identity."""
    from erc_verl.algorithm.losses import is_erc_loss_mode

    loss_mode = config.actor_rollout_ref.actor.policy_loss.get("loss_mode")
    identity = {"trainer": trainer, "use_v1": bool(config.trainer.use_v1), "trainer_mode": trainer_mode,
                "replay_buffer": replay_buffer, "erc": is_erc_loss_mode(loss_mode), "loss_mode": loss_mode}
    metrics = metrics_path(config)
    where = ""
    if metrics is not None:
        path = identity_path(metrics)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path + ".tmp", "w", encoding="utf-8") as f:  # whole or absent: readers poll while the run goes on
            json.dump(identity, f)
        os.replace(path + ".tmp", path)
        where = f" (written to {os.path.abspath(path)})"
    print(f"erc-verl: run identity {json.dumps(identity)}{where}", flush=True)
    return identity


def read_run_identity(metrics_path: str) -> Optional[dict]:
    """The identity written next to ``metrics_path``, or None when the run wrote none."""
    path = identity_path(metrics_path)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)
