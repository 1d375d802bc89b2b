"""Low-precision storage for the small-state optimizers: stochastic rounding with a counter-based
generator, INT8 weight groups and packed INT4 projector groups.

Stochastic rounding (SR) keeps the updates that round-to-nearest would drop: a bf16 weight whose
update is smaller than half a bf16 step moves with the probability the update covers of that step,
so in expectation it follows the fp32 trajectory (GaLore's and Q-GaLore's papers train without an
fp32 copy of the weights this way). The random bits come from a generator seeded by
(seed, parameter index, step, purpose), not from a running stream: a resumed run draws the very
same bits without saving any generator state, so resume stays bitwise.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import Tensor

INT8_MAX = 127
INT4_LEVELS = 15


def generator(device: torch.device, *key: int | str) -> torch.Generator:
    """A generator seeded from ``key`` alone (same key, same bits, on any run)."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    g = torch.Generator(device=device)
    g.manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
    return g


def round_to(x: Tensor, dtype: torch.dtype, gen: torch.Generator | None,
             rows: tuple[int, int] | None = None) -> Tensor:
    """fp32 ``x`` in ``dtype``: fp32 as is; bf16 by stochastic rounding (``gen``) or, without a
    generator, to nearest. Each bf16 neighbour is chosen with probability proportional to
    closeness: 16 random bits added below bf16's mantissa, then the low half cut off. ``rows``
    (first, total): ``x`` is rows ``first..`` of a tensor of ``total`` rows and takes those rows of
    the whole tensor's random bits (a parameter split over ranks rounds as it would whole)."""
    x = x.float()
    if dtype == torch.float32:
        return x
    if dtype != torch.bfloat16:
        raise ValueError(f"stochastic rounding to {dtype} is not supported (fp32 or bf16)")
    if gen is None:
        return x.to(torch.bfloat16)
    shape = x.shape if rows is None else (rows[1], *x.shape[1:])
    noise = torch.randint(0, 1 << 16, shape, dtype=torch.int32, device=x.device, generator=gen)
    if rows is not None:
        noise = noise[rows[0]:rows[0] + x.shape[0]]
    bits = (x.contiguous().view(torch.int32) + noise) & -65536  # sign-magnitude: adds to the magnitude
    return bits.view(torch.float32).to(torch.bfloat16)  # exact: the low 16 bits are zero


def _groups(x: Tensor, group: int) -> Tensor:
    """``x`` flattened into rows of ``group`` (the last row zero-padded)."""
    flat = x.reshape(-1)
    pad = (-flat.numel()) % group
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, group)


def quantize_int8(w: Tensor, group: int, gen: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Symmetric INT8 per group of ``group`` values: (q int8 [groups, group], scale fp32 [groups]),
    w ~ q * scale. Stochastic rounding with ``gen``, else to nearest."""
    g = _groups(w.float(), group)
    scale = (g.abs().amax(dim=1) / INT8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    x = g / scale[:, None]
    if gen is None:
        q = x.round()
    else:
        q = (x + torch.rand(x.shape, device=x.device, generator=gen)).floor_()
    return q.clamp_(-INT8_MAX, INT8_MAX).to(torch.int8), scale


def dequantize_int8(q: Tensor, scale: Tensor, shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """The weight ``q * scale`` (computed in fp32, then cast: the same bits every time)."""
    return (q.float() * scale[:, None]).reshape(-1)[: math.prod(shape)].view(shape).to(dtype)


def quantize_int4(x: Tensor, group: int) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric INT4 per group (Q-GaLore's projector format), to nearest: (two codes per byte
    uint8, scale fp32 [groups], zero fp32 [groups]); x ~ scale * (code - zero)."""
    g = _groups(x.float(), group)
    lo, hi = g.amin(dim=1), g.amax(dim=1)
    scale = ((hi - lo) / INT4_LEVELS).clamp_min(1e-8)
    zero = (-lo / scale).round_().clamp_(0, INT4_LEVELS)
    codes = (g / scale[:, None]).round_().add_(zero[:, None]).clamp_(0, INT4_LEVELS).to(torch.uint8).reshape(-1)
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])
    return codes[0::2] | (codes[1::2] << 4), scale, zero


def dequantize_int4(packed: Tensor, scale: Tensor, zero: Tensor, shape: torch.Size | tuple[int, ...],
                    group: int) -> Tensor:
    """fp32 tensor of ``shape`` from ``quantize_int4``'s output."""
    codes = torch.stack([packed & 15, packed >> 4], dim=1).reshape(-1)
    n = scale.numel() * group
    g = codes[:n].float().view(-1, group)
    return ((g - zero[:, None]) * scale[:, None]).reshape(-1)[: math.prod(shape)].view(shape)
