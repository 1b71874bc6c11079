"""The actor-side loss fed verl-format TensorDicts (nested/jagged fields, as verl's engine passes them)."""

import copy
import math
from functools import partial

import pytest
import torch

from verl.utils import tensordict_utils as tu
from verl.workers.utils.losses import ppo_loss as verl_ppo_loss

from erc_verl.seams.actor_loss import ppo_loss_with_entropy
from erc_verl.seams.engine import DETACHED_ENTROPY_KEY, enable_detached_entropy
from erc_verl.algorithm.config import ERCFSDPActorConfig
from erc_verl.bench.engine_rig import cpu_lm_engine, engine_on_cpu

from support.objects import padded_update_batch, tiny_qwen2, update_batch


def actor_config(loss_mode, **kw):
    base = dict(ppo_mini_batch_size=4, ppo_micro_batch_size_per_gpu=4, rollout_n=1, clip_ratio_low=0.2,
                clip_ratio_high=0.28, policy_loss={"loss_mode": loss_mode})
    base.update(kw)
    return ERCFSDPActorConfig(**base)


def forward(model, td, loss_fn, calculate_entropy=True, engine=None, **flags):
    """verl's engine forward_step (real code, CPU) with the given loss; returns loss, metrics and grads."""
    model.zero_grad()
    td = td.copy()
    tu.assign_non_tensor(td, calculate_entropy=calculate_entropy, **flags)
    with engine_on_cpu():
        loss, out = (engine or cpu_lm_engine(model)).forward_step(td, loss_function=loss_fn, forward_only=False)
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return loss.detach(), out["metrics"], grads


@pytest.mark.parametrize("kl", [False, True])
@pytest.mark.parametrize("entropy_coeff", [0.0, 0.01])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_erc_with_open_bounds_reproduces_verl_ppo_loss(kl, entropy_coeff, agg):
    """The seam check: if verl's ppo_loss changes what it computes, this fails."""
    model, td = tiny_qwen2(), update_batch(batch_size=5, seed=3)
    common = dict(entropy_coeff=entropy_coeff, use_kl_loss=kl, kl_loss_coef=0.1, loss_agg_mode=agg)
    ours = actor_config("grpo_erc", entropy_mask_low=0.0, entropy_mask_high=math.inf, **common)
    stock = actor_config("vanilla", **common)
    loss, metrics, grads = forward(model, td, partial(ppo_loss_with_entropy, config=ours))
    v_loss, v_metrics, v_grads = forward(model, td, partial(verl_ppo_loss, config=stock))
    torch.testing.assert_close(loss, v_loss, rtol=0, atol=0)
    torch.testing.assert_close(grads, v_grads, rtol=1e-6, atol=1e-9)
    for key, metric in v_metrics.items():
        value = metric.aggregate() if hasattr(metric, "aggregate") else metric
        ours_value = metrics[key].aggregate() if hasattr(metrics[key], "aggregate") else metrics[key]
        assert ours_value == pytest.approx(value, rel=1e-6), key
    assert metrics["actor/erc_clipfrac"].aggregate() == 0.0


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_erc_with_open_bounds_through_the_one_pass_seam_matches_verl_within_float32(agg):
    """With ERC's engine seam on, the log-probs come from its one-pass function instead of verl's (see
    erc_verl/seams/engine.py); loss and gradients then equal verl's DAPO update to float32 rounding (asserted:
    gradients within 2e-8 where they reach 1e-2; measured here: the same loss, gradients within 4e-9), not bit for
    bit as above, where both share verl's log-probs."""
    model, td = tiny_qwen2(vocab_size=300), update_batch(batch_size=5, seed=3, vocab_size=300)
    ours = actor_config("grpo_erc", entropy_mask_low=0.0, entropy_mask_high=math.inf, loss_agg_mode=agg)
    engine = cpu_lm_engine(model)
    enable_detached_entropy(engine)
    loss, metrics, grads = forward(model, td, partial(ppo_loss_with_entropy, config=ours), calculate_entropy=False,
                                   engine=engine, **{DETACHED_ENTROPY_KEY: True})
    v_loss, _, v_grads = forward(model, td, partial(verl_ppo_loss, config=actor_config("vanilla", loss_agg_mode=agg)),
                                 calculate_entropy=False)
    torch.testing.assert_close(loss, v_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grads, v_grads, rtol=0, atol=2e-8)
    assert metrics["actor/erc_clipfrac"].aggregate() == 0.0


def test_erc_gate_drops_tokens_in_a_real_update():
    model, td = tiny_qwen2(), update_batch(batch_size=6, seed=4)
    # old entropy = the model's own entropy, perturbed so that some ratios leave (0.95, 1.05)
    with torch.no_grad(), engine_on_cpu():
        probe = td.copy()
        tu.assign_non_tensor(probe, calculate_entropy=True)
        out = cpu_lm_engine(model).forward_step(probe, loss_function=None, forward_only=True)[1]["model_output"]
    from verl.workers.utils.padding import no_padding_2_padding

    entropy = no_padding_2_padding(out["entropy"], td)
    scale = 1 + 0.1 * torch.randn(entropy.shape, generator=torch.Generator().manual_seed(0))
    td["old_entropy"] = entropy * scale
    loss, metrics, grads = forward(model, td, partial(ppo_loss_with_entropy, config=actor_config("grpo_erc")))
    frac = metrics["actor/erc_clipfrac"].aggregate()
    assert 0.1 < frac < 0.9
    assert metrics["actor/erc_clipfrac_upper"].aggregate() + metrics["actor/erc_clipfrac_lower"].aggregate() == (
        pytest.approx(frac)
    )
    assert metrics["actor/entropy_ratio_max"].aggregation.value == "max"
    assert torch.isfinite(loss) and grads.abs().sum() > 0


def test_erc_without_current_entropy_fails_loudly():
    model, td = tiny_qwen2(), update_batch()
    with pytest.raises(RuntimeError, match="current policy's entropy.*erc_verl.main_ppo"):
        forward(model, td, partial(ppo_loss_with_entropy, config=actor_config("gppo_erc")), calculate_entropy=False)


def test_erc_without_old_entropy_fails_loudly():
    model, td = tiny_qwen2(), update_batch(old_entropy=False)
    with pytest.raises(RuntimeError, match="old policy's entropy.*old_entropy"):
        forward(model, td, partial(ppo_loss_with_entropy, config=actor_config("grpo_erc")))


@pytest.mark.parametrize("loss_mode", ["vanilla", "gppo"])
def test_non_erc_losses_need_no_erc_inputs_and_match_verl(loss_mode):
    """Bound as the actor loss, the plugin's loss runs a non-ERC loss on what verl alone provides (no
    ``old_entropy`` field, no entropy from the engine) and changes nothing: loss, gradients, metrics."""
    model, td = tiny_qwen2(), update_batch(seed=2, old_entropy=False)
    cfg = actor_config(loss_mode)
    loss, metrics, grads = forward(model, td, partial(ppo_loss_with_entropy, config=cfg), calculate_entropy=False)
    v_loss, v_metrics, v_grads = forward(model, td, partial(verl_ppo_loss, config=cfg), calculate_entropy=False)
    assert torch.equal(loss, v_loss) and torch.equal(grads, v_grads)
    assert metrics.keys() == v_metrics.keys()
    for key, metric in v_metrics.items():
        assert metrics[key].aggregation == metric.aggregation and metrics[key].values == metric.values, key


def test_token_diagnostics_are_written_from_the_actor_loss(tmp_path):
    model, td = tiny_qwen2(), update_batch(batch_size=6, seed=4)
    cfg = actor_config("grpo_erc", erc_diagnostics={"dir": str(tmp_path), "tokens_per_step": 5})
    forward(model, td, partial(ppo_loss_with_entropy, config=cfg))
    forward(model, td, partial(ppo_loss_with_entropy, config=cfg))
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and "rank0" in files[0].name
    lines = [line for line in files[0].read_text().splitlines() if line.strip()]
    assert 2 <= len(lines) <= 2 * 5 + 1  # at most tokens_per_step per call (+ a header for csv)


# --- the reference fork's positive-NLL term (positive_nll_coeff; not in the paper) ---

def scored_batch(scores, batch_size=5, seed=3, global_batch_size=None, nested=False):
    """``update_batch`` plus ``rm_scores`` as verl's reward loop writes them: the score on the last response
    token (padded as in the V0 DataProto batch, or nested per response as V1 reads it from TransferQueue)."""
    padded = padded_update_batch(batch_size=batch_size, seed=seed)
    td = update_batch(batch_size=batch_size, seed=seed)
    lengths = padded["response_mask"].sum(-1)
    rm_scores = torch.zeros(padded["response_mask"].shape)
    rm_scores[torch.arange(batch_size), lengths - 1] = torch.tensor(scores, dtype=torch.float32)
    if nested:
        rm_scores = torch.nested.as_nested_tensor([rm_scores[i, : lengths[i]] for i in range(batch_size)],
                                                  layout=torch.jagged)
    td["rm_scores"] = rm_scores
    if global_batch_size is not None:
        tu.assign_non_tensor(td, global_batch_size=global_batch_size)
    return padded, td


def reference_positive_nll(model, padded, scores, weight):
    """Independent float64 computation: a float64 copy of the model run by Hugging Face on the padded batch;
    mean of -log p(response token) over the response tokens of the responses scored 1, times ``weight``."""
    model64 = copy.deepcopy(model).double()
    logits = model64(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"],
                     position_ids=padded["position_ids"]).logits
    prompt_len = padded["prompts"].shape[1]
    response_logits = logits[:, prompt_len - 1 : -1]
    log_p = torch.log_softmax(response_logits, dim=-1).gather(-1, padded["responses"][..., None])[..., 0]
    positive = torch.tensor(scores, dtype=torch.float64)[:, None] == 1.0
    mask = padded["response_mask"].bool() & positive
    value = (-log_p * mask).sum() / mask.sum() * weight
    value.backward()
    grads = torch.cat([p.grad.flatten() for p in model64.parameters() if p.grad is not None])
    return value.detach(), grads


SCORES = [1.0, 0.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize("loss_mode", ["vanilla", "gppo", "grpo_erc"])
@pytest.mark.parametrize("global_batch_size, nested", [(None, False), (10, False), (10, True)])
def test_positive_nll_adds_coeff_times_nll_of_responses_scored_1(loss_mode, global_batch_size, nested):
    """The term the reference scripts ran with (postive_loss_coeff=0.1), for an ERC loss and the baselines,
    against float64: loss and gradient move by exactly coeff * NLL. A micro-batch of 5 out of a mini-batch
    of 10 responses weighs 1/2, as the fork's ``loss_scale_factor``."""
    model = tiny_qwen2()
    padded, td = scored_batch(SCORES, global_batch_size=global_batch_size, nested=nested)
    coeff = 0.5
    loss, metrics, grads = forward(model, td, partial(ppo_loss_with_entropy,
                                                      config=actor_config(loss_mode, positive_nll_coeff=coeff)))
    base_loss, base_metrics, base_grads = forward(model, td, partial(ppo_loss_with_entropy,
                                                                     config=actor_config(loss_mode)))
    weight = 1.0 if global_batch_size is None else 5 / global_batch_size
    expected, expected_grads = reference_positive_nll(model, padded, SCORES, weight)

    assert float(loss - base_loss) == pytest.approx(coeff * float(expected), rel=1e-5)
    torch.testing.assert_close(grads - base_grads, coeff * expected_grads.float(), rtol=1e-4, atol=1e-6)
    assert metrics["actor/positive_nll_loss"].aggregate() == pytest.approx(float(expected), rel=1e-5)
    assert "actor/positive_nll_loss" not in base_metrics
    assert metrics["actor/pg_loss"].aggregate() == base_metrics["actor/pg_loss"].aggregate()


@pytest.mark.parametrize("loss_mode", ["vanilla", "grpo_erc"])
def test_positive_nll_is_zero_without_a_response_scored_1(loss_mode):
    model = tiny_qwen2()
    _, td = scored_batch([0.0, 0.0, 0.5, -1.0, 0.0])
    loss, metrics, grads = forward(model, td, partial(ppo_loss_with_entropy,
                                                      config=actor_config(loss_mode, positive_nll_coeff=0.1)))
    base_loss, _, base_grads = forward(model, td, partial(ppo_loss_with_entropy, config=actor_config(loss_mode)))
    assert torch.equal(loss, base_loss) and torch.equal(grads, base_grads)
    assert metrics["actor/positive_nll_loss"].aggregate() == 0.0


def test_coeff_0_baseline_is_verl_ppo_loss_bit_for_bit():
    model = tiny_qwen2()
    _, td = scored_batch(SCORES)
    cfg = actor_config("vanilla", positive_nll_coeff=0.0)
    loss, metrics, grads = forward(model, td, partial(ppo_loss_with_entropy, config=cfg))
    v_loss, v_metrics, v_grads = forward(model, td, partial(verl_ppo_loss, config=cfg))
    assert torch.equal(loss, v_loss) and torch.equal(grads, v_grads)
    assert set(metrics) == set(v_metrics)


def test_coeff_0_erc_loss_does_not_read_the_scores():
    """With coefficient 0 the ERC loss is the one without the term: same bits with or without ``rm_scores``."""
    model = tiny_qwen2()
    _, td = scored_batch(SCORES)
    without = td.exclude("rm_scores")
    cfg = actor_config("grpo_erc")
    loss, metrics, grads = forward(model, td, partial(ppo_loss_with_entropy, config=cfg))
    w_loss, w_metrics, w_grads = forward(model, without, partial(ppo_loss_with_entropy, config=cfg))
    assert torch.equal(loss, w_loss) and torch.equal(grads, w_grads)
    assert set(metrics) == set(w_metrics) and "actor/positive_nll_loss" not in metrics


def test_positive_nll_without_scores_fails_loudly():
    model, td = tiny_qwen2(), update_batch()
    with pytest.raises(RuntimeError, match="positive_nll_coeff=0.1 needs .*'rm_scores'"):
        forward(model, td, partial(ppo_loss_with_entropy, config=actor_config("vanilla", positive_nll_coeff=0.1)))


@pytest.mark.parametrize("bad", [-0.1, math.inf, math.nan])
def test_positive_nll_coeff_must_be_finite_and_non_negative(bad):
    with pytest.raises(ValueError, match="positive_nll_coeff must be finite and >= 0"):
        actor_config("vanilla", positive_nll_coeff=bad)
