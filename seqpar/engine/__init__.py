"""The training engine: the micro-batch loop (``trainer``) and the one module that reads and
writes DeepSpeed's internal state (``deepspeed_state``, pinned to deepspeed==0.19.8)."""

from seqpar.engine.trainer import Trainer, TrainState

__all__ = ["Trainer", "TrainState"]
