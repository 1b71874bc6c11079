"""The Entropy Ratio Clipping rule (paper eq. 8-9), written once for every base loss.

A response token keeps its policy gradient only while the entropy of the current policy stays
close to the entropy of the policy that sampled it:

    rho_t = (H(pi_theta, t) + 1e-8) / (H(pi_old, t) + 1e-8),   keep_t = low < rho_t < high   (strict)

Outside the band the token's loss term keeps its value but contributes no gradient, and it still
counts in the aggregation denominator. We get exactly that by detaching the token's *log-prob*
before the base loss sees it: for token-level losses (PPO-clip, GPPO, ...) each loss term depends on
its own log-prob only, so this equals the reference's ``where(keep, pg_losses, pg_losses.detach())``,
and it lets the same gate sit in front of any registered verl loss (GSPO, CISPO, ...).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import torch

ENTROPY_EPS = 1e-8
ACTOR = "actor_rollout_ref.actor"  # where the band's keys live in verl's config
# erc_keep_mask's metrics: averages over the micro-batch's response tokens, then its extremes.
ERC_TOKEN_MEAN_METRICS = ("actor/erc_clipfrac", "actor/erc_clipfrac_upper", "actor/erc_clipfrac_lower",
                          "actor/entropy_ratio_mean", "actor/entropy_ratio_std")
ERC_EXTREME_METRICS = ("actor/entropy_ratio_min", "actor/entropy_ratio_max")


@dataclass(frozen=True)
class ERCBounds:
    """The open interval (low, high) in which the entropy ratio keeps a token's gradient.

    The one check of the ERC band: the actor config, the losses, the diagnostics and the demo's
    --erc-low/--erc-high all build one, so a band is refused by the same rule wherever it comes from; ``keys``
    names the two settings in the refusal (the demo passes its flags).
    """

    low: float
    high: float
    keys: tuple[str, str] = field(default=(f"{ACTOR}.entropy_mask_low", f"{ACTOR}.entropy_mask_high"),
                                  compare=False, repr=False)

    def __post_init__(self):
        if self.low is None or self.high is None:
            raise ValueError(
                "ERC loss selected but actor_rollout_ref.actor.entropy_mask_low / entropy_mask_high are not set. "
                "Launch with `python -m erc_verl.main_ppo` (its config defines them, paper: 0.95 / 1.05) or add "
                "both keys to the actor config you pass to the loss."
            )
        low_key, high_key = self.keys
        for key, value in ((low_key, self.low), (high_key, self.high)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real):  # numpy scalars are Real too
                raise ValueError(f"{key} must be a number, got {value!r}")
        if not (0.0 <= self.low < self.high):
            raise ValueError(
                f"ERC needs 0 <= {low_key.rsplit('.', 1)[-1]} < {high_key.rsplit('.', 1)[-1]}, got low={self.low}, "
                f"high={self.high}. Set {low_key} / {high_key} (paper: 0.95 / 1.05)."
            )


def entropy_ratio(entropy: torch.Tensor, old_entropy: torch.Tensor) -> torch.Tensor:
    """rho = (H + eps) / (H_old + eps) in float32, with no graph (it only gates).

    Entropies are clamped at 0 first: entropy_from_logits can return -1e-7 on near one-hot
    distributions, which would otherwise make rho negative and drop the token by rounding alone.
    """
    with torch.no_grad():
        current = entropy.detach().float().clamp_min(0.0)
        old = old_entropy.detach().float().clamp_min(0.0)
        return (current + ENTROPY_EPS) / (old + ENTROPY_EPS)


def erc_keep_mask(
    entropy: torch.Tensor, old_entropy: torch.Tensor, response_mask: torch.Tensor, bounds: ERCBounds
) -> tuple[torch.Tensor, dict[str, float]]:
    """Which response tokens keep their gradient, and what the gate did (metrics under ``actor/``)."""
    if entropy.shape != old_entropy.shape or entropy.shape != response_mask.shape:
        raise ValueError(
            f"ERC: entropy {tuple(entropy.shape)}, old_entropy {tuple(old_entropy.shape)} and response_mask "
            f"{tuple(response_mask.shape)} must have the same (batch, response_length) shape."
        )
    rho = entropy_ratio(entropy, old_entropy)
    valid = response_mask.bool()
    above = rho >= bounds.high
    below = rho <= bounds.low
    keep = (rho > bounds.low) & (rho < bounds.high) & valid

    # Every key, even for a micro-batch without response tokens (verl pads with such samples): verl's
    # Metric.aggregate_dp needs the same number of values from every rank. The token means of an empty
    # micro-batch are 0 (the actor loss weights them by token count: ERC_TOKEN_MEAN_METRICS), its min and
    # max are the empty set's +inf / -inf, which min / max over the other micro-batches ignore.
    n_valid = valid.sum().clamp_min(1).float()
    mean = torch.where(valid, rho, 0.0).sum() / n_valid
    std = (torch.where(valid, rho - mean, 0.0).square().sum() / n_valid).sqrt()
    if rho.numel():
        lowest, highest = torch.where(valid, rho, math.inf).amin(), torch.where(valid, rho, -math.inf).amax()
    else:
        lowest, highest = rho.new_tensor(math.inf), rho.new_tensor(-math.inf)
    values = [(~keep & valid).sum() / n_valid, (above & valid).sum() / n_valid, (below & valid).sum() / n_valid,
              mean, std, lowest, highest]
    # one device-to-host copy for all metrics, not one sync per .item()
    metrics = dict(zip(ERC_TOKEN_MEAN_METRICS + ERC_EXTREME_METRICS, torch.stack(values).tolist()))
    return keep, metrics


def gate_log_prob(log_prob: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Same values as ``log_prob``; gradient flows only through the kept tokens."""
    return torch.where(keep, log_prob, log_prob.detach())
