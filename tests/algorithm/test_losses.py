"""Registered losses against an independent float64 implementation of the paper's formulas."""

import math
import re

import pytest
import torch
from omegaconf import OmegaConf

from verl.trainer.ppo.core_algos import get_policy_loss_fn

import erc_verl  # noqa: F401  (registers the losses)
from erc_verl.algorithm.config import ERCFSDPActorConfig

AGG_MODES = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


def make_config(**overrides):
    cfg = dict(
        clip_ratio=0.2,
        clip_ratio_low=0.2,
        clip_ratio_high=0.28,
        clip_ratio_c=3.0,
        entropy_mask_low=0.95,
        entropy_mask_high=1.05,
        global_batch_info={},
    )
    cfg.update(overrides)
    return OmegaConf.create(cfg)


def make_batch(batch=4, length=7, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    old_log_prob = -torch.rand(batch, length, generator=g, dtype=torch.float64) * 3
    log_prob = old_log_prob + torch.randn(batch, length, generator=g, dtype=torch.float64) * 0.4
    advantages = torch.randn(batch, 1, generator=g, dtype=torch.float64).expand(batch, length).clone()
    lengths = torch.randint(1, length + 1, (batch,), generator=g)
    response_mask = (torch.arange(length)[None, :] < lengths[:, None]).to(torch.float64)
    old_entropy = torch.rand(batch, length, generator=g, dtype=torch.float64) * 2
    entropy = old_entropy * (1 + torch.randn(batch, length, generator=g, dtype=torch.float64) * 0.08)
    return {k: v.to(dtype) for k, v in dict(
        old_log_prob=old_log_prob, log_prob=log_prob, advantages=advantages,
        response_mask=response_mask, entropy=entropy, old_entropy=old_entropy).items()}


# ---- independent float64 reference (the paper's equations, written from scratch) ----

def ref_token_losses(log_prob, old_log_prob, adv, eps_low, eps_high, clip_c, gradient_preserving):
    ratio = torch.exp(torch.clamp(log_prob - old_log_prob, -20, 20))
    if gradient_preserving:
        r = ratio.detach()
        clipped = torch.where(r > 1 + eps_high, (1 + eps_high) * ratio / r,
                              torch.where(r < 1 - eps_low, (1 - eps_low) * ratio / r, ratio))
    else:
        clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    objective = torch.minimum(ratio * adv, clipped * adv)
    # dual clip: for A < 0 the objective is bounded below by clip_c * A
    objective = torch.where(adv < 0, torch.maximum(objective, clip_c * adv), objective)
    return -objective


def ref_aggregate(losses, mask, mode):
    if mode == "token-mean":
        return (losses * mask).sum() / mask.sum()
    if mode == "token-sum":
        return (losses * mask).sum()
    seqs = [(losses[i] * mask[i], mask[i]) for i in range(losses.shape[0]) if mask[i].sum() > 0]
    if mode == "seq-mean-token-sum":
        return sum(l.sum() for l, _ in seqs) / len(seqs)
    if mode == "seq-mean-token-mean":
        return sum(l.sum() / m.sum() for l, m in seqs) / len(seqs)
    if mode == "seq-mean-token-sum-norm":
        return sum(l.sum() for l, _ in seqs) / len(seqs) / mask.shape[-1]
    raise ValueError(mode)


def ref_loss_and_grad(batch, cfg, gradient_preserving, erc, mode):
    lp = batch["log_prob"].double().clone().requires_grad_(True)
    losses = ref_token_losses(lp, batch["old_log_prob"].double(), batch["advantages"].double(),
                              cfg.clip_ratio_low, cfg.clip_ratio_high, cfg.clip_ratio_c, gradient_preserving)
    mask = batch["response_mask"].double()
    if erc:
        rho = (batch["entropy"].double().clamp_min(0) + 1e-8) / (batch["old_entropy"].double().clamp_min(0) + 1e-8)
        keep = (rho > cfg.entropy_mask_low) & (rho < cfg.entropy_mask_high) & mask.bool()
        losses = torch.where(keep, losses, losses.detach())  # the reference's formulation
    loss = ref_aggregate(losses, mask, mode)
    (grad,) = torch.autograd.grad(loss, lp)
    return loss.detach(), grad


def run_loss(name, batch, cfg, mode, with_entropy=True):
    lp = batch["log_prob"].clone().requires_grad_(True)
    kwargs = dict(old_log_prob=batch["old_log_prob"], log_prob=lp, advantages=batch["advantages"],
                  response_mask=batch["response_mask"].bool(), loss_agg_mode=mode, config=cfg)
    if with_entropy:
        kwargs.update(entropy=batch["entropy"], old_entropy=batch["old_entropy"])
    loss, metrics = get_policy_loss_fn(name)(**kwargs)
    (grad,) = torch.autograd.grad(loss, lp)
    return loss.detach(), grad, metrics


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("shape", [(1, 1), (4, 7), (8, 33)])
@pytest.mark.parametrize("name,gp,erc", [("gppo", True, False), ("grpo_erc", False, True), ("gppo_erc", True, True)])
def test_loss_and_gradient_match_float64_reference(name, gp, erc, mode, shape):
    batch = make_batch(*shape, seed=hash((name, mode, shape)) % 1000)
    cfg = make_config()
    loss, grad, _ = run_loss(name, batch, cfg, mode, with_entropy=erc)
    ref_loss, ref_grad = ref_loss_and_grad(batch, cfg, gp, erc, mode)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)


def test_gates_something_in_the_reference_cases():
    """Guard against the comparison above passing because nothing was ever clipped."""
    batch = make_batch(8, 33, seed=1)
    _, grad_erc, metrics = run_loss("grpo_erc", batch, make_config(), "token-mean")
    _, grad_plain, _ = run_loss("vanilla", batch, make_config(), "token-mean", with_entropy=False)
    assert 0.0 < metrics["actor/erc_clipfrac"] < 1.0
    assert not torch.allclose(grad_erc, grad_plain)


def test_gppo_keeps_gradient_where_ppo_clip_drops_it():
    batch = make_batch(4, 16, seed=3)
    cfg = make_config(clip_ratio_c=100.0)
    _, g_ppo, m_ppo = run_loss("vanilla", batch, cfg, "token-sum", with_entropy=False)
    _, g_gppo, m_gppo = run_loss("gppo", batch, cfg, "token-sum", with_entropy=False)
    assert m_ppo["actor/pg_clipfrac"] == m_gppo["actor/pg_clipfrac"] > 0
    dropped = (g_ppo == 0) & batch["response_mask"].bool()
    assert dropped.any() and (g_gppo[dropped] != 0).all()
    # the preserved gradient is (1 ± eps) * (-A), the magnitude of the clip boundary
    ratio = torch.exp(batch["log_prob"] - batch["old_log_prob"])
    bound = torch.where(ratio > 1, torch.full_like(ratio, 1.28), torch.full_like(ratio, 0.8))
    torch.testing.assert_close(g_gppo[dropped], (-batch["advantages"] * bound)[dropped])


@pytest.mark.parametrize("mode", AGG_MODES)
def test_grpo_erc_with_open_bounds_equals_vanilla_exactly(mode):
    batch = make_batch(6, 20, seed=7)
    cfg = make_config(entropy_mask_low=0.0, entropy_mask_high=math.inf)
    loss, grad, metrics = run_loss("grpo_erc", batch, cfg, mode)
    v_loss, v_grad, v_metrics = run_loss("vanilla", batch, cfg, mode, with_entropy=False)
    assert torch.equal(loss, v_loss) and torch.equal(grad, v_grad)
    assert metrics["actor/erc_clipfrac"] == 0.0
    for key, value in v_metrics.items():
        assert metrics[key] == value


def test_clip_fractions_split_into_upper_and_lower():
    entropy_old = torch.ones(1, 6)
    entropy = torch.tensor([[0.5, 0.95, 0.99, 1.0, 1.05, 2.0]])  # ratio == bound is clipped (strict band)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    batch = dict(old_log_prob=torch.zeros(1, 6), log_prob=torch.zeros(1, 6, requires_grad=True),
                 advantages=torch.ones(1, 6), response_mask=mask)
    loss, m = get_policy_loss_fn("grpo_erc")(**batch, config=make_config(), entropy=entropy, old_entropy=entropy_old)
    loss.backward()
    assert m["actor/erc_clipfrac"] == pytest.approx(3 / 5)
    assert m["actor/erc_clipfrac_lower"] == pytest.approx(2 / 5)
    assert m["actor/erc_clipfrac_upper"] == pytest.approx(1 / 5)
    assert batch["log_prob"].grad[0].ne(0).tolist() == [False, False, True, True, False, False]


@pytest.mark.parametrize("name", ["grpo_erc", "gppo_erc", "erc"])
def test_missing_entropies_fail_loudly(name):
    batch = make_batch()
    cfg = make_config(erc_base_loss_mode="vanilla")
    with pytest.raises(ValueError, match="without entropy and old_entropy.*erc_verl.main_ppo"):
        run_loss(name, batch, cfg, "token-mean", with_entropy=False)


@pytest.mark.parametrize("low,high", [(1.1, 1.05), (1.0, 1.0), (-0.1, 1.05)])
def test_bad_bounds_are_refused(low, high):
    with pytest.raises(ValueError, match="0 <= entropy_mask_low < entropy_mask_high"):
        run_loss("grpo_erc", make_batch(), make_config(entropy_mask_low=low, entropy_mask_high=high), "token-mean")


@pytest.mark.parametrize("low,high,message", [
    ("abc", 1.05, "actor_rollout_ref.actor.entropy_mask_low must be a number, got 'abc'"),
    (0.95, True, "actor_rollout_ref.actor.entropy_mask_high must be a number, got True"),
    (float("nan"), 1.05, "0 <= entropy_mask_low < entropy_mask_high, got low=nan"),
])
def test_one_band_check_for_the_loss_the_actor_config_and_the_diagnostics(low, high, message):
    """ERCBounds is the only check of the band: the loss, ERCFSDPActorConfig and the diagnostics refuse alike."""
    from erc_verl.algorithm.gate import ERCBounds
    from erc_verl.seams.diagnostics import ClipBounds

    with pytest.raises(ValueError, match=re.escape(message)):
        ERCBounds(low, high)
    with pytest.raises(ValueError, match=re.escape(message)):
        run_loss("grpo_erc", make_batch(), make_config(entropy_mask_low=low, entropy_mask_high=high), "token-mean")
    with pytest.raises(ValueError, match=re.escape(message)):
        ClipBounds.from_config(make_config(entropy_mask_low=low, entropy_mask_high=high))
    with pytest.raises(ValueError, match=re.escape(message)):
        ERCFSDPActorConfig(strategy="fsdp", ppo_mini_batch_size=2, ppo_micro_batch_size_per_gpu=2, rollout_n=2,
                           entropy_mask_low=low, entropy_mask_high=high)


def test_bounds_take_any_real_number():
    """Python and numpy numbers alike (a caller's config may hold numpy scalars); only the band is refused."""
    import numpy as np

    from erc_verl.algorithm.gate import ERCBounds

    assert ERCBounds(np.float32(0.5), np.float64(1.5)) == ERCBounds(0.5, 1.5)
    assert ERCBounds(0, np.int64(2)) == ERCBounds(0.0, 2.0)


def test_missing_bounds_are_refused():
    cfg = OmegaConf.create(dict(clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.2, global_batch_info={}))
    with pytest.raises(ValueError, match="entropy_mask_low / entropy_mask_high are not set"):
        run_loss("grpo_erc", make_batch(), cfg, "token-mean")


@pytest.mark.parametrize("case", ["zero_entropy", "all_masked", "none_masked", "bf16", "empty_response"])
def test_edge_cases_are_finite(case):
    batch = make_batch(4, 9, seed=11)
    if case == "zero_entropy":
        batch["entropy"] = torch.zeros_like(batch["entropy"])
        batch["old_entropy"] = torch.zeros_like(batch["old_entropy"])
    if case == "all_masked":  # every token far outside the band
        batch["entropy"] = batch["old_entropy"] * 3 + 1
    if case == "none_masked":
        batch["entropy"] = batch["old_entropy"].clone()
    if case == "bf16":
        batch = {k: v.to(torch.bfloat16) for k, v in batch.items()}
    cfg = make_config()
    if case == "empty_response":
        # A micro-batch without response tokens: verl normalises by the global token count it passes in
        # global_batch_info (without it verl's own `vanilla` divides 0 by 0 too).
        batch["response_mask"] = torch.zeros_like(batch["response_mask"])
        cfg = make_config(global_batch_info={"batch_num_tokens": 10, "dp_size": 1})
    for name in ("grpo_erc", "gppo_erc"):
        loss, grad, metrics = run_loss(name, batch, cfg, "token-mean")
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        if case == "empty_response":  # min / max of no tokens: the identities of verl's MIN / MAX aggregation
            assert metrics.pop("actor/entropy_ratio_min") == math.inf
            assert metrics.pop("actor/entropy_ratio_max") == -math.inf
            assert metrics["actor/entropy_ratio_mean"] == metrics["actor/erc_clipfrac"] == 0.0
        assert all(math.isfinite(v) for v in metrics.values())
        if case == "zero_entropy":  # 0/0 -> ratio 1: inside the band, nothing dropped
            assert metrics["actor/erc_clipfrac"] == 0.0
        if case == "all_masked":
            assert metrics["actor/erc_clipfrac"] == 1.0 and torch.count_nonzero(grad) == 0
        if case == "none_masked":
            assert metrics["actor/erc_clipfrac"] == 0.0


def test_generic_erc_gates_another_registered_loss():
    batch = make_batch(4, 12, seed=5)
    cfg = make_config(erc_base_loss_mode="gppo")
    loss, grad, m = run_loss("erc", batch, cfg, "token-mean")
    loss2, grad2, m2 = run_loss("gppo_erc", batch, make_config(), "token-mean")
    assert torch.equal(loss, loss2) and torch.equal(grad, grad2) and m == m2
    with pytest.raises(ValueError, match="erc_base_loss_mode"):
        run_loss("erc", batch, make_config(), "token-mean")
    with pytest.raises(ValueError, match="itself an ERC loss"):
        run_loss("erc", batch, make_config(erc_base_loss_mode="grpo_erc"), "token-mean")


def test_generic_erc_on_sequence_level_gspo_drops_gated_tokens_gradient():
    batch = make_batch(4, 12, seed=9)
    # verl's gspo insists on its actor dataclass: use ours (config as a dataclass rather than a DictConfig)
    cfg = ERCFSDPActorConfig(ppo_mini_batch_size=4, ppo_micro_batch_size_per_gpu=4, rollout_n=1,
                             clip_ratio_low=3e-4, clip_ratio_high=4e-4, erc_base_loss_mode="gspo")
    loss, grad, m = run_loss("erc", batch, cfg, "seq-mean-token-mean")
    base_loss, _, _ = run_loss("gspo", batch, cfg, "seq-mean-token-mean", with_entropy=False)
    assert torch.equal(loss, base_loss)  # values untouched
    rho = batch["entropy"] / batch["old_entropy"]
    gated = ((rho <= 0.95) | (rho >= 1.05)) & batch["response_mask"].bool()
    assert gated.any() and (grad[gated] == 0).all()
