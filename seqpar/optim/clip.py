"""Global gradient-norm clipping where seqpar, not DeepSpeed, owns some gradients (split experts
at ZeRO-0, Q-GaLore's INT8 layers). DeepSpeed's rule: scale every gradient by
max_norm / (norm + 1e-6) when that is below 1. No host read: the norm stays a device tensor."""

from __future__ import annotations

import torch
from torch import Tensor


def squared_norm(grads: list[Tensor], device: torch.device) -> Tensor:
    """Sum of squares of ``grads`` in fp32 (0 when there are none: the caller may still all-reduce it)."""
    if not grads:
        return torch.zeros((), dtype=torch.float32, device=device)
    return torch.stack([g.float().pow(2).sum() for g in grads]).sum()


def clip_to_norm_(grads: list[Tensor], norm: Tensor, max_norm: float) -> None:
    """Scale ``grads`` in place so that their global ``norm`` is at most ``max_norm`` (0: off)."""
    if max_norm > 0 and grads:
        coef = max_norm / (norm + 1e-6)
        coef = torch.where(coef < 1, coef, torch.ones_like(coef))
        # an inf norm (squares overflowed) would scale everything to 0 and let the step through:
        # NaN instead, so the optimizer's own check skips it (engine/nonfinite.py)
        torch._foreach_mul_(grads, torch.where(torch.isfinite(norm), coef, torch.full_like(coef, float("nan"))))
