"""GPU checks CI cannot run: fused attention kernels against the exact reference, determinism,
chunked loss in bf16. Prints a table and exits non-zero on any failure.

    python scripts/gpu_selftest.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from seqpar.kernels import SDPAAttention  # noqa: E402
from seqpar.kernels.torch_math import varlen_attention  # noqa: E402
from seqpar.kernels import select_block_kernel  # noqa: E402
from seqpar.loss import chunked_cross_entropy  # noqa: E402
from seqpar.parallel.ring import RingAttention  # noqa: E402
from seqpar.parallel.sharding import RingMeta  # noqa: E402

ROWS: list[tuple[str, bool, str]] = []


def check(name: str, ok: bool, detail: str) -> None:
    ROWS.append((name, ok, detail))
    print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def kernel_vs_reference(dtype: torch.dtype, heads: int, kv: int, docs: int, tol: float) -> None:
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    t, d = 2048, 128
    q, k, v = (torch.randn(t, h, d, device=dev, generator=g, dtype=dtype) for h in (heads, kv, kv))
    dout = torch.randn(t, heads, d, device=dev, generator=g, dtype=dtype)
    cu = torch.linspace(0, t, docs + 1, device=dev).long()
    cu[1:-1] += 37  # uneven documents
    max_len = int((cu[1:] - cu[:-1]).max())
    kernel = SDPAAttention()
    qs, ks, vs = (x.clone().requires_grad_() for x in (q, k, v))
    out, lse = kernel(qs, ks, vs, cu, max_len, d**-0.5)
    torch.autograd.backward(out, dout)
    qr, kr, vr = (x.float().requires_grad_() for x in (q, k, v))
    ref, ref_lse = varlen_attention(qr, kr, vr, cu, d**-0.5)
    torch.autograd.backward(ref, dout.float())
    errs = {"out": rel(out, ref), "lse": rel(lse, ref_lse), "dq": rel(qs.grad, qr.grad),
            "dk": rel(ks.grad, kr.grad), "dv": rel(vs.grad, vr.grad)}
    name = f"sdpa {str(dtype)[6:]} heads {heads}/{kv} docs {docs} -> {kernel.describe()}"
    check(name, max(errs.values()) < tol, " ".join(f"{k} {e:.1e}" for k, e in errs.items()))


def ring_blocks_vs_reference(dtype: torch.dtype, heads: int, kv: int, docs: int, tol: float) -> None:
    """Ring attention at degree 1 (two zigzag chunks, fused block kernels fwd + bwd from the global
    out/LSE) against the exact reference."""
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(1)
    t, d = 2048, 128
    q, k, v = (torch.randn(t, h, d, device=dev, generator=g, dtype=dtype) for h in (heads, kv, kv))
    dout = torch.randn(t, heads, d, device=dev, generator=g, dtype=dtype)
    cu = torch.linspace(0, t, docs + 1, device=dev).long()
    cu[1:-1] += 37
    ring = RingAttention([0], 0, None, select_block_kernel(dev))
    qs, ks, vs = (x.clone().requires_grad_() for x in (q, k, v))
    out = ring(qs, ks, vs, RingMeta(cu.tolist(), t, 1, 0), d**-0.5)
    torch.autograd.backward(out, dout)
    qr, kr, vr = (x.float().requires_grad_() for x in (q, k, v))
    ref, _ = varlen_attention(qr, kr, vr, cu, d**-0.5)
    torch.autograd.backward(ref, dout.float())
    errs = {"out": rel(out, ref), "dq": rel(qs.grad, qr.grad), "dk": rel(ks.grad, kr.grad), "dv": rel(vs.grad, vr.grad)}
    name = f"ring1 {str(dtype)[6:]} heads {heads}/{kv} docs {docs} -> {ring.describe()}"
    check(name, max(errs.values()) < tol, " ".join(f"{k} {e:.1e}" for k, e in errs.items()))


def deterministic_repeatable() -> None:
    torch.use_deterministic_algorithms(True)
    try:
        dev = torch.device("cuda")
        t, h, d = 8192, 16, 128
        q, k, v = (torch.randn(t, h, d, device=dev, dtype=torch.bfloat16) for _ in range(3))
        cu = torch.tensor([0, t], device=dev)
        grads = []
        for _ in range(3):
            kernel = SDPAAttention(deterministic=True)
            qs, ks, vs = (x.clone().requires_grad_() for x in (q, k, v))
            out, _ = kernel(qs, ks, vs, cu, t, d**-0.5)
            out.float().square().sum().backward()
            grads.append((out.detach(), qs.grad, ks.grad, vs.grad))
        same = all(torch.equal(a, b) for g in grads[1:] for a, b in zip(grads[0], g))
        check(f"deterministic mode repeatable -> {kernel.describe()}", same, "3 runs bitwise equal" if same else "differ")
    finally:
        torch.use_deterministic_algorithms(False)


def chunked_loss_bf16() -> None:
    dev = torch.device("cuda")
    h = torch.randn(4096, 512, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(32000, 512, device=dev) * 0.02).bfloat16().requires_grad_()
    labels = torch.randint(0, 32000, (4096,), device=dev)
    labels[::7] = -100
    got = chunked_cross_entropy(h, w, labels, 1000)
    got.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = None
    w.grad = None
    want = F.cross_entropy((h.float() @ w.float().t()), labels, reduction="sum", ignore_index=-100)
    want.backward()
    errs = (rel(got, want), rel(gh, h.grad), rel(gw, w.grad))
    check("chunked CE bf16 vs full fp32 logits", max(errs) < 2e-2, "loss %.1e dh %.1e dw %.1e" % errs)


def main() -> int:
    if "--ring-only" in sys.argv:  # quick re-check of the ring block kernels
        for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
            for heads, kv in ((8, 8), (8, 2)):
                for docs in (1, 4):
                    ring_blocks_vs_reference(dtype, heads, kv, docs, tol)
        deterministic_repeatable()
        return 0
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 1
    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | cuDNN {torch.backends.cudnn.version()}")
    for dtype, tol in ((torch.bfloat16, 3e-2), (torch.float16, 5e-3), (torch.float32, 1e-4)):
        for heads, kv in ((8, 8), (8, 2)):
            for docs in (1, 4):
                try:
                    kernel_vs_reference(dtype, heads, kv, docs, tol)
                except Exception as e:
                    check(f"sdpa {dtype} {heads}/{kv} docs {docs}", False, f"{type(e).__name__}: {str(e)[:200]}")
    for dtype, tol in ((torch.bfloat16, 3e-2), (torch.float32, 1e-4)):
        for heads, kv in ((8, 8), (8, 2)):
            for docs in (1, 4):
                try:
                    ring_blocks_vs_reference(dtype, heads, kv, docs, tol)
                except Exception as e:
                    check(f"ring1 {dtype} {heads}/{kv} docs {docs}", False, f"{type(e).__name__}: {str(e)[:300]}")
    deterministic_repeatable()
    chunked_loss_bf16()
    failed = [r for r in ROWS if not r[1]]
    print(f"\n{len(ROWS) - len(failed)}/{len(ROWS)} checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
