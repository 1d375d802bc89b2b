"""Device checks of the memory features whose CUDA paths CI cannot run (issues 12, 14):

    python scripts/gpu_memory_check.py [--device cuda|cpu]

1. ``offload``: full activation checkpointing with the checkpointed inputs offloaded (pinned host
   buffers, side-stream copies, prefetch) gives bitwise the loss and gradients of keeping them on
   the device, and lowers the measured peak by about the offloaded bytes (CUDA: max allocated;
   CPU: the check of equality only, the host is the device there).
2. ``tiled``: the tiled MLP's loss and gradients equal the untiled ones within rounding.
3. ``galore``: a GaLoreAdamW step on the device equals the same step in fp32 on the CPU (the SVD
   on the device picks the same subspace up to sign, which the projected update does not see).
4. ``qgalore``: Q-GaLore in bf16 on the device: stochastic rounding unbiased, the INT8 layer's
   weight gradient equal to autograd's, and a rebuilt layer + optimizer (state dicts) continues
   the same trajectory bitwise.
5. ``rmsnorm``: the norm that saves only its input and rsqrt against eager autograd on the
   device: same forward, gradients within rounding, less memory kept after the forward.

One PASS / FAIL line per check; exit status 0 only if all pass. tests/test_gpu_memory_check.py
runs it with --device cpu.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from seqpar.config import MemoryConfig, ModelConfig  # noqa: E402
from seqpar.engine.memory import apply_memory_policy  # noqa: E402
from seqpar.models import build_model  # noqa: E402


def run_model(dev, dtype, memory: MemoryConfig | None, tokens: int, layers: int):
    cfg = ModelConfig(vocab_size=512, hidden_size=256, intermediate_size=768, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2)
    model = build_model(cfg, seed=1).to(dev, dtype)
    if memory is not None:
        apply_memory_policy(model, memory, cfg, dev)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 512, (1, tokens), generator=g).to(dev)
    pos = torch.arange(tokens, device=dev)[None]
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    out = model(ids, pos, ids.roll(-1, 1))
    out.loss_sum.backward()
    peak = torch.cuda.max_memory_allocated(dev) - base if dev.type == "cuda" else 0
    grads = {n: p.grad.detach().float().cpu() for n, p in model.named_parameters()}
    return out.loss_sum.detach().float().cpu(), grads, peak


def check_offload(dev, dtype) -> tuple[bool, str]:
    layers, tokens = 8, 4096 if dev.type == "cuda" else 512
    full = MemoryConfig(activation_checkpointing="full")
    loss_a, grads_a, peak_a = run_model(dev, dtype, full, tokens, layers)
    loss_b, grads_b, peak_b = run_model(dev, dtype, full.model_copy(update={"offload_activations": True}),
                                        tokens, layers)
    same = torch.equal(loss_a, loss_b) and all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)
    detail = f"bitwise {'equal' if same else 'DIFFERENT'}"
    if dev.type != "cuda":
        return same, detail
    expect = (layers - 1) * tokens * 256 * torch.finfo(dtype).bits // 8  # all but the last layer's input
    saved = peak_a - peak_b
    ok = same and 0.8 * expect <= saved <= 1.2 * expect
    return ok, detail + f"; peak {peak_a / 2**20:.1f} -> {peak_b / 2**20:.1f} MiB, saved {saved / 2**20:.1f} " \
                        f"(offloaded inputs {expect / 2**20:.1f} MiB)"


def check_tiled(dev, dtype) -> tuple[bool, str]:
    tokens = 2048 if dev.type == "cuda" else 256
    loss_a, grads_a, _ = run_model(dev, dtype, None, tokens, 2)
    loss_b, grads_b, _ = run_model(dev, dtype, MemoryConfig(tiled_mlp=True, mlp_tile_tokens=256 if dev.type == "cuda"
                                                             else 64), tokens, 2)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    worst = max(float((grads_a[n] - grads_b[n]).abs().max() / grads_a[n].abs().max().clamp_min(1e-30))
                for n in grads_a)
    lrel = float((loss_a - loss_b).abs() / loss_a.abs())
    return worst <= tol and lrel <= tol, f"loss {lrel:.1e}, worst gradient {worst:.1e} relative (tolerance {tol:g})"


def check_galore(dev) -> tuple[bool, str]:
    from seqpar.optim.galore import GaLoreAdamW

    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(64, 192, generator=g)
    grads = [torch.randn(64, 192, generator=g) for _ in range(3)]
    finals = []
    for d in (torch.device("cpu"), dev):
        w = torch.nn.Parameter(w0.clone().to(d))
        opt = GaLoreAdamW([{"params": [w], "galore": True, "rank": 16, "update_interval": 2}], lr=1e-2)
        for gr in grads:
            w.grad = gr.to(d)
            opt.step()
        finals.append(w.detach().cpu())
    err = float((finals[0] - finals[1]).abs().max() / (finals[0] - w0).abs().max())
    return err <= 1e-3, f"device vs CPU update differs by {err:.1e} of the update"


def check_qgalore(dev) -> tuple[bool, str]:
    """Q-GaLore on the device, bf16: stochastic rounding unbiased there; the INT8 layer's
    gradients equal autograd's through the dequantized weight; an optimizer rebuilt from the
    layer's and its own state dicts (a resume's order) continues bitwise (the device's generator
    keyed the same way draws the same bits)."""
    from torch import nn

    from seqpar.optim.qgalore import Int8Linear, QGaLoreAdamW
    from seqpar.optim.quant import generator, round_to

    x = torch.full((1 << 20,), 1.0 + 2 ** -10, device=dev)
    bias = abs(float(round_to(x, torch.bfloat16, generator(dev, 0)).float().mean()) - 1 - 2 ** -10)
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(256, 192, generator=g).bfloat16().to(dev) for _ in range(6)]

    def build(seed):
        torch.manual_seed(seed)
        layer = Int8Linear(nn.Linear(192, 64, bias=False).bfloat16(), 64).to(dev)
        opt = QGaLoreAdamW([{"params": [layer.weight_int8], "galore": True, "rank": 16, "update_interval": 1}],
                           layers={layer.weight_int8: layer}, lr=1e-2, adaptive_window=2, adaptive_threshold=0.0)
        return layer, opt

    def step(layer, opt, xb):
        layer(xb).float().pow(2).mean().backward()
        opt.step()

    layer, opt = build(0)
    w = layer.dequantized().clone().requires_grad_()
    xg = inputs[0].clone().requires_grad_()
    layer(xg).float().pow(2).mean().backward()
    torch.nn.functional.linear(inputs[0], w).float().pow(2).mean().backward()
    grad_err = float((layer.weight_grad.float() - w.grad.float()).abs().max() / w.grad.float().abs().max())
    layer.weight_grad = None
    start = layer.dequantized().float()
    for xb in inputs[:3]:
        step(layer, opt, xb)
    twin, opt2 = build(1)
    twin.load_state_dict(layer.state_dict())
    opt2.load_state_dict(opt.state_dict())  # live tensors: the load must copy them
    for xb in inputs[3:]:
        step(layer, opt, xb)
        step(twin, opt2, xb)
    same = torch.equal(layer.weight_int8, twin.weight_int8) and torch.equal(layer.weight_int8_scale,
                                                                            twin.weight_int8_scale)
    moved = float((layer.dequantized().float() - start).abs().mean())
    ok = same and bias < 2e-5 and moved > 0 and grad_err < 1e-2
    return ok, (f"resumed trajectory {'bitwise' if same else 'DIFFERS'}, SR bias {bias:.1e}, weight grad vs "
                f"autograd {grad_err:.1e}, mean |update| {moved:.1e}")


def check_rmsnorm(dev, dtype) -> tuple[bool, str]:
    """The norm (saves its input and rsqrt only) against eager autograd on the device: same
    forward, gradients within rounding, and fewer bytes alive after the forward (CUDA: allocated)."""
    from seqpar.models.transformer import RMSNorm

    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4096, 2048, generator=g).to(dev, dtype)
    w0 = torch.randn(2048, generator=g).to(dev, dtype)
    gy = torch.randn(4096, 2048, generator=g).to(dev, dtype)

    def eager(x, w):
        xf = x.float()
        return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)

    results, kept = [], []
    for fused in (True, False):
        x = x0.clone().requires_grad_()
        norm = RMSNorm(2048, 1e-6).to(dev, dtype)
        with torch.no_grad():
            norm.weight.copy_(w0)
        before = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
        y = norm(x) if fused else eager(x, norm.weight)
        kept.append((torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0) - before)
        y.backward(gy)
        results.append((y.detach(), x.grad, norm.weight.grad))
        del y
    same = torch.equal(results[0][0], results[1][0])
    err = max(float((a.float() - b.float()).abs().max() / b.float().abs().max()) for a, b in
              zip(results[0][1:], results[1][1:]))
    less = kept[0] < kept[1] if dev.type == "cuda" else True
    return same and err <= 2e-2 and less, (f"forward {'equal' if same else 'DIFFERS'}, gradients within {err:.1e}"
                                           + (f", kept after forward {kept[0] / 2**20:.0f} vs eager "
                                              f"{kept[1] / 2**20:.0f} MiB" if dev.type == "cuda" else ""))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    dev = torch.device(a.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"# seqpar gpu_memory_check | {name} | torch {torch.__version__} | {str(dtype)[6:]}", flush=True)
    failed = 0
    for label, fn in (("offload", lambda: check_offload(dev, dtype)), ("tiled", lambda: check_tiled(dev, dtype)),
                      ("galore", lambda: check_galore(dev)), ("qgalore", lambda: check_qgalore(dev)),
                      ("rmsnorm", lambda: check_rmsnorm(dev, dtype))):
        try:
            ok, detail = fn()
        except Exception as e:  # a crash is a failure with its reason, and the next check still runs
            ok, detail = False, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        failed += not ok
        print(f"{'PASS' if ok else 'FAIL'} {label}: {detail}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
