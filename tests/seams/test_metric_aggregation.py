"""ERC gate metrics through verl's own metric path: micro-batches merged per rank with ``append_to_dict``
(as verl's ``postprocess_batch_func``), then ``Metric.aggregate_dp`` over data-parallel ranks (as
``TrainingWorker.train_mini_batch``), with one rank holding an all-padding micro-batch (verl pads batches
with zero-response-mask samples)."""

import math
from functools import partial

import numpy as np
import pytest
import torch

from verl.utils import tensordict_utils as tu
from verl.utils.metric import Metric
from verl.utils.py_functional import append_to_dict
from verl.workers.utils.padding import left_right_2_no_padding, no_padding_2_padding

from erc_verl.seams.actor_loss import ppo_loss_with_entropy
from erc_verl.algorithm.config import ERCFSDPActorConfig
from erc_verl.algorithm.gate import entropy_ratio
from erc_verl.bench.engine_rig import cpu_lm_engine, engine_on_cpu

from support.objects import padded_update_batch, tiny_qwen2

ERC_KEYS = ["actor/erc_clipfrac", "actor/erc_clipfrac_upper", "actor/erc_clipfrac_lower", "actor/entropy_ratio_mean",
            "actor/entropy_ratio_std", "actor/entropy_ratio_min", "actor/entropy_ratio_max"]


def micro_batch(seed, padding=False):
    padded = padded_update_batch(batch_size=2, seed=seed)
    # the random tiny model's entropy is close to log(64) = 4.16: ratios inside and on both sides of (0.95, 1.05)
    spread = torch.rand(padded["old_entropy"].shape, generator=torch.Generator().manual_seed(seed)) * 0.16 - 0.08
    padded["old_entropy"] = math.log(64) * (1 + spread)
    if padding:  # verl's padding samples: real tokens, response_mask all zero
        padded["response_mask"] = torch.zeros_like(padded["response_mask"])
    return padded


def run_ranks(ranks):
    """Each rank's micro-batches through verl's engine forward_step with the ERC actor loss; returns the
    per-rank metrics (merged as verl merges micro-batches) and what the loss saw (entropies, masks)."""
    model = tiny_qwen2()
    config = ERCFSDPActorConfig(ppo_mini_batch_size=8, ppo_micro_batch_size_per_gpu=2, rollout_n=1,
                                policy_loss={"loss_mode": "grpo_erc"})
    # batch_num_tokens: the mini-batch's response tokens summed over dp ranks (verl all-reduces it)
    batch_num_tokens = int(sum(mb["response_mask"].sum() for mbs in ranks for mb in mbs))
    seen, per_rank = [], []

    def recording_loss(config, model_output, data, dp_group=None):
        entropy = no_padding_2_padding(model_output["entropy"], data).detach()
        padded = data.select("old_entropy", "response_mask").to_padded_tensor()
        seen.append((entropy, padded["old_entropy"], padded["response_mask"].bool()))
        return ppo_loss_with_entropy(config, model_output, data, dp_group)

    for mbs in ranks:
        rank_metrics = {}
        for padded in mbs:
            td = left_right_2_no_padding(padded.clone())
            tu.assign_non_tensor(td, dp_size=len(ranks), batch_num_tokens=batch_num_tokens, global_batch_size=8,
                                 use_remove_padding=True, use_fused_kernels=False, temperature=1.0,
                                 calculate_entropy=True)
            with engine_on_cpu():
                _, out = cpu_lm_engine(model).forward_step(td, partial(recording_loss, config=config), False)
            append_to_dict(rank_metrics, out["metrics"])
        per_rank.append(rank_metrics)
    return per_rank, seen


def test_erc_metrics_aggregate_over_ranks_when_one_micro_batch_is_all_padding():
    ranks = [[micro_batch(1), micro_batch(2)], [micro_batch(3), micro_batch(4, padding=True)]]
    per_rank, seen = run_ranks(ranks)
    # verl's own check: every rank reports every key once per micro-batch
    got = {key: float(Metric.aggregate_dp([rank[key] for rank in per_rank])) for key in ERC_KEYS}

    # expected: over the valid tokens of all micro-batches of all ranks
    rho = torch.cat([entropy_ratio(e, o)[m] for e, o, m in seen])
    assert rho.numel() == sum(int(m.sum()) for _, _, m in seen) > 0 and not seen[-1][2].any()
    outside = (rho <= 0.95) | (rho >= 1.05)
    assert (rho <= 0.95).any() and (rho >= 1.05).any() and not outside.all()
    # std: verl keeps one number per key, so it is the token-weighted mean of the micro-batch stds
    stds = [(entropy_ratio(e, o)[m].std(unbiased=False), m.sum()) for e, o, m in seen if m.any()]
    expected = {
        "actor/erc_clipfrac": outside.float().mean(),
        "actor/erc_clipfrac_upper": (rho >= 1.05).float().mean(),
        "actor/erc_clipfrac_lower": (rho <= 0.95).float().mean(),
        "actor/entropy_ratio_mean": rho.mean(),
        "actor/entropy_ratio_std": sum(s * n for s, n in stds) / rho.numel(),
        "actor/entropy_ratio_min": rho.min(),
        "actor/entropy_ratio_max": rho.max(),
    }
    for key in ERC_KEYS:
        assert got[key] == pytest.approx(float(expected[key]), rel=1e-5), key
    assert all(math.isfinite(v) for v in got.values())


def test_a_rank_of_padding_alone_does_not_change_the_aggregate():
    """Two ranks with the same real micro-batches: adding a rank that only holds padding leaves every
    ERC metric where the real tokens put it (a missing key would average over fewer ranks instead)."""
    real = [[micro_batch(5)], [micro_batch(6)]]
    with_padding_rank = real + [[micro_batch(7, padding=True)]]
    base = {k: float(Metric.aggregate_dp([r[k] for r in run_ranks(real)[0]])) for k in ERC_KEYS}
    padded = {k: float(Metric.aggregate_dp([r[k] for r in run_ranks(with_padding_rank)[0]])) for k in ERC_KEYS}
    for key in ERC_KEYS:
        assert padded[key] == pytest.approx(base[key], rel=1e-5), key
    assert np.isfinite(list(padded.values())).all()
