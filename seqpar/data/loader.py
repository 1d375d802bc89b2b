"""Micro-batches for one data-parallel rank, addressed by (optimizer step, micro-step).

The global batch of step ``s`` is sample positions ``[s*G, (s+1)*G)``, ``G = micro x dp x accum``.
Micro-step ``m`` on DP rank ``r`` takes positions ``s*G + (m*dp + r)*micro + j``: the sequence of
global batches is independent of the DP degree (only the rank assignment changes), and the loader
holds no position of its own, so resuming mid-window is just asking for ``(step, micro_step)``.
Every rank of a sequence-parallel group shares a DP rank and so receives the same full sequences.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from seqpar.data.packing import IGNORE_INDEX, SAMPLE_KEYS, PackedDataset
from seqpar.data.sampler import GlobalSampler


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Host -> device copy that does not wait for the GPU: from pinned memory on CUDA (a pageable
    source can make the copy wait), a plain copy elsewhere."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@dataclass
class Batch:
    """``[B, S]`` int64 tensors; ``labels`` are already shifted (``IGNORE_INDEX`` = no loss)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(*(to_device(t, device) for t in (self.input_ids, self.labels, self.position_ids)))

    @property
    def num_loss_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


class MicroBatchLoader:
    """Deterministic micro-batches of ``dataset`` in ``sampler`` order for one DP rank.

    ``prefetch=True`` builds the next step's window on a background thread while the current one
    trains; results are identical either way (everything is a function of the step).
    """

    def __init__(
        self,
        dataset: PackedDataset,
        sampler: GlobalSampler,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        grad_accum_steps: int,
        prefetch: bool = False,
    ):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        if micro_batch_size < 1 or grad_accum_steps < 1:
            raise ValueError("micro_batch_size and grad_accum_steps must be >= 1")
        if sampler.num_samples != len(dataset):
            raise ValueError(f"sampler covers {sampler.num_samples} samples, dataset has {len(dataset)}")
        self.dataset = dataset
        self.sampler = sampler
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.grad_accum_steps = grad_accum_steps
        self.global_batch_size = micro_batch_size * dp_size * grad_accum_steps
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="seqpar-data") if prefetch else None
        self._ahead: tuple[int, Future[list[Batch]]] | None = None

    def positions(self, step: int, micro_step: int) -> list[int]:
        """Global sample positions of this rank's micro-batch."""
        if step < 0 or not 0 <= micro_step < self.grad_accum_steps:
            raise ValueError(
                f"need step >= 0 and 0 <= micro_step < {self.grad_accum_steps}, got ({step}, {micro_step})"
            )
        first = step * self.global_batch_size
        first += (micro_step * self.dp_size + self.dp_rank) * self.micro_batch_size
        return list(range(first, first + self.micro_batch_size))

    def indices(self, step: int, micro_step: int) -> list[int]:
        """Dataset indices of this rank's micro-batch."""
        return [self.sampler.index(p) for p in self.positions(step, micro_step)]

    def micro_batch(self, step: int, micro_step: int) -> Batch:
        samples = [self.dataset[i] for i in self.indices(step, micro_step)]
        return Batch(*(torch.from_numpy(np.stack([s[k] for s in samples])) for k in SAMPLE_KEYS))

    def _window(self, step: int) -> list[Batch]:
        return [self.micro_batch(step, m) for m in range(self.grad_accum_steps)]

    def window(self, step: int) -> list[Batch]:
        """All ``grad_accum_steps`` micro-batches of this rank for optimizer step ``step``."""
        if self._pool is None:
            return self._window(step)
        ahead, self._ahead = self._ahead, None
        batches = ahead[1].result() if ahead is not None and ahead[0] == step else self._window(step)
        self._ahead = (step + 1, self._pool.submit(self._window, step + 1))
        return batches

    def consumed_samples(self, step: int, micro_step: int) -> int:
        """Samples consumed by all ranks before micro-step ``micro_step`` of ``step``."""
        return step * self.global_batch_size + micro_step * self.micro_batch_size * self.dp_size

    def close(self) -> None:
        """Stop the prefetch thread (no-op without prefetch)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
            self._ahead = None
