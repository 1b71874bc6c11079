"""Actor config dataclasses that carry the ERC keys through verl's ``omega_conf_to_dataclass``.

verl workers turn ``actor_rollout_ref.actor`` into the class named by its ``_target_``; stock
``FSDPActorConfig`` rejects unknown keys. Our Hydra config points ``_target_`` here, so
``entropy_mask_low/high`` survive the conversion in every worker and bad values fail at
construction, which the entry point does on the driver before any worker starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from typing import Optional

from verl.base_config import BaseConfig
from verl.workers.config import FSDPActorConfig

from erc_verl.algorithm.gate import ERCBounds
from erc_verl.algorithm.losses import erc_base_loss_mode, is_erc_loss_mode


DIAGNOSTICS = "actor_rollout_ref.actor.erc_diagnostics"


@dataclass
class ERCDiagnosticsConfig(BaseConfig):
    """Opt-in token sampling for the paper's scatter plots (see erc_verl.seams.diagnostics).

    Args:
        dir: Directory for per-rank sample files; None turns diagnostics off.
        tokens_per_step: Response tokens sampled at random per loss call (micro-batch).
        max_records: Cap on records one process writes in total (bounds disk use).
        seed: Seed of the sampler (combined with the rank).
    """

    dir: Optional[str] = None
    tokens_per_step: int = 256
    max_records: int = 200_000
    seed: int = 0

    def __post_init__(self):
        if self.dir is not None and not isinstance(self.dir, str):
            raise ValueError(f"{DIAGNOSTICS}.dir must be a string (a directory) or null, got {self.dir!r}")
        for name in ("tokens_per_step", "max_records", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{DIAGNOSTICS}.{name} must be an integer, got {value!r}")
        if self.tokens_per_step <= 0 or self.max_records <= 0:
            raise ValueError(
                f"{DIAGNOSTICS}.tokens_per_step and .max_records must be positive, got "
                f"{self.tokens_per_step} and {self.max_records}."
            )


@dataclass
class ERCFSDPActorConfig(FSDPActorConfig):
    """verl's FSDP actor config plus the ERC keys (reference names kept for drop-in overrides).

    Args:
        entropy_mask_low: A token keeps its gradient only if entropy ratio > this (paper: 0.95).
        entropy_mask_high: ... and entropy ratio < this (paper: 1.05).
        erc_base_loss_mode: With ``policy_loss.loss_mode=erc``: the registered verl loss to gate.
        erc_diagnostics: Token sampling for plots; off unless ``erc_diagnostics.dir`` is set.
        positive_nll_coeff: Weight of the reference fork's extra NLL term on responses scored 1 (its
            ``postive_loss_coeff``, 0.1 in its scripts; not in the paper). 0 = the paper as written.
    """

    entropy_mask_low: float = 0.95
    entropy_mask_high: float = 1.05
    erc_base_loss_mode: Optional[str] = None
    erc_diagnostics: ERCDiagnosticsConfig = field(default_factory=ERCDiagnosticsConfig)
    positive_nll_coeff: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        ERCBounds(self.entropy_mask_low, self.entropy_mask_high)
        coeff = self.positive_nll_coeff
        if isinstance(coeff, bool) or not isinstance(coeff, (int, float)) or not 0.0 <= coeff < float("inf"):
            raise ValueError(
                f"actor_rollout_ref.actor.positive_nll_coeff must be finite and >= 0, got {coeff!r}."
            )
        loss_mode = self.policy_loss.get("loss_mode", "vanilla")
        if is_erc_loss_mode(loss_mode):
            erc_base_loss_mode(loss_mode, self)
        if isinstance(self.erc_diagnostics, dict):
            object.__setattr__(self, "erc_diagnostics", ERCDiagnosticsConfig(**self.erc_diagnostics))


def erc_actor_keys() -> list[str]:
    """The keys ERCFSDPActorConfig adds to verl's FSDPActorConfig (a nested dataclass's keys dotted)."""
    base = {f.name for f in fields(FSDPActorConfig)}
    keys = []
    for f in fields(ERCFSDPActorConfig):
        if f.name not in base and is_dataclass(f.default_factory):
            keys += [f"{f.name}.{sub.name}" for sub in fields(f.default_factory) if sub.init and sub.name != "_target_"]
        elif f.name not in base:
            keys.append(f.name)
    return keys


def validate_erc_config(config) -> None:
    """Refuse, on the driver and before any worker starts, what would fail or silently degrade later."""
    from hydra.errors import InstantiationException

    from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY
    from verl.utils.config import omega_conf_to_dataclass

    actor = config.actor_rollout_ref.actor
    loss_mode = actor.policy_loss.get("loss_mode", "vanilla")
    if loss_mode not in POLICY_LOSS_REGISTRY:
        raise ValueError(
            f"actor_rollout_ref.actor.policy_loss.loss_mode={loss_mode!r} is not a registered verl policy loss; "
            f"choose one of {sorted(POLICY_LOSS_REGISTRY)}."
        )
    if is_erc_loss_mode(loss_mode) and actor.get("strategy") not in ("fsdp", "fsdp2"):  # the ERC seam is FSDP's
        raise ValueError(
            f"ERC losses support FSDP actors (actor_rollout_ref.actor.strategy=fsdp|fsdp2), got "
            f"actor_rollout_ref.actor.strategy={actor.get('strategy')!r} with loss_mode={loss_mode!r}."
        )
    # Builds ERCFSDPActorConfig exactly as the workers will: bad bounds / base loss fail here.
    try:
        actor_config = omega_conf_to_dataclass(actor)
    except InstantiationException as error:  # surface our message, not Hydra's wrapper
        if isinstance(error.__cause__, ValueError):
            raise ValueError(str(error.__cause__)) from error
        raise
    if not isinstance(actor_config, ERCFSDPActorConfig):
        raise ValueError(
            "actor_rollout_ref.actor._target_ must be erc_verl.algorithm.config.ERCFSDPActorConfig (the ERC keys are lost "
            f"otherwise), got {type(actor_config).__name__}. Use `python -m erc_verl.main_ppo`, whose config sets it."
        )
    distillation = config.get("distillation") or {}
    if actor_config.positive_nll_coeff > 0 and distillation.get("enabled", False):
        raise ValueError("actor_rollout_ref.actor.positive_nll_coeff > 0 does not support distillation; set it to 0.")
    if actor_config.positive_nll_coeff > 0 and actor.get("strategy") not in ("fsdp", "fsdp2"):  # FSDP loss scaling
        raise ValueError(
            "actor_rollout_ref.actor.positive_nll_coeff > 0 supports FSDP actors (strategy=fsdp|fsdp2), got "
            f"actor_rollout_ref.actor.strategy={actor.get('strategy')!r}."
        )
    if actor_config.erc_diagnostics.dir and not is_erc_loss_mode(loss_mode):  # it would write nothing
        raise ValueError(
            "actor_rollout_ref.actor.erc_diagnostics.dir records ERC's entropy ratios, which only ERC losses compute "
            f"(grpo_erc, gppo_erc, erc); got loss_mode={loss_mode!r}. Unset erc_diagnostics.dir for this run."
        )
    if not is_erc_loss_mode(loss_mode):
        return
    rollout_correction = config.algorithm.get("rollout_correction") or {}
    if rollout_correction.get("bypass_mode", False):
        raise ValueError(
            f"loss_mode={loss_mode!r} needs the old policy's entropy from compute_log_prob, which "
            "algorithm.rollout_correction.bypass_mode=True skips. Set bypass_mode=False or use a non-ERC loss."
        )
    if distillation.get("enabled", False):
        raise ValueError(f"loss_mode={loss_mode!r} does not support distillation; set distillation.enabled=False.")
