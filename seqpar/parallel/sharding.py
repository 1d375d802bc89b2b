"""Split a micro-batch along the sequence over the ranks of a sequence-parallel (SP) group.

Every rank of an SP group receives the same full micro-batch from the loader (same DP rank), with
labels already shifted, and keeps its own slice of the flattened token stream:

1. flatten [B, S] to T tokens and pad to a multiple of ``2 x ring x ulysses`` (``ulysses`` without
   ring) with a padding *document* (ignored labels, positions restarting at 0);
2. ring split, zigzag: with 2R equal chunks, ring rank r holds chunks r and 2R-1-r, so every rank
   has the same share of causal work;
3. Ulysses split: each ring-local sequence is cut contiguously into ``ulysses`` pieces.

Position ids travel with their tokens (global within each document), so RoPE is unchanged. The
document layout of the whole stream is known on every rank (it is computed from the full batch),
so no metadata is ever communicated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from seqpar.data.packing import IGNORE_INDEX
from seqpar.kernels import AttnMeta


def zigzag_chunks(ring: int, rank: int) -> tuple[int, int]:
    """The two chunk indices (of 2R) that ring rank ``rank`` holds."""
    return rank, 2 * ring - 1 - rank


def padded_length(total: int, ring: int, ulysses: int) -> int:
    multiple = 2 * ring * ulysses if ring > 1 else ulysses
    return -(-total // multiple) * multiple


def ring_local_indices(total: int, ring: int, rank: int) -> Tensor:
    """Global token indices of ring rank ``rank``'s sequence (its two zigzag chunks)."""
    if ring == 1:
        return torch.arange(total)
    chunk = total // (2 * ring)
    a, b = zigzag_chunks(ring, rank)
    return torch.cat([torch.arange(a * chunk, (a + 1) * chunk), torch.arange(b * chunk, (b + 1) * chunk)])


@dataclass
class RingMeta:
    """What ring attention needs about the whole (padded) stream; identical on every rank."""

    cu_seqlens: list[int]  # document boundaries of the padded stream (python ints)
    total: int
    ring: int
    rank: int  # this rank's position in the ring

    @property
    def chunk(self) -> int:
        return self.total // (2 * self.ring)


@dataclass
class ShardedBatch:
    input_ids: Tensor  # [T_local] this rank's tokens
    labels: Tensor
    position_ids: Tensor
    meta: AttnMeta | RingMeta  # for the attention that runs after the Ulysses all-to-all
    local_index: Tensor  # global index (in the padded stream) of each local token
    total: int  # padded stream length

    @property
    def num_loss_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


def shard_batch(
    input_ids: Tensor,
    labels: Tensor,
    position_ids: Tensor,
    ring: int,
    ring_rank: int,
    ulysses: int,
    ulysses_rank: int,
    pad_id: int = 0,
) -> ShardedBatch:
    """This rank's share of a [B, S] micro-batch (see the module docstring)."""
    ids, lab, pos = input_ids.reshape(-1), labels.reshape(-1), position_ids.reshape(-1)
    n = ids.numel()
    total = padded_length(n, ring, ulysses)
    if total > n:
        extra = total - n
        ids = torch.cat([ids, ids.new_full((extra,), pad_id)])
        lab = torch.cat([lab, lab.new_full((extra,), IGNORE_INDEX)])
        pos = torch.cat([pos, torch.arange(extra, dtype=pos.dtype, device=pos.device)])
    starts = torch.nonzero(pos == 0).flatten()
    if starts.numel() == 0 or starts[0].item() != 0:
        raise ValueError("position_ids must start every sequence with 0 (a document start)")
    cu = starts.tolist() + [total]
    ring_idx = ring_local_indices(total, ring, ring_rank).to(ids.device)
    local = ring_idx.view(ulysses, -1)[ulysses_rank]
    if ring == 1:
        # After the Ulysses all-to-all each rank sees the whole stream: plain varlen attention.
        lens = [b - a for a, b in zip(cu[:-1], cu[1:])]
        meta: AttnMeta | RingMeta = AttnMeta(torch.tensor(cu, device=ids.device), max(lens))
    else:
        meta = RingMeta(cu, total, ring, ring_rank)
    return ShardedBatch(ids[local], lab[local], pos[local], meta, local, total)


def owner_of(total: int, ring: int, ulysses: int) -> Tensor:
    """SP rank (ring_rank x ulysses + ulysses_rank) holding each token of an unpadded stream."""
    padded = padded_length(total, ring, ulysses)
    owner = torch.empty(padded, dtype=torch.long)
    for r in range(ring):
        for u, idx in enumerate(ring_local_indices(padded, ring, r).view(ulysses, -1)):
            owner[idx] = r * ulysses + u
    return owner[:total]
