"""Worker for tests/test_expert_parallel.py: torchrun with 2 or 4 gloo processes.

For every (sequence-parallel layout, expert-parallel degree) the world allows: each data-parallel
replica trains its own packed sequence, split over its SP ranks; MoE experts are split over EP
groups of consecutive ranks. Loss, aux loss, routing (tokens per expert) and every gradient must
equal one process running the whole model on every replica's sequence without EP or SP (fp32,
<= 1e-5 relative): dense gradients summed over all ranks, expert gradients over the ranks holding
the same experts. Writes one JSON line per check to argv[1] (rank 0); exits non-zero on a failure.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from common import finish

from seqpar.config import ModelConfig, MoEConfig
from seqpar.kernels import TorchAttention
from seqpar.kernels.torch_math import TorchBlockKernel
from seqpar.models import build_model
from seqpar.parallel import make_topology
from seqpar.parallel.attention import build_attention, shard_for
from seqpar.parallel.experts import ExpertParallel, ep_groups

TOL = 1e-5
results: list[dict] = []
DOCS = [[21, 9, 34], [40, 24], [64], [5, 30, 1, 28]]  # one packed sequence per DP replica (T = 64)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def model_cfg(experts: int) -> ModelConfig:
    # top-2 of 8 experts, shared expert with gate, aux loss, expert bias: every MoE path
    return ModelConfig(arch="qwen2_moe", vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2,
                       moe=MoEConfig(num_experts=experts, top_k=2, intermediate_size=16,
                                     shared_expert_intermediate_size=8, shared_expert_gate=True, aux_loss_coef=0.05,
                                     bias_update_rate=1e-3))


def starve(model, experts: int) -> None:
    """Route nothing to the upper half of the experts (the bias selects, never weights): the EP
    ranks holding them receive no tokens and must still give zero gradients, not None."""
    for _, r in model.routers():
        r.expert_bias[experts // 2:] = -1e4


def batch(replica: int):
    g = torch.Generator().manual_seed(100 + replica)
    docs = DOCS[replica % len(DOCS)]
    t = sum(docs)
    ids = torch.randint(0, 61, (1, t), generator=g)
    pos = torch.cat([torch.arange(n) for n in docs])[None]
    labels = torch.randint(0, 61, (1, t), generator=g)
    return ids, pos, labels


def reference(cfg: ModelConfig, replicas: int, starved: bool = False):
    """Whole model, one process, every replica's sequence: summed loss/aux, grads, counts."""
    model = build_model(cfg, seed=5)
    if starved:
        starve(model, cfg.moe.num_experts)
    loss = aux = 0.0
    for r in range(replicas):
        out = model(*batch(r))
        (out.loss_sum + out.aux_loss).backward()
        loss, aux = loss + out.loss_sum.detach(), aux + out.aux_loss.detach()
    return loss, aux, {n: p.grad for n, p in model.named_parameters()}, model.router_state_dict()


def groups_of(lists: list[list[int]]):
    """Create every group (all ranks take part in each new_group) and return the one with us."""
    mine = None
    for ranks in lists:
        g = dist.new_group(ranks)
        if dist.get_rank() in ranks:
            mine = g
    return mine


def check(ulysses: int, ring: int, degree: int, experts: int, starved: bool = False) -> None:
    world, rank = dist.get_world_size(), dist.get_rank()
    topo = make_topology(ulysses, ring, torch.device("cpu"))
    ep_lists, edp_lists = ep_groups(world, degree)
    ep_group, edp_group = groups_of(ep_lists), groups_of(edp_lists)
    ep = ExpertParallel(ep_group, degree, rank % degree, experts, edp_group)
    cfg = model_cfg(experts)
    replicas = world // topo.sp
    ref_loss, ref_aux, ref_grads, ref_routers = reference(cfg, replicas, starved)

    model = build_model(cfg, seed=5)
    if starved:
        starve(model, experts)
    model.set_expert_parallel(ep)
    if topo.sp > 1:
        model.set_attention(build_attention(topo, TorchAttention(), TorchBlockKernel(chunk=16)))
        model.set_sequence_parallel_group(topo.sp_group)
    ids, pos, labels = batch(topo.dp_rank)
    sh = shard_for(topo, ids, labels, pos)
    out = model(sh.input_ids[None], sh.position_ids[None], sh.labels[None], sh.meta)
    # the aux loss is whole-sequence on each SP rank of a replica: 1/sp each
    (out.loss_sum + out.aux_loss / topo.sp).backward()
    stats = torch.stack([out.loss_sum.detach(), out.aux_loss.detach() / topo.sp])
    dist.all_reduce(stats)
    worst, name = 0.0, ""
    for n, p in model.named_parameters():
        if p.grad is None:  # would desynchronise ZeRO's reductions between expert-data-parallel peers
            results.append({"check": f"{n}: no gradient", "ok": False})
            continue
        grad = p.grad.clone()
        if ".experts." in n:
            dist.all_reduce(grad, group=edp_group)
            want = ref_grads[n][ep.first:ep.first + ep.local]
        else:
            dist.all_reduce(grad)
            want = ref_grads[n]
        assert grad.shape == want.shape, (n, grad.shape, want.shape)
        e = rel(grad, want)
        if e > worst:
            worst, name = e, n
    routing = 0.0
    for key, value in model.router_state_dict().items():
        if key.endswith("tokens_per_expert"):
            counts = value.clone()
            dist.all_reduce(counts)
            routing = max(routing, float((counts - ref_routers[key]).abs().max()))
    label = f"ulysses{ulysses}xring{ring} ep{degree} experts{experts} dp{replicas}" + (" starved" if starved else "")
    errs = {"loss": rel(stats[0], ref_loss), "aux": rel(stats[1], ref_aux), "grad": worst}
    ok = all(v <= TOL for v in errs.values()) and routing == 0.0
    local_shape = tuple(model.model.layers[0].mlp.experts.gate_proj.shape)
    ok = ok and local_shape[0] == experts // degree  # each rank really holds E / P experts
    results.append({"check": f"{label} (worst grad: {name})", "ok": ok, "routing_diff": routing,
                    "local_experts": local_shape[0], **{k: f"{v:.1e}" for k, v in errs.items()}})


def main() -> int:
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    # (ulysses, ring, EP degree): EP with data parallelism, with SP, across SP and DP at once
    cases = {2: [(1, 1, 1), (1, 1, 2), (2, 1, 2), (1, 2, 2)],
             4: [(1, 1, 2), (1, 1, 4), (2, 1, 2), (2, 1, 4), (1, 2, 4), (2, 2, 4)]}[world]
    for ulysses, ring, degree in cases:
        check(ulysses, ring, degree, experts=8)
    check(1, 1, world, experts=8, starved=True)  # ranks holding experts 4-7 receive no token
    status = finish(results, Path(sys.argv[1]))
    dist.destroy_process_group()
    return status


if __name__ == "__main__":
    sys.exit(main())
