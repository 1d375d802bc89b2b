"""Periodic evaluation: the loss on held-out data every ``train.eval_every`` steps.

Held-out data (built by ``data/prepare.py``): the passkey task's own eval split, or
``data.eval_paths`` (same format as ``data.paths``), read as one set or, with
``data.eval_per_file``, one set per file. The first ``train.eval_samples`` sequences of each set are
scored each time (the same ones, so evaluations are comparable); every DP rank scores its share,
sequence-parallel ranks their shards, and a loss is the sum of token cross-entropies over all
labelled tokens, like training's. ``eval_loss`` covers every scored token of every set.

``train.eval_by_position`` also splits the tokens by their position in their document within the
sequence (the context the model had when predicting them): whether the loss keeps falling deep into
a long context is what a context extension is for, and a single mean hides it. Scored with
``loss.token_cross_entropy`` whatever ``train.loss_impl`` is (fused kernels return only the sum).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from seqpar.data import Batch, PackedDataset
from seqpar.data.packing import IGNORE_INDEX

if TYPE_CHECKING:
    from seqpar.config import Config
    from seqpar.engine.trainer import Trainer


def eval_identity(cfg: "Config") -> str:
    """What an ``eval_loss`` measured (the held-out data and how many sequences of it), recorded
    next to it in a checkpoint's manifest: ``checkpoint.keep_best`` compares only losses measured
    alike, since a resume may change the evaluation settings."""
    d, t = cfg.data, cfg.train
    what = {"type": d.type, "eval_paths": [str(p) for p in d.eval_paths], "per_file": d.eval_per_file,
            "samples": t.eval_samples, "seq_len": d.seq_len}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def _short(n: int) -> str:
    for unit, size in (("M", 2**20), ("K", 2**10)):
        if n and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def position_buckets(edges: list[int], seq_len: int) -> list[str]:
    """Names of the position buckets ``edges`` make: [4096, 16384] at 32K -> 0-4K, 4K-16K, 16K-32K."""
    bounds = [0, *edges, seq_len]
    return [f"{_short(lo)}-{_short(hi)}" for lo, hi in zip(bounds, bounds[1:])]


def position_sums(losses: torch.Tensor, positions: torch.Tensor, labels: torch.Tensor,
                  edges: torch.Tensor) -> torch.Tensor:
    """[buckets, 2] float64: (CE sum, labelled tokens) of the tokens at each position bucket.

    ``positions`` are the input tokens' positions in their documents (``position_ids``; the label
    at that index is the next token, predicted from position + 1 tokens of context)."""
    bucket = torch.bucketize(positions, edges, right=True)  # edges[b-1] <= position < edges[b]
    labelled = (labels != IGNORE_INDEX).double()
    values = torch.stack([losses.double() * labelled, labelled], dim=1)  # [T, 2]
    # a one-hot product, not index_add_ (atomics on CUDA): the same weights give bitwise the same loss
    return torch.nn.functional.one_hot(bucket, edges.numel() + 1).double().t() @ values


@dataclass
class HeldOutResult:
    loss: float  # over every scored token of every set
    sequences: int
    sets: dict[str, float]  # data.eval_per_file: each file's loss (empty otherwise)
    positions: dict[str, float]  # train.eval_by_position: bucket name -> loss (nan: no token there)

    def metrics(self) -> dict[str, float]:
        """What metrics.jsonl records (a bucket no token reached is left out)."""
        return {"eval_loss": self.loss, **{f"eval_loss/{k}": v for k, v in self.sets.items()},
                **{f"eval_loss_by_position/{k}": v for k, v in self.positions.items() if math.isfinite(v)}}

    def line(self, step: int, max_steps: int) -> str:
        text = f"eval step {step}/{max_steps} | held-out loss {self.loss:.4f} ({self.sequences} sequences)"
        if self.sets:
            text += " | " + ", ".join(f"{k} {v:.4f}" for k, v in self.sets.items())
        if self.positions:
            text += " | by position " + ", ".join(
                f"{k} {v:.4f}" if math.isfinite(v) else f"{k} -" for k, v in self.positions.items())
        return text


@torch.no_grad()
def held_out_loss(trainer: "Trainer", sets: dict[str | None, PackedDataset]) -> HeldOutResult:
    """Token cross-entropy of the first ``train.eval_samples`` sequences of each held-out set
    (collective: every rank takes part in every forward)."""
    cfg, dp, dp_rank = trainer.cfg, trainer.layout.dp, trainer.topo.dp_rank
    edges = torch.tensor(cfg.train.eval_by_position, dtype=torch.int64, device=trainer.device)
    # one row per set (CE sum, labelled tokens), then one per position bucket: a single all-reduce
    sums = torch.zeros(len(sets) + edges.numel() + 1, 2, dtype=torch.float64, device=trainer.device)
    sizes = [min(cfg.train.eval_samples, len(ds)) for ds in sets.values()]
    trainer.engine.eval()
    try:
        for row, (ds, n) in enumerate(zip(sets.values(), sizes)):
            for t in range(-(-n // dp)):  # ZeRO-3 and sequence parallelism need every rank in every forward
                i = min(dp_rank + t * dp, n - 1)
                s = ds[i]
                batch = Batch(*(torch.from_numpy(s[k])[None] for k in ("input_ids", "labels", "position_ids")))
                ids, pos, labels, meta = trainer._model_inputs(batch)
                out = trainer.engine(ids, pos, labels, meta, per_token=True)
                if dp_rank + t * dp >= n:  # a padding turn counts nothing
                    continue
                # this rank's shard of the tokens: the SP ranks' counts add up to the sequence's
                by_pos = position_sums(out.token_losses, pos.reshape(-1), labels.reshape(-1), edges)
                sums[row] += by_pos.sum(0)
                sums[len(sets):] += by_pos
    finally:
        trainer.engine.train()
    dist.all_reduce(sums)
    rows = sums.tolist()  # one host read
    loss = lambda ce, n: ce / n if n > 0 else math.nan  # noqa: E731
    per_set, per_bucket = rows[: len(sets)], rows[len(sets):]
    return HeldOutResult(
        loss=loss(sum(r[0] for r in per_set), sum(r[1] for r in per_set)), sequences=sum(sizes),
        sets={k: loss(*r) for k, r in zip(sets, per_set) if k is not None},
        positions=dict(zip(position_buckets(cfg.train.eval_by_position, cfg.data.seq_len),
                           (loss(*r) for r in per_bucket))) if edges.numel() else {},
    )
