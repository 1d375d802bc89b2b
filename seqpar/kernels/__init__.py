"""Attention kernels behind one interface.

A kernel is called as ``kernel(q, k, v, cu_seqlens, max_seqlen, scale) -> (out, lse)`` with
q [T, H, D], k/v [T, Hkv, D] (GQA allowed), cumulative document lengths ``cu_seqlens`` [N+1] over
the T tokens, and returns out [T, H, D] (differentiable) and lse [H, T] fp32 (detached). Masking is
always causal within documents. Sequence-parallel wrappers (``seqpar.parallel``) build on this.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from seqpar.kernels import flash as _flash
from seqpar.kernels.sdpa import SDPAAttention, installed_varlen_backends
from seqpar.kernels.torch_math import varlen_attention


@dataclass
class AttnMeta:
    """Document layout of the tokens a rank's attention sees (built once per micro-batch)."""

    cu_seqlens: Tensor  # int64 [N+1], cumulative document lengths over the T local tokens
    max_seqlen: int

    def to(self, device: torch.device | str) -> "AttnMeta":
        """Built on the host from the loader's batch (reading a device tensor's values would stall
        the GPU), then moved without waiting."""
        from seqpar.data.loader import to_device

        return AttnMeta(to_device(self.cu_seqlens, device), self.max_seqlen)


class LocalAttention:
    """Adapts a kernel to the model's ``attention(q, k, v, meta, scale) -> out`` call (no SP)."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, meta: AttnMeta, scale: float) -> Tensor:
        return self.kernel(q, k, v, meta.cu_seqlens, meta.max_seqlen, scale)[0]

    def describe(self) -> str:
        return self.kernel.describe()


class TorchAttention:
    """Exact pure-torch kernel (CPU default; any device)."""

    name = "torch"

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, scale: float):
        return varlen_attention(q, k, v, cu_seqlens, scale)

    def describe(self) -> str:
        return "torch"


def select_attention(name: str, device: torch.device, deterministic: bool = False):
    """Pick the kernel: ``auto``/``sdpa`` = torch's fused SDPA ops (on CUDA the fastest correct of
    cuDNN / flash / efficient, plus flash-attn 2 and FlashAttention-4 for packed documents when
    installed, measured per signature; the CPU flash kernel on CPU); ``flash_attn`` = flash-attn 2
    only; ``torch`` = exact math."""
    if name == "auto":
        name = "sdpa"
    if name == "torch":
        return TorchAttention()
    if name == "sdpa":
        extra = installed_varlen_backends() if device.type == "cuda" else None
        return SDPAAttention(deterministic, device_type=device.type, extra_varlen=extra)
    if device.type != "cuda":
        raise ValueError(
            f"train.attention='{name}' needs a CUDA device (this run is on {device.type}): "
            f"use 'torch' or 'auto'"
        )
    if name == "flash_attn":
        if not _flash.available():
            raise ValueError(
                "train.attention='flash_attn' but flash-attn is not installed: "
                "pip install 'seqpar[flash]' or use 'sdpa'"
            )
        return _flash.FlashAttnAttention(deterministic)
    raise ValueError(f"unknown attention kernel '{name}': use auto, torch, sdpa or flash_attn")


def select_block_kernel(device: torch.device, deterministic: bool = False):
    """Dense (causal or full) block kernel for ring attention.

    CUDA: cuDNN forward + backward (from the global out/LSE), checked against the exact reference
    on an H200 (scripts/gpu_selftest.py); fp32 blocks and deterministic mode (no cuDNN) use the
    exact torch blocks until the flash / efficient block backward has been checked on a GPU.
    CPU: exact torch math (the CPU flash kernel's LSE cannot be merged, see kernels/torch_math.py).
    """
    from seqpar.kernels.sdpa import SDPABlockKernel
    from seqpar.kernels.torch_math import TorchBlockKernel

    if device.type == "cuda" and not deterministic:
        return SDPABlockKernel(order=["cudnn"], fallback=TorchBlockKernel())
    return TorchBlockKernel()


def attn_meta_from_positions(position_ids: Tensor) -> AttnMeta:
    """Document boundaries of a flattened packed sequence: documents start where position == 0."""
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0, as_tuple=False).flatten()
    if starts.numel() == 0 or starts[0].item() != 0:
        raise ValueError("position_ids must start every sequence with 0 (a document start)")
    total = torch.tensor([flat.numel()], device=flat.device)
    cu = torch.cat([starts, total])
    return AttnMeta(cu, int((cu[1:] - cu[:-1]).max().item()))


__all__ = [
    "AttnMeta",
    "LocalAttention",
    "SDPAAttention",
    "TorchAttention",
    "attn_meta_from_positions",
    "select_attention",
    "select_block_kernel",
]
