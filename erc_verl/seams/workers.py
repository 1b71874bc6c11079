"""ERC on top of whichever actor worker verl picked, with the plugin's actor loss when ERC or the positive-NLL
term (``positive_nll_coeff > 0``) is selected, and the detached-entropy engine seam when ERC is.

verl chooses the actor worker class per trainer (``ActorRolloutRefWorker``; ``DetachActorWorker`` in
``separate_async``, which adds CPU save/restore for decoupled PPO). ERC only changes ``init_model``, so it is a
mixin put in front of verl's class, not a replacement for it.
"""

from __future__ import annotations

from functools import lru_cache, partial

from verl.single_controller.base.decorator import MAGIC_ATTR, Dispatch, register
from verl.workers.engine_workers import ActorRolloutRefWorker
from verl.workers.utils.losses import ppo_loss as verl_ppo_loss

from erc_verl.seams.actor_loss import needs_plugin_actor_loss, ppo_loss_with_entropy
from erc_verl.seams.engine import enable_detached_entropy
from erc_verl.algorithm.losses import is_erc_loss_mode


class ERCActorWorkerMixin:
    """Identical to the verl worker it is mixed into unless the actor's loss is an ERC loss or
    ``positive_nll_coeff > 0``."""

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def init_model(self):
        super().init_model()
        if not self._is_actor or not needs_plugin_actor_loss(self.config.actor):
            return
        if self.distillation_enabled:
            raise ValueError(
                "ERC losses and positive_nll_coeff > 0 do not support distillation; set distillation.enabled=False, "
                "or pick a non-ERC loss with positive_nll_coeff=0."
            )
        stock_loss = self.loss_fn
        if not (isinstance(stock_loss, partial) and stock_loss.func is verl_ppo_loss):
            raise RuntimeError(
                "ERC: verl's actor worker no longer binds verl.workers.utils.losses.ppo_loss in init_model; "
                "erc_verl/seams/workers.py must be updated for this verl version."
            )
        self.loss_fn = partial(ppo_loss_with_entropy, config=stock_loss.keywords["config"])
        self.actor.set_loss_fn(self.loss_fn)
        if is_erc_loss_mode(self.config.actor.policy_loss.get("loss_mode")):
            # verl's trainers ask the update for graph entropy when `calculate_entropy or entropy_coeff != 0`; the
            # update then uses verl's entropy function, and the old-policy pass must use the same one
            graph_entropy = self.config.actor.get("calculate_entropy", False) or self.config.actor.entropy_coeff != 0
            enable_detached_entropy(self.actor.engine, gate_entropy_for_old_policy=not graph_entropy)


@lru_cache(maxsize=None)
def erc_actor_worker_cls(verl_cls: type) -> type:
    """``verl_cls`` (a plain class, not a Ray remote) with the ERC ``init_model`` in front."""
    if issubclass(verl_cls, ERCActorWorkerMixin):
        return verl_cls
    if not issubclass(verl_cls, ActorRolloutRefWorker):
        raise TypeError(f"ERC wraps verl's ActorRolloutRefWorker and its subclasses, got {verl_cls.__name__}.")
    # verl's worker group dispatches init_model by its @register attributes: ours must be verl's.
    ours, verls = (getattr(c.init_model, MAGIC_ATTR, None) for c in (ERCActorWorkerMixin, verl_cls))
    if ours != verls:
        raise RuntimeError(
            f"ERC: {verl_cls.__name__}.init_model is registered with {verls}, erc_verl/seams/workers.py with {ours}; "
            "update ERCActorWorkerMixin for this verl version."
        )
    return type(f"ERC{verl_cls.__name__}", (ERCActorWorkerMixin, verl_cls),
                {"__doc__": f"{verl_cls.__name__} with ERC's init_model.", "__module__": __name__})


ERCActorRolloutRefWorker = erc_actor_worker_cls(ActorRolloutRefWorker)
