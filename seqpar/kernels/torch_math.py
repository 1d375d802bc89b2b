"""Exact attention in plain torch ops, with a hand-written backward.

Used on CPU (and anywhere no fused kernel fits). Why not SDPA on CPU: the CPU flash op returns an
LSE whose gradient autograd drops, so any LSE merge (ring attention) built on it is wrong. Here the
forward returns (out, lse) and the backward recomputes probabilities from the saved global LSE,
exactly like flash attention, so memory stays O(chunk x keys) instead of O(T^2).

Layout: q [T, H, D], k/v [T, Hkv, D] (GQA: H a multiple of Hkv), out [T, H, D], lse [H, T] fp32.
Masking is "causal within documents": query i sees key j iff doc(i) == doc(j) and pos(i) >= pos(j),
where pos is the index in the (packed) sequence. Math is done in fp32 whatever the input dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Queries processed per chunk; bounds the score matrix to chunk x keys per head.
DEFAULT_CHUNK = 1024


def _split_heads(x: Tensor, hkv: int) -> Tensor:
    """[T, H, D] -> [Hkv, G, T, D] fp32 (G = H / Hkv query heads share one kv head)."""
    t, h, d = x.shape
    return x.float().view(t, hkv, h // hkv, d).permute(1, 2, 0, 3)


def _merge_heads(x: Tensor) -> Tensor:
    """[Hkv, G, T, D] -> [T, H, D]."""
    hkv, g, t, d = x.shape
    return x.permute(2, 0, 1, 3).reshape(t, hkv * g, d)


def block_mask(q_idx: Tensor, k_idx: Tensor, q_doc: Tensor, k_doc: Tensor) -> Tensor:
    """[Tq, Tk] bool: query sees key (same document, not in the future)."""
    return (q_doc[:, None] == k_doc[None, :]) & (q_idx[:, None] >= k_idx[None, :])


def block_forward(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float
) -> tuple[Tensor, Tensor]:
    """One (query block, key block) pair. Returns out [Tq, H, D] fp32 and lse [H, Tq] fp32.

    Rows with no visible key get out = 0 and lse = -inf (they merge away in ring attention).
    """
    hkv = k.shape[1]
    qh, kh, vh = _split_heads(q, hkv), k.float().permute(1, 0, 2), v.float().permute(1, 0, 2)
    s = torch.einsum("hgqd,hkd->hgqk", qh, kh) * scale
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [Hkv, G, Tq]
    p = torch.exp(s - lse.unsqueeze(-1).clamp_min(torch.finfo(torch.float32).min))
    p = p.nan_to_num_(0.0)  # fully masked rows: exp(-inf - -inf)
    out = torch.einsum("hgqk,hkd->hgqd", p, vh)
    return _merge_heads(out), lse.flatten(0, 1)


def block_backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    mask: Tensor,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of one block given the *final* out and lse of its queries (flash-style).

    Returns fp32 dq [Tq, H, D], dk and dv [Tk, Hkv, D].
    """
    hkv = k.shape[1]
    qh, kh, vh = _split_heads(q, hkv), k.float().permute(1, 0, 2), v.float().permute(1, 0, 2)
    doh, oh = _split_heads(dout, hkv), _split_heads(out, hkv)
    lse_h = lse.view(hkv, -1, lse.shape[-1])
    s = torch.einsum("hgqd,hkd->hgqk", qh, kh) * scale
    p = torch.exp(s - lse_h.unsqueeze(-1)).masked_fill(~mask, 0.0)
    delta = (doh * oh).sum(-1, keepdim=True)  # [Hkv, G, Tq, 1]
    dv = torch.einsum("hgqk,hgqd->hkd", p, doh)
    dp = torch.einsum("hgqd,hkd->hgqk", doh, vh)
    ds = p * (dp - delta) * scale
    dq = torch.einsum("hgqk,hkd->hgqd", ds, kh)
    dk = torch.einsum("hgqk,hgqd->hkd", ds, qh)
    return _merge_heads(dq), dk.permute(1, 0, 2), dv.permute(1, 0, 2)


def doc_ids_from_cu(cu_seqlens: Tensor, total: int) -> Tensor:
    """Document index of every token from cumulative sequence lengths [N+1]."""
    idx = torch.arange(total, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:], idx, right=True)


def _chunks(cu_seqlens: Tensor, total: int, chunk: int):
    """Yield (q_lo, q_hi, k_lo): query chunk and the first key any of its queries can see."""
    starts = cu_seqlens[:-1].tolist()
    doc = doc_ids_from_cu(cu_seqlens, total).tolist()
    for lo in range(0, total, chunk):
        hi = min(lo + chunk, total)
        yield lo, hi, starts[doc[lo]]


class _VarlenAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, scale, chunk):  # type: ignore[override]
        total = q.shape[0]
        doc = doc_ids_from_cu(cu_seqlens, total)
        idx = torch.arange(total, device=q.device)
        out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.empty(q.shape[1], total, dtype=torch.float32, device=q.device)
        for lo, hi, klo in _chunks(cu_seqlens, total, chunk):
            mask = block_mask(idx[lo:hi], idx[klo:hi], doc[lo:hi], doc[klo:hi])
            o, l_ = block_forward(q[lo:hi], k[klo:hi], v[klo:hi], mask, scale)
            out[lo:hi], lse[:, lo:hi] = o, l_
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
        ctx.scale, ctx.chunk = scale, chunk
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):  # type: ignore[override]
        q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
        total = q.shape[0]
        doc = doc_ids_from_cu(cu_seqlens, total)
        idx = torch.arange(total, device=q.device)
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
        dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
        for lo, hi, klo in _chunks(cu_seqlens, total, ctx.chunk):
            mask = block_mask(idx[lo:hi], idx[klo:hi], doc[lo:hi], doc[klo:hi])
            dq_, dk_, dv_ = block_backward(
                dout[lo:hi], q[lo:hi], k[klo:hi], v[klo:hi], out[lo:hi], lse[:, lo:hi], mask, ctx.scale
            )
            dq[lo:hi] = dq_
            dk[klo:hi] += dk_
            dv[klo:hi] += dv_
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def varlen_attention(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, scale: float, chunk: int = DEFAULT_CHUNK
) -> tuple[Tensor, Tensor]:
    """Causal attention within documents given by ``cu_seqlens``; returns (out, lse).

    ``lse`` is returned for merging but carries no gradient (like flash attention's).
    """
    return _VarlenAttention.apply(q, k, v, cu_seqlens, scale, chunk)


class TorchBlockKernel:
    """Dense blocks (causal or full) for ring attention, exact, chunked over query rows."""

    name = "torch"

    def __init__(self, chunk: int = DEFAULT_CHUNK):
        self.chunk = chunk

    def _blocks(self, lq: int, lk: int, causal: bool, device):
        for lo in range(0, lq, self.chunk):
            hi = min(lo + self.chunk, lq)
            k_hi = hi if causal else lk  # causal blocks are square and aligned
            if causal:
                qi = torch.arange(lo, hi, device=device)
                mask = qi[:, None] >= torch.arange(k_hi, device=device)[None, :]
            else:
                mask = torch.ones(hi - lo, k_hi, dtype=torch.bool, device=device)
            yield lo, hi, k_hi, mask

    def forward(self, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
        out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.empty(q.shape[1], q.shape[0], dtype=torch.float32, device=q.device)
        for lo, hi, k_hi, mask in self._blocks(q.shape[0], k.shape[0], causal, q.device):
            out[lo:hi], lse[:, lo:hi] = block_forward(q[lo:hi], k[:k_hi], v[:k_hi], mask, scale)
        return out, lse

    def backward(self, dout, q, k, v, out, lse, causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
        dq = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
        dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
        for lo, hi, k_hi, mask in self._blocks(q.shape[0], k.shape[0], causal, q.device):
            dq[lo:hi], dk_, dv_ = block_backward(
                dout[lo:hi], q[lo:hi], k[:k_hi], v[:k_hi], out[lo:hi], lse[:, lo:hi], mask, scale
            )
            dk[:k_hi] += dk_
            dv[:k_hi] += dv_
        return dq, dk, dv

    def describe(self) -> str:
        return "torch"
