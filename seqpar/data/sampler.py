"""Global sample order: position 0, 1, 2, ... (across epochs) -> dataset index, with O(1) seek."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from seqpar.errors import DataError


class GlobalSampler:
    """Epoch ``e`` visits the dataset in the permutation drawn from ``PCG64([seed, e])``.

    ``index(pos)`` is a pure function of ``(num_samples, seed, shuffle, pos)``: resuming at any
    position is just calling it, nothing is replayed. Only the current epoch's permutation is
    kept (``num_samples`` int64s).
    """

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True):
        if num_samples < 1:
            raise ValueError(f"GlobalSampler needs a non-empty dataset, got num_samples={num_samples}")
        if seed < 0:
            raise ValueError(f"data.seed={seed} must be >= 0 (it seeds numpy's PCG64)")
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self._epoch = -1
        self._perm: np.ndarray | None = None
        self._lock = threading.Lock()  # the loader may prefetch from a background thread

    def permutation(self, epoch: int) -> np.ndarray:
        """The visiting order of one epoch (a fresh array; not cached)."""
        if not self.shuffle:
            return np.arange(self.num_samples, dtype=np.int64)
        rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
        return rng.permutation(self.num_samples)

    def index(self, pos: int) -> int:
        """Dataset index of global sample position ``pos``."""
        if pos < 0:
            raise ValueError(f"sample position must be >= 0, got {pos}")
        epoch, offset = divmod(int(pos), self.num_samples)
        if not self.shuffle:
            return offset
        with self._lock:
            if epoch != self._epoch:
                self._perm, self._epoch = self.permutation(epoch), epoch
            return int(self._perm[offset])  # type: ignore[index]

    def state_dict(self) -> dict[str, Any]:
        return {"num_samples": self.num_samples, "seed": self.seed, "shuffle": self.shuffle}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Check a checkpoint's sampler matches this one (the order is derived, not stored)."""
        mine = self.state_dict()
        diff = [f"{k}: checkpoint {sd.get(k)!r} != now {v!r}" for k, v in mine.items() if sd.get(k) != v]
        if diff:  # a user mistake (changed data settings), said in one line
            raise DataError(
                "the data changed since the checkpoint, so resuming would not continue the same "
                f"sample order ({'; '.join(diff)}): restore the original data.paths / data.seed / "
                "data.shuffle / data.seq_len, or start a new run"
            )
