"""Parallel layout: process groups, sequence sharding, Ulysses, ring and hybrid attention."""

from seqpar.parallel.topology import Topology, group_ranks, init_topology, make_topology, pick_device

__all__ = ["Topology", "group_ranks", "init_topology", "make_topology", "pick_device"]
