"""Per-token entropy of the full vocabulary distribution, for reading only (no autograd graph).

ERC reads the current policy's entropy; it never differentiates it. verl's entropy functions are written for
the entropy bonus (differentiable): ``logsumexp(l) - sum(softmax(l) * l)`` costs two exponentials per logit
and, without ``torch.compile``, three (tokens x vocab) float32 temporaries. Read-only, the same quantity
needs one exponential per logit and two small reused buffers. In base 2 (``b = (l - max l) / ln 2``):

    e = 2 ** b,  H = ln 2 * (log2(sum e) - sum(e * b) / sum(e))

Base 2 because ``torch.exp2`` is about 3x faster than ``torch.exp`` on CPU (AVX-512, torch 2.13; the
exponential is most of this function's time). Shifting by the row maximum before the products also keeps
both terms of the difference small (``b <= 0``), where verl's form subtracts two numbers of the size of
the logits.
"""

from __future__ import annotations

import math

import torch

# float32 bytes per work buffer: small on CPU so a chunk stays in cache, large on accelerators.
CHUNK_BYTES = {"cpu": 4 << 20}
DEFAULT_CHUNK_BYTES = 256 << 20
_LOG2_E = 1.0 / math.log(2.0)
_LN_2 = math.log(2.0)


def default_chunk_rows(logits: torch.Tensor) -> int:
    budget = CHUNK_BYTES.get(logits.device.type, DEFAULT_CHUNK_BYTES)
    return max(1, budget // (logits.shape[-1] * 4))


@torch.no_grad()
def entropy_from_logits_no_grad(logits: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """Float32 entropy over the last dimension of ``logits`` (..., vocab), any float dtype, ``rows`` rows at a
    time (default: the device's budget above). ``logits`` is not modified. Logits at -inf or float min (masked
    tokens) count as probability 0."""
    if rows is not None and rows < 1:
        raise ValueError(f"rows must be a positive number of rows per chunk, got {rows}")
    flat = logits.reshape(-1, logits.shape[-1])
    rows = rows or default_chunk_rows(flat)
    entropy = torch.empty(flat.shape[0], dtype=torch.float32, device=flat.device)
    shifted = torch.empty(min(rows, flat.shape[0]), flat.shape[-1], dtype=torch.float32, device=flat.device)
    weights = torch.empty_like(shifted)
    for start in range(0, flat.shape[0], rows):
        chunk = flat[start : start + rows]
        n = chunk.shape[0]
        b, e = shifted[:n], weights[:n]
        row_max = chunk.amax(dim=-1, keepdim=True)
        if chunk.dtype.itemsize >= 4:
            torch.sub(chunk, row_max, out=b)
        else:  # 16-bit: upcast first so the shift is done in float32
            b.copy_(chunk).sub_(row_max.float())
        # 2 ** -200 is 0 in float32, and the clamp keeps masked logits' 0 * -inf from turning into NaN
        b.mul_(_LOG2_E).clamp_(min=-200.0)
        torch.exp2(b, out=e)
        total = e.sum(dim=-1)
        weighted = e.mul_(b).sum(dim=-1)
        torch.sub(total.log2(), weighted.div_(total), out=entropy[start : start + n]).mul_(_LN_2)
    return entropy.view(logits.shape[:-1])
