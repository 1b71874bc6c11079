"""The read-only entropy against a float64 reference of H = -sum p log p."""

import pytest
import torch

from erc_verl.algorithm.entropy import entropy_from_logits_no_grad


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
    assert got.dtype == torch.float32
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
