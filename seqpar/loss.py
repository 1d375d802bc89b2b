"""Cross-entropy over the vocabulary computed in chunks of tokens.

The full [tokens x vocab] logits of a 100K-token sequence with a 128K vocabulary would be 50 GB in
fp32. ``chunked_cross_entropy`` projects and scores ``chunk`` tokens at a time, keeps only one fp32
LSE per token, and recomputes each chunk's logits in the backward (one extra matmul, no stored
logits), so peak memory is O(chunk x vocab).
"""

from __future__ import annotations

import torch
from torch import Tensor

from seqpar.data.packing import IGNORE_INDEX


class _ChunkedCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, chunk: int) -> Tensor:  # type: ignore[override]
        acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32 at least, fp64 stays fp64
        total = torch.zeros((), dtype=acc, device=hidden.device)
        lse = torch.zeros(hidden.shape[0], dtype=acc, device=hidden.device)
        for lo in range(0, hidden.shape[0], chunk):
            lab = labels[lo : lo + chunk]
            valid = lab != IGNORE_INDEX
            if not bool(valid.any()):
                continue
            logits = (hidden[lo : lo + chunk] @ weight.t()).to(acc)
            lse_c = torch.logsumexp(logits, dim=-1)
            lse[lo : lo + chunk] = lse_c
            tgt = logits.gather(1, lab.clamp_min(0).unsqueeze(1)).squeeze(1)
            total += torch.where(valid, lse_c - tgt, 0.0).sum()
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.chunk = chunk
        return total

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        hidden, weight, labels, lse = ctx.saved_tensors
        d_hidden = torch.zeros_like(hidden)
        d_weight = torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device)
        for lo in range(0, hidden.shape[0], ctx.chunk):
            lab = labels[lo : lo + ctx.chunk]
            valid = lab != IGNORE_INDEX
            if not bool(valid.any()):
                continue
            h = hidden[lo : lo + ctx.chunk]
            # softmax - onehot, zero for ignored rows, times the incoming scalar gradient
            p = torch.exp((h @ weight.t()).to(lse.dtype) - lse[lo : lo + ctx.chunk, None])
            p.scatter_add_(1, lab.clamp_min(0).unsqueeze(1), -torch.ones_like(p[:, :1]))
            p = p * (valid.unsqueeze(1) * grad)
            d_hidden[lo : lo + ctx.chunk] = (p.to(weight.dtype) @ weight).to(hidden.dtype)
            d_weight += p.t() @ h.to(lse.dtype)
        return d_hidden, d_weight.to(weight.dtype), None, None


def chunked_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, chunk: int = 4096) -> Tensor:
    """Sum (not mean) of token cross-entropies of ``hidden @ weight.T`` against ``labels``.

    hidden [T, H], weight [V, H], labels [T] with ``IGNORE_INDEX`` for tokens without loss.
    The caller divides by the global count of real tokens (see ``seqpar.engine``).
    """
    return _ChunkedCE.apply(hidden, weight, labels, chunk)
