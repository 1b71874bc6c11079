"""Trainer-side ERC plumbing for verl 0.9: the V1 trainers (default) and the legacy V0 ``RayPPOTrainer``.

Three small overrides, active only when the actor's loss is an ERC loss (the first also with positive_nll_coeff > 0):
- actor workers are verl's chosen class with ``ERCActorWorkerMixin`` in front (ERC actor loss +
  graph-free current entropy); also for a non-ERC loss with ``positive_nll_coeff > 0`` (the plugin's actor loss
  adds that term);
- the old-policy entropy verl already computes in ``_compute_old_log_prob`` is kept as ``old_entropy``
  for the update (V1 writes it back to TransferQueue as ``entropy``; V0 drops it after logging);
- update batches carry the flag asking the worker for the current entropy.
No extra forward pass: the old entropy comes from the pass that produces ``old_log_probs``.
"""

from __future__ import annotations

import inspect
import os
from contextlib import contextmanager
from functools import lru_cache

import ray
import torch
from omegaconf import DictConfig
from tensordict import TensorDict

from verl.trainer.ppo.ray_trainer import RayPPOTrainer
from verl.trainer.ppo.utils import Role

from erc_verl.seams.actor_loss import OLD_ENTROPY_KEY, needs_plugin_actor_loss
from erc_verl.seams.engine import DETACHED_ENTROPY_KEY
from erc_verl.algorithm.losses import is_erc_loss_mode
from erc_verl.seams.workers import erc_actor_worker_cls

_ACTOR_ROLES = (Role.Actor, Role.ActorRollout, Role.ActorRolloutRef)


def erc_enabled(config: DictConfig) -> bool:
    return is_erc_loss_mode(config.actor_rollout_ref.actor.policy_loss.get("loss_mode"))


def plugin_actor_loss_enabled(config: DictConfig) -> bool:
    """ERC, or any loss with the opt-in positive-NLL term: the actor workers must run the plugin's actor loss."""
    return needs_plugin_actor_loss(config.actor_rollout_ref.actor)


def use_erc_actor_workers(role_worker_mapping: dict) -> None:
    """Put the ERC mixin in front of the actor worker class verl chose; the ref-only worker stays verl's.

    The mapping holds ``ray.remote(cls)`` (verl builds it so, and unwraps with ``__ray_actor_class__``).
    """
    for role in _ACTOR_ROLES:
        if role in role_worker_mapping:
            verl_cls = getattr(role_worker_mapping[role], "__ray_actor_class__", role_worker_mapping[role])
            role_worker_mapping[role] = ray.remote(erc_actor_worker_cls(verl_cls))


class ERCTrainerV1Mixin:
    """Put in front of any registered V1 trainer (``sync``, ``colocate_async``, ``separate_async``)."""

    def _init_resource_pool_mgr(self):
        super()._init_resource_pool_mgr()
        if plugin_actor_loss_enabled(self.config):
            use_erc_actor_workers(self.role_worker_mapping)

    def _compute_old_log_prob(self, batch, metrics: dict):
        batch = super()._compute_old_log_prob(batch, metrics)
        if not erc_enabled(self.config):
            return batch
        import transfer_queue as tq

        # verl 0.9 stores the old-policy entropy under "entropy"; copy it to the name the ERC loss reads.
        stored = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=["entropy"])
        old_entropy = TensorDict({OLD_ENTROPY_KEY: stored["entropy"]}, batch_size=stored.batch_size)
        return tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id, fields=old_entropy)

    def _update_actor(self, batch, metrics: dict):
        if erc_enabled(self.config):
            batch.extra_info[DETACHED_ENTROPY_KEY] = True
        return super()._update_actor(batch, metrics)


@lru_cache(maxsize=None)
def erc_v1_trainer_cls(trainer_mode: str) -> type:
    """The V1 trainer registered as ``trainer_mode``, with the ERC overrides in front."""
    from verl.trainer.ppo.v1 import get_trainer_cls

    base = get_trainer_cls(trainer_mode)
    if issubclass(base, ERCTrainerV1Mixin):  # looked up while erc_trainer_registered is active
        return base
    return type(f"ERC{base.__name__}", (ERCTrainerV1Mixin, base),
                {"__doc__": f"{base.__name__} with ERC plumbing.", "__module__": __name__})


# What verl 0.9's TaskRunnerV1.run does to pick the trainer; erc_trainer_registered relies on it.
_RUNNER_LOOKUP = "get_trainer_cls(config.trainer.v1.trainer_mode)"


@contextmanager
def erc_trainer_registered(trainer_mode: str):
    """Inside the block, verl's trainer registry answers ``trainer_mode`` with the ERC trainer.

    verl's ``TaskRunnerV1.run`` builds ``get_trainer_cls(config.trainer.v1.trainer_mode)``, and the trainer
    branches on that same string (replay buffer, resume, ``trainer.v1[<mode>]``), so the ERC trainer must be
    found under the user's name, not a new one. Meant for the dedicated task-runner actor process, around
    ``run``; verl's class is put back on exit.
    """
    from verl.trainer.main_ppo import TaskRunnerV1
    from verl.trainer.ppo.v1 import trainer_base

    if _RUNNER_LOOKUP not in inspect.getsource(TaskRunnerV1.__ray_actor_class__.run):
        raise RuntimeError(
            f"verl's TaskRunnerV1.run no longer picks its trainer with {_RUNNER_LOOKUP}; "
            "erc_verl.seams.trainer.erc_trainer_registered must be updated for this verl version."
        )
    erc_cls = erc_v1_trainer_cls(trainer_mode)
    verl_cls = trainer_base.TRAINER_REGISTRY[trainer_mode]
    trainer_base.TRAINER_REGISTRY[trainer_mode] = erc_cls
    try:
        yield erc_cls
    finally:
        trainer_base.TRAINER_REGISTRY[trainer_mode] = verl_cls


class TrainingComplete(Exception):
    """The checkpoint a run resumes from already reached ``total_training_steps``: there is nothing left to train."""


class ERCRayPPOTrainer(RayPPOTrainer):
    """verl's legacy (``trainer.use_v1=False``) trainer with the ERC plumbing.

    ``erc_verl.main_ppo`` builds it for every V0 run, ERC or not, so an ERC run and its baseline share its two
    resume fixes to verl 0.9.1's V0 ``fit`` (its V1 trainers get both right; tests/e2e/test_cluster_path.py):

    - resumed from a checkpoint at ``total_training_steps`` it trained one step past the end and saved it
      (``global_steps += 1`` comes before its last-step check; each restart of a finished job added a step:
      verl-project/verl PR #6232, open);
    - resumed exactly at an epoch boundary it skipped the saved data-loader state ("Next epoch will iterate from
      scratch"), so the sampler, seeded afresh, replayed the first epoch's order where an uninterrupted run draws
      a new one.
    """

    def fit(self):
        try:
            return super().fit()
        except TrainingComplete as done:
            print(f"erc-verl: {done}", flush=True)

    def _load_checkpoint(self):
        """verl's ``fit`` calls this first; past the end, stop before its loop (and before validation)."""
        super()._load_checkpoint()
        if self.global_steps >= self.total_training_steps:
            raise TrainingComplete(
                f"resumed at global step {self.global_steps} of trainer.total_training_steps="
                f"{self.total_training_steps}: training is complete, nothing to do"
            )
        if self.global_steps > 0 and self.global_steps % len(self.train_dataloader) == 0:
            self._continue_data_after_finished_epoch()

    def _continue_data_after_finished_epoch(self) -> None:
        """Load the state verl skipped and close the finished epoch it holds (one pass that yields nothing), so the
        loop's next pass draws the next epoch from the sampler's generator as an uninterrupted run does."""
        trainer = self.config.trainer
        folder = (trainer.resume_from_path if trainer.resume_mode == "resume_path"
                  else os.path.join(os.path.abspath(trainer.default_local_dir), f"global_step_{self.global_steps}"))
        state_path = os.path.join(folder, "data.pt")
        if not os.path.exists(state_path):
            return  # verl said so already ("No dataloader state found")
        self.train_dataloader.load_state_dict(torch.load(state_path, weights_only=False))
        if any(True for _ in self.train_dataloader):
            raise RuntimeError(
                f"{state_path} (global step {self.global_steps}, an epoch boundary) is not the end of an epoch; "
                "erc_verl.seams.trainer.ERCRayPPOTrainer must be updated for this verl / torchdata version."
            )

    def __init__(self, config, *args, role_worker_mapping: dict, **kwargs):
        if plugin_actor_loss_enabled(config):
            role_worker_mapping = dict(role_worker_mapping)
            use_erc_actor_workers(role_worker_mapping)
        super().__init__(config, *args, role_worker_mapping=role_worker_mapping, **kwargs)

    def _compute_old_log_prob(self, batch):
        old_log_prob, mfu = super()._compute_old_log_prob(batch)
        if erc_enabled(self.config):
            # fit() pops "entropys" after logging actor/entropy; keep the same tensor for the update.
            old_log_prob.batch[OLD_ENTROPY_KEY] = old_log_prob.batch["entropys"]
        return old_log_prob, mfu

    def _update_actor(self, batch):
        if erc_enabled(self.config):
            batch.meta_info[DETACHED_ENTROPY_KEY] = True
        return super()._update_actor(batch)
