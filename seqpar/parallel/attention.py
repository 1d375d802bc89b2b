"""Compose the attention a rank runs from its layout: local, Ulysses, ring, or Ulysses x ring."""

from __future__ import annotations

import torch

from seqpar.kernels import LocalAttention
from seqpar.parallel.ring import RingAttention
from seqpar.parallel.sharding import ShardedBatch, shard_batch
from seqpar.parallel.topology import Topology
from seqpar.parallel.ulysses import UlyssesAttention, kv_repeats


def build_attention(topo: Topology, kernel, block_kernel):
    """``kernel``: local varlen kernel (no ring); ``block_kernel``: dense blocks for the ring.

    Hybrid = Ulysses inside (all-to-all over adjacent ranks), ring across: the Ulysses all-to-all
    gathers each ring rank's zigzag sequence, then ring attention runs between the ranks that
    hold the same heads.
    """
    if topo.ring > 1:
        inner = RingAttention(topo.ring_ranks, topo.ring_rank, topo.ring_group, block_kernel)
    else:
        inner = LocalAttention(kernel)
    if topo.ulysses > 1:
        return UlyssesAttention(inner, topo.ulysses_group, topo.ulysses)
    return inner


PREPARE_TOKENS = 32768  # probe length cap: the choice is per signature, the timing cost bounded


def prepare_local_kernel(kernel, topo: Topology, heads: int, kv_heads: int, dim: int, tokens: int,
                         dtype: torch.dtype, device: torch.device) -> None:
    """Let a measuring kernel choose its backends at start-up on the shape this rank's local
    attention will see: after Ulysses' all-to-all the whole sequence with heads / degree. Ring
    layouts use the block kernel instead, which chooses at its first call."""
    prepare = getattr(kernel, "prepare", None)
    if prepare is None or topo.ring > 1:
        return
    u = topo.ulysses
    kv_local = kv_heads * kv_repeats(kv_heads, u) // u if u > 1 else kv_heads
    prepare(min(tokens, PREPARE_TOKENS), heads // u, kv_local, dim, dtype, device)


def shard_for(topo: Topology, input_ids, labels, position_ids, pad_id: int = 0) -> ShardedBatch:
    """This rank's slice of a micro-batch under ``topo``'s sequence parallelism."""
    return shard_batch(
        input_ids, labels, position_ids, topo.ring, topo.ring_rank, topo.ulysses, topo.ulysses_rank, pad_id
    )
