"""Zigzag ring attention: exact causal attention within documents over a ring of ranks.

Each ring rank holds two zigzag chunks of the stream (``sharding.py``). K/V blocks travel around
the ring (``batch_isend_irecv``, the next block's transfer overlapping the current block's
compute); every rank merges the partial results into its output with an fp32 log-sum-exp merge.
The backward is hand-written, per block, from the *global* output and LSE (as flash attention's
backward is), and the dK/dV of each block travel around the ring back to their owner in fp32.

Which queries see which keys is derived from chunk order and the document layout alone:

* a chunk against itself: causal attention within each document of the chunk;
* a query chunk against an earlier key chunk: at most ONE document spans both (the one running
  from the end of the key chunk to the start of the query chunk), so it is a single dense,
  non-causal block: a prefix of the query chunk against a suffix of the key chunk;
* against a later key chunk: nothing.

So a (query rank, key rank) pair is a short list of dense ``Segment``s, each computed by a block
kernel with ``forward(q, k, v, causal, scale) -> (out, lse)`` and
``backward(dout, q, k, v, out, lse, causal, scale) -> (dq, dk, dv)`` (any float dtype: the ring
accumulates in fp32).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from seqpar.parallel.sharding import RingMeta, zigzag_chunks


@dataclass(frozen=True)
class Segment:
    q_lo: int  # rows of the ring-local query sequence
    q_hi: int
    k_lo: int  # rows of the ring-local key sequence of the source rank
    k_hi: int
    causal: bool


def _doc_of(cu: list[int], pos: int) -> int:
    return bisect.bisect_right(cu, pos) - 1


def segments(meta: RingMeta, src: int) -> list[Segment]:
    """Dense blocks between this rank's queries and ring rank ``src``'s keys."""
    c, cu = meta.chunk, meta.cu_seqlens
    if meta.ring == 1:  # both chunks are this rank's and adjacent: one causal block per document
        return [Segment(a, b, a, b, True) for a, b in zip(cu[:-1], cu[1:])]
    out: list[Segment] = []
    for qi, qc in enumerate(zigzag_chunks(meta.ring, meta.rank)):
        for ki, kc in enumerate(zigzag_chunks(meta.ring, src)):
            q0, k0 = qc * c, kc * c  # global start of each chunk
            if kc == qc:  # same chunk: causal within each document inside it
                d = _doc_of(cu, q0)
                while d < len(cu) - 1 and cu[d] < q0 + c:
                    lo, hi = max(cu[d], q0), min(cu[d + 1], q0 + c)
                    out.append(Segment(qi * c + lo - q0, qi * c + hi - q0, ki * c + lo - k0, ki * c + hi - k0, True))
                    d += 1
            elif kc < qc:  # earlier keys: the one document spanning both chunks, if any
                d = _doc_of(cu, q0)
                if cu[d] < k0 + c:  # that document starts before the key chunk ends
                    q_hi = min(cu[d + 1], q0 + c)
                    k_lo = max(cu[d], k0)
                    out.append(Segment(qi * c, qi * c + q_hi - q0, ki * c + k_lo - k0, ki * c + c, False))
    return out


def _merge(out: Tensor, lse: Tensor, rows: slice, blk_out: Tensor, blk_lse: Tensor) -> None:
    """Fold a block's (out, lse) into the running fp32 accumulators for ``rows`` (in place).

    Every row of a segment sees at least one key, so ``blk_lse`` is finite and no NaN arises
    when the running ``lse`` is still -inf.
    """
    old = lse[:, rows]
    new = torch.logaddexp(old, blk_lse)
    w_old = torch.exp(old - new).t().unsqueeze(-1)  # [rows, H, 1]
    w_blk = torch.exp(blk_lse - new).t().unsqueeze(-1)
    out[rows] = out[rows] * w_old + blk_out.float() * w_blk
    lse[:, rows] = new


class RingComm:
    """Send to the next ring rank, receive from the previous one (global ranks)."""

    def __init__(self, ranks: list[int], rank: int, group):
        self.next = ranks[(rank + 1) % len(ranks)]
        self.prev = ranks[(rank - 1) % len(ranks)]
        self.group = group

    def start(self, tensors: list[Tensor]) -> tuple[list, list[Tensor]]:
        recv = [torch.empty_like(t) for t in tensors]
        ops = [dist.P2POp(dist.isend, t.contiguous(), self.next, self.group) for t in tensors]
        ops += [dist.P2POp(dist.irecv, r, self.prev, self.group) for r in recv]
        return dist.batch_isend_irecv(ops), recv

    @staticmethod
    def wait(pending: tuple[list, list[Tensor]]) -> list[Tensor]:
        for req in pending[0]:
            req.wait()
        return pending[1]


def _ordered(meta: RingMeta, src: int) -> list[Segment]:
    """Segments against ``src``; for this rank's own keys the same-chunk (causal) ones first.

    The causal segments of step 0 partition the local rows (every token lies in one document of
    its chunk), so they can *assign* out / LSE / dq / dk / dv instead of merging into initialised
    accumulators: no zero / -inf fill and one merge pass less. Checked here, cheaply, every call.
    """
    segs = segments(meta, src)
    if src != meta.rank:
        return segs
    diag = [s for s in segs if s.causal]
    local = meta.total if meta.ring == 1 else 2 * meta.chunk
    if sum(s.q_hi - s.q_lo for s in diag) != local:
        raise RuntimeError(f"ring segments do not cover the local rows: {diag}")
    return diag + [s for s in segs if not s.causal]


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, meta: RingMeta, comm: RingComm, kernel, scale: float):  # type: ignore[override]
        n = meta.ring
        # fp32 accumulators, filled by step 0's causal segments (see _ordered)
        out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.empty((q.shape[1], q.shape[0]), dtype=torch.float32, device=q.device)
        kv = [k, v]
        for step in range(n):
            src = (meta.rank - step) % n
            pending = comm.start(kv) if step < n - 1 else None  # overlaps with this block's compute
            for s in _ordered(meta, src):
                rows = slice(s.q_lo, s.q_hi)
                o, l_ = kernel.forward(q[rows], kv[0][s.k_lo : s.k_hi], kv[1][s.k_lo : s.k_hi], s.causal, scale)
                if step == 0 and s.causal:
                    out[rows] = o
                    lse[:, rows] = l_
                else:
                    _merge(out, lse, rows, o, l_)
            if pending is not None:
                kv = comm.wait(pending)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.meta, ctx.comm, ctx.kernel, ctx.scale = meta, comm, kernel, scale
        return out

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        meta, comm, kernel, scale = ctx.meta, ctx.comm, ctx.kernel, ctx.scale
        n = meta.ring
        dq = torch.empty(q.shape, dtype=torch.float32, device=q.device)  # filled at step 0
        kv = [k, v]
        acc: list[Tensor] = []  # (dk, dv) of the block travelling through this rank
        for step in range(n):
            src = (meta.rank - step) % n
            pending = comm.start(kv) if step < n - 1 else None
            if step == 0:  # block `src` = our own: its step-0 causal segments fill every key row
                dk = torch.empty(k.shape, dtype=torch.float32, device=k.device)
                dv = torch.empty(v.shape, dtype=torch.float32, device=v.device)
            else:  # add to what earlier ranks accumulated for block `src` (fp32 on the wire)
                dk, dv = acc
            for s in _ordered(meta, src):
                rq, rk = slice(s.q_lo, s.q_hi), slice(s.k_lo, s.k_hi)
                dq_, dk_, dv_ = kernel.backward(
                    dout[rq], q[rq], kv[0][rk], kv[1][rk], out[rq], lse[:, rq], s.causal, scale
                )
                if step == 0 and s.causal:  # blocks may return half precision; assignment casts
                    dq[rq], dk[rk], dv[rk] = dq_, dk_, dv_
                else:
                    dq[rq] += dq_
                    dk[rk] += dk_
                    dv[rk] += dv_
            # hand block src's gradient to the next rank; receive block (src - 1)'s from the previous
            acc = comm.wait(comm.start([dk, dv])) if n > 1 else [dk, dv]
            if pending is not None:
                kv = comm.wait(pending)
        # after n hops the accumulator that arrived last is this rank's own block, complete
        return dq.to(q.dtype), acc[0].to(k.dtype), acc[1].to(v.dtype), None, None, None, None


class RingAttention:
    """Model-facing ``attention(q, k, v, meta, scale)`` over the ring group."""

    def __init__(self, ranks: list[int], rank: int, group, kernel):
        self.comm = RingComm(ranks, rank, group)
        self.kernel = kernel
        self.size = len(ranks)

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, meta: RingMeta, scale: float) -> Tensor:
        return _RingAttention.apply(q, k, v, meta, self.comm, self.kernel, scale)

    def describe(self) -> str:
        return f"ring{self.size}[{self.kernel.describe()}]"
