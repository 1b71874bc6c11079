"""The detached-entropy seam on verl's real FSDPEngineWithLMHead code path (CPU, no FSDP wrapping)."""

import copy
from unittest import mock

import pytest
import torch

from verl.utils import tensordict_utils as tu
from verl.utils import torch_functional as verl_F
from verl.utils.torch_functional import logprobs_from_logits  # noqa: F401  (a global the contract check looks for)
from verl.workers.engine.fsdp import transformer_impl

from erc_verl.seams.engine import (
    DETACHED_ENTROPY_KEY,
    check_engine_contract,
    check_verl_version,
    enable_detached_entropy,
)
from erc_verl.bench.engine_rig import cpu_lm_engine, engine_on_cpu

from support.objects import tiny_qwen2, update_batch


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
        seen["verl_log_probs_restored"] = transformer_impl.logprobs_from_logits is spy  # before mock restores it
    loss.backward()
    seen["inplace_backward"] = spy.call_args.kwargs.get("inplace_backward") if spy.called else None
    seen["verl_log_probs"] = spy.called
    return seen


@pytest.mark.parametrize("engine_overrides", [{}, {"entropy_from_logits_with_chunking": True,
                                                   "entropy_from_logits_chunk_size": 5},
                                              {"entropy_checkpointing": True}])
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
    # verl turns in-place log-prob backward off when it builds the entropy graph; the seam does not call verl's
    # log-prob function at all here: its one pass yields both (no flash-attn on CPU)
    assert graph["inplace_backward"] is False and seam["inplace_backward"] is None


def old_policy_entropy(engine, td):
    """verl's compute_log_prob pass: forward only, no grad, entropy requested."""
    td = td.copy()
    tu.assign_non_tensor(td, calculate_entropy=True)
    with torch.no_grad(), engine_on_cpu():
        _, out = engine.forward_step(td, loss_function=None, forward_only=True)
    return out["model_output"]["entropy"]


@pytest.mark.parametrize("gate_entropy_for_old_policy", [True, False])
def test_old_and_current_entropy_are_computed_alike_under_bf16(gate_entropy_for_old_policy):
    """On-policy (same weights, same tokens) the ERC ratio must be exactly 1. Under FSDP mixed precision the
    logits are bf16; verl's entropy in bf16 against the seam's float32 one put rho anywhere in 0.6..9 in a
    real CPU run. With the gate's function on both passes they agree bit for bit; without it they do not."""
    model, td = tiny_qwen2(vocab_size=512, hidden_size=64), update_batch(seed=6, vocab_size=512)
    engine = cpu_lm_engine(model)
    engine._autocast_dtype = torch.bfloat16
    enable_detached_entropy(engine, gate_entropy_for_old_policy=gate_entropy_for_old_policy)
    old = old_policy_entropy(engine, td).values()
    current = capture_outputs(engine, td, **{DETACHED_ENTROPY_KEY: True})["entropy"].values()
    if gate_entropy_for_old_policy:
        torch.testing.assert_close(current, old, rtol=0, atol=0)
    else:  # the mismatch the flag exists for: bf16 entropy vs float32 entropy of the same logits
        assert old.dtype == torch.bfloat16 and not torch.equal(current, old.float())


def test_detached_entropy_at_sampling_temperature_matches_verl():
    """verl scales the logits by the rollout temperature before entropy and log-probs; so does the seam's pass."""
    model, td = tiny_qwen2(), update_batch(seed=4)
    graph = capture_outputs(cpu_lm_engine(model), td, calculate_entropy=True, temperature=0.7)
    plain = capture_outputs(cpu_lm_engine(model), td, calculate_entropy=True)
    engine = cpu_lm_engine(model)
    enable_detached_entropy(engine)
    seam = capture_outputs(engine, td, temperature=0.7, **{DETACHED_ENTROPY_KEY: True})
    torch.testing.assert_close(seam["entropy"].values(), graph["entropy"].values().detach())
    torch.testing.assert_close(seam["log_probs"].values(), graph["log_probs"].values().detach())
    assert not torch.allclose(seam["entropy"].values(), plain["entropy"].values().detach())  # 0.7 did apply


def test_seam_is_inert_unless_flagged():
    model, td = tiny_qwen2(), update_batch(seed=2)
    engine = cpu_lm_engine(model)
    enable_detached_entropy(engine)
    plain = capture_outputs(engine, td)
    assert "entropy" not in plain and plain["inplace_backward"] is True
    # entropy_coeff != 0: the trainer sets calculate_entropy and verl's graph entropy is used as is
    with_bonus = capture_outputs(engine, td, calculate_entropy=True, **{DETACHED_ENTROPY_KEY: True})
    assert with_bonus["entropy"].requires_grad


def test_contract_check_fails_loudly_when_verl_engine_changes():
    class MovedEngine:
        def prepare_model_outputs(self, output, output_args, micro_batch, logits_processor_func):
            return {"log_probs": None}

    with pytest.raises(RuntimeError, match="no longer reads"):
        check_engine_contract(MovedEngine())
    check_engine_contract(cpu_lm_engine(tiny_qwen2()))


def test_contract_check_fails_loudly_when_verl_stops_calling_its_log_prob_function():
    class OwnLogProbs:
        def prepare_model_outputs(self, output, output_args, micro_batch, logits_processor_func):
            keys = ("calculate_entropy", "distillation_only", "distillation_use_topk", "calculate_sum_pi_squared")
            return {"log_probs": torch.log_softmax(output.logits, -1), "read": keys}

        def _gather_and_unpad_packed(self, tensor, pad_size):
            return tensor

    class QualifiedCall(OwnLogProbs):  # a call the module-global swap would not reach
        def prepare_model_outputs(self, output, output_args, micro_batch, logits_processor_func):
            keys = ("calculate_entropy", "distillation_only", "distillation_use_topk", "calculate_sum_pi_squared")
            return {"log_probs": verl_F.logprobs_from_logits(output.logits, micro_batch), "read": keys}

    for engine in (OwnLogProbs(), QualifiedCall()):
        with pytest.raises(RuntimeError, match="no longer calls its module's logprobs_from_logits"):
            check_engine_contract(engine)


@pytest.mark.parametrize("version", ["0.8.0", "0.10.0", "0.10.0.dev0", "1.9.1"])
def test_unsupported_verl_versions_are_refused(version):
    with pytest.raises(RuntimeError, match=rf"written for verl 0\.9\.x, found verl {version}\b"):
        check_verl_version(version)


@pytest.mark.parametrize("version", ["0.9.1", "0.9.0", "0.9.2.dev0", "0.9.1.post1", "0.9.0rc1", "0.9.3+cu124"])
def test_every_verl_0_9_release_is_accepted(version):
    """Development, pre-, post- and local builds of 0.9.x carry the same seams as the releases."""
    check_verl_version(version)


def test_installed_verl_version_is_read_when_called(monkeypatch):
    import verl

    monkeypatch.setattr(verl, "__version__", "0.10.0")
    with pytest.raises(RuntimeError, match="found verl 0.10.0"):
        check_verl_version()


def test_one_pass_yields_log_probs_and_entropy_and_restores_verls_function():
    from erc_verl.seams import engine as seam

    model, td = tiny_qwen2(vocab_size=64), update_batch(seed=5)
    engine = cpu_lm_engine(model)
    verl_log_probs = transformer_impl.logprobs_from_logits
    enable_detached_entropy(engine)
    with mock.patch.object(seam, "log_probs_and_entropy", wraps=seam.log_probs_and_entropy) as spy, \
            mock.patch.object(seam, "entropy_from_logits_no_grad") as separate_entropy:
        seen = capture_outputs(engine, td, **{DETACHED_ENTROPY_KEY: True})
    assert spy.call_count == 1 and spy.call_args.args[0].shape[-1] == 64
    separate_entropy.assert_not_called()
    assert seen["entropy"].values().shape == seen["log_probs"].values().shape
    assert seen["verl_log_probs_restored"]  # verl's function is back after the pass
    assert transformer_impl.logprobs_from_logits is verl_log_probs


def test_verls_log_prob_function_is_restored_when_the_pass_fails():
    from erc_verl.seams import engine as seam

    model, td = tiny_qwen2(), update_batch(seed=5)
    engine = cpu_lm_engine(model)
    enable_detached_entropy(engine)
    verl_log_probs = transformer_impl.logprobs_from_logits
    with mock.patch.object(seam, "log_probs_and_entropy", side_effect=RuntimeError("boom")):
        with pytest.raises(RuntimeError, match="boom"):
            capture_outputs(engine, td, **{DETACHED_ENTROPY_KEY: True})
    assert transformer_impl.logprobs_from_logits is verl_log_probs
    with pytest.raises(RuntimeError, match="already enabled"):
        enable_detached_entropy(engine)


def float64_reference(model, td, **flags):
    """verl's stock engine on a float64 copy of the model: exact log-probs, entropy and parameter gradients."""
    exact = copy.deepcopy(model).double()
    seen = capture_outputs(cpu_lm_engine(exact), td, calculate_entropy=True, **flags)
    return seen, [p.grad for p in exact.parameters()]


@pytest.mark.parametrize("use_remove_padding", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_one_pass_matches_float64_as_closely_as_verl(use_remove_padding, temperature):
    """Packed (remove-padding) and padded layouts, at the sampling temperature or not: the seam's log-probs,
    entropy and parameter gradients are within float32 rounding of float64, and no further from it than
    verl's own float32 log-probs and gradients."""
    model, td = tiny_qwen2(vocab_size=300), update_batch(seed=8, vocab_size=300)
    flags = dict(use_remove_padding=use_remove_padding, temperature=temperature)
    exact, exact_grads = float64_reference(model, td, **flags)

    stock = capture_outputs(cpu_lm_engine(model), td, **flags)
    stock_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    engine = cpu_lm_engine(model)
    enable_detached_entropy(engine)
    ours = capture_outputs(engine, td, **flags, **{DETACHED_ENTROPY_KEY: True})
    ours_grads = [p.grad.clone() for p in model.parameters()]

    assert stock["verl_log_probs"] and not ours["verl_log_probs"]  # the one-pass function ran in its place

    def error(got, want):
        return (got.detach().double() - want.detach()).abs().max().item()

    exact_lp = exact["log_probs"].values()
    assert error(ours["log_probs"].values(), exact_lp) < 1e-5
    assert error(ours["log_probs"].values(), exact_lp) <= 2 * error(stock["log_probs"].values(), exact_lp) + 1e-7
    assert error(ours["entropy"].values(), exact["entropy"].values()) < 1e-5
    for got, verls, want in zip(ours_grads, stock_grads, exact_grads):
        assert error(got, want) <= 2 * error(verls, want) + 1e-7


def test_without_verls_torch_log_probs_the_entropy_is_a_separate_pass(monkeypatch):
    """Where verl would use flash-attn's (or NPU's) cross-entropy kernel, its log-probs are kept and the entropy
    comes from a separate graph-free pass. flash-attn cannot run here, so verl's choice is mocked (to "not torch")
    and verl then runs its torch kernel anyway: what is checked is the seam's routing and its result."""
    from erc_verl.seams import engine as seam

    model, td = tiny_qwen2(), update_batch(seed=9)
    graph = capture_outputs(cpu_lm_engine(model), td, calculate_entropy=True)
    monkeypatch.setattr(seam, "verl_uses_torch_log_probs", lambda: False)
    engine = cpu_lm_engine(model)
    enable_detached_entropy(engine)
    with mock.patch.object(seam, "log_probs_and_entropy") as fused:
        separate = capture_outputs(engine, td, **{DETACHED_ENTROPY_KEY: True})
    fused.assert_not_called()
    assert separate["inplace_backward"] is True and not separate["entropy"].requires_grad
    torch.testing.assert_close(separate["entropy"].values(), graph["entropy"].values().detach())


@pytest.mark.parametrize("flash, npu, disabled, torch_kernel", [
    (False, False, "0", True), (True, False, "0", False), (True, False, "1", True), (False, True, "0", False)])
def test_verls_log_prob_kernel_choice_is_read_as_verl_makes_it(monkeypatch, flash, npu, disabled, torch_kernel):
    from verl.utils import torch_functional as verl_F

    from erc_verl.seams.engine import verl_uses_torch_log_probs

    monkeypatch.setattr(verl_F, "FLAH_ATTN_CROSS_ENTROPY_LOSS_AVAILABLE", flash)
    monkeypatch.setattr(verl_F, "NPU_CROSS_ENTROPY_LOSS_AVAILABLE", npu)
    monkeypatch.setenv("VERL_DISABLE_FLASH_ATTN_CE", disabled)
    assert verl_uses_torch_log_probs() is torch_kernel


def test_fused_kernels_entropy_is_read_detached_without_recomputation():
    """verl's fused linear-for-PPO forward (torch backend, runs on CPU) returns log-probs and entropy together;
    the seam reads that entropy detached and computes nothing else."""
    from verl.models.transformers.monkey_patch import patch_forward_with_backends

    from erc_verl.seams import engine as seam

    model, td = tiny_qwen2(), update_batch(seed=6)
    tu.assign_non_tensor(td, use_fused_kernels=True)
    # verl patches the model *class*; restore it after the test
    with mock.patch.object(type(model), "forward", type(model).forward):
        patch_forward_with_backends(model, use_fused_kernels=True, fused_kernels_backend="torch")
        graph = capture_outputs(cpu_lm_engine(model), td, calculate_entropy=True)
        grads_graph = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()

        engine = cpu_lm_engine(model)
        enable_detached_entropy(engine)
        with mock.patch.object(seam, "entropy_from_logits_no_grad") as own_entropy:
            fused = capture_outputs(engine, td, **{DETACHED_ENTROPY_KEY: True})
        grads_fused = [p.grad.clone() for p in model.parameters()]

    own_entropy.assert_not_called()
    assert graph["entropy"].requires_grad and not fused["entropy"].requires_grad
    torch.testing.assert_close(fused["entropy"].values(), graph["entropy"].values().detach())
    torch.testing.assert_close(fused["log_probs"].values(), graph["log_probs"].values().detach())
    for a, b in zip(grads_fused, grads_graph):
        torch.testing.assert_close(a, b)


class _SequenceParallelStandIn(torch.nn.Module):
    """Ulysses attention needs flash-attn on CUDA, so it cannot run here. This stand-in gives each rank what an
    Ulysses forward gives it, its shard of the packed sequence's logits, by all-gathering the (padded, sliced)
    inputs verl prepared and running the real model on the whole sequence. Everything around it (verl's pad and
    slice, the all-gather and unpad of entropy and log-probs, the seam) is real, with gloo collectives."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def forward(self, input_ids, position_ids, **kwargs):
        import torch.distributed as dist
        from transformers.modeling_outputs import CausalLMOutputWithPast

        world, rank = dist.get_world_size(), dist.get_rank()

        def gather(t):
            parts = [torch.empty_like(t) for _ in range(world)]
            dist.all_gather(parts, t)
            return torch.cat(parts, dim=-1)

        logits = self.model(input_ids=gather(input_ids), position_ids=gather(position_ids), **kwargs).logits
        return CausalLMOutputWithPast(logits=logits.chunk(world, dim=1)[rank])


def _ulysses_rank(rank, world, init_file):
    import torch.distributed as dist

    from verl.utils.ulysses import set_ulysses_sequence_parallel_group

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model, td = tiny_qwen2(), update_batch(seed=1)
        assert int(td["input_ids"].offsets()[-1]) % world, "want a token count verl must pad for sp"
        reference = capture_outputs(cpu_lm_engine(model), td, calculate_entropy=True)

        set_ulysses_sequence_parallel_group(dist.group.WORLD)
        engine = cpu_lm_engine(_SequenceParallelStandIn(model))
        engine.use_ulysses_sp, engine.ulysses_sequence_parallel_size = True, world
        enable_detached_entropy(engine)
        sharded = capture_outputs(engine, td, **{DETACHED_ENTROPY_KEY: True})

        assert not sharded["entropy"].requires_grad and sharded["inplace_backward"] is None
        torch.testing.assert_close(sharded["entropy"].values(), reference["entropy"].values().detach())
        torch.testing.assert_close(sharded["log_probs"].values(), reference["log_probs"].values().detach())
    finally:
        dist.destroy_process_group()


@pytest.mark.integration
def test_ulysses_sequence_parallel_gathers_the_detached_entropy(tmp_path):
    """Two gloo ranks, sp=2: packed tokens (33) are padded to a multiple of 2 and sliced by verl; each rank's
    detached entropy is all-gathered and unpadded by verl and matches the unsharded entropy token for token."""
    import torch.multiprocessing as mp

    mp.spawn(_ulysses_rank, args=(2, str(tmp_path / "dist_init")), nprocs=2, join=True)
