"""The read-only entropy and the fused log-prob + entropy pass against float64 references."""

import math

import pytest
import torch

from erc_verl.algorithm.entropy import entropy_from_logits_no_grad, log_probs_and_entropy


def reference_entropy(logits: torch.Tensor) -> torch.Tensor:
    log_p = torch.log_softmax(logits.double(), dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1)


@pytest.mark.parametrize("rows", [None, 1, 3, 7, 64])
def test_matches_float64_reference_across_chunk_boundaries(rows):
    logits = torch.randn(23, 1000, generator=torch.Generator().manual_seed(0)) * 4
    torch.testing.assert_close(entropy_from_logits_no_grad(logits, rows).double(), reference_entropy(logits),
                               rtol=0, atol=1e-5)


def test_extreme_rows_uniform_peaked_and_offset():
    vocab = 151_936
    uniform = torch.zeros(vocab)
    peaked = torch.full((vocab,), -1e4)
    peaked[7] = 0.0
    offset = torch.randn(vocab, generator=torch.Generator().manual_seed(1)) + 3e3  # logits far from zero
    logits = torch.stack([uniform, peaked, offset])
    got = entropy_from_logits_no_grad(logits)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), reference_entropy(logits), rtol=0, atol=1e-4)
    assert got[0].item() == pytest.approx(torch.log(torch.tensor(float(vocab))).item(), abs=1e-4)
    assert got[1].item() == 0.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_dtypes_match_the_reference(dtype):
    logits = (torch.randn(9, 4096, generator=torch.Generator().manual_seed(2)) * 8).to(dtype)
    got = entropy_from_logits_no_grad(logits, rows=4)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(got.double(), reference_entropy(logits.double()), rtol=0, atol=1e-5)


def test_masked_logits_count_as_probability_zero():
    logits = torch.randn(3, 200, generator=torch.Generator().manual_seed(3))
    masked = logits.clone()
    masked[:, 100:] = torch.finfo(torch.float32).min
    masked[1, 150] = -float("inf")
    torch.testing.assert_close(entropy_from_logits_no_grad(masked), entropy_from_logits_no_grad(logits[:, :100]))


def test_leading_dimensions_are_kept_and_bad_rows_refused():
    logits = torch.randn(2, 3, 50, generator=torch.Generator().manual_seed(4))
    got = entropy_from_logits_no_grad(logits, rows=4)
    assert got.shape == (2, 3)
    torch.testing.assert_close(got.double(), reference_entropy(logits), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="rows"):
        entropy_from_logits_no_grad(logits, rows=0)


def test_builds_no_graph_and_leaves_logits_untouched():
    logits = torch.randn(5, 300, requires_grad=True)
    before = logits.detach().clone()
    got = entropy_from_logits_no_grad(logits, rows=2)
    assert not got.requires_grad and got.grad_fn is None
    assert torch.equal(logits.detach(), before)


def test_empty_input():
    assert entropy_from_logits_no_grad(torch.empty(0, 10)).shape == (0,)


# ----------------------------------------------------------------------- log-probs and entropy in one pass


def reference_log_probs(logits: torch.Tensor, labels: torch.Tensor, upstream: torch.Tensor):
    """float64 log p(label), and the gradient of sum(upstream * log p) with respect to the logits."""
    exact = logits.detach().double().requires_grad_()
    log_p = torch.log_softmax(exact, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    (log_p * upstream.double()).sum().backward()
    return log_p.detach(), exact.grad


def fused(logits: torch.Tensor, labels: torch.Tensor, upstream: torch.Tensor, rows=None):
    leaf = logits.detach().requires_grad_()
    log_p, entropy = log_probs_and_entropy(leaf, labels, rows)
    (log_p * upstream).sum().backward()
    return log_p.detach(), entropy, leaf.grad


def sample(tokens=37, vocab=3000, scale=4.0, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(tokens, vocab, generator=g) * scale).to(dtype)
    return logits, torch.randint(0, vocab, (tokens,), generator=g), torch.randn(tokens, generator=g)


@pytest.mark.parametrize("rows", [None, 1, 5, 64])
def test_fused_log_probs_gradient_and_entropy_match_float64(rows):
    """Float32 logits: everything within float32 rounding of the exact values, as close as verl's own."""
    from verl.utils.torch_functional import logprobs_from_logits_v2

    logits, labels, upstream = sample()
    exact_lp, exact_grad = reference_log_probs(logits, labels, upstream)
    log_p, entropy, grad = fused(logits, labels, upstream, rows)
    assert log_p.dtype == entropy.dtype == torch.float32 and grad.dtype == torch.float32
    torch.testing.assert_close(log_p.double(), exact_lp, rtol=0, atol=2e-6)
    # a probability near 1 carries the rounding of (logit - log-sum-exp): ~1e-6 for logits of size ~16
    torch.testing.assert_close(grad.double(), exact_grad, rtol=0, atol=2e-6)
    torch.testing.assert_close(entropy.double(), reference_entropy(logits), rtol=0, atol=2e-6)
    leaf = logits.clone().requires_grad_()
    verl_lp = logprobs_from_logits_v2(leaf, labels)
    (verl_lp * upstream).sum().backward()
    for ours, verls, exact in ((log_p, verl_lp, exact_lp), (grad, leaf.grad, exact_grad)):
        assert (ours.double() - exact).abs().max() <= 2 * (verls.double() - exact).abs().max() + 1e-7


def test_fused_pass_at_temperature_differentiates_through_the_scaling():
    """verl divides the logits by the sampling temperature before its log-prob call; the gradient flows back
    through that division to the raw logits."""
    logits, labels, upstream = sample(seed=1)
    raw = logits.clone().requires_grad_()
    log_p, entropy = log_probs_and_entropy(raw / 0.7, labels)
    (log_p * upstream).sum().backward()
    exact = logits.double().requires_grad_()
    exact_lp = torch.log_softmax(exact / 0.7, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    (exact_lp * upstream.double()).sum().backward()
    torch.testing.assert_close(log_p.detach().double(), exact_lp.detach(), rtol=0, atol=4e-6)
    torch.testing.assert_close(raw.grad.double(), exact.grad, rtol=0, atol=2e-6)
    torch.testing.assert_close(entropy.double(), reference_entropy(logits / 0.7), rtol=0, atol=4e-6)


def test_fused_pass_on_masked_logits():
    """Masked logits (float min, -inf) have probability 0: no gradient, no entropy, finite log-probs elsewhere."""
    logits, labels, upstream = sample(tokens=6, vocab=400, seed=2)
    labels = labels % 200
    masked = logits.clone()
    masked[:, 200:] = torch.finfo(torch.float32).min
    masked[3, 300] = -float("inf")
    log_p, entropy, grad = fused(masked, labels, upstream)
    narrow_lp, narrow_entropy, narrow_grad = fused(logits[:, :200], labels, upstream)
    assert torch.isfinite(log_p).all() and torch.isfinite(grad).all()
    assert not grad[:, 200:].any()
    torch.testing.assert_close(log_p, narrow_lp)
    torch.testing.assert_close(entropy, narrow_entropy)
    torch.testing.assert_close(grad[:, :200], narrow_grad)


def test_fused_pass_on_bf16_logits():
    """bf16 logits (FSDP mixed precision): log-probs and entropy are computed in float32 from the bf16 values,
    so they are float32-accurate for those values; the gradient comes back in bf16 (one rounding)."""
    logits, labels, upstream = sample(seed=3, dtype=torch.bfloat16)
    exact_lp, exact_grad = reference_log_probs(logits, labels, upstream)
    log_p, entropy, grad = fused(logits, labels, upstream, rows=8)
    assert log_p.dtype == torch.float32 and grad.dtype == torch.bfloat16
    torch.testing.assert_close(log_p.double(), exact_lp, rtol=0, atol=2e-6)
    torch.testing.assert_close(entropy.double(), reference_entropy(logits.double()), rtol=0, atol=2e-6)
    torch.testing.assert_close(grad.double(), exact_grad, rtol=2**-8, atol=1e-9)


def test_fused_entropy_is_read_only_and_agrees_with_the_entropy_alone():
    logits, labels, _ = sample(seed=4)
    leaf = logits.clone().requires_grad_()
    log_p, entropy = log_probs_and_entropy(leaf, labels, rows=3)
    assert log_p.requires_grad and not entropy.requires_grad
    assert torch.equal(entropy, entropy_from_logits_no_grad(logits, rows=3))  # same chunks, same arithmetic
    assert torch.equal(leaf.detach(), logits)
    with pytest.raises(ValueError, match="rows"):
        log_probs_and_entropy(leaf, labels, rows=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_pass_stays_float32_under_autocast(dtype):
    """verl's engine runs prepare_model_outputs under torch.autocast (bf16 with FSDP mixed precision); autocast
    would run some of the pass's reductions in 16 bits (bf16 rounding of H, float16 overflow on flat rows)."""
    logits, labels, upstream = sample(seed=5)
    flat = torch.zeros(1, 151_936)  # near-flat row: sum(e * b) is ~1e5, past float16's range
    exact_lp, exact_grad = reference_log_probs(logits, labels, upstream)
    with torch.autocast("cpu", dtype=dtype):
        log_p, entropy, grad = fused(logits, labels, upstream)
        flat_entropy = entropy_from_logits_no_grad(flat + torch.randn(1, 151_936) * 1e-3)
    assert log_p.dtype == entropy.dtype == torch.float32
    torch.testing.assert_close(log_p.double(), exact_lp, rtol=0, atol=2e-6)
    torch.testing.assert_close(entropy.double(), reference_entropy(logits), rtol=0, atol=2e-6)
    torch.testing.assert_close(grad.double(), exact_grad, rtol=0, atol=2e-6)
    assert torch.isfinite(flat_entropy).all() and abs(flat_entropy.item() - math.log(151_936)) < 1e-4


def test_labels_must_match_the_logits_rows():
    logits, labels, _ = sample(tokens=4, vocab=10)
    with pytest.raises(ValueError, match="labels"):
        log_probs_and_entropy(logits, labels[:3])


def test_float64_logits_give_float64_log_probs_and_gradients():
    """References (the GPU kit's float64 update) need the pass in float64: checked with autograd's gradcheck."""
    logits, labels, _ = sample(tokens=3, vocab=20, seed=6)
    exact = logits.double().requires_grad_()
    log_p, entropy = log_probs_and_entropy(exact, labels, rows=2)
    assert log_p.dtype == entropy.dtype == torch.float64
    torch.testing.assert_close(entropy, reference_entropy(logits), rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x: log_probs_and_entropy(x, labels, rows=2)[0], (exact,))
