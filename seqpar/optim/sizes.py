"""How many bytes a checkpoint's weights and optimizer state take, by training mode (full AdamW,
GaLore, LoRA), from the model's shapes alone (a meta-device model: any size, no memory, no
training). Counted as one copy of each (ZeRO shards the same bytes over ranks); the small files
(RNG, counters, config) are left out. ``scripts/bench_checkpoint.py --sizes`` prints it;
``tests/test_galore.py`` checks it against real checkpoints of a small model."""

from __future__ import annotations

import torch

from seqpar.config import Config


def checkpoint_bytes(cfg: Config) -> dict[str, int]:
    """{"weights": ..., "optimizer": ..., "total": ...} for ``cfg`` (its precision, optimizer, LoRA)."""
    from seqpar.models.lora import apply_lora
    from seqpar.models.transformer import Transformer
    from seqpar.optim.galore import galore_state_bytes

    m, t = cfg.model, cfg.train
    with torch.device("meta"):
        model = Transformer(m.model_copy(update={"lora": None}))
        if m.lora is not None:
            apply_lora(model, m.lora)
    wbytes = 2 if t.precision == "bf16" else 4
    master = 4 if t.precision == "bf16" else 0  # fp32 copy in the optimizer; fp32 training updates the weights
    targets = tuple(f".{name}.weight" for name in t.galore.targets)
    weights = optimizer = 0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue  # LoRA's frozen base: not in the checkpoint (its identity is)
        weights += p.numel() * wbytes
        galore = t.optimizer == "galore" and p.dim() == 2 and ".layers." in name and name.endswith(targets)
        moments = galore_state_bytes(tuple(p.shape), t.galore.rank) if galore else 8 * p.numel()
        optimizer += master * p.numel() + moments
    return {"weights": weights, "optimizer": optimizer, "total": weights + optimizer}
