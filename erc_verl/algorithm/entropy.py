"""Per-token log-probs and entropy of the full vocabulary distribution, streamed over the logits in chunks.

ERC reads the current policy's entropy; it never differentiates it. The log-prob of the sampled token already
needs every logit's exponential (the row's log-sum-exp); the entropy needs one more multiply-add per logit
in that same pass. In base 2 (``b = (l - max l) / ln 2``, ``e = 2 ** b``):

    log-sum-exp = max l + ln 2 * log2(sum e)
    H           = ln 2 * (log2(sum e) - sum(e * b) / sum(e))

Base 2 because ``torch.exp2`` is about 3x faster than ``torch.exp`` on CPU (AVX-512, torch 2.13; the
exponential is most of the pass). Shifting by the row maximum keeps both terms of the difference small
(``b <= 0``), where ``logsumexp(l) - sum(softmax(l) * l)`` (verl's form) subtracts two numbers of the size
of the logits.

``log_probs_and_entropy`` gives the log-probs a gradient and the entropy none. Like verl's in-place log-prob
kernels it saves the logits and one log-sum-exp per row, and its backward recomputes the softmax chunk by
chunk into the gradient it returns: no (tokens x vocab) buffer of its own beyond that gradient.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

# bytes per float32 work buffer: small on CPU so a chunk stays in cache, large on accelerators.
CHUNK_BYTES = {"cpu": 4 << 20}
DEFAULT_CHUNK_BYTES = 256 << 20
_LOG2_E = 1.0 / math.log(2.0)
_LN_2 = math.log(2.0)


def default_chunk_rows(logits: torch.Tensor) -> int:
    budget = CHUNK_BYTES.get(logits.device.type, DEFAULT_CHUNK_BYTES)
    return max(1, budget // (logits.shape[-1] * 4))


def _rows(logits: torch.Tensor, rows: Optional[int]) -> int:
    if rows is not None and rows < 1:
        raise ValueError(f"rows must be a positive number of rows per chunk, got {rows}")
    return rows or default_chunk_rows(logits)


def _autocast_off(device: torch.device):
    """Autocast off: verl runs the engine's outputs under ``torch.autocast`` (bf16 with FSDP mixed precision),
    which would run ``linalg.vecdot`` in bf16 (and ``sum(e * b)`` of a near-flat row overflows float16). The
    pass's precision is its own: float32, float64 for float64 logits."""
    return torch.autocast(device_type=device.type, enabled=False)


def _stream(flat: torch.Tensor, rows: int, labels: Optional[torch.Tensor]):
    """One pass over ``flat`` (tokens, vocab): per row the log-sum-exp, the entropy and, with ``labels``, the
    label's logit. Two (rows, vocab) work buffers are reused for every chunk; ``flat`` is not modified."""
    with _autocast_off(flat.device):
        return _stream_chunks(flat, rows, labels)


def _stream_chunks(flat: torch.Tensor, rows: int, labels: Optional[torch.Tensor]):
    dtype = torch.promote_types(flat.dtype, torch.float32)  # float32, or float64 for float64 logits (references)
    n_rows = flat.shape[0]
    lse = torch.empty(n_rows, dtype=dtype, device=flat.device)
    entropy = torch.empty(n_rows, dtype=dtype, device=flat.device)
    shifted = torch.empty(min(rows, n_rows), flat.shape[-1], dtype=dtype, device=flat.device)
    weights = torch.empty_like(shifted)
    for start in range(0, n_rows, rows):
        chunk = flat[start : start + rows]
        n = chunk.shape[0]
        b, e = shifted[:n], weights[:n]
        row_max = chunk.amax(dim=-1, keepdim=True).to(dtype)
        torch.sub(chunk, row_max, out=b)  # in the compute dtype (row_max is), also for 16-bit logits
        # 2 ** -200 is 0 in float32, and the clamp keeps masked logits' 0 * -inf from turning into NaN
        b.mul_(_LOG2_E).clamp_(min=-200.0)
        torch.exp2(b, out=e)
        total = e.sum(dim=-1)
        log2_total = total.log2()
        mean_b = torch.linalg.vecdot(e, b) / total
        torch.sub(log2_total, mean_b, out=entropy[start : start + n]).mul_(_LN_2)
        torch.add(row_max.squeeze(-1), log2_total, alpha=_LN_2, out=lse[start : start + n])
    label_logits = None if labels is None else flat.gather(-1, labels.unsqueeze(-1)).squeeze(-1).to(dtype)
    return lse, entropy, label_logits


@torch.no_grad()
def entropy_from_logits_no_grad(logits: torch.Tensor, rows: Optional[int] = None) -> torch.Tensor:
    """Float32 (float64 for float64 logits) entropy over the last dimension of ``logits`` (..., vocab), ``rows``
    rows at a time (default: the device's budget above). Logits at -inf or float min (masked tokens) count as
    probability 0."""
    flat = logits.reshape(-1, logits.shape[-1])
    _, entropy, _ = _stream(flat, _rows(flat, rows), labels=None)
    return entropy.view(logits.shape[:-1])


class _LogProbsAndEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, rows: int):
        flat, flat_labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
        lse, entropy, label_logits = _stream(flat, rows, flat_labels)
        ctx.save_for_backward(logits, labels, lse)
        ctx.rows = rows
        entropy = entropy.view(labels.shape)
        ctx.mark_non_differentiable(entropy)
        return (label_logits - lse).view(labels.shape), entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_log_probs: torch.Tensor, _grad_entropy):
        """d log p(y) / d l = onehot(y) - softmax(l), chunk by chunk from the saved row log-sum-exp."""
        logits, labels, lse = ctx.saved_tensors
        if grad_log_probs is None:
            return None, None, None
        flat, flat_labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1, 1)
        upstream = grad_log_probs.reshape(-1, 1).to(lse.dtype)
        grad = torch.empty_like(flat)
        same_dtype = grad.dtype == lse.dtype
        work = None if same_dtype else torch.empty(min(ctx.rows, flat.shape[0]), flat.shape[-1], dtype=lse.dtype,
                                                   device=flat.device)
        with _autocast_off(flat.device):
            for start in range(0, flat.shape[0], ctx.rows):
                chunk = flat[start : start + ctx.rows]
                n = chunk.shape[0]
                out = grad[start : start + n] if same_dtype else work[:n]
                g = upstream[start : start + n]
                torch.sub(chunk, lse[start : start + n, None], out=out)
                out.mul_(_LOG2_E).exp2_().mul_(g.neg())
                out.scatter_add_(1, flat_labels[start : start + n], g)
                if not same_dtype:
                    grad[start : start + n].copy_(out)
        return grad.view(logits.shape), None, None


def log_probs_and_entropy(logits: torch.Tensor, labels: torch.Tensor,
                          rows: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log p(labels), H)`` over the last dimension of ``logits`` (..., vocab), ``labels`` (...), in one pass.

    Both are float32, computed in float32 (autocast off) from 16- and 32-bit logits, as verl's log-probs are under
    autocast on GPUs; float64 logits (references) are computed and returned in float64. The log-probs carry a
    gradient to ``logits`` (in their dtype); the entropy is read-only.
    """
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels {tuple(labels.shape)} must have the logits' shape without the vocabulary, "
                         f"{tuple(logits.shape[:-1])}")
    return _LogProbsAndEntropy.apply(logits, labels, _rows(logits, rows))
