"""Sequence tiling: run a per-token function over tiles of tokens, recomputed tile by tile.

Each tile goes through a non-reentrant ``torch.utils.checkpoint``: its forward keeps nothing but
the tile's input (a view of the whole input, which the caller keeps anyway), and its backward
recomputes the tile's intermediates just before they are needed and frees them after. So the
intermediates of one tile are alive at a time, in the forward and in the backward. Gradients of
the function's weights are summed over the tiles by autograd before any gradient hook fires
(DeepSpeed sees one gradient per weight, as without tiling).

DeepSpeed 0.19.8 ships ``TiledMLP`` (ALST) for the same purpose. It is an autograd Function that
calls ``torch.autograd.backward`` per tile inside its backward and toggles ZeRO-3's
``ds_grad_is_ready`` flags so DeepSpeed does not reduce after the first tile. Checkpointing each
tile needs neither: it composes with whole-layer checkpointing, sequence parallelism and every
ZeRO stage through autograd alone. The cost is the same in both: inside a checkpointed layer the
MLP runs three times per micro-batch (forward, the layer's recomputation, the tile's).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint


def tiled(fn: Callable[[Tensor], Tensor], x: Tensor, tile: int) -> Tensor:
    """``fn(x)`` computed over tiles of ``tile`` rows (dim 0); ``fn`` must act on each row alone."""
    n = x.shape[0]
    if tile <= 0 or n <= tile or not torch.is_grad_enabled():
        return fn(x)
    return torch.cat([checkpoint(fn, x[i:i + tile], use_reentrant=False) for i in range(0, n, tile)])
