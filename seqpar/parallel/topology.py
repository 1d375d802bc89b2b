"""Process groups: world = data-parallel (DP) x sequence-parallel (SP), SP = ulysses x ring.

Rank layout, innermost first: ulysses, ring, dp. Ulysses' all-to-all moves the most bytes per
step, so its ranks are adjacent (same node when the degree fits); ring peers come next; DP
replicas are outermost. ``rank = (dp_rank * ring + ring_rank) * ulysses + ulysses_rank``.

These groups are the only process-wide mutable state in seqpar (torch.distributed owns them).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist


def ensure_launcher_env() -> None:
    """Make ``python seqpar/train.py`` (no launcher) a 1-process world on a free local port."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])


def pick_device(kind: str) -> torch.device:
    """``auto``: this rank's GPU when CUDA is available, else CPU."""
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("train.device='cuda' but no CUDA device is visible: use 'cpu' or 'auto'")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


@dataclass
class Topology:
    """This rank's coordinates and the groups it belongs to."""

    world_size: int
    rank: int
    dp: int
    ulysses: int
    ring: int
    device: torch.device
    dp_group: object = field(repr=False, default=None)
    sp_group: object = field(repr=False, default=None)
    ulysses_group: object = field(repr=False, default=None)
    ring_group: object = field(repr=False, default=None)
    ring_ranks: list[int] = field(repr=False, default_factory=list)  # global ranks of my ring
    # Small host-side agreements (stop flags) go over gloo on CPU tensors: on an NCCL job a GPU
    # tensor there would make the host wait for the GPU after every micro-batch. None = WORLD.
    control_group: object = field(repr=False, default=None)
    # Start-up waits that may last hours (rank 0 tokenizing a corpus): gloo, STARTUP_TIMEOUT.
    # None = WORLD (a Topology made by hand, without make_topology).
    startup_group: object = field(repr=False, default=None)

    @property
    def sp(self) -> int:
        return self.ulysses * self.ring

    @property
    def ulysses_rank(self) -> int:
        return self.rank % self.ulysses

    @property
    def ring_rank(self) -> int:
        return (self.rank // self.ulysses) % self.ring

    @property
    def sp_rank(self) -> int:
        return self.rank % self.sp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.sp

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        return (
            f"world {self.world_size} = dp {self.dp} x sp {self.sp} "
            f"(ulysses {self.ulysses} x ring {self.ring}) on {self.device.type}"
        )


def group_ranks(world: int, ulysses: int, ring: int) -> dict[str, list[list[int]]]:
    """All groups of each kind as rank lists (pure function; every rank must create all of them)."""
    sp = ulysses * ring
    dp = world // sp
    rank = lambda d, r, u: (d * ring + r) * ulysses + u  # noqa: E731
    return {
        "dp": [[rank(d, r, u) for d in range(dp)] for r in range(ring) for u in range(ulysses)],
        "sp": [[rank(d, r, u) for r in range(ring) for u in range(ulysses)] for d in range(dp)],
        "ulysses": [[rank(d, r, u) for u in range(ulysses)] for d in range(dp) for r in range(ring)],
        "ring": [[rank(d, r, u) for r in range(ring)] for d in range(dp) for u in range(ulysses)],
    }


def init_topology(ulysses: int, ring: int, device: torch.device, backend: str = "auto") -> Topology:
    """Initialise torch.distributed (via DeepSpeed, env:// rendezvous) and build the groups."""
    import deepspeed

    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    ensure_launcher_env()
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend)
    return make_topology(ulysses, ring, device)


# The start-up group's collectives may wait for hours (rank 0 tokenizing a corpus, hashing a LoRA
# base) where NCCL's and DeepSpeed's default 30 minutes would kill the job. A rank that dies
# meanwhile is noticed anyway: its peers' gloo connections close, and launchers stop the rest. The
# control group, used every step, keeps the default timeout, so a hung rank is still found in minutes.
STARTUP_TIMEOUT = timedelta(hours=24)


def make_topology(ulysses: int, ring: int, device: torch.device) -> Topology:
    """Create this layout's process groups (collective: every rank calls it with the same args)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    sp = ulysses * ring
    if world % sp:
        raise ValueError(
            f"world size {world} is not divisible by parallel.ulysses_degree x ring_degree = {sp}"
        )
    topo = Topology(world, rank, world // sp, ulysses, ring, device)
    for kind, groups in group_ranks(world, ulysses, ring).items():
        for ranks in groups:
            # new_group is collective: every rank creates every group, keeps its own.
            g = dist.new_group(ranks) if len(ranks) < world else dist.group.WORLD
            if rank in ranks:
                setattr(topo, f"{kind}_group", g)
                if kind == "ring":
                    topo.ring_ranks = ranks
    # collective, like the groups above
    if dist.get_backend() != "gloo":
        topo.control_group = dist.new_group(backend="gloo")
    topo.startup_group = dist.new_group(backend="gloo", timeout=STARTUP_TIMEOUT)
    return topo
