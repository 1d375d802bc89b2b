"""Ulysses (DeepSpeed-Ulysses) attention: trade a sequence split for a head split.

Before attention, one all-to-all turns [T_local, H, D] (all heads of this rank's tokens) into
[U x T_local, H/U, D] (H/U heads of the Ulysses group's tokens, in rank order = sequence order);
the inner attention then runs on a sequence U times longer; a second all-to-all turns the output
back. Both use ``torch.distributed.nn.functional.all_to_all_single`` (autograd-aware; works on
gloo). With fewer kv heads than the degree (GQA), kv heads are repeated up to the degree so each
rank receives exactly the kv head its query heads use.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributed.nn.functional import all_to_all_single


def kv_repeats(kv_heads: int, degree: int) -> int:
    """How many times to repeat kv heads before the all-to-all (1 when they divide evenly)."""
    if kv_heads >= degree:
        if kv_heads % degree:
            raise ValueError(f"num_key_value_heads={kv_heads} is not a multiple of ulysses_degree={degree}")
        return 1
    if degree % kv_heads:
        raise ValueError(f"ulysses_degree={degree} is not a multiple of num_key_value_heads={kv_heads}")
    return degree // kv_heads


def _to_heads(x: Tensor, degree: int, group) -> Tensor:
    """[T_local, H, D] -> [degree * T_local, H / degree, D]."""
    t, h, d = x.shape
    send = x.reshape(t, degree, h // degree, d).transpose(0, 1).contiguous()
    recv = torch.empty_like(send)
    return all_to_all_single(recv, send, group=group).reshape(degree * t, h // degree, d)


def _to_tokens(x: Tensor, degree: int, group) -> Tensor:
    """[degree * T_local, H / degree, D] -> [T_local, H, D] (inverse of ``_to_heads``)."""
    tt, hl, d = x.shape
    send = x.reshape(degree, tt // degree, hl, d).contiguous()
    recv = torch.empty_like(send)
    out = all_to_all_single(recv, send, group=group)
    return out.transpose(0, 1).reshape(tt // degree, degree * hl, d)


class UlyssesAttention:
    """Wraps an inner attention (local kernel or ring) that runs on the gathered sequence."""

    def __init__(self, inner, group, degree: int):
        self.inner, self.group, self.degree = inner, group, degree

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, meta, scale: float) -> Tensor:
        rep = kv_repeats(k.shape[1], self.degree)
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        q, k, v = (_to_heads(x, self.degree, self.group) for x in (q, k, v))
        out = self.inner(q, k, v, meta, scale)
        return _to_tokens(out, self.degree, self.group)

    def describe(self) -> str:
        return f"ulysses{self.degree}[{self.inner.describe()}]"
