"""Optimizers seqpar builds itself (``train.optimizer``); AdamW comes from DeepSpeed's config."""

from seqpar.optim.galore import GaLoreAdamW

__all__ = ["GaLoreAdamW"]
