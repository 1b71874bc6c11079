"""One arm of the demo: GRPO-style rollouts and off-policy mini-batch updates with a registered verl loss.

The loop follows verl's PPO trainer step by step, at toy scale:

1. sample ``n`` responses per prompt at temperature 1 with the current policy;
2. score them with ``erc_verl.reward.compute_score`` and turn scores into advantages with verl's own
   ``compute_grpo_outcome_advantage``;
3. recompute old log-probs and old entropies once, without gradients (verl's ``compute_log_prob``);
4. split the batch by prompts into mini-batches and take one optimizer step per mini-batch, calling
   the policy loss exactly as registered in verl (``get_policy_loss_fn(loss_mode)``). The current
   entropy is computed without autograd: ERC only gates, it never differentiates the entropy.

From the second mini-batch on the policy is off-policy w.r.t. the rollout, which is where PPO-clip
and ERC act.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch
from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage, get_policy_loss_fn
from verl.utils.torch_functional import entropy_from_logits, logprobs_from_logits

from erc_verl.config import ERCFSDPActorConfig
from erc_verl.demo_task import DATA_SOURCE, Problem, encode_prompts, generate, response_logits
from erc_verl.diagnostics import ClipBounds, TokenDiagnostics, ppo_clipped_mask
from erc_verl.gate import erc_keep_mask
from erc_verl.losses import erc_bounds_from_config, is_erc_loss_mode


@dataclass(frozen=True)
class ArmSpec:
    """A training recipe: the registered loss and its PPO clip range (paper section 4.1)."""

    name: str
    loss_mode: str
    clip_low: float
    clip_high: float


ARMS: dict[str, ArmSpec] = {
    "dapo": ArmSpec("dapo", "vanilla", 0.2, 0.28),
    "dapo_erc": ArmSpec("dapo_erc", "grpo_erc", 0.2, 0.28),
    "gppo": ArmSpec("gppo", "gppo", 0.2, 0.2),
    "gppo_erc": ArmSpec("gppo_erc", "gppo_erc", 0.2, 0.2),
}


def actor_config(arm: ArmSpec, *, prompts_per_minibatch: int, n: int, erc_low: float, erc_high: float,
                 clip_ratio_c: float) -> ERCFSDPActorConfig:
    """The same actor config class the ERC workers build from Hydra, so the losses read real fields."""
    responses = prompts_per_minibatch * n
    return ERCFSDPActorConfig(
        strategy="fsdp",
        ppo_mini_batch_size=prompts_per_minibatch,
        ppo_micro_batch_size_per_gpu=responses,
        rollout_n=n,
        clip_ratio=arm.clip_low,
        clip_ratio_low=arm.clip_low,
        clip_ratio_high=arm.clip_high,
        clip_ratio_c=clip_ratio_c,
        loss_agg_mode="token-mean",
        policy_loss={"loss_mode": arm.loss_mode},
        entropy_mask_low=erc_low,
        entropy_mask_high=erc_high,
    )


def cached_scorer(compute_score: Callable[..., float]) -> Callable[[str, str], float]:
    """Memoise the verifier: a toy policy repeats the same few answers, and math-verify is the slow part."""

    @functools.lru_cache(maxsize=65_536)
    def score(solution: str, ground_truth: str) -> float:
        return float(compute_score(DATA_SOURCE, solution, ground_truth))

    return score


@dataclass
class Rollout:
    """One RL batch, laid out as verl's DataProto would hold it (responses grouped by prompt)."""

    prompts: torch.Tensor  # [N, P]
    responses: torch.Tensor  # [N, R]
    response_mask: torch.Tensor  # [N, R] float
    scores: torch.Tensor  # [N]
    advantages: torch.Tensor  # [N, R]
    old_log_prob: torch.Tensor  # [N, R]
    old_entropy: torch.Tensor  # [N, R]


def policy_outputs(model, prompts: torch.Tensor, responses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-prob of the response (with autograd if enabled) and entropy (never with autograd)."""
    logits = response_logits(model, prompts, responses).float()
    log_prob = logprobs_from_logits(logits, responses)
    with torch.no_grad():
        entropy = entropy_from_logits(logits.detach())
    return log_prob, entropy


def collect_rollout(model, tokenizer, problems: list[Problem], n: int, generator: torch.Generator,
                    score: Callable[[str, str], float]) -> Rollout:
    prompts = encode_prompts(tokenizer, problems).repeat_interleave(n, dim=0)
    responses, mask = generate(model, prompts, tokenizer.eos_token_id, tokenizer.pad_token_id, generator)
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    truths = [p.ground_truth for p in problems for _ in range(n)]
    scores = torch.tensor([score(t, g) for t, g in zip(texts, truths)], dtype=torch.float32)

    # verl puts the sequence reward on the last response token.
    last = (mask.sum(dim=1).long() - 1).clamp_min(0)
    token_rewards = torch.zeros_like(mask)
    token_rewards[torch.arange(len(scores)), last] = scores
    index = np.repeat(np.arange(len(problems)), n)
    advantages, _ = compute_grpo_outcome_advantage(token_level_rewards=token_rewards, response_mask=mask, index=index)

    model.eval()
    with torch.no_grad():
        old_log_prob, old_entropy = policy_outputs(model, prompts, responses)
    return Rollout(prompts, responses, mask, scores, advantages, old_log_prob, old_entropy)


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else math.nan


def update_policy(model, optimizer, rollout: Rollout, config: ERCFSDPActorConfig, minibatches: int, n: int,
                  grad_clip: float, diagnostics: Optional[TokenDiagnostics]) -> dict[str, float]:
    """One pass over the rollout in ``minibatches`` optimizer steps; returns step-level metrics."""
    loss_mode = config.policy_loss["loss_mode"]
    loss_fn = get_policy_loss_fn(loss_mode)
    erc = is_erc_loss_mode(loss_mode)
    band = erc_bounds_from_config(config)  # measured in every arm, applied only by ERC losses
    clip_bounds = ClipBounds.from_config(config)

    n_prompts = rollout.prompts.shape[0] // n
    per_mb = n_prompts // minibatches
    per_step: dict[str, list[float]] = {}
    model.train()
    for mb in range(minibatches):
        rows = slice(mb * per_mb * n, (mb + 1) * per_mb * n)
        prompts, responses = rollout.prompts[rows], rollout.responses[rows]
        mask, adv = rollout.response_mask[rows], rollout.advantages[rows]
        old_lp, old_ent = rollout.old_log_prob[rows], rollout.old_entropy[rows]

        log_prob, entropy = policy_outputs(model, prompts, responses)
        kwargs: dict[str, Any] = {"entropy": entropy, "old_entropy": old_ent} if erc else {}
        loss, metrics = loss_fn(old_log_prob=old_lp, log_prob=log_prob, advantages=adv, response_mask=mask,
                                loss_agg_mode=config.loss_agg_mode, config=config, rollout_is_weights=None, **kwargs)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip))
        optimizer.step()

        # Token-level bookkeeping (no gradients): who was clipped by what.
        valid = mask.bool()
        in_band, band_metrics = erc_keep_mask(entropy, old_ent, mask, band)
        keep = in_band if erc else valid
        ppo_clipped, _ = ppo_clipped_mask(log_prob.detach(), old_lp, adv, clip_bounds)
        erc_clipped = valid & ~keep
        n_valid = max(int(valid.sum()), 1)
        row = {
            "pg_loss": float(loss.detach()),
            "grad_norm": grad_norm,
            "pg_clipfrac": metrics["actor/pg_clipfrac"],
            "pg_clipfrac_lower": metrics["actor/pg_clipfrac_lower"],
            "ppo_kl": metrics["actor/ppo_kl"],
            # What the loss reported: zero for arms without the ERC gate.
            "erc_clipfrac": metrics.get("actor/erc_clipfrac", 0.0),
            "erc_clipfrac_upper": metrics.get("actor/erc_clipfrac_upper", 0.0),
            "erc_clipfrac_lower": metrics.get("actor/erc_clipfrac_lower", 0.0),
            # What the gate would clip: measured in every arm, so arms can be compared.
            "entropy_ratio_outside_frac": band_metrics["actor/erc_clipfrac"],
            "clipfrac_ppo_only": int((valid & ppo_clipped & ~erc_clipped).sum()) / n_valid,
            "clipfrac_erc_only": int((erc_clipped & ~ppo_clipped).sum()) / n_valid,
            "clipfrac_both": int((ppo_clipped & erc_clipped).sum()) / n_valid,
        }
        for key in ("entropy_ratio_mean", "entropy_ratio_std", "entropy_ratio_min", "entropy_ratio_max"):
            row[key] = band_metrics.get(f"actor/{key}", math.nan)
        for key, value in row.items():
            per_step.setdefault(key, []).append(value)

        if diagnostics is not None:
            diagnostics.record(log_prob=log_prob, old_log_prob=old_lp, entropy=entropy, old_entropy=old_ent,
                               advantages=adv, response_mask=mask, keep=keep, config=config)

    out = {key: _mean(values) for key, values in per_step.items()}
    out["entropy_ratio_min"] = float(np.min(per_step["entropy_ratio_min"]))
    out["entropy_ratio_max"] = float(np.max(per_step["entropy_ratio_max"]))
    out["grad_norm_max"] = float(np.max(per_step["grad_norm"]))
    return out


@torch.no_grad()
def greedy_accuracy(model, tokenizer, problems: list[Problem], score: Callable[[str, str], float]) -> float:
    prompts = encode_prompts(tokenizer, problems)
    responses, _ = generate(model, prompts, tokenizer.eos_token_id, tokenizer.pad_token_id, None, greedy=True)
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    return float(np.mean([score(t, p.ground_truth) for t, p in zip(texts, problems)]))
