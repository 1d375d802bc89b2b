"""Optimizers seqpar builds itself (``train.optimizer``); AdamW comes from DeepSpeed's config."""

from __future__ import annotations

import torch

from seqpar.optim.galore import GaLoreAdamW, build_galore
from seqpar.optim.qgalore import Int8Weights, QGaLoreAdamW, build_qgalore


def build_small_state_optimizer(model: torch.nn.Module, train) -> tuple[torch.optim.Optimizer | None,
                                                                         Int8Weights | None]:
    """GaLore / Q-GaLore for DeepSpeed as a client optimizer (None for adamw: DeepSpeed builds
    it), and Q-GaLore's INT8 layers (it makes them first)."""
    if train.optimizer == "galore":
        return build_galore(model, train), None
    if train.optimizer == "qgalore":
        return build_qgalore(model, train)
    return None, None


def describe_optimizer(train, shards: int = 1) -> str:
    """The optimizer line's name part (start-up summary); ``shards``: ranks GaLore's state is
    sharded over (1: replicated)."""
    g = train.galore
    if train.optimizer == "adamw":
        return ""
    name = "Q-GaLore-AdamW" if train.optimizer == "qgalore" else "GaLore-AdamW"
    out = f"{name} rank {g.rank}, refresh every {g.update_interval}"
    if train.optimizer == "qgalore":
        out += (f" (doubling at |cos| >= {g.adaptive_threshold:g} over {g.adaptive_window})" if g.adaptive_window
                else "") + f", INT8 weights / INT4 projectors in groups of {g.quant_group}, bf16 moments"
    if train.precision == "bf16":
        out += ", fp32 master weights" if g.master_weights else ", bf16 weights (stochastic rounding)"
    return out + f", scale {g.scale:g}" + (f" (state sharded over {shards} ranks)" if shards > 1 else "") + " "


__all__ = ["GaLoreAdamW", "Int8Weights", "QGaLoreAdamW", "build_small_state_optimizer", "describe_optimizer"]
