"""Learning-rate schedule: linear warmup, then cosine / linear decay (or constant) to a floor, or
warmup-stable-decay (constant at the peak, then a linear cooldown over the last steps: a run can be
extended during the stable phase without changing any learning rate it has used)."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from seqpar.config import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """LR used by optimizer step ``step`` (0-based). Warmup reaches the peak at step warmup-1."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    floor = cfg.lr * cfg.min_lr_ratio
    span = max(cfg.max_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    if cfg.decay == "constant":
        return cfg.lr
    if cfg.decay == "wsd":
        cooldown = max(math.ceil(cfg.cooldown_ratio * span), 1)
        start = cfg.max_steps - cooldown
        # each of the last ``cooldown`` steps is lower than the one before; the last one is at the floor
        return cfg.lr if step < start else cfg.lr - (cfg.lr - floor) * min((step - start + 1) / cooldown, 1.0)
    if cfg.decay == "linear":
        return cfg.lr - (cfg.lr - floor) * progress
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupDecay(LRScheduler):
    """torch scheduler over ``lr_at``; DeepSpeed steps it once per optimizer step.

    Its ``state_dict`` holds only numbers (the step counter), never the config callable.
    """

    def __init__(self, optimizer: Optimizer, cfg: TrainConfig):
        self.cfg = cfg
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        return [lr_at(self.last_epoch, self.cfg) for _ in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {k: v for k, v in super().state_dict().items() if k != "cfg"}
