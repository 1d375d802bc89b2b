"""Cross-entropy over the vocabulary, computed one tile of tokens at a time.

The full [tokens x vocab] logits of a 100K-token sequence with a 128K vocabulary would be 50 GB in
fp32, so ``chunked_cross_entropy`` never builds them. Design:

* One tile: the loss never holds more than one tile of logits. Forward and backward walk the
  tokens in tiles of ``chunk`` rows, in a fixed order; a tile's compute-dtype logits and its fp32
  softmax are short-lived buffers of that one tile, freed before the next tile starts, so peak
  memory is O(chunk x vocab) whatever the sequence length. Backward saves only hidden, weight,
  labels and one fp32 LSE per token, and recomputes each tile's logits (one extra matmul instead
  of a stored [T, V] tensor).
* Compute-dtype matmuls, fp32 math. The three big matmuls (logits = h @ W^T, d_hidden = p @ W and
  the tile's p^T @ h) run in the inputs' dtype: bf16 stays bf16 on the tensor cores, fp32 stays
  fp32, fp64 stays fp64. Precision matters where errors compound, so the LSE / softmax and the
  d_weight accumulator summed over all tiles are fp32 (fp64 inputs stay fp64): a bf16 accumulator
  would drift by one rounding per tile over hundreds of tiles.
* No host syncs. No ``.item()``, ``bool(tensor)`` or branching on tensor values: a token labelled
  ``IGNORE_INDEX`` (or a tile of them) is masked to contribute exactly 0, so the GPU never waits
  for the CPU. Tiles are scored even when fully ignored; that costs less than a sync per tile.
* Deterministic: plain matmuls and elementwise ops in a fixed tile order, no atomics, so the same
  inputs give bitwise the same loss and gradients.

``select_loss`` (``train.loss_impl``) can instead pick a fused CUDA kernel when installed:
Liger-Kernel or Apple's cut-cross-entropy, which compute the same sum with their own tiling.
"""

from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from seqpar.data.packing import IGNORE_INDEX

LossFn = Callable[[Tensor, Tensor, Tensor, int], Tensor]
LOSS_IMPLS = ("auto", "torch", "liger", "cce")


def _tile(h: Tensor, w: Tensor, lab: Tensor, acc: torch.dtype) -> tuple[Tensor, Tensor]:
    """One tile's LSE and token losses (0 on ignored rows), in ``acc``; its logits die here."""
    logits = (h @ w.t()).to(acc)  # the one live tile
    lse = torch.logsumexp(logits, dim=-1)
    tgt = logits.gather(1, lab.clamp_min(0).unsqueeze(1)).squeeze(1)
    del logits  # free the tile before the next one is allocated
    # where (not multiply) so a non-finite ignored row cannot leak a NaN into the sum
    return lse, torch.where(lab != IGNORE_INDEX, lse - tgt, 0.0)


class _ChunkedCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, chunk: int) -> Tensor:  # type: ignore[override]
        cdt = torch.promote_types(hidden.dtype, weight.dtype)  # matmul (compute) dtype
        acc = torch.promote_types(cdt, torch.float32)  # fp32 at least, fp64 stays fp64
        h_all, w = hidden.to(cdt), weight.to(cdt)  # no-ops when the dtypes already agree
        lse = torch.empty(hidden.shape[0], dtype=acc, device=hidden.device)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        for lo in range(0, hidden.shape[0], chunk):
            lse[lo : lo + chunk], losses = _tile(h_all[lo : lo + chunk], w, labels[lo : lo + chunk], acc)
            total += losses.sum()
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.chunk = chunk
        return total

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        hidden, weight, labels, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_h or need_w):
            return None, None, None, None
        chunk = ctx.chunk
        cdt, acc = torch.promote_types(hidden.dtype, weight.dtype), lse.dtype
        h_all, w = hidden.to(cdt), weight.to(cdt)
        grad = grad.to(acc)
        d_hidden = torch.empty(hidden.shape, dtype=cdt, device=hidden.device) if need_h else None
        d_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        for lo in range(0, hidden.shape[0], chunk):
            lab = labels[lo : lo + chunk]
            h = h_all[lo : lo + chunk]
            # p = (softmax - onehot(target)) * grad, zero on ignored rows; built in place in fp32
            p = (h @ w.t()).to(acc)
            p.sub_(lse[lo : lo + chunk, None]).exp_()
            idx = lab.clamp_min(0).unsqueeze(1)
            # one target per row: scatter_ of gathered values, not scatter_add_ (atomics on CUDA)
            p.scatter_(1, idx, p.gather(1, idx) - 1.0)
            p.masked_fill_((lab == IGNORE_INDEX).unsqueeze(1), 0.0).mul_(grad)
            p = p.to(cdt)  # no-op for fp32 / fp64 inputs
            if d_hidden is not None:
                torch.mm(p, w, out=d_hidden[lo : lo + chunk])
            if d_weight is not None:
                d_weight += p.t() @ h  # compute-dtype matmul, fp32 running sum across tiles
            del p
        return (
            None if d_hidden is None else d_hidden.to(hidden.dtype),
            None if d_weight is None else d_weight.to(weight.dtype),
            None,
            None,
        )


def chunked_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, chunk: int = 4096) -> Tensor:
    """Sum (not mean) of token cross-entropies of ``hidden @ weight.T`` against ``labels``.

    hidden [T, H], weight [V, H], labels [T] with ``IGNORE_INDEX`` for tokens without loss.
    Returns an fp32 scalar (fp64 for fp64 inputs). The caller divides by the global count of real
    tokens (see ``seqpar.engine``).
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1 tokens, got {chunk}")
    return _ChunkedCE.apply(hidden, weight, labels, chunk)


@torch.no_grad()
def token_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, chunk: int = 4096) -> Tensor:
    """Each token's cross-entropy [T] (0 where ``IGNORE_INDEX``), tile by tile as
    ``chunked_cross_entropy``'s forward (the same values; no gradients): evaluation reports the
    held-out loss by position in the document from it (``seqpar.engine.evaluation``)."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1 tokens, got {chunk}")
    cdt = torch.promote_types(hidden.dtype, weight.dtype)
    acc = torch.promote_types(cdt, torch.float32)
    h_all, w = hidden.to(cdt), weight.to(cdt)
    out = torch.empty(hidden.shape[0], dtype=acc, device=hidden.device)
    for lo in range(0, hidden.shape[0], chunk):
        out[lo : lo + chunk] = _tile(h_all[lo : lo + chunk], w, labels[lo : lo + chunk], acc)[1]
    return out


# -- optional fused CUDA kernels ---------------------------------------------------------------------
# Guarded by import and by the call's signature (the keywords we pass), never by version number.


def _accepts(fn: Callable, *names: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return all(n in params for n in names)


def _liger() -> Callable | None:
    """Liger-Kernel's functional fused linear cross-entropy, or None if unusable."""
    try:
        from liger_kernel.transformers.functional import (
            liger_fused_linear_cross_entropy as fn,
        )
    except Exception:  # noqa: BLE001 - ImportError, or a broken triton / CUDA build: not usable
        return None
    return fn if _accepts(fn, "ignore_index", "reduction") else None


_CCE_DTYPES = (torch.bfloat16, torch.float16)


def _cce() -> Callable | None:
    """cut-cross-entropy's ``linear_cross_entropy``, or None if unusable."""
    try:
        from cut_cross_entropy import linear_cross_entropy as fn
    except Exception:  # noqa: BLE001 - as above
        return None
    return fn if _accepts(fn, "ignore_index", "reduction") else None


def _as_loss(out: object) -> Tensor:
    """Newer Liger returns a tuple or an output object when extras are requested: take the loss."""
    out = getattr(out, "loss", out)
    if isinstance(out, (tuple, list)):
        out = out[0]
    assert isinstance(out, Tensor)
    return out if out.dtype in (torch.float32, torch.float64) else out.float()


def _liger_loss(fn: Callable) -> LossFn:
    extra = {"accum_dtype": torch.float32} if _accepts(fn, "accum_dtype") else {}

    def loss(hidden: Tensor, weight: Tensor, labels: Tensor, chunk: int = 4096) -> Tensor:
        # liger tiles by itself; ``chunk`` is the torch path's knob
        return _as_loss(fn(hidden, weight, labels, ignore_index=IGNORE_INDEX, reduction="sum", **extra))

    return loss


def _cce_loss(fn: Callable) -> LossFn:
    def loss(hidden: Tensor, weight: Tensor, labels: Tensor, chunk: int = 4096) -> Tensor:
        if hidden.dtype not in _CCE_DTYPES or weight.dtype not in _CCE_DTYPES:
            return chunked_cross_entropy(hidden, weight, labels, chunk)  # its backward is 16-bit only
        return _as_loss(fn(hidden, weight, labels, ignore_index=IGNORE_INDEX, reduction="sum"))

    return loss


@dataclass(frozen=True)
class LossImpl:
    """The selected loss: call as ``impl(hidden, weight, labels, chunk)`` -> summed cross-entropy."""

    name: str  # "torch", "liger" or "cce"
    fn: LossFn

    def __call__(self, hidden: Tensor, weight: Tensor, labels: Tensor, chunk: int = 4096) -> Tensor:
        return self.fn(hidden, weight, labels, chunk)

    def describe(self) -> str:
        return {
            "torch": "torch (chunked)",
            "liger": "liger (fused linear CE)",
            "cce": "cce (cut cross-entropy; torch for fp32 inputs)",
        }[self.name]


_PACKAGES = {"liger": ("liger-kernel", "liger_kernel"), "cce": ("cut-cross-entropy", "cut_cross_entropy")}


def _unavailable(impl: str, device: torch.device) -> ValueError:
    """One line: what ``impl`` needs, what is missing here, and the fix."""
    pip, module = _PACKAGES[impl]
    head = f"train.loss_impl='{impl}'"
    if device.type != "cuda":
        return ValueError(f"{head} needs CUDA and {pip} (this run is on {device.type}): use 'torch' or 'auto'")
    if not _importable(module):
        return ValueError(f"{head} needs {pip}, which is not installed: pip install {pip}, or use 'torch'")
    return ValueError(
        f"{head}: the installed {pip} fails to import or lacks the ignore_index/reduction keywords: "
        f"pip install -U {pip}, or use 'torch'"
    )


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def select_loss(impl: str, device: torch.device, deterministic: bool = False) -> LossImpl:
    """Pick the loss for ``train.loss_impl``.

    ``auto``: Liger-Kernel on CUDA when importable, else cut-cross-entropy on CUDA when importable
    (skipped when ``deterministic``: its backward adds tiles in scheduling order), else the chunked torch
    path. ``torch``: always the chunked torch path. ``liger`` / ``cce``: that kernel, or a ValueError.
    """
    if impl not in LOSS_IMPLS:
        raise ValueError(f"unknown train.loss_impl '{impl}': use one of {', '.join(LOSS_IMPLS)}")
    cuda = device.type == "cuda"
    if impl in ("auto", "liger"):
        fn = _liger() if cuda else None
        if fn is not None:
            return LossImpl("liger", _liger_loss(fn))
        if impl == "liger":
            raise _unavailable(impl, device)
    if impl == "cce" and deterministic:
        raise ValueError(
            "train.loss_impl='cce' is not deterministic (its backward adds tiles in scheduling order) but "
            "train.deterministic is set: use 'torch' or 'liger'"
        )
    if impl == "cce" or (impl == "auto" and not deterministic):
        fn = _cce() if cuda else None
        if fn is not None:
            return LossImpl("cce", _cce_loss(fn))
        if impl == "cce":
            raise _unavailable(impl, device)
    return LossImpl("torch", chunked_cross_entropy)


__all__ = ["IGNORE_INDEX", "LOSS_IMPLS", "LossImpl", "chunked_cross_entropy", "select_loss", "token_cross_entropy"]
