"""Expert parallelism (EP): each rank of an EP group holds E / P of a MoE layer's experts, and
tokens travel to their experts' ranks by all-to-all and back.

Any P ranks can form an EP group: the routed experts act on each token alone, so whose tokens
meet on an expert's rank (data-parallel replicas, sequence-parallel shards) does not matter. seqpar
groups consecutive ranks (``ep_groups``), so EP stays inside a node when P divides the GPUs per
node. Ranks holding the same experts (one per EP group) form the expert-data-parallel group, over
which the experts' gradients are summed; dense parameters keep their all-rank reduction.

One MoE layer's forward on a rank (``ExpertParallel.run``):
1. the rank's (token, slot) pairs arrive sorted by expert with ``counts`` [E];
2. per-expert counts are exchanged (all-to-all of [P, E/P] integers) and read on the host: the
   token all-to-all needs its split sizes there (one sync per layer, like every dropless EP);
3. tokens go to the owner of their expert (autograd-aware ``all_to_all_single``, gloo too), in
   (source rank, expert) order, are regrouped expert-major, run through the local experts'
   grouped compute, put back in (source, expert) order and return by the inverse all-to-all.
The backward is the same exchange reversed (autograd of the all-to-alls and the permutations).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.nn.functional import all_to_all_single

from seqpar.optim.clip import clip_to_norm_, squared_norm


def ep_groups(world: int, degree: int) -> tuple[list[list[int]], list[list[int]]]:
    """(EP groups, expert-data-parallel groups) as rank lists: EP groups are consecutive ranks;
    the i-th rank of every EP group holds the same experts."""
    if degree < 1 or world % degree:
        raise ValueError(f"expert-parallel degree {degree} does not divide the world size {world}")
    ep = [list(range(s, s + degree)) for s in range(0, world, degree)]
    edp = [list(range(i, world, degree)) for i in range(degree)]
    return ep, edp


@dataclass
class ExpertParallel:
    """This rank's place in expert parallelism for a model with ``num_experts`` experts per layer."""

    group: object  # the EP process group (None when degree == 1)
    degree: int
    rank: int  # index within the EP group = which slice of experts this rank holds
    num_experts: int
    edp_group: object = None  # ranks holding the same experts (for gradient reduction)

    def __post_init__(self):
        if self.num_experts % self.degree:
            raise ValueError(f"num_experts={self.num_experts} is not divisible by the expert-parallel degree "
                             f"{self.degree}")

    @property
    def local(self) -> int:
        return self.num_experts // self.degree

    @property
    def first(self) -> int:
        return self.rank * self.local

    def run(self, experts, x_sorted: Tensor, counts: Tensor) -> Tensor:
        """``experts(x, local_counts)`` (this rank's E/P experts) applied to every token of the EP
        group routed to them; returns this rank's tokens' outputs, in ``x_sorted``'s order."""
        p, el = self.degree, self.local
        send_counts = counts.reshape(p, el).to(torch.int64)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)  # [source, local expert]
        send_host = send_counts.sum(1).tolist()
        recv_host = recv_counts.tolist()
        recv_split = [sum(row) for row in recv_host]
        recv = x_sorted.new_empty(sum(recv_split), x_sorted.shape[1])
        x_recv = all_to_all_single(recv, x_sorted.contiguous(), recv_split, send_host, group=self.group)
        perm = expert_major(recv_host, x_sorted.device)
        local_counts = recv_counts.sum(0)
        y_local = experts(x_recv[perm], local_counts)
        if sum(recv_split) == 0:
            # no token reached this rank's experts: keep their weights in the graph (zero gradients,
            # not None), or ZeRO's gradient reduction would skip them here and not on their peers
            y_local = y_local + sum(w.sum() for w in experts.parameters()) * 0
        y_recv = torch.empty_like(y_local)
        y_recv[perm] = y_local  # back to (source, expert) order; unique indices
        back = y_recv.new_empty(x_sorted.shape[0], y_recv.shape[1])
        return all_to_all_single(back, y_recv, send_host, recv_split, group=self.group)


def expert_major(recv_counts: list[list[int]], device: torch.device) -> Tensor:
    """Indices that reorder tokens received as (source rank, local expert) blocks into (local
    expert, source rank) order, so each local expert's tokens are contiguous."""
    starts, pos = [], 0
    for row in recv_counts:
        starts.append([])
        for n in row:
            starts[-1].append(pos)
            pos += n
    blocks = [torch.arange(starts[s][e], starts[s][e] + recv_counts[s][e])
              for e in range(len(recv_counts[0])) for s in range(len(recv_counts))]
    idx = torch.cat(blocks) if blocks else torch.zeros(0, dtype=torch.int64)
    return idx.to(device)


def gather_experts(state: dict[str, Tensor], ep: ExpertParallel) -> dict[str, Tensor]:
    """``state`` (a model state dict on one rank of the first EP group, ranks 0..P-1) with every
    expert tensor replaced, on rank 0, by all P slices concatenated (collective over that group;
    other ranks get their input back). One tensor at a time, on the CPU."""
    out = dict(state)
    nccl = dist.get_backend(ep.group) == "nccl"  # NCCL gathers device tensors, gloo host ones
    dst = dist.get_global_rank(ep.group, 0)
    for name in sorted(k for k in state if ".mlp.experts." in k):
        local = state[name].detach().contiguous()
        local = local if nccl else local.cpu()
        parts = [torch.empty_like(local) for _ in range(ep.degree)] if ep.rank == 0 else None
        dist.gather(local, parts, dst=dst, group=ep.group)
        if parts is not None:  # one tensor's slices at a time on the device, then to the host
            out[name] = torch.cat([p.cpu() for p in parts])
    return out


@torch.no_grad()
def clip_grad_norm_(dense: list[Tensor], experts: list[Tensor], ep: ExpertParallel, max_norm: float) -> Tensor:
    """Global gradient-norm clipping with split experts, on reduced gradients (DeepSpeed's rule:
    scale by max_norm / (norm + 1e-6) when that is below 1). Dense gradients are equal on every
    rank; each EP group holds every expert's gradient once, so the expert part is summed over it.
    Returns the norm (a device tensor: no host read)."""
    grads = [p.grad for p in dense if p.grad is not None]
    egrads = [p.grad for p in experts if p.grad is not None]
    dev = next(iter(dense or experts)).device  # a rank without any gradient still joins the all-reduce
    e = squared_norm(egrads, dev)
    dist.all_reduce(e, group=ep.group)
    norm = (squared_norm(grads, dev) + e).sqrt()
    clip_to_norm_(grads + egrads, norm, max_norm)
    return norm
