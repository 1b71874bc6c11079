"""verl's actor worker, with the ERC actor loss and the detached-entropy engine seam when ERC is selected."""

from __future__ import annotations

from functools import partial

from verl.single_controller.base.decorator import Dispatch, register
from verl.workers.engine_workers import ActorRolloutRefWorker
from verl.workers.utils.losses import ppo_loss as verl_ppo_loss

from erc_verl.actor_loss import ppo_loss_with_entropy
from erc_verl.engine import enable_detached_entropy
from erc_verl.losses import is_erc_loss_mode


class ERCActorRolloutRefWorker(ActorRolloutRefWorker):
    """Identical to verl's worker unless the actor's ``policy_loss.loss_mode`` is an ERC loss."""

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def init_model(self):
        super().init_model()
        if not self._is_actor or not is_erc_loss_mode(self.config.actor.policy_loss.get("loss_mode")):
            return
        if self.distillation_enabled:
            raise ValueError("ERC losses do not support distillation; disable `distillation` or pick a non-ERC loss.")
        stock_loss = self.loss_fn
        if not (isinstance(stock_loss, partial) and stock_loss.func is verl_ppo_loss):
            raise RuntimeError(
                "ERC: verl's actor worker no longer binds verl.workers.utils.losses.ppo_loss in init_model; "
                "erc_verl/workers.py must be updated for this verl version."
            )
        self.loss_fn = partial(ppo_loss_with_entropy, config=stock_loss.keywords["config"])
        self.actor.set_loss_fn(self.loss_fn)
        enable_detached_entropy(self.actor.engine)
