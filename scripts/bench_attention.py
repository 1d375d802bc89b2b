"""Attention fwd+bwd throughput: seqpar's kernels against torch SDPA's backends.

    python scripts/bench_attention.py --seqlens 8192 32768 131072            # one GPU, degree 1
    torchrun --nproc_per_node 8 scripts/bench_attention.py --seqlens 131072  # SP layouts, 8 ranks

Causal, bf16, [S, H, D] single sequence (and a packed variant with --docs N). TFLOP/s counts the
causal work only: fwd 2*H*S^2*D, fwd+bwd 3.5x that (the FlashAttention convention), per document
for packed inputs; under SP it is per rank (total work / ranks / time). With several processes
every Ulysses x ring factorisation of the world size is timed (``--device cpu`` runs that on gloo,
fp32, for a smoke test).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from seqpar.kernels import SDPAAttention, TorchAttention, select_block_kernel  # noqa: E402
from seqpar.parallel.ring import RingAttention  # noqa: E402
from seqpar.parallel.sharding import RingMeta  # noqa: E402


def timed(fn, min_iters: int, budget_s: float) -> float:
    """Median-free simple timing: warm up once, then run until ``budget_s`` or ``min_iters``."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    while len(times) < min_iters or sum(times) < budget_s * 1000:
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
        if len(times) >= 50:
            break
    return sorted(times)[len(times) // 2] / 1000


def bench(seqlen: int, heads: int, kv_heads: int, dim: int, docs: int, budget: float, deterministic: bool):
    dev = torch.device("cuda")
    dt = torch.bfloat16
    q = torch.randn(seqlen, heads, dim, device=dev, dtype=dt, requires_grad=True)
    k = torch.randn(seqlen, kv_heads, dim, device=dev, dtype=dt, requires_grad=True)
    v = torch.randn(seqlen, kv_heads, dim, device=dev, dtype=dt, requires_grad=True)
    dout = torch.randn(seqlen, heads, dim, device=dev, dtype=dt)
    scale = dim**-0.5
    bounds = torch.linspace(0, seqlen, docs + 1, device=dev).long()
    cu, max_len = bounds, int((bounds[1:] - bounds[:-1]).max())
    doc_lens = (bounds[1:] - bounds[:-1]).double()
    flops = 3.5 * 2 * heads * dim * float((doc_lens**2).sum())
    results = {}

    def run_kernel(kernel):
        def f():
            out, _ = kernel(q, k, v, cu, max_len, scale)
            torch.autograd.backward(out, dout)
        return f

    ours = SDPAAttention(deterministic)
    results["seqpar sdpa"] = run_kernel(ours)  # = Ulysses at degree 1 (no all-to-all)
    ring = RingAttention([0], 0, None, select_block_kernel(dev, deterministic))
    ring_meta = RingMeta(cu.tolist(), seqlen, 1, 0)

    def run_ring():
        out = ring(q, k, v, ring_meta, scale)
        torch.autograd.backward(out, dout)
    results["seqpar ring1"] = run_ring
    if docs == 1:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        qb, kb, vb = (x.detach().transpose(0, 1)[None].requires_grad_() for x in (q, k, v))
        db = dout.transpose(0, 1)[None]
        for name, backend in [("torch cudnn", SDPBackend.CUDNN_ATTENTION),
                              ("torch flash", SDPBackend.FLASH_ATTENTION),
                              ("torch efficient", SDPBackend.EFFICIENT_ATTENTION)]:
            if deterministic and backend == SDPBackend.CUDNN_ATTENTION:
                continue

            def f(backend=backend):
                with sdpa_kernel(backend):
                    o = torch.nn.functional.scaled_dot_product_attention(
                        qb, kb, vb, is_causal=True, scale=scale, enable_gqa=kv_heads != heads)
                torch.autograd.backward(o, db)
            results[name] = f
    if seqlen <= 8192:
        results["seqpar torch (exact math)"] = run_kernel(TorchAttention())
    rows = []
    for name, fn in results.items():
        try:
            t = timed(fn, 3, budget)
            rows.append((name, t * 1000, flops / t / 1e12))
        except Exception as e:  # a backend unsupported here: report, keep going
            rows.append((name, float("nan"), float("nan")))
            print(f"  {name}: {type(e).__name__}: {str(e).splitlines()[0][:120]}", file=sys.stderr)
        q.grad = k.grad = v.grad = None
    names = {"seqpar sdpa": f"seqpar {ours.describe()}", "seqpar ring1": f"seqpar {ring.describe()}"}
    return [(names.get(n, n), ms, tf) for n, ms, tf in rows]


def bench_sp(a) -> None:
    """Every Ulysses x ring layout of the world size, on the sharded sequence."""
    import torch.distributed as dist

    from seqpar.kernels import select_attention
    from seqpar.parallel import make_topology
    from seqpar.parallel.attention import build_attention, shard_for

    cuda = a.device == "cuda"
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if cuda else "gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    dtype = torch.bfloat16 if cuda else torch.float32
    if rank == 0:
        print(f"# {torch.cuda.get_device_name() if cuda else 'cpu'} x{world} | heads {a.heads}/{a.kv_heads} "
              f"d {a.dim} {str(dtype)[6:]} causal docs {a.docs}")
        print("| seqlen | layout | ms fwd+bwd | TFLOP/s per rank |\n|---|---|---|---|")
    layouts = [(u, world // u) for u in range(world, 0, -1) if world % u == 0 and a.heads % u == 0]
    for seqlen in a.seqlens:
        g = torch.Generator().manual_seed(0)
        full = [torch.randn(seqlen, h, a.dim, generator=g).to(dev, dtype) for h in (a.heads, a.kv_heads, a.kv_heads, a.heads)]
        bounds = torch.linspace(0, seqlen, a.docs + 1).long()
        pos = torch.cat([torch.arange(int(n)) for n in bounds[1:] - bounds[:-1]])[None].to(dev)
        flops = 3.5 * 2 * a.heads * a.dim * float(((bounds[1:] - bounds[:-1]).double() ** 2).sum())
        for u, r in layouts:
            topo = make_topology(u, r, dev)
            if topo.sp != world:
                continue
            attn = build_attention(topo, select_attention("auto", dev), select_block_kernel(dev))
            sh = shard_for(topo, pos, torch.zeros_like(pos), pos)
            pad = sh.total - seqlen
            q, k, v, dout = (torch.cat([x, x.new_zeros(pad, *x.shape[1:])])[sh.local_index] for x in full)
            q, k, v = (x.requires_grad_() for x in (q, k, v))

            def step():
                out = attn(q, k, v, sh.meta, a.dim**-0.5)
                torch.autograd.backward(out, dout)

            times = []
            for i in range(a.iters + 1):
                dist.barrier()
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                step()
                if cuda:
                    torch.cuda.synchronize()
                dist.barrier()
                if i:  # first call warms up (kernel choice, allocations)
                    times.append(time.perf_counter() - t0)
            t = sorted(times)[len(times) // 2]
            if rank == 0:
                print(f"| {seqlen} | ulysses{u} x ring{r} [{attn.describe()}] | {t * 1000:.2f} | "
                      f"{flops / world / t / 1e12:.3g} |", flush=True)
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqlens", type=int, nargs="+", default=[8192, 32768, 131072])
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=32)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--docs", type=int, default=1, help="equal-length packed documents")
    p.add_argument("--budget", type=float, default=1.0, help="seconds of timing per cell")
    p.add_argument("--deterministic", action="store_true")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: SP layouts on gloo")
    p.add_argument("--iters", type=int, default=3, help="timed iterations per SP layout")
    a = p.parse_args()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        bench_sp(a)
        return
    if not torch.cuda.is_available():
        sys.exit("bench_attention.py needs a CUDA device")
    if a.deterministic:
        torch.use_deterministic_algorithms(True)
    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | heads {a.heads}/{a.kv_heads} "
          f"d {a.dim} bf16 causal docs {a.docs}{' deterministic' if a.deterministic else ''}")
    print("| seqlen | kernel | ms fwd+bwd | TFLOP/s |\n|---|---|---|---|")
    for s in a.seqlens:
        for name, ms, tf in bench(s, a.heads, a.kv_heads, a.dim, a.docs, a.budget, a.deterministic):
            print(f"| {s} | {name} | {ms:.2f} | {tf:.0f} |", flush=True)


if __name__ == "__main__":
    main()
