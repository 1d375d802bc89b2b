"""MoE layer fwd+bwd time against the expert count at equal active parameters: the historical
per-expert loop against the grouped expert compute (issue 13).

    python scripts/bench_moe.py                          # CPU: fp32, E = 8 16 32 64, both paths
    python scripts/bench_moe.py --device cuda            # GPU: bf16, plus a dense baseline

One ``seqpar.models.moe.MoE`` layer (router, dispatch, experts; no shared expert), top-k and the
expert width fixed, so every E has the same active parameters and FLOPs per token
(top_k x 3 x hidden x intermediate); only the total expert parameters grow with E. Each step is
forward + backward of the whole layer with fresh gradients (set to None first); a cell is the best
of its runs. "historical" runs a verbatim copy of the code before issue 13 (argsort, bincount,
``.tolist()``, a loop indexing ``w[e]``); "new" runs the current code: on CUDA one
``torch._grouped_mm`` per projection when the device allows it (sm90/sm100, bf16), elsewhere the
loop over per-expert views. The last line gives time(E max) / time(E min) for both.

On CUDA (or with ``--dense``) the same run also times a dense SwiGLU on top_k x tokens rows (the
same GEMM FLOPs as the experts, as three plain GEMMs) and prints each MoE step's throughput as a
share of it ("expert path" says which path ran); "experts alone" times the expert GEMMs on
pre-sorted tokens without router and dispatch.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from seqpar.config import MoEConfig
from seqpar.models.moe import MoE

# ---- the code before issue 13, kept for the comparison ---------------------------------------

def historical_experts(ex, x_sorted, counts):
    outs, lo = [], 0
    for e, n in enumerate(counts):
        if n:
            xe = x_sorted[lo : lo + n]
            h = F.silu(xe @ ex.gate_proj[e].t()) * (xe @ ex.up_proj[e].t())
            outs.append(h @ ex.down_proj[e].t())
            lo += n
    return torch.cat(outs) if outs else x_sorted[:0]


def historical_moe(self, x):
    t, h = x.shape
    k, e = self.cfg.top_k, self.cfg.num_experts
    scores, idx, weights = self.gate(x)
    flat = idx.reshape(-1)
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=e)
    y_sorted = historical_experts(self.experts, x[order // k], counts.tolist())
    y_slots = torch.empty_like(y_sorted)
    y_slots[order] = y_sorted
    y = (y_slots.view(t, k, h) * weights.unsqueeze(-1).to(x.dtype)).sum(1)
    aux = self._aux_loss(scores, counts) if self.cfg.aux_loss_coef > 0 else scores.new_zeros(())
    return y, aux


# ---- timing -------------------------------------------------------------------------------------

def timed(fn, dev: torch.device, min_iters: int, budget_s: float) -> float:
    """Best (minimum) seconds of ``fn`` after two warm-up calls, over at least ``min_iters`` calls
    and about ``budget_s`` seconds: the least disturbed run on a machine shared with other work."""
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    fn()
    fn()
    sync()
    times: list[float] = []
    while len(times) < min_iters or (sum(times) < budget_s and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return min(times)


def build(e: int, a, dev: torch.device, dtype: torch.dtype) -> MoE:
    cfg = MoEConfig(num_experts=e, top_k=a.top_k, intermediate_size=a.intermediate, aux_loss_coef=0.01)
    m = MoE(a.hidden, cfg)
    g = torch.Generator().manual_seed(e)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * a.hidden**-0.5)
    return m.to(dev, dtype)


def step_fn(m: MoE, x: torch.Tensor, dy: torch.Tensor, historical: bool):
    def f():
        m.zero_grad(set_to_none=True)
        y, aux = historical_moe(m, x) if historical else m(x)[:2]
        torch.autograd.backward([y, aux], [dy, torch.ones_like(aux)])
    return f


def experts_only_fn(m: MoE, x: torch.Tensor, dy: torch.Tensor):
    """The expert GEMMs alone on tokens already sorted by expert (what a grouped GEMM sees)."""
    k, e = m.cfg.top_k, m.cfg.num_experts
    with torch.no_grad():
        flat = m.gate(x)[1].reshape(-1)
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=e)
        xs = x[order // k].detach().requires_grad_()
    dys = dy.repeat_interleave(k, 0)[order]

    def f():
        m.zero_grad(set_to_none=True)
        xs.grad = None
        m.experts(xs, counts).backward(dys)
    return f


def dense_fn(rows: int, a, dev: torch.device, dtype: torch.dtype):
    """SwiGLU on ``rows`` tokens with the experts' width: the same GEMM FLOPs as the experts."""
    g = torch.Generator().manual_seed(0)
    w = [(torch.randn(s, generator=g) * a.hidden**-0.5).to(dev, dtype).requires_grad_()
         for s in ((a.intermediate, a.hidden), (a.intermediate, a.hidden), (a.hidden, a.intermediate))]
    x = torch.randn(rows, a.hidden, generator=g).to(dev, dtype).requires_grad_()
    dy = torch.randn(rows, a.hidden, generator=g).to(dev, dtype)

    def f():
        for t in (x, *w):
            t.grad = None
        y = F.linear(F.silu(F.linear(x, w[0])) * F.linear(x, w[1]), w[2])
        y.backward(dy)
    return f


def machine(dev: torch.device) -> str:
    if dev.type == "cuda":
        return f"{torch.cuda.get_device_name(dev)} (sm{''.join(map(str, torch.cuda.get_device_capability(dev)))})"
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--experts", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--hidden", type=int, default=None, help="default 512 on CPU, 2048 on CUDA")
    p.add_argument("--intermediate", type=int, default=None,
                   help="each expert's width (fixed over E: equal active parameters); default 256 / 768")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--tokens", type=int, default=None, help="default 2048 on CPU, 16384 on CUDA")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default fp32 on CPU, bf16 on CUDA")
    p.add_argument("--budget", type=float, default=None, help="seconds of timing per cell (default 1 / 0.5)")
    p.add_argument("--min-iters", type=int, default=3)
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default 1: on a machine shared with other jobs, OpenMP threads that "
                        "wait for a descheduled sibling cost milliseconds per op)")
    p.add_argument("--dense", action="store_true", help="dense baseline columns on CPU too (always on CUDA)")
    p.add_argument("--no-historical", action="store_true", help="skip the historical loop (slow at large E)")
    a = p.parse_args()
    dev = torch.device("cuda" if a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available()) else "cpu")
    cuda = dev.type == "cuda"
    a.hidden = a.hidden or (2048 if cuda else 512)
    a.intermediate = a.intermediate or (768 if cuda else 256)
    a.tokens = a.tokens or (16384 if cuda else 2048)
    a.dtype = a.dtype or ("bf16" if cuda else "fp32")
    a.budget = a.budget if a.budget is not None else (0.5 if cuda else 1.0)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    if not cuda:
        torch.set_num_threads(a.threads or 1)
    rows = a.tokens * a.top_k
    flops = 3 * 2 * rows * 3 * a.hidden * a.intermediate  # fwd + bwd (2x fwd) of the expert GEMMs

    print(f"# `python scripts/bench_moe.py{''.join(' ' + s for s in sys.argv[1:])}`")
    print(f"# {machine(dev)} | torch {torch.__version__} | {a.dtype} | tokens {a.tokens} hidden {a.hidden} "
          f"top-{a.top_k} expert width {a.intermediate} | active expert params "
          f"{a.top_k * 3 * a.hidden * a.intermediate / 1e6:.2f} M at every E")
    dense_s = None
    dense = cuda or a.dense
    if dense:
        dense_s = timed(dense_fn(rows, a, dev, dtype), dev, a.min_iters, a.budget)
        print(f"# dense SwiGLU baseline ({rows} rows, same GEMM FLOPs): {dense_s * 1e3:.2f} ms, "
              f"{flops / dense_s / 1e12:.3g} TFLOP/s")
    head = "| E | total expert params | historical ms | new ms | speed-up |"
    sep = "|---|---|---|---|---|"
    if dense:
        head += " new vs dense (expert path) | new experts alone vs dense |"
        sep += "---|---|"
    print(head + "\n" + sep, flush=True)
    res: dict[int, tuple[float | None, float]] = {}
    for e in a.experts:
        m = build(e, a, dev, dtype)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(a.tokens, a.hidden, generator=g).to(dev, dtype)
        dy = torch.randn(a.tokens, a.hidden, generator=g).to(dev, dtype)
        path = "grouped_mm" if m.experts.use_grouped_mm(x[:8]) else "loop"
        new = timed(step_fn(m, x, dy, historical=False), dev, a.min_iters, a.budget)
        old = None if a.no_historical else timed(step_fn(m, x, dy, historical=True), dev, a.min_iters, a.budget)
        res[e] = (old, new)
        total = 3 * e * a.hidden * a.intermediate / 1e6
        row = (f"| {e} | {total:.1f} M | {'-' if old is None else f'{old * 1e3:.1f}'} | {new * 1e3:.1f} | "
               f"{'-' if old is None else f'{old / new:.1f}x'} |")
        if dense:
            only = timed(experts_only_fn(m, x, dy), dev, a.min_iters, a.budget)
            row += f" {dense_s / new:.0%} ({path}) | {dense_s / only:.0%} |"
        print(row, flush=True)
        del m
    lo, hi = min(res), max(res)
    old_r = "-" if res[lo][0] is None else f"{res[hi][0] / res[lo][0]:.2f}"
    print(f"\ntime(E={hi}) / time(E={lo}): historical {old_r}, new {res[hi][1] / res[lo][1]:.2f}")


if __name__ == "__main__":
    main()
