"""The read-only entropy against a float64 reference of H = -sum p log p."""

import pytest
import torch

from erc_verl.entropy import entropy_from_logits_no_grad


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


def test_bfloat16_logits_are_upcast_before_the_shift():
    logits = (torch.randn(9, 4096, generator=torch.Generator().manual_seed(2)) * 8).bfloat16()
    got = entropy_from_logits_no_grad(logits, rows=4)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), reference_entropy(logits.float()), rtol=0, atol=1e-5)


def test_builds_no_graph_and_leaves_logits_untouched():
    logits = torch.randn(5, 300, requires_grad=True)
    before = logits.detach().clone()
    got = entropy_from_logits_no_grad(logits, rows=2)
    assert not got.requires_grad and got.grad_fn is None
    assert torch.equal(logits.detach(), before)


def test_empty_input():
    assert entropy_from_logits_no_grad(torch.empty(0, 10)).shape == (0,)
