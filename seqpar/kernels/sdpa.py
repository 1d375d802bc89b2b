"""Attention through torch's fused SDPA ops that also return the log-sum-exp (CUDA; CPU too).

The public ``F.scaled_dot_product_attention`` hides the LSE, which ring attention needs, so we call
the aten ops directly (as torch's own context parallelism does). Their autograd formulas give the
gradient of ``out``; ``lse`` is returned detached. Backends, fastest first on an H100: cuDNN, then
flash (FA2), then memory-efficient. cuDNN has no deterministic backward, so deterministic mode
skips it. Packed documents use the varlen entry points (cumulative sequence lengths).

Which op runs is decided once per (backend list, dense/varlen, GQA) by trying them in order and
remembering the first that works on this GPU/torch build (``BackendChooser``): the logic is plain
Python and tested on CPU with fake backends.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

aten = torch.ops.aten

# (q, k, v, cu_seqlens | None, max_seqlen, scale) -> (out [T, H, D], lse [H, T])
Backend = Callable[[Tensor, Tensor, Tensor, "Tensor | None", int, float], tuple[Tensor, Tensor]]


def _as_bhsd(x: Tensor) -> Tensor:
    """[T, H, D] -> [1, H, T, D] view (the fused ops accept this stride pattern)."""
    return x.unsqueeze(0).transpose(1, 2)


def _lse_ht(lse: Tensor, heads: int, total: int) -> Tensor:
    """Normalise the various LSE shapes ([1,H,T], [1,H,T,1], [H,T], padded) to fp32 [H, T]."""
    return lse.reshape(-1, lse.shape[-1] if lse.shape[-1] != 1 else lse.shape[-2])[:heads, :total].float()


def _expand_kv(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    rep = q.shape[1] // k.shape[1]
    if rep == 1:
        return k, v
    return k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)


def _half_only(q: Tensor, name: str) -> None:
    # Measured on an H200 (torch 2.11): the cuDNN op accepts fp32 and returns NaN. cuDNN and flash
    # are half-precision kernels; refuse other dtypes so the chooser moves on to `efficient`.
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise NotImplementedError(f"{name} supports fp16/bf16 only, got {q.dtype}")


def cudnn_dense(q, k, v, cu, max_len, scale):
    _half_only(q, "cudnn")
    out, lse = aten._scaled_dot_product_cudnn_attention(
        _as_bhsd(q), _as_bhsd(k), _as_bhsd(v), None, True, 0.0, True, False, scale=scale
    )[:2]
    return out.squeeze(0).transpose(0, 1), _lse_ht(lse, q.shape[1], q.shape[0])


def flash_dense(q, k, v, cu, max_len, scale):
    _half_only(q, "flash")
    out, lse = aten._scaled_dot_product_flash_attention(
        _as_bhsd(q), _as_bhsd(k), _as_bhsd(v), 0.0, True, False, scale=scale
    )[:2]
    return out.squeeze(0).transpose(0, 1), _lse_ht(lse, q.shape[1], q.shape[0])


def efficient_dense(q, k, v, cu, max_len, scale):
    out, lse = aten._scaled_dot_product_efficient_attention(
        _as_bhsd(q), _as_bhsd(k), _as_bhsd(v), None, True, 0.0, True, scale=scale
    )[:2]
    return out.squeeze(0).transpose(0, 1), _lse_ht(lse, q.shape[1], q.shape[0])


def flash_varlen(q, k, v, cu, max_len, scale):
    _half_only(q, "flash")
    out, lse = aten._flash_attention_forward(
        q, k, v, cu, cu, max_len, max_len, 0.0, True, False, scale=scale
    )[:2]
    return out, _lse_ht(lse, q.shape[1], q.shape[0])


def efficient_varlen(q, k, v, cu, max_len, scale):
    # custom_mask_type 1 = causal from the top-left of each (q, k) document pair.
    out, lse = aten._efficient_attention_forward(
        q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), None, cu, cu, max_len, max_len, 0.0, 1, True,
        scale=scale,
    )[:2]
    lse = unpad_varlen_lse(lse, cu, q.shape[0]) if lse.dim() == 3 else lse
    return out.squeeze(0), _lse_ht(lse, q.shape[1], q.shape[0])


def unpad_varlen_lse(lse: Tensor, cu: Tensor, total: int) -> Tensor:
    """[N docs, H, >= max_len] padded per-document LSE (efficient varlen, seen on an H200) ->
    [H, total]. Gathered by each token's (document, offset), computed on the device: reading the
    document lengths on the host would wait for the GPU."""
    t = torch.arange(total, device=cu.device)
    doc = torch.searchsorted(cu[1:], t, right=True)
    return lse[doc, :, t - cu[doc]].transpose(0, 1)


def cpu_flash_varlen(q, k, v, cu, max_len, scale):
    """CPU: torch's fused CPU flash kernel, one causal call per document.

    Its LSE output carries no gradient (a known limitation), which is fine here: local attention
    only differentiates ``out``. Ring attention on CPU uses the exact ``torch_math`` blocks.
    """
    k, v = _expand_kv(q, k, v)
    outs, lses = [], []
    bounds = cu.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        o, lse = aten._scaled_dot_product_flash_attention_for_cpu(
            _as_bhsd(q[a:b]), _as_bhsd(k[a:b]), _as_bhsd(v[a:b]), 0.0, True, scale=scale
        )
        outs.append(o.squeeze(0).transpose(0, 1))
        lses.append(lse.reshape(q.shape[1], b - a))
    return torch.cat(outs), torch.cat(lses, dim=1).float()


DENSE = {"cudnn": cudnn_dense, "flash": flash_dense, "efficient": efficient_dense}
# No cuDNN varlen: torch 2.11's `_cudnn_attention_forward` with cumulative lengths gave wrong
# outputs and ~25 TFLOP/s on an H200 (scripts/gpu_selftest.py); flash varlen is the fast path.
VARLEN = {"flash": flash_varlen, "efficient": efficient_varlen}
ORDER = ("cudnn", "flash", "efficient")


def backend_order(deterministic: bool, prefer: Sequence[str] | None = None) -> list[str]:
    """Backends to try, fastest first; cuDNN's backward is never deterministic, so it is dropped."""
    order = list(prefer or ORDER)
    unknown = [b for b in order if b not in ORDER]
    if unknown:
        raise ValueError(f"unknown SDPA backend(s) {unknown}; choose from {ORDER}")
    return [b for b in order if not (deterministic and b == "cudnn")]


class BackendChooser:
    """Try backends in order for each call signature; remember the first that works.

    With GQA (fewer kv heads) each backend is tried first natively, then with kv heads repeated,
    since which fused kernels accept GQA differs between torch builds.
    """

    def __init__(self, table: dict[str, Backend], order: Sequence[str]):
        if not order:
            raise ValueError("no attention backend left to try (deterministic mode drops cuDNN)")
        self.table, self.order = table, [name for name in order if name in table]
        self.chosen: dict[tuple, tuple[str, bool]] = {}
        self.errors: dict[str, str] = {}

    def _run(self, name: str, expand: bool, q, k, v, cu, max_len, scale):
        if expand:
            k, v = _expand_kv(q, k, v)
        return self.table[name](q, k, v, cu, max_len, scale)

    def __call__(self, key: tuple, q, k, v, cu, max_len, scale) -> tuple[Tensor, Tensor]:
        if key in self.chosen:
            return self._run(*self.chosen[key], q, k, v, cu, max_len, scale)
        gqa = q.shape[1] != k.shape[1]
        for name in self.order:
            for expand in (False, True) if gqa else (False,):
                try:
                    result = self._run(name, expand, q, k, v, cu, max_len, scale)
                except (RuntimeError, NotImplementedError) as e:  # unsupported for these inputs
                    self.errors[f"{name}{'+expand' if expand else ''}"] = str(e).splitlines()[0][:200]
                    continue
                self.chosen[key] = (name, expand)
                return result
        raise RuntimeError(f"no SDPA backend ran for {key}: {self.errors}")


class SDPAAttention:
    """Local causal attention within documents via torch's fused SDPA ops (CUDA or CPU)."""

    name = "sdpa"

    def __init__(self, deterministic: bool = False, prefer: Sequence[str] | None = None, device_type: str = "cuda"):
        order = backend_order(deterministic, prefer)
        self.dense = BackendChooser(DENSE, order)
        self.varlen = BackendChooser(VARLEN, order)
        self.on_cpu = device_type == "cpu"

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, scale: float):
        if q.device.type == "cpu":
            out, lse = cpu_flash_varlen(q, k, v, cu_seqlens, max_seqlen, scale)
            return out, lse.detach()
        key = (q.dtype, q.shape[1] != k.shape[1], q.shape[-1])
        if cu_seqlens.numel() == 2:  # one document: the dense kernels are the fastest
            out, lse = self.dense(key, q, k, v, None, max_seqlen, scale)
        else:
            out, lse = self.varlen(key, q, k, v, cu_seqlens.to(torch.int32), max_seqlen, scale)
        return out, lse.detach()

    def describe(self) -> str:
        if self.on_cpu:
            return "sdpa[cpu-flash]"
        chosen = {n for n, _ in self.dense.chosen.values()} | {n for n, _ in self.varlen.chosen.values()}
        return f"sdpa[{','.join(sorted(chosen)) or 'chosen at first call'}]"


class SDPABlockKernel:
    """Dense blocks (causal or full) for ring attention on CUDA, forward and backward through the
    fused SDPA ops. The backward takes the *global* out and LSE of the queries (flash-attention
    style), which is what makes the ring's per-block gradients exact. kv heads are repeated for
    GQA and their gradients summed back. Backend per (dtype, causal) chosen like SDPAAttention."""

    name = "sdpa"

    def __init__(self, deterministic: bool = False, order: Sequence[str] | None = None, fallback=None):
        self.order = backend_order(deterministic, order)
        self.fallback = fallback  # used for dtypes no listed backend takes (fp32 with cuDNN only)
        self.chosen: dict[tuple, str] = {}
        self.errors: dict[str, str] = {}

    def _use_fallback(self, q: Tensor) -> bool:
        half = q.dtype in (torch.float16, torch.bfloat16)
        return self.fallback is not None and not half and "efficient" not in self.order

    @staticmethod
    def _fwd(name: str, q4, k4, v4, causal: bool, scale: float):
        if name == "cudnn":
            r = aten._scaled_dot_product_cudnn_attention(q4, k4, v4, None, True, 0.0, causal, False, scale=scale)
        elif name == "flash":
            r = aten._scaled_dot_product_flash_attention(q4, k4, v4, 0.0, causal, False, scale=scale)
        else:
            r = aten._scaled_dot_product_efficient_attention(q4, k4, v4, None, True, 0.0, causal, scale=scale)
        return r[0], r[1]

    @staticmethod
    def _bwd(name: str, do, q, k, v, o, lse, causal: bool, scale: float):
        """[L, H, D] tensors in, [L, H, D] gradients out."""
        lq, lk = q.shape[0], k.shape[0]
        zero = torch.zeros((), dtype=torch.int64, device=q.device)
        if name == "efficient":  # the low-level op works in [B, S, H, D]
            grads = aten._efficient_attention_backward(
                do[None], q[None], k[None], v[None], None, o[None], None, None, lq, lk, lse, 0.0,
                zero, zero, int(causal), False, scale=scale,
            )[:3]
            return tuple(g[0] for g in grads)
        args = (_as_bhsd(do), _as_bhsd(q), _as_bhsd(k), _as_bhsd(v), _as_bhsd(o), lse)
        if name == "cudnn":
            grads = aten._scaled_dot_product_cudnn_attention_backward(
                *args, zero, zero, None, None, None, lq, lk, 0.0, causal, scale=scale
            )
        else:
            grads = aten._scaled_dot_product_flash_attention_backward(
                *args, None, None, lq, lk, 0.0, causal, zero, zero, scale=scale
            )
        return tuple(g[0].transpose(0, 1) for g in grads)

    def _expand(self, q: Tensor, k: Tensor, v: Tensor):
        return _expand_kv(q, k, v)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
        if self._use_fallback(q):
            return self.fallback.forward(q, k, v, causal, scale)
        k, v = self._expand(q, k, v)
        key = (q.dtype, causal)
        names = [self.chosen[key]] if key in self.chosen else self.order
        for name in names:
            if name in ("cudnn", "flash") and q.dtype not in (torch.float16, torch.bfloat16):
                continue
            try:
                out, lse = self._fwd(name, _as_bhsd(q), _as_bhsd(k), _as_bhsd(v), causal, scale)
            except (RuntimeError, NotImplementedError) as e:
                self.errors[name] = str(e).splitlines()[0][:200]
                continue
            self.chosen[key] = name
            return out.squeeze(0).transpose(0, 1), _lse_ht(lse, q.shape[1], q.shape[0])
        raise RuntimeError(f"no SDPA block backend ran: {self.errors}")

    def backward(self, dout, q, k, v, out, lse, causal: bool, scale: float):
        if self._use_fallback(q):
            return self.fallback.backward(dout, q, k, v, out, lse, causal, scale)
        hkv = k.shape[1]
        k, v = self._expand(q, k, v)
        name = self.chosen[(q.dtype, causal)]
        lq = q.shape[0]
        # each op wants the LSE in the layout its forward produced
        lse4 = lse.unsqueeze(0).contiguous()
        if name == "cudnn":
            lse4 = lse4.unsqueeze(-1)
        elif name == "efficient":
            pad = -(-lq // 32) * 32  # the efficient kernel stores LSE rows padded to 32
            lse4 = torch.nn.functional.pad(lse4, (0, pad - lq))
        o = out.to(q.dtype)
        dq, dk, dv = self._bwd(name, dout.to(q.dtype).contiguous(), q, k, v, o, lse4, causal, scale)
        rep = q.shape[1] // hkv
        if rep > 1:  # gradients of repeated kv heads go back to their shared head, summed in fp32
            dk = dk.reshape(dk.shape[0], hkv, rep, -1).sum(2, dtype=torch.float32)
            dv = dv.reshape(dv.shape[0], hkv, rep, -1).sum(2, dtype=torch.float32)
        # in the kernel's dtype otherwise: the ring accumulates into fp32 without a cast copy
        return dq, dk, dv

    def describe(self) -> str:
        names = sorted(set(self.chosen.values())) or ["chosen at first call"]
        return f"sdpa[{','.join(names)}]" + ("+torch(fp32)" if self.fallback is not None else "")
