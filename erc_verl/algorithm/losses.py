"""Policy losses registered in verl's registry: ``gppo``, ``grpo_erc``, ``gppo_erc`` and ``erc``.

verl imports this module on ``import verl`` in every process (the ``verl.plugins`` entry point), so
``actor_rollout_ref.actor.policy_loss.loss_mode=grpo_erc`` resolves in Ray workers too. Importing it
again only re-registers the same functions.

ERC losses take verl's standard keyword arguments plus ``entropy=`` (current policy, per response
token) and ``old_entropy=`` (the policy that produced ``old_log_prob``). verl's own ``ppo_loss`` does
not pass entropies; ``erc_verl.seams.actor_loss.ppo_loss_with_entropy`` does, and ``erc_verl.main_ppo``
installs it in the actor workers.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY, agg_loss, get_policy_loss_fn, register_policy_loss
from verl.utils import torch_functional as verl_F

from erc_verl.algorithm.gate import ERCBounds, erc_keep_mask, gate_log_prob

# loss_mode -> base loss the ERC gate sits in front of (None: read `erc_base_loss_mode` from the config).
ERC_LOSS_MODES: dict[str, Optional[str]] = {"grpo_erc": "vanilla", "gppo_erc": "gppo", "erc": None}


def is_erc_loss_mode(loss_mode: str | None) -> bool:
    return loss_mode in ERC_LOSS_MODES


def config_value(config: Any, key: str, default: Any = None) -> Any:
    """Read a key from verl's actor dataclass or an OmegaConf/dict config alike; unset or None -> default."""
    if config is None:
        return default
    value = config.get(key, default) if hasattr(config, "get") else getattr(config, key, default)
    return default if value is None else value


def erc_bounds_from_config(config: Any) -> ERCBounds:
    """The actor config's ERC band, checked by :class:`ERCBounds` (unset keys included)."""
    return ERCBounds(config_value(config, "entropy_mask_low"), config_value(config, "entropy_mask_high"))


def erc_base_loss_mode(loss_mode: str, config: Any) -> str:
    base = ERC_LOSS_MODES[loss_mode] or config_value(config, "erc_base_loss_mode")
    if not base:
        raise ValueError(
            "loss_mode=erc gates another registered verl loss: set actor_rollout_ref.actor.erc_base_loss_mode "
            "(e.g. vanilla, gppo, gspo, cispo)."
        )
    if is_erc_loss_mode(base):
        raise ValueError(f"actor_rollout_ref.actor.erc_base_loss_mode={base!r} is itself an ERC loss; name a base loss.")
    if base not in POLICY_LOSS_REGISTRY:
        names = sorted(name for name in POLICY_LOSS_REGISTRY if not is_erc_loss_mode(name))
        raise ValueError(
            f"actor_rollout_ref.actor.erc_base_loss_mode={base!r} is not a registered verl policy loss; "
            f"choose one of {', '.join(names)}."
        )
    return base


@register_policy_loss("gppo")
def compute_policy_loss_gppo(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """GPPO (paper eq. 7): PPO-clip's values, but clipped tokens keep a gradient scaled by (1±eps)/sg(ratio).

    Where PPO-clip would use the constant ``clip(ratio)``, GPPO uses ``(1±eps) * ratio / sg(ratio)``:
    equal in value, with gradient ``(1±eps) * A * dlogp``. The dual-clip bound ``clip_ratio_c`` for
    negative advantages caps the loss exactly as in verl's ``vanilla``.
    """
    clip_ratio = config_value(config, "clip_ratio")
    eps_low = config_value(config, "clip_ratio_low", clip_ratio)
    eps_high = config_value(config, "clip_ratio_high", clip_ratio)
    clip_ratio_c = config_value(config, "clip_ratio_c", 3.0)
    if clip_ratio_c <= 1.0:
        raise ValueError(f"actor_rollout_ref.actor.clip_ratio_c must be > 1.0 for dual-clip, got {clip_ratio_c}.")

    log_ratio = torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0)
    ratio = torch.exp(log_ratio)
    ppo_kl = verl_F.masked_mean(-log_ratio, response_mask)

    ratio_sg = ratio.detach()
    upper, lower = 1.0 + eps_high, 1.0 - eps_low
    preserved = torch.where(
        ratio_sg > upper, upper / ratio_sg * ratio, torch.where(ratio_sg < lower, lower / ratio_sg * ratio, ratio)
    )
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * preserved
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    pg_clipfrac = verl_F.masked_mean(torch.gt(pg_losses2, pg_losses1).float(), response_mask)

    pg_losses3 = -advantages * clip_ratio_c
    clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
    pg_clipfrac_lower = verl_F.masked_mean(
        torch.gt(clip_pg_losses1, pg_losses3) * (advantages < 0).float(), response_mask
    )
    pg_losses = torch.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)
    if rollout_is_weights is not None:
        pg_losses = pg_losses * rollout_is_weights

    global_batch_info = config_value(config, "global_batch_info", None) or {}
    pg_loss = agg_loss(loss_mat=pg_losses, loss_mask=response_mask, loss_agg_mode=loss_agg_mode, **global_batch_info)
    metrics = {
        "actor/pg_clipfrac": pg_clipfrac.detach().item(),
        "actor/ppo_kl": ppo_kl.detach().item(),
        "actor/pg_clipfrac_lower": pg_clipfrac_lower.detach().item(),
    }
    return pg_loss, metrics


def _make_erc_loss(loss_mode: str) -> Callable[..., tuple[torch.Tensor, dict[str, Any]]]:
    def compute_policy_loss_with_erc(
        old_log_prob: torch.Tensor,
        log_prob: torch.Tensor,
        advantages: torch.Tensor,
        response_mask: torch.Tensor,
        loss_agg_mode: str = "token-mean",
        config: Any = None,
        rollout_is_weights: torch.Tensor | None = None,
        entropy: torch.Tensor | None = None,
        old_entropy: torch.Tensor | None = None,
        **base_kwargs: Any,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        if entropy is None or old_entropy is None:
            missing = " and ".join(n for n, t in (("entropy", entropy), ("old_entropy", old_entropy)) if t is None)
            raise ValueError(
                f"policy loss {loss_mode!r} (Entropy Ratio Clipping) was called without {missing}. "
                "Stock verl's ppo_loss does not pass entropies: launch with `python -m erc_verl.main_ppo`, "
                "or bind `erc_verl.seams.actor_loss.ppo_loss_with_entropy` as the actor loss "
                "(see README, 'ERC in your own verl run'). Refusing to run as plain PPO."
            )
        keep, erc_metrics = erc_keep_mask(entropy, old_entropy, response_mask, erc_bounds_from_config(config))
        base_fn = get_policy_loss_fn(erc_base_loss_mode(loss_mode, config))
        pg_loss, metrics = base_fn(
            old_log_prob=old_log_prob,
            log_prob=gate_log_prob(log_prob, keep),
            advantages=advantages,
            response_mask=response_mask,
            loss_agg_mode=loss_agg_mode,
            config=config,
            rollout_is_weights=rollout_is_weights,
            **base_kwargs,
        )
        return pg_loss, {**metrics, **erc_metrics}

    compute_policy_loss_with_erc.__name__ = f"compute_policy_loss_{loss_mode}"
    compute_policy_loss_with_erc.__doc__ = (
        f"{loss_mode}: the ERC gate (erc_verl.algorithm.gate) in front of "
        f"{ERC_LOSS_MODES[loss_mode] or 'the loss named by `erc_base_loss_mode`'}."
    )
    return compute_policy_loss_with_erc


for _mode in ERC_LOSS_MODES:
    register_policy_loss(_mode)(_make_erc_loss(_mode))

compute_policy_loss_grpo_erc = get_policy_loss_fn("grpo_erc")
compute_policy_loss_gppo_erc = get_policy_loss_fn("gppo_erc")
