"""Worker for tests/test_sequence_parallel.py: run under torchrun with 2 or 4 gloo processes.

For every layout the world allows (Ulysses, ring, and 2x2 Ulysses x ring), checks that sequence-
parallel attention and whole-model loss/gradients equal a single-process computation of the same
inputs (every rank computes that reference itself). Writes one JSON line per check to argv[1]
(rank 0) and exits non-zero if any check fails.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from seqpar.config import MemoryConfig, ModelConfig, MoEConfig
from seqpar.engine.memory import apply_memory_policy
from seqpar.kernels import TorchAttention, attn_meta_from_positions
from seqpar.kernels.torch_math import TorchBlockKernel, varlen_attention
from seqpar.models import build_model
from seqpar.parallel import make_topology
from seqpar.parallel.attention import build_attention, shard_for

TOL = 1e-5
results: list[dict] = []


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def record(name: str, tol: float = TOL, **errs: float) -> None:
    ok = all(e <= tol for e in errs.values())
    results.append({"check": name, "ok": ok, **{k: f"{v:.1e}" for k, v in errs.items()}})


def positions(doc_lens: list[int]) -> torch.Tensor:
    return torch.cat([torch.arange(n) for n in doc_lens])


def gather_rows(local: torch.Tensor, index: torch.Tensor, total: int, group) -> torch.Tensor:
    """Reassemble a sharded [T_local, ...] tensor in global order (padding rows included)."""
    n = dist.get_world_size(group)
    parts = [torch.empty_like(local) for _ in range(n)]
    idx = [torch.empty_like(index) for _ in range(n)]
    dist.all_gather(parts, local.contiguous(), group=group)
    dist.all_gather(idx, index.contiguous(), group=group)
    out = torch.zeros((total, *local.shape[1:]), dtype=local.dtype)
    for p, i in zip(parts, idx):
        out[i] = p
    return out


def check_attention(topo, label: str, doc_lens: list[int], heads: int, kv: int) -> None:
    g = torch.Generator().manual_seed(7)
    t, d = sum(doc_lens), 16
    q, k, v = (torch.randn(t, h, d, generator=g, dtype=torch.float64) for h in (heads, kv, kv))
    dout = torch.randn(t, heads, d, generator=g, dtype=torch.float64)
    pos = positions(doc_lens)
    # single-process reference
    qr, kr, vr = (x.clone().requires_grad_() for x in (q, k, v))
    ref, _ = varlen_attention(qr, kr, vr, attn_meta_from_positions(pos).cu_seqlens, 0.25)
    torch.autograd.backward(ref, dout)
    # sequence parallel: shard q/k/v/dout exactly like token ids
    sh = shard_for(topo, torch.arange(t), torch.zeros(t, dtype=torch.long), pos)
    total = sh.total

    def pad(x):
        return torch.cat([x, x.new_zeros((total - t, *x.shape[1:]))])

    local = [pad(x)[sh.local_index].clone().requires_grad_() for x in (q, k, v)]
    attn = build_attention(topo, TorchAttention(), TorchBlockKernel(chunk=8))
    out = attn(*local, sh.meta, 0.25)
    torch.autograd.backward(out, pad(dout)[sh.local_index])
    got = gather_rows(out.detach(), sh.local_index, total, topo.sp_group)[:t]
    grads = [gather_rows(x.grad, sh.local_index, total, topo.sp_group)[:t] for x in local]
    record(f"attention {label} docs={doc_lens} heads={heads}/{kv}",
           out=rel(got, ref), dq=rel(grads[0], qr.grad), dk=rel(grads[1], kr.grad), dv=rel(grads[2], vr.grad))


def check_model(topo, label: str, kind: str, doc_lens: list[int], memory: MemoryConfig | None = None) -> None:
    """Loss, aux loss and every gradient under SP against one process without SP; with ``memory``,
    the SP model also runs that activation policy (the reference keeps every activation)."""
    moe = dict(arch="qwen2_moe", moe=MoEConfig(num_experts=4, top_k=2, intermediate_size=16,
                                             shared_expert_intermediate_size=8, shared_expert_gate=True,
                                             aux_loss_coef=0.05))
    cfg = ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, **(moe if kind == "moe" else {}))
    g = torch.Generator().manual_seed(11)
    t = sum(doc_lens)
    ids = torch.randint(0, 61, (1, t), generator=g)
    pos = positions(doc_lens)[None]
    labels = torch.randint(0, 61, (1, t), generator=g)
    labels[0, torch.cumsum(torch.tensor(doc_lens), 0) - 1] = -100  # document ends
    ref_model = build_model(cfg, seed=5).double()
    out = ref_model(ids, pos, labels)
    (out.loss_sum + out.aux_loss).backward()
    model = build_model(cfg, seed=5).double()
    model.set_attention(build_attention(topo, TorchAttention(), TorchBlockKernel(chunk=16)))
    model.set_sequence_parallel_group(topo.sp_group)
    if memory is not None:
        apply_memory_policy(model, memory, cfg, torch.device("cpu"))
    sh = shard_for(topo, ids, labels, pos)
    o = model(sh.input_ids[None], sh.position_ids[None], sh.labels[None], sh.meta)
    # each rank back-propagates its CE; the aux loss is whole-sequence on every rank, so 1/sp each
    (o.loss_sum + o.aux_loss / topo.sp).backward()
    loss = o.loss_sum.detach().clone()
    dist.all_reduce(loss, group=topo.sp_group)
    worst, name = 0.0, ""
    for (n, p), (_, pr) in zip(model.named_parameters(), ref_model.named_parameters()):
        grad = p.grad.clone()
        dist.all_reduce(grad, group=topo.sp_group)
        e = rel(grad, pr.grad)
        if e > worst:
            worst, name = e, n
    aux_err = abs(o.aux_loss.item() - out.aux_loss.item()) / max(abs(out.aux_loss.item()), 1e-30)
    policy = "" if memory is None else " memory " + memory.model_dump_json(exclude_defaults=True)
    record(f"model {kind} {label} docs={doc_lens}{policy} (worst grad: {name})", tol=TOL if memory is None else 1e-6,
           loss=rel(loss, out.loss_sum.detach()), aux=aux_err, grad=worst)


def check_peak_memory(topo, label: str) -> None:
    """Issue 12's CPU target: at a fixed total length, a rank's peak memory (every tensor alive,
    measured by torch's MemTracker on the real CPU tensors, forward + backward) under SP is at most
    0.55x one process holding the whole sequence, on an activation-dominated shape."""
    from torch.distributed._tools.mem_tracker import MemTracker

    cfg = ModelConfig(vocab_size=61, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    t = 2048
    g = torch.Generator().manual_seed(0)
    ids, pos = torch.randint(0, 61, (1, t), generator=g), torch.arange(t)[None]
    labels = ids.roll(-1, 1)

    def peak(model, *inputs) -> int:
        tracker = MemTracker()
        with tracker:
            model(*inputs).loss_sum.backward()
        return sum(v.get("Total", 0) for v in tracker.get_tracker_snapshot("peak").values())

    whole = peak(build_model(cfg, seed=1), ids, pos, labels)
    model = build_model(cfg, seed=1)
    model.set_attention(build_attention(topo, TorchAttention(), TorchBlockKernel()))
    sh = shard_for(topo, ids, labels, pos)
    mine = torch.tensor([float(peak(model, sh.input_ids[None], sh.position_ids[None], sh.labels[None], sh.meta))])
    dist.all_reduce(mine, op=dist.ReduceOp.MAX)  # the busiest rank
    record(f"peak memory {label} (per rank / whole sequence)", tol=0.55, peak_ratio=float(mine) / whole)


def main() -> int:
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    layouts = {2: [(2, 1), (1, 2)], 4: [(4, 1), (1, 4), (2, 2)]}[world]
    cpu = torch.device("cpu")
    for ulysses, ring in layouts:
        topo = make_topology(ulysses, ring, cpu)
        label = f"ulysses{ulysses}xring{ring}"
        # one document; packed uneven documents (one crossing every chunk border); padding needed;
        # documents starting on the last token of a zigzag chunk (c = chunk length at T = 64)
        c = 64 // (2 * ring)
        for docs in ([64], [5, 30, 1, 28], [7, 19, 13], [c - 1, 65 - c], [c - 1, 1, c, 64 - 2 * c]):
            check_attention(topo, label, docs, heads=4, kv=4 if ulysses <= 4 else 2)
        check_attention(topo, label, [11, 40, 13], heads=8, kv=1 if ulysses == 1 else max(1, ulysses // 2))
        for kind in ("dense", "moe"):
            check_model(topo, label, kind, [21, 9, 34])
        # activation policies under SP (issue 12): every policy with offload, tiles crossing the shards
        check_model(topo, label, "dense", [21, 9, 34], MemoryConfig(
            activation_checkpointing="selective", offload_activations=True, tiled_mlp=True, mlp_tile_tokens=5))
        check_model(topo, label, "moe", [21, 9, 34], MemoryConfig(
            activation_checkpointing="full", offload_activations=True, tiled_mlp=True,
            mlp_tile_tokens=6))
        check_peak_memory(topo, label)
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")
    failed = [r for r in results if not r["ok"]]
    dist.barrier()
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
