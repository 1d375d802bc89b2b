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
    if cfg.lora is not None:  # adapters on the loaded base; the base frozen
        from seqpar.models.lora import apply_lora

        apply_lora(model, cfg.lora, seed)
    return model


__all__ = ["ModelOutput", "Transformer", "build_model", "count_parameters"]
