"""Models: one Llama-family transformer (dense or MoE) and Hugging Face import/export."""

from __future__ import annotations

import torch

from seqpar.config import ModelConfig
from seqpar.models.transformer import ModelOutput, Transformer, count_parameters


def build_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    """Random init from ``seed`` (identical on every rank), then HF weights when configured."""
    model = Transformer(cfg)
    model.init_weights(torch.Generator().manual_seed(seed))
    if cfg.hf_path is not None and cfg.load_weights:
        from seqpar.models.hf import load_hf_checkpoint

        load_hf_checkpoint(model, cfg.hf_path)
    return model


__all__ = ["ModelOutput", "Transformer", "build_model", "count_parameters"]
