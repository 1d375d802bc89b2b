"""How many bytes a checkpoint's weights and optimizer state take, by training mode (full AdamW,
GaLore, Q-GaLore, LoRA), from the model's shapes alone (a meta-device model: any size, no memory,
no training). Counted as one copy of each (ZeRO shards the same bytes over ranks); the small files
(RNG, counters, config) are left out. ``scripts/bench_checkpoint.py --sizes`` prints it;
``tests/test_galore.py`` checks it against real checkpoints of a small model."""

from __future__ import annotations

import torch

from seqpar.config import Config


def checkpoint_bytes(cfg: Config) -> dict[str, int]:
    """{"weights": ..., "optimizer": ..., "total": ...} bytes for ``cfg`` (its precision, optimizer,
    LoRA, ZeRO stage), and "trainable": the number of trainable values (all ranks together)."""
    from seqpar.models.lora import apply_lora
    from seqpar.models.transformer import Transformer
    from seqpar.optim.galore import galore_state_bytes, is_galore_target
    from seqpar.optim.qgalore import qgalore_state_bytes

    m, t = cfg.model, cfg.train
    with torch.device("meta"):
        model = Transformer(m.model_copy(update={"lora": None}))
        if m.lora is not None:
            apply_lora(model, m.lora)
    wbytes = 2 if t.precision == "bf16" else 4
    # DeepSpeed's fp32 copy: bf16 with AdamW (or GaLore with master_weights), and ZeRO 1-3 in any
    # precision (its partitions keep their own fp32 flat copy); ZeRO-0 fp32 and GaLore's
    # low-precision weights update the weights themselves
    master = 4 if (t.precision == "bf16" and not cfg.low_precision_weights) or cfg.parallel.zero_stage >= 1 else 0
    qgalore, g = t.optimizer == "qgalore", t.galore
    weights = optimizer = trainable = 0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue  # LoRA's frozen base: not in the checkpoint (its identity is)
        n = p.numel()
        trainable += n
        target = t.optimizer in ("galore", "qgalore") and is_galore_target(name, p, g.targets)
        if qgalore and target:  # INT8 codes + a scale per group
            weights += n + 4 * -(-n // g.quant_group)
            optimizer += qgalore_state_bytes(tuple(p.shape), g.rank, g.quant_group, g.adaptive_window)
        elif qgalore:  # bf16 moments
            weights += n * wbytes
            optimizer += 4 * n + 4
        else:
            weights += n * wbytes
            optimizer += master * n + (galore_state_bytes(tuple(p.shape), g.rank) if target else 8 * n + 4)  # + step
    return {"weights": weights, "optimizer": optimizer, "total": weights + optimizer, "trainable": trainable}


def galore_sharded(cfg: Config, world_size: int) -> bool:
    """GaLore's state sharded by parameter (train.galore.shard_state): several ranks, and GaLore is
    DeepSpeed's optimizer itself (fp32, or bf16 without master weights)."""
    t = cfg.train
    return (t.optimizer == "galore" and t.galore.shard_state and world_size > 1
            and (t.precision == "fp32" or cfg.low_precision_weights))


def galore_largest_share(cfg: Config, world_size: int) -> int:
    """Optimizer bytes of the most loaded rank when GaLore's state is sharded over ``world_size``
    ranks: the optimizer's own owners (``balance_owners`` over its parameter order) on a meta model."""
    from seqpar.models.transformer import Transformer
    from seqpar.optim.galore import SPLIT, GaLoreAdamW, galore_groups, galore_state_bytes, plan_shards

    with torch.device("meta"):
        model = Transformer(cfg.model)
    groups = galore_groups(model, cfg.train)
    params = [(p, g) for g in groups for p in g["params"]]
    owner, rows = plan_shards([GaLoreAdamW.state_numel(p, g) for p, g in params],
                              [GaLoreAdamW.split_rows(p, g) for p, g in params], world_size)
    load = [0] * world_size
    for i, ((p, g), k) in enumerate(zip(params, owner)):
        if k == SPLIT:  # each rank: its rows' AdamW moments + the step
            per_row = p.numel() // p.shape[0]
            for r, (lo, hi) in enumerate(rows[i]):
                load[r] += 8 * per_row * (hi - lo) + 4
        else:  # projector + low-rank moments + step, or AdamW's moments + step
            load[k] += galore_state_bytes(tuple(p.shape), g["rank"]) if g.get("galore") else 8 * p.numel() + 4
    return max(load)
