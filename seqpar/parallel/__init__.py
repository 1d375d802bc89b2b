"""Parallel layout: process groups (``topology``); sequence-parallel attention comes here too."""

from seqpar.parallel.topology import Topology, group_ranks, init_topology, pick_device

__all__ = ["Topology", "group_ranks", "init_topology", "pick_device"]
