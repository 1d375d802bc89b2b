"""Weighted mixture of datasets (``data.weights``): each file of ``data.paths`` is its own source.

One epoch of the mixture holds ``c_k`` samples of source ``k``, in proportion to its weight, and at
least all of its ``n_k`` samples: the epoch length is the smallest ``N`` with ``w_k N >= n_k`` for
every ``k``, so no sample is ever left out and a source above its natural share repeats (the usual
way to upsample long documents in continued pretraining). Slots are interleaved evenly (the
``m``-th sample of source ``k`` sits at ``(m + 1/2) / c_k`` of the epoch) and the ``m``-th slot of
source ``k`` reads its sample ``m mod n_k``; ``GlobalSampler`` then permutes the epoch as for any
dataset. Like every dataset here, ``self[i]`` is a pure function of ``i``: O(1) seek, the same
global batches on any number of ranks.

Memory is one byte (two above 255 sources) per slot plus a count per 4096 slots and source.
"""

from __future__ import annotations

import math

import numpy as np

from seqpar.data.packing import PackedDataset, Sample

_BLOCK = 4096  # slots per stored prefix count: a lookup scans at most this many bytes


def mixture_counts(sizes: list[int], weights: list[float]) -> list[int]:
    """Samples of each source in one epoch: proportional to ``weights``, each at least its size."""
    total = float(sum(weights))
    share = [w / total for w in weights]
    n = max(math.ceil(s / p) for s, p in zip(sizes, share))
    return [max(s, round(p * n)) for s, p in zip(sizes, share)]


class MixtureDataset(PackedDataset):
    """``sources`` (same ``seq_len`` and padding id) sampled in proportion to ``weights``."""

    def __init__(self, sources: list[PackedDataset], weights: list[float], names: list[str]):
        if not sources or len(sources) != len(weights) or len(names) != len(sources):
            raise ValueError("a mixture needs one weight and one name per source")
        self.sources, self.names = sources, names
        self.seq_len = sources[0].seq_len
        self.pad_id = sources[0].pad_id
        if any(s.seq_len != self.seq_len or s.pad_id != self.pad_id for s in sources):
            raise ValueError("mixture sources differ in seq_len or padding id")
        self.sizes = [len(s) for s in sources]
        self.weights = [float(w) for w in weights]
        self.counts = mixture_counts(self.sizes, self.weights)
        self.n = sum(self.counts)
        # even interleave: slot order by (m + 1/2) / c_k, ties in source order (stable sort)
        keys = np.concatenate([(np.arange(c, dtype=np.float64) + 0.5) / c for c in self.counts])
        owner = np.repeat(np.arange(len(sources)), self.counts)
        dtype = np.uint8 if len(sources) <= 256 else np.uint16
        self.source_of = owner[np.argsort(keys, kind="stable")].astype(dtype)
        del keys, owner
        # counts of each source before every block start: [blocks + 1, sources]
        blocks = np.zeros((-(-self.n // _BLOCK) + 1, len(sources)), dtype=np.int64)
        for b in range(blocks.shape[0] - 1):
            seg = self.source_of[b * _BLOCK:(b + 1) * _BLOCK]
            blocks[b + 1] = blocks[b] + np.bincount(seg, minlength=len(sources))
        self.before = blocks

    def __len__(self) -> int:
        return self.n

    def locate(self, i: int) -> tuple[int, int]:
        """(source, sample index in it) of slot ``i``."""
        k = int(self.source_of[i])
        b = i // _BLOCK
        m = int(self.before[b, k]) + int(np.count_nonzero(self.source_of[b * _BLOCK:i] == k))
        return k, m % self.sizes[k]

    def _sample(self, i: int) -> Sample:
        k, j = self.locate(i)
        return self.sources[k][j]

    @property
    def vocab_size_needed(self) -> int:  # type: ignore[override]
        return max(s.vocab_size_needed for s in self.sources)

    @property
    def vocab_source(self) -> str:
        """The source emitting the largest id (for the error that says which file to look at)."""
        k = max(range(len(self.sources)), key=lambda j: self.sources[j].vocab_size_needed)
        return getattr(self.sources[k], "vocab_source", self.names[k])

    def describe(self) -> str:
        total = sum(self.weights)
        parts = [f"{name} {100 * w / total:.0f}% ({size:,} sequences, x{c / size:.2f})"
                 for name, w, size, c in zip(self.names, self.weights, self.sizes, self.counts)]
        return f"mixture of {len(self.sources)}: " + ", ".join(parts) + f"; {self.n:,} sequences of {self.seq_len} per epoch"
