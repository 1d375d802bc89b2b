"""Weighted mixture of datasets (``data.weights``): each file of ``data.paths`` is its own source.

One epoch of the mixture holds ``c_k`` samples of source ``k``, in proportion to its weight, and at
least all of its ``n_k`` samples: the epoch length is the smallest ``N`` with ``w_k N >= n_k`` for
every ``k``, so no sample is ever left out and a source above its natural share repeats (the usual
way to upsample long documents in continued pretraining). Slots are interleaved evenly (the
``m``-th sample of source ``k`` sits at ``(m + 1/2) / c_k`` of the epoch) and the ``m``-th slot of
source ``k`` reads its sample ``m mod n_k``; ``GlobalSampler`` then permutes the epoch as for any
dataset. Like every dataset here, ``self[i]`` is a pure function of ``i``: O(1) seek, the same
global batches on any number of ranks.

Memory: one byte (two above 256 sources) per slot of the epoch plus a count per 4096 slots and
source, built a million slots at a time; the sampler's permutation of the epoch takes 8 bytes per
slot on top. A weight far below a large source's natural share makes the epoch long (the epoch must
show all of that source): a warning says so above x1000, and the summary shows every repeat factor.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from seqpar.data.packing import PackedDataset, Sample

log = logging.getLogger(__name__)

_BLOCK = 4096  # slots per stored prefix count: a lookup scans at most this many bytes
LARGE_REPEAT = 1000  # a repeat factor above this is most likely a mistake in data.weights
_BUILD = 1 << 20  # slots interleaved at a time (bounded temporaries)


def _interleave(counts: list[int]) -> np.ndarray:
    """Source of each slot: the ``m``-th slot of source ``k`` has the key ``(m + 1/2) / c_k``; slots
    in key order, ties in source order. Built in key ranges ``[b/B, (b+1)/B)`` cut exactly (integer
    arithmetic), so temporaries stay ~``_BUILD`` slots whatever the epoch length."""
    n, k = sum(counts), len(counts)
    blocks = n // _BUILD + 1
    out = np.empty(n, dtype=np.uint8 if k <= 256 else np.uint16)

    def below(b: int, c: int) -> int:  # slots of a source of c with key < b / blocks: 2m + 1 < 2 b c / blocks
        num = 2 * b * c - blocks
        return 0 if num <= 0 else min(c, -(-num // (2 * blocks)))

    done, lo = 0, [0] * k
    for b in range(1, blocks + 1):
        hi = [below(b, c) if b < blocks else c for c in counts]
        keys = np.concatenate([(np.arange(a, z, dtype=np.float64) + 0.5) / c for a, z, c in zip(lo, hi, counts)])
        owner = np.repeat(np.arange(k), [z - a for a, z in zip(lo, hi)])
        out[done:done + len(keys)] = owner[np.argsort(keys, kind="stable")]
        done, lo = done + len(keys), hi
    assert done == n
    return out


def _prefix_counts(source_of: np.ndarray, k: int) -> np.ndarray:
    """Slots of each source before every ``_BLOCK`` boundary: [blocks + 1, k] (int64)."""
    n = len(source_of)
    rows = -(-n // _BLOCK)
    counts = np.zeros((rows + 1, k), dtype=np.int64)
    for r0 in range(0, rows, _BUILD // _BLOCK or 1):
        r1 = min(rows, r0 + (_BUILD // _BLOCK or 1))
        seg = source_of[r0 * _BLOCK:r1 * _BLOCK].astype(np.int64)
        row = np.arange(len(seg)) // _BLOCK
        counts[r0 + 1:r1 + 1] = np.bincount(row * k + seg, minlength=(r1 - r0) * k).reshape(r1 - r0, k)
    return np.cumsum(counts, axis=0)


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
        self.source_of = _interleave(self.counts)
        self.before = _prefix_counts(self.source_of, len(sources))
        worst = max(range(len(sources)), key=lambda k: self.counts[k] / self.sizes[k])
        if self.counts[worst] / self.sizes[worst] > LARGE_REPEAT:
            log.warning("data.weights: %s repeats x%.0f in each epoch of %s sequences (an epoch shows every "
                        "sequence of every source, so a large source with a small weight makes it long): check "
                        "the weights", names[worst], self.counts[worst] / self.sizes[worst], f"{self.n:,}")

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

    def content_fingerprint(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for src in self.sources:
            out.update(src.content_fingerprint())
        return out

    def describe(self) -> str:
        total = sum(self.weights)
        parts = [f"{name} {100 * w / total:.0f}% ({size:,} sequences, x{c / size:.2f})"
                 for name, w, size, c in zip(self.names, self.weights, self.sizes, self.counts)]
        return f"mixture of {len(self.sources)}: " + ", ".join(parts) + f"; {self.n:,} sequences of {self.seq_len} per epoch"
