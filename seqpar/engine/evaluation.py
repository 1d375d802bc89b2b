"""Periodic evaluation: the loss on held-out data every ``train.eval_every`` steps.

Held-out data (built by ``data/prepare.py``): the passkey task's own eval split, or
``data.eval_paths`` (same format as ``data.paths``). The first ``train.eval_samples`` sequences are scored each time (the same ones,
so evaluations are comparable); every DP rank scores its share, sequence-parallel ranks their
shards, and the loss is the sum of token cross-entropies over all labelled tokens, like training's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from seqpar.data import Batch, PackedDataset

if TYPE_CHECKING:
    from seqpar.engine.trainer import Trainer


@torch.no_grad()
def held_out_loss(trainer: "Trainer", dataset: PackedDataset) -> float:
    """Mean token cross-entropy of the first ``train.eval_samples`` held-out sequences (collective)."""
    n = min(trainer.cfg.train.eval_samples, len(dataset))
    dp, dp_rank = trainer.layout.dp, trainer.topo.dp_rank
    turns = -(-n // dp)  # ZeRO-3 and sequence parallelism need every rank in every forward
    sums = torch.zeros(2, dtype=torch.float64, device=trainer.device)  # CE sum, labelled tokens
    trainer.engine.eval()
    try:
        for t in range(turns):
            i = min(dp_rank + t * dp, n - 1)
            s = dataset[i]
            batch = Batch(*(torch.from_numpy(s[k])[None] for k in ("input_ids", "labels", "position_ids")))
            ids, pos, labels, meta = trainer._model_inputs(batch)
            out = trainer.engine(ids, pos, labels, meta)
            if dp_rank + t * dp < n:  # a padding turn counts nothing
                sums[0] += out.loss_sum.double()
                if trainer.topo.sp_rank == 0:  # whole-sequence count, once per DP rank
                    sums[1] += batch.num_loss_tokens
    finally:
        trainer.engine.train()
    dist.all_reduce(sums)
    return (sums[0] / sums[1].clamp_min(1)).item()
