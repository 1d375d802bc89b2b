"""Compose the attention a rank runs from its layout: local, Ulysses, ring, or Ulysses x ring."""

from __future__ import annotations

from seqpar.kernels import LocalAttention
from seqpar.parallel.ring import RingAttention
from seqpar.parallel.sharding import ShardedBatch, shard_batch
from seqpar.parallel.topology import Topology
from seqpar.parallel.ulysses import UlyssesAttention


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


def shard_for(topo: Topology, input_ids, labels, position_ids, pad_id: int = 0) -> ShardedBatch:
    """This rank's slice of a micro-batch under ``topo``'s sequence parallelism."""
    return shard_batch(
        input_ids, labels, position_ids, topo.ring, topo.ring_rank, topo.ulysses, topo.ulysses_rank, pad_id
    )
