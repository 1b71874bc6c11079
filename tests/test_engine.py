"""The detached-entropy seam on verl's real FSDPEngineWithLMHead code path (CPU, no FSDP wrapping)."""

from unittest import mock

import pytest
import torch

from verl.utils import tensordict_utils as tu
from verl.workers.engine.fsdp import transformer_impl

from erc_verl.engine import (
    DETACHED_ENTROPY_KEY,
    check_engine_contract,
    check_verl_version,
    enable_detached_entropy,
)
from erc_verl.testing import cpu_lm_engine, engine_on_cpu, tiny_qwen2, update_batch


def capture_outputs(engine, td, **flags):
    """Run verl's forward_step and capture what prepare_model_outputs hands to the loss."""
    td = td.copy()
    tu.assign_non_tensor(td, **flags)
    seen = {}

    def loss_fn(model_output, data, dp_group=None):
        seen.update(model_output)
        return model_output["log_probs"].values().sum(), {}

    with engine_on_cpu(), mock.patch.object(
        transformer_impl, "logprobs_from_logits", wraps=transformer_impl.logprobs_from_logits
    ) as spy:
        loss, _ = engine.forward_step(td, loss_function=loss_fn, forward_only=False)
    loss.backward()
    seen["inplace_backward"] = spy.call_args.kwargs.get("inplace_backward")
    return seen


@pytest.mark.parametrize("engine_overrides", [{}, {"entropy_from_logits_with_chunking": True,
                                                   "entropy_from_logits_chunk_size": 5}])
def test_detached_entropy_matches_verl_entropy_without_graph(engine_overrides):
    model, td = tiny_qwen2(), update_batch(seed=1)

    graph = capture_outputs(cpu_lm_engine(model, **engine_overrides), td, calculate_entropy=True)
    grads_graph = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    engine = cpu_lm_engine(model, **engine_overrides)
    enable_detached_entropy(engine)
    seam = capture_outputs(engine, td, **{DETACHED_ENTROPY_KEY: True})
    grads_seam = [p.grad.clone() for p in model.parameters()]

    assert graph["entropy"].requires_grad and not seam["entropy"].requires_grad
    torch.testing.assert_close(seam["entropy"].values(), graph["entropy"].values().detach())
    torch.testing.assert_close(seam["log_probs"].values(), graph["log_probs"].values().detach())
    for a, b in zip(grads_seam, grads_graph):
        torch.testing.assert_close(a, b)
    # verl turns in-place log-prob backward off when it builds the entropy graph; the seam keeps it on
    assert graph["inplace_backward"] is False and seam["inplace_backward"] is True


def test_seam_is_inert_unless_flagged():
    model, td = tiny_qwen2(), update_batch(seed=2)
    engine = cpu_lm_engine(model)
    enable_detached_entropy(engine)
    plain = capture_outputs(engine, td)
    assert "entropy" not in plain and plain["inplace_backward"] is True
    # entropy_coeff != 0: the trainer sets calculate_entropy and verl's graph entropy is used as is
    with_bonus = capture_outputs(engine, td, calculate_entropy=True, **{DETACHED_ENTROPY_KEY: True})
    assert with_bonus["entropy"].requires_grad


def test_entropy_checkpointing_setting_still_works():
    model, td = tiny_qwen2(), update_batch(seed=3)
    engine = cpu_lm_engine(model, entropy_checkpointing=True)
    enable_detached_entropy(engine)
    seam = capture_outputs(engine, td, **{DETACHED_ENTROPY_KEY: True})
    assert not seam["entropy"].requires_grad and torch.isfinite(seam["entropy"].values()).all()


def test_contract_check_fails_loudly_when_verl_engine_changes():
    class MovedEngine:
        def prepare_model_outputs(self, output, output_args, micro_batch, logits_processor_func):
            return {"log_probs": None}

    with pytest.raises(RuntimeError, match="no longer reads"):
        check_engine_contract(MovedEngine())
    check_engine_contract(cpu_lm_engine(tiny_qwen2()))


@pytest.mark.parametrize("version", ["0.8.0", "0.10.0"])
def test_unsupported_verl_versions_are_refused(version):
    with pytest.raises(RuntimeError, match="written for verl"):
        check_verl_version(version)
    check_verl_version("0.9.1")


def test_graph_free_pass_uses_the_read_only_entropy_and_restores_verls():
    from erc_verl import engine as seam

    model, td = tiny_qwen2(vocab_size=64), update_batch(seed=5)
    engine = cpu_lm_engine(model)
    verl_entropy = engine.compute_entropy_from_logits
    enable_detached_entropy(engine)
    with mock.patch.object(seam, "entropy_from_logits_no_grad", wraps=seam.entropy_from_logits_no_grad) as spy:
        seen = capture_outputs(engine, td, **{DETACHED_ENTROPY_KEY: True})
    assert spy.call_count == 1 and spy.call_args.args[0].shape[-1] == 64
    assert seen["entropy"].values().shape == seen["log_probs"].values().shape
    assert engine.compute_entropy_from_logits is verl_entropy  # verl's function restored after the pass
