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


def prefix_reference(q: Tensor, k: Tensor, v: Tensor, cu: "Tensor | None", scale: float, rows: int):
    """Exact (out, lse) of the first ``rows`` tokens: causal masking means they depend on nothing
    after them, so a candidate kernel is checked against fp32 math on a prefix at O(rows^2) cost."""
    from seqpar.kernels.torch_math import varlen_attention

    rows = min(rows, q.shape[0])
    if cu is None:
        cu_p = torch.tensor([0, rows], device=q.device)
    else:
        cu_p = torch.unique(torch.clamp(cu.long(), max=rows))  # documents cut at the prefix end
    with torch.no_grad():
        return varlen_attention(q[:rows], k[:rows], v[:rows], cu_p, scale)


def cuda_seconds(fn: Callable[[], None], iters: int = 3) -> float:
    """Median CUDA time of ``fn`` after one warm-up call."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return sorted(times)[len(times) // 2]


class BackendChooser:
    """Pick the backend for each call signature once, and remember it.

    Every backend that runs is checked against exact fp32 math on a prefix of the inputs (a kernel
    that runs but is wrong, as torch 2.11's cuDNN varlen was, is dropped). Without a timer
    (deterministic mode): the first correct one in ``order``. With a ``timer`` (fast mode on CUDA):
    every correct one is timed forward + backward on copies of the inputs; the fastest is kept. Deterministic
    mode never times: a choice that depended on timing noise could differ between a run and its
    resume, and bitwise resume needs the same kernels.

    With GQA (fewer kv heads) each backend is tried first natively, then with kv heads repeated,
    since which fused kernels accept GQA differs between torch builds.
    """

    CHECK_ROWS = 512

    def __init__(self, table: dict[str, Backend], order: Sequence[str],
                 timer: Callable[[Callable[[], None]], float] | None = None):
        if not order:
            raise ValueError("no attention backend left to try (deterministic mode drops cuDNN)")
        self.table, self.order = table, [name for name in order if name in table]
        self.timer = timer
        self.chosen: dict[tuple, tuple[str, bool]] = {}
        self.errors: dict[str, str] = {}
        self.timings: dict[tuple, dict[str, float]] = {}  # key -> candidate -> seconds fwd+bwd

    def _run(self, name: str, expand: bool, q, k, v, cu, max_len, scale):
        if expand:
            k, v = _expand_kv(q, k, v)
        return self.table[name](q, k, v, cu, max_len, scale)

    def _candidates(self, q, k):
        gqa = q.shape[1] != k.shape[1]
        for name in self.order:
            for expand in (False, True) if gqa else (False,):
                yield name, expand

    @staticmethod
    def _label(name: str, expand: bool) -> str:
        return f"{name}{'+expand' if expand else ''}"

    def _close(self, got: tuple[Tensor, Tensor], ref: tuple[Tensor, Tensor], rows: int, q: Tensor) -> str:
        """'' when the candidate's prefix matches the exact math, else what differs."""
        tol = 1e-4 if q.dtype == torch.float32 else 3e-2  # bf16 rounding of values near 1
        out, lse = got[0][:rows].float(), got[1][:, :rows].float()
        scale = max(1.0, float(ref[0].abs().max()))
        err_out = float((out - ref[0]).abs().max()) / scale
        err_lse = float((lse - ref[1]).abs().max())
        if not (err_out <= tol and err_lse <= tol * 10):
            return f"wrong result (max error out {err_out:.2g}, lse {err_lse:.2g})"
        return ""

    def _measure(self, key: tuple, q, k, v, cu, max_len, scale) -> tuple[str, bool]:
        ref = prefix_reference(q, k, v, cu, scale, self.CHECK_ROWS)
        rows = ref[0].shape[0]
        qc, kc, vc = (x.detach().clone().requires_grad_() for x in (q, k, v))
        g = torch.Generator(device=q.device).manual_seed(0)  # not the training RNG stream
        grad = torch.randn(qc.shape, dtype=qc.dtype, device=qc.device, generator=g)
        times: dict[str, float] = {}
        for name, expand in self._candidates(q, k):
            label = self._label(name, expand)
            try:
                with torch.no_grad():
                    problem = self._close(self._run(name, expand, qc, kc, vc, cu, max_len, scale), ref, rows, q)
                if problem:
                    self.errors[label] = problem
                    continue

                def step(name=name, expand=expand):
                    with torch.enable_grad():
                        out = self._run(name, expand, qc, kc, vc, cu, max_len, scale)[0]
                        torch.autograd.backward(out, grad)
                    qc.grad = kc.grad = vc.grad = None

                times[label] = self.timer(step)
            except (RuntimeError, NotImplementedError, TypeError, ValueError) as e:
                self.errors[label] = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        if not times:
            raise RuntimeError(f"no SDPA backend ran correctly for {key}: {self.errors}")
        self.timings[key] = times
        best = min(times, key=times.get)
        return best.removesuffix("+expand"), best.endswith("+expand")

    def __call__(self, key: tuple, q, k, v, cu, max_len, scale) -> tuple[Tensor, Tensor]:
        if key not in self.chosen and self.timer is not None:
            self.chosen[key] = self._measure(key, q, k, v, cu, max_len, scale)
        if key in self.chosen:
            try:
                return self._run(*self.chosen[key], q, k, v, cu, max_len, scale)
            except (RuntimeError, NotImplementedError) as e:
                # the choice was made on a probe shape; a longer sequence can exceed what a kernel
                # takes: drop it for this signature and choose again among the others
                name, expand = self.chosen.pop(key)
                self.errors[self._label(name, expand)] = f"failed after being chosen: {str(e).splitlines()[0][:160]}"
                self.order = [n for n in self.order if n != name]  # not tried again by this chooser
                if not self.order:
                    raise
                return self(key, q, k, v, cu, max_len, scale)
        ref = None
        for name, expand in self._candidates(q, k):
            label = self._label(name, expand)
            try:
                result = self._run(name, expand, q, k, v, cu, max_len, scale)
            except (RuntimeError, NotImplementedError) as e:  # unsupported for these inputs
                self.errors[label] = str(e).splitlines()[0][:200]
                continue
            # checked like a timed choice (deterministic mode's bitwise runs need a right kernel too)
            ref = ref if ref is not None else prefix_reference(q, k, v, cu, scale, self.CHECK_ROWS)
            problem = self._close(result, ref, ref[0].shape[0], q)
            if problem:
                self.errors[label] = problem
                continue
            self.chosen[key] = (name, expand)
            return result
        raise RuntimeError(f"no SDPA backend ran for {key}: {self.errors}")

    def describe(self) -> str:
        """Chosen backend per signature, with the measured alternatives when timed."""
        parts = []
        for key, (name, expand) in self.chosen.items():
            t = self.timings.get(key)
            label = self._label(name, expand)
            if t:
                label += " (" + ", ".join(f"{n} {s * 1e3:.4g} ms" for n, s in sorted(t.items(), key=lambda x: x[1])) + ")"
            parts.append(label)
        return "; ".join(parts)


def installed_varlen_backends() -> dict[str, Backend]:
    """Optional varlen kernels from other packages, offered to the chooser when importable.

    Both are checked against exact math at the first call like every candidate, so an API
    mismatch with an installed version drops the backend instead of giving wrong results."""
    from seqpar.kernels import flash as _flash

    extra: dict[str, Backend] = {}
    if _flash.available():
        fa2 = _flash.FlashAttnAttention()
        extra["flash_attn"] = lambda q, k, v, cu, max_len, scale: fa2(q, k, v, cu, max_len, scale)
    if _flash.fa4_available():
        extra["fa4"] = _flash.fa4_varlen
    return extra


class SDPAAttention:
    """Local causal attention within documents via torch's fused SDPA ops (CUDA or CPU).

    ``measure`` (default on CUDA outside deterministic mode): each signature's backend is the
    fastest correct one, timed at its first call (``BackendChooser``); otherwise the first that
    runs in ``ORDER``. ``prepare`` makes that first call at start-up on the run's shape so the
    choice is known before training (and printed in the summary)."""

    name = "sdpa"

    def __init__(self, deterministic: bool = False, prefer: Sequence[str] | None = None, device_type: str = "cuda",
                 measure: bool | None = None, extra_varlen: dict[str, Backend] | None = None):
        order = backend_order(deterministic, prefer)
        if measure is None:
            measure = device_type == "cuda" and not deterministic
        timer = cuda_seconds if measure else None
        varlen = dict(VARLEN)
        if extra_varlen and not deterministic:  # their backward is not known to be repeatable
            varlen.update(extra_varlen)
        self.dense = BackendChooser(DENSE, order, timer)
        self.varlen = BackendChooser(varlen, order + [n for n in varlen if n not in order], timer)
        self.on_cpu = device_type == "cpu"

    @staticmethod
    def _key(q: Tensor, k: Tensor) -> tuple:
        return (q.dtype, q.shape[1] != k.shape[1], q.shape[-1])

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, scale: float):
        if q.device.type == "cpu":
            out, lse = cpu_flash_varlen(q, k, v, cu_seqlens, max_seqlen, scale)
            return out, lse.detach()
        key = self._key(q, k)
        if cu_seqlens.numel() == 2:  # one document: the dense kernels are the fastest
            out, lse = self.dense(key, q, k, v, None, max_seqlen, scale)
        else:
            out, lse = self.varlen(key, q, k, v, cu_seqlens.to(torch.int32), max_seqlen, scale)
        return out, lse.detach()

    def prepare(self, tokens: int, heads: int, kv_heads: int, dim: int, dtype: torch.dtype,
                device: torch.device, doc_len: int | None = None) -> None:
        """Choose the dense and varlen backends for this shape now (random inputs; the choice is
        remembered per (dtype, GQA, head dim), so the run's real calls reuse it)."""
        if self.on_cpu or device.type == "cpu":
            return
        g = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(tokens, heads, dim, device=device, dtype=dtype, generator=g)
        k, v = (torch.randn(tokens, kv_heads, dim, device=device, dtype=dtype, generator=g) for _ in range(2))
        scale = dim**-0.5
        one = torch.tensor([0, tokens], device=device)
        self(q, k, v, one, tokens, scale)
        doc = max(1, min(doc_len or tokens // 4, tokens))
        cu = torch.arange(0, tokens + 1, doc, device=device)
        if int(cu[-1]) != tokens:
            cu = torch.cat([cu, one[1:]])
        if cu.numel() > 2:
            self(q, k, v, cu, doc, scale)

    def describe(self) -> str:
        if self.on_cpu:
            return "sdpa[cpu-flash]"
        parts = [f"{kind} {c.describe()}" for kind, c in (("dense", self.dense), ("varlen", self.varlen)) if c.chosen]
        return f"sdpa[{'; '.join(parts) or 'chosen at first call'}]"


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
