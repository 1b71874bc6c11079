"""The actor loss that hands entropies to the policy loss (verl 0.9's ``ppo_loss`` plus two tensors).

verl's ``verl.workers.utils.losses.ppo_loss`` calls the registered policy loss with a fixed set of
arguments and no entropies. For ERC losses this function does the same work with ``entropy=``
(current policy, from the model output of the update micro-batch) and ``old_entropy=`` (the field the
ERC trainer adds to the batch from verl's own ``compute_log_prob`` pass). Every other loss mode is
delegated to verl's ``ppo_loss`` untouched. ``tests/seams/test_actor_loss.py`` checks that the ERC path with
bounds (0, inf) reproduces verl's ``ppo_loss`` exactly, so a change in verl's loss shows up as a failure.

``positive_nll_coeff > 0`` (default 0, the paper as written) adds the reference fork's undocumented extra
loss (its ``postive_loss_coeff``) to any loss mode, ERC or not: see ``positive_nll_loss``.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from tensordict import TensorDict

from verl.trainer.ppo.core_algos import agg_loss, get_policy_loss_fn, kl_penalty
from verl.utils.metric import AggregationType, Metric
from verl.workers.utils.losses import ppo_loss as verl_ppo_loss
from verl.workers.utils.padding import no_padding_2_padding

from erc_verl.seams.diagnostics import TokenDiagnostics, maybe_diagnostics
from erc_verl.algorithm.gate import ERC_EXTREME_METRICS, ERC_TOKEN_MEAN_METRICS, erc_keep_mask
from erc_verl.algorithm.losses import config_value, erc_bounds_from_config, is_erc_loss_mode

OLD_ENTROPY_KEY = "old_entropy"
# The reward function's score at each response token (its last token carries the score, pre-KL): written
# by verl 0.9.1's agent/reward loop and present in the update batch of both trainers (V1: TransferQueue
# field, nested; V0: DataProto batch, padded). It is the fork's ``token_level_rewards`` when KL-in-reward is off.
SCORE_KEY = "rm_scores"

# The gate's extremes; every other policy metric aggregates as verl's ppo_loss does it (MEAN).
_EXTREME_AGGREGATION = dict(zip(ERC_EXTREME_METRICS, (AggregationType.MIN, AggregationType.MAX)))
_diagnostics_writers: dict[tuple, Optional[TokenDiagnostics]] = {}


def _diagnostics(config: Any) -> Optional[TokenDiagnostics]:
    """This process's token-diagnostics writer, or None when ``erc_diagnostics.dir`` is unset (the default)."""
    section = config.get("erc_diagnostics", None)
    if section is None or not section.get("dir"):
        return None
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    key = (section.get("dir"), rank)
    if key not in _diagnostics_writers:
        _diagnostics_writers[key] = maybe_diagnostics(section, rank=rank)
    return _diagnostics_writers[key]


def _policy_metrics(metrics: dict[str, Any], token_share: Optional[float] = None) -> dict[str, Metric]:
    """Per-micro-batch policy metrics; the gate's extremes aggregate as extremes, the rest as means (as verl does).

    ``token_share`` (this micro-batch's response tokens * dp_size / the mini-batch's tokens over all ranks)
    makes the gate's token averages token-weighted: under verl's SUM aggregation (mean over ranks, sum over
    micro-batches) they add up to the average over the mini-batch's response tokens, and a micro-batch of
    padding adds 0 instead of pulling the mean towards 0.
    """
    out = {}
    for key, value in metrics.items():
        if token_share is not None and key in ERC_TOKEN_MEAN_METRICS:
            out[key] = Metric(value=value * token_share, aggregation=AggregationType.SUM)
        else:
            out[key] = Metric(value=value, aggregation=_EXTREME_AGGREGATION.get(key, AggregationType.MEAN))
    return out


def positive_nll_coeff(config: Any) -> float:
    return float(config_value(config, "positive_nll_coeff", 0.0))


def needs_plugin_actor_loss(actor_config: Any) -> bool:
    """Whether the actor must run ``ppo_loss_with_entropy``: an ERC loss, or the opt-in positive-NLL term."""
    loss_mode = config_value(actor_config, "policy_loss", {}).get("loss_mode", "vanilla")
    return is_erc_loss_mode(loss_mode) or positive_nll_coeff(actor_config) > 0


def _metric_aggregation(config: Any, data: TensorDict) -> AggregationType:
    """SUM when the loss is normalised by global batch info (verl's rule in ``ppo_loss``), else MEAN."""
    global_normalisation = (
        data["dp_size"] > 1
        or data["batch_num_tokens"] is not None
        or data["global_batch_size"] is not None
        or config.loss_scale_factor is not None
    )
    return AggregationType.SUM if global_normalisation else AggregationType.MEAN


def positive_nll_loss(log_prob: torch.Tensor, scores: torch.Tensor, response_mask: torch.Tensor, config: Any,
                      data: TensorDict) -> torch.Tensor:
    """The reference fork's extra term (``postive_loss_coeff``; not in the paper), aggregated as the fork did.

    Negative log-likelihood of the response tokens of the responses whose score sums to exactly 1, aggregated
    with verl's ``agg_loss`` (``loss_agg_mode``) over those tokens of this micro-batch only, then weighted
    by the micro-batch's share of the mini-batch's responses (the fork's ``loss_scale_factor``; here
    ``micro_bsz * dp_size / global_batch_size``, since verl 0.9.1 sums micro-batch losses and averages
    gradients over data-parallel ranks). Zero in a micro-batch without such responses.
    """
    positive = scores.sum(dim=-1) == 1.0
    mask = response_mask & positive[:, None]
    if not bool(mask.any()):  # as the fork: no positive response, no term (and no 0/0)
        return log_prob.sum() * 0.0
    nll = agg_loss(loss_mat=-log_prob, loss_mask=mask, loss_agg_mode=config.loss_agg_mode)
    if data["global_batch_size"] is None:
        return nll
    return nll * (log_prob.shape[0] * data["dp_size"] / data["global_batch_size"])


def _add_positive_nll(policy_loss, metrics: dict, config: Any, model_output: dict, data: TensorDict,
                      log_prob: Optional[torch.Tensor] = None, response_mask: Optional[torch.Tensor] = None):
    """``policy_loss + positive_nll_coeff * positive_nll_loss``; unchanged (same objects) when the coefficient is 0.

    ``log_prob`` / ``response_mask``: the padded tensors when the caller already has them (the ERC path)."""
    coeff = positive_nll_coeff(config)
    if coeff == 0:
        return policy_loss, metrics
    if SCORE_KEY not in data.keys():
        raise RuntimeError(
            f"positive_nll_coeff={coeff} needs each response's reward score (field {SCORE_KEY!r}) in the update "
            "batch; verl 0.9.1's reward loop writes it. Set actor_rollout_ref.actor.positive_nll_coeff=0 to run without."
        )
    if log_prob is None:
        padded = data.select("response_mask", SCORE_KEY).to_padded_tensor()
        log_prob = no_padding_2_padding(model_output["log_probs"], data)
        response_mask = padded["response_mask"].to(bool)
        scores = padded[SCORE_KEY]
    else:
        scores = data.select(SCORE_KEY).to_padded_tensor()[SCORE_KEY]
    term = positive_nll_loss(log_prob, scores, response_mask, config, data)
    metrics["actor/positive_nll_loss"] = Metric(value=term.detach(), aggregation=_metric_aggregation(config, data))
    return policy_loss + coeff * term, metrics


def ppo_loss_with_entropy(config: Any, model_output: dict, data: TensorDict, dp_group=None):
    """verl's actor PPO loss, passing ``entropy`` and ``old_entropy`` to ERC policy losses, plus the opt-in
    positive-NLL term (``positive_nll_coeff``) for any loss."""
    loss_mode = config.policy_loss.get("loss_mode", "vanilla")
    if not is_erc_loss_mode(loss_mode):
        policy_loss, metrics = verl_ppo_loss(config, model_output, data, dp_group)
        return _add_positive_nll(policy_loss, metrics, config, model_output, data)

    if model_output.get("entropy") is None:
        raise RuntimeError(
            f"loss_mode={loss_mode!r} needs the current policy's entropy, but the actor engine did not compute it. "
            "The ERC worker asks for it via the micro-batch flag set by the ERC trainer: launch with "
            "`python -m erc_verl.main_ppo`, or set actor_rollout_ref.actor.calculate_entropy=True."
        )
    if OLD_ENTROPY_KEY not in data.keys():
        raise RuntimeError(
            f"loss_mode={loss_mode!r} needs the old policy's entropy (field {OLD_ENTROPY_KEY!r}) in the update batch. "
            "The ERC trainer carries it from compute_log_prob: launch with `python -m erc_verl.main_ppo`. "
            "With algorithm.rollout_correction.bypass_mode=True no old entropy exists; ERC cannot run there."
        )

    log_prob = no_padding_2_padding(model_output["log_probs"], data)
    entropy = no_padding_2_padding(model_output["entropy"], data)

    config.global_batch_info["dp_size"] = data["dp_size"]
    config.global_batch_info["batch_num_tokens"] = data["batch_num_tokens"]
    config.global_batch_info["global_batch_size"] = data["global_batch_size"]
    config.global_batch_info["loss_scale_factor"] = config.loss_scale_factor
    metric_aggregation = _metric_aggregation(config, data)

    fields = ["response_mask", "old_log_probs", "advantages", OLD_ENTROPY_KEY]
    fields += [key for key in ("rollout_is_weights", "ref_log_prob") if key in data]
    padded = data.select(*fields).to_padded_tensor()
    response_mask = padded["response_mask"].to(bool)

    pg_loss, pg_metrics = get_policy_loss_fn(loss_mode)(
        old_log_prob=padded["old_log_probs"],
        log_prob=log_prob,
        advantages=padded["advantages"],
        response_mask=response_mask,
        loss_agg_mode=config.loss_agg_mode,
        config=config,
        rollout_is_weights=padded.get("rollout_is_weights", None),
        entropy=entropy,
        old_entropy=padded[OLD_ENTROPY_KEY],
    )

    diagnostics = _diagnostics(config)
    if diagnostics is not None:
        keep, _ = erc_keep_mask(entropy, padded[OLD_ENTROPY_KEY], response_mask, erc_bounds_from_config(config))
        diagnostics.record(log_prob=log_prob.detach(), old_log_prob=padded["old_log_probs"], entropy=entropy,
                           old_entropy=padded[OLD_ENTROPY_KEY], advantages=padded["advantages"],
                           response_mask=response_mask, keep=keep, config=config)

    # verl 0.9's engines always set batch_num_tokens (all-reduced over dp); without it, plain means
    token_share = None
    if data["batch_num_tokens"]:
        token_share = float(response_mask.sum()) * data["dp_size"] / data["batch_num_tokens"]
    metrics: dict[str, Any] = _policy_metrics(pg_metrics, token_share)
    metrics["actor/pg_loss"] = Metric(value=pg_loss, aggregation=metric_aggregation)
    policy_loss = pg_loss

    entropy_loss = agg_loss(
        loss_mat=entropy, loss_mask=response_mask, loss_agg_mode=config.loss_agg_mode, **config.global_batch_info
    )
    if config.entropy_coeff != 0:
        policy_loss = policy_loss - config.entropy_coeff * entropy_loss
    metrics["actor/entropy_loss"] = Metric(value=entropy_loss.detach(), aggregation=metric_aggregation)

    if config.use_kl_loss:
        kld = kl_penalty(logprob=log_prob, ref_logprob=padded["ref_log_prob"], kl_penalty=config.kl_loss_type)
        kl_loss = agg_loss(
            loss_mat=kld, loss_mask=response_mask, loss_agg_mode=config.loss_agg_mode, **config.global_batch_info
        )
        policy_loss = policy_loss + kl_loss * config.kl_loss_coef
        metrics["kl_loss"] = Metric(value=kl_loss, aggregation=metric_aggregation)
        metrics["kl_coef"] = config.kl_loss_coef

    return _add_positive_nll(policy_loss, metrics, config, model_output, data, log_prob, response_mask)
