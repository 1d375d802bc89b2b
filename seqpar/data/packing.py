"""Packed samples: the one format every dataset emits, and the numpy helpers that build it.

A sample is ``{"input_ids", "labels", "position_ids"}``, three 1-D int64 arrays of ``seq_len``:

* ``labels[i]`` is the target of position ``i`` (already shifted), ``IGNORE_INDEX`` = no loss;
* ``position_ids`` restart at 0 at each document start and only there, so document boundaries are
  exactly ``position_ids == 0`` (the attention kernels build their varlen masks from this);
* a label never crosses a boundary: the last token of a document has ``IGNORE_INDEX``;
* tail padding is its own pseudo-document: pad ids, ignored labels, positions 0, 1, 2, ...
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

IGNORE_INDEX = -100
Sample = dict[str, np.ndarray]
SAMPLE_KEYS = ("input_ids", "labels", "position_ids")


class PackedDataset(ABC):
    """Random-access dataset of packed samples; ``self[i]`` is a pure function of ``i``."""

    seq_len: int
    pad_id: int
    vocab_size_needed: int  # max token id it can emit + 1 (checked against the model's vocab)

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def _sample(self, i: int) -> Sample: ...

    def __getitem__(self, i: int) -> Sample:
        return self._sample(self._index(i))

    def _index(self, i: int) -> int:
        n = len(self)
        if not 0 <= int(i) < n:
            raise IndexError(f"sample index {i} out of range for {type(self).__name__} of {n}")
        return int(i)

    def describe(self) -> str:
        """One line for the run log."""
        return f"{type(self).__name__}: {len(self):,} sequences of {self.seq_len} tokens"

    def content_fingerprint(self) -> dict[str, str]:
        """What identifies the data's content, by file (recorded in checkpoints: a resume on
        changed data is refused unless allowed); empty for data the config alone determines."""
        return {}


def positions_from_starts(starts: np.ndarray, n: int) -> np.ndarray:
    """Position ids for ``n`` tokens whose documents begin at ``starts`` (index 0 always does)."""
    idx = np.arange(n, dtype=np.int64)
    is_start = np.zeros(n, dtype=bool)
    is_start[0] = True
    is_start[np.asarray(starts, dtype=np.int64)] = True
    # Each position minus the most recent start at or before it.
    return idx - np.maximum.accumulate(np.where(is_start, idx, 0))


def window_sample(window: np.ndarray, doc_ends: np.ndarray) -> Sample:
    """Sample from ``S + 1`` consecutive stream tokens.

    ``doc_ends`` are the input positions (0..S-1) holding the last token of a document: their
    next token starts another document, so they get no label and positions restart after them.
    The window's first token gets position 0 even mid-document (a fragment is a new document).
    """
    seq_len = len(window) - 1
    doc_ends = np.asarray(doc_ends, dtype=np.int64)
    input_ids = np.asarray(window[:-1], dtype=np.int64)
    labels = np.array(window[1:], dtype=np.int64)
    labels[doc_ends] = IGNORE_INDEX
    starts = doc_ends + 1
    position_ids = positions_from_starts(starts[starts < seq_len], seq_len)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def pack_documents(
    tokens: np.ndarray, loss_mask: np.ndarray, starts: np.ndarray, seq_len: int, pad_id: int
) -> Sample:
    """Whole documents laid end to end, then padding up to ``seq_len``.

    ``tokens[k]`` is trained on (is a target) where ``loss_mask[k]``; ``starts`` are the document
    offsets within ``tokens`` (starting with 0). ``len(tokens) <= seq_len``.
    """
    n = len(tokens)
    assert 0 < n <= seq_len, (n, seq_len)
    tokens = np.asarray(tokens, dtype=np.int64)
    starts = np.asarray(starts, dtype=np.int64)
    input_ids = np.full(seq_len, pad_id, dtype=np.int64)
    input_ids[:n] = tokens
    labels = np.full(seq_len, IGNORE_INDEX, dtype=np.int64)
    labels[: n - 1] = np.where(np.asarray(loss_mask[1:], dtype=bool), tokens[1:], IGNORE_INDEX)
    labels[starts[starts > 0] - 1] = IGNORE_INDEX  # no label across a document boundary
    if n < seq_len:
        starts = np.append(starts, n)  # the padding pseudo-document
    position_ids = positions_from_starts(starts, seq_len)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def greedy_pack(lengths: np.ndarray, seq_len: int) -> tuple[np.ndarray, int]:
    """Pack examples in order: a new sequence starts when the next example does not fit.

    Returns ``(bounds, truncated)``: sequence ``b`` holds examples ``bounds[b]:bounds[b + 1]``
    (contiguous, because order is kept), and the number of examples longer than ``seq_len``
    (each fills a sequence alone and is cut to ``seq_len`` tokens).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    truncated = int((lengths > seq_len).sum())
    bounds = [0]
    used = 0
    for k, n in enumerate(np.minimum(lengths, seq_len).tolist()):
        if used + n > seq_len:
            bounds.append(k)
            used = 0
        used += n
    if len(lengths):
        bounds.append(len(lengths))
    return np.asarray(bounds, dtype=np.int64), truncated


def best_fit_pack(lengths: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Best-fit decreasing: the longest example first, each into the fullest sequence it still fits
    (a new one when none does). Returns ``(order, bounds)``: sequence ``b`` holds examples
    ``order[bounds[b]:bounds[b + 1]]`` (in file order within it); sequences in the order they were
    opened (longest examples first). Examples are counted at ``min(length, seq_len)``.

    Greedy packing in file order leaves a sequence's tail empty whenever the next example does not
    fit, which costs most when examples are long next to ``seq_len`` (two of 20K tokens leave 12K of
    a 32K sequence padding each); this fills those tails with shorter examples. A pure function of
    the lengths (ties keep file order): every rank and every restart packs the same. The fullest
    fitting sequence is found in O(log seq_len) with a tree over remaining capacities.
    """
    need = np.minimum(np.asarray(lengths, dtype=np.int64), seq_len)
    size = 1 << int(seq_len).bit_length()  # leaves for remaining capacities 0..seq_len
    tree = [0] * (2 * size)  # tree[i]: open sequences with a remaining capacity under node i
    open_at: dict[int, list[int]] = {}  # remaining capacity -> sequences with exactly that room

    def add(cap: int, d: int) -> None:
        i = cap + size
        while i:
            tree[i] += d
            i >>= 1

    def smallest_at_least(lo: int) -> int | None:
        i = lo + size
        if tree[i]:
            return lo
        while i > 1:
            if not i & 1 and tree[i + 1]:  # a left child whose right sibling has room >= lo
                i += 1
                break
            i >>= 1
        else:
            return None
        while i < size:
            i = 2 * i if tree[2 * i] else 2 * i + 1
        return i - size

    bins: list[list[int]] = []
    for k in np.argsort(-need, kind="stable").tolist():
        n = int(need[k])
        cap = smallest_at_least(n)
        if cap is None:
            b, cap = len(bins), seq_len
            bins.append([])
        else:
            b = open_at[cap].pop()
            add(cap, -1)
        bins[b].append(k)
        if cap - n > 0:  # a full sequence takes nothing more
            open_at.setdefault(cap - n, []).append(b)
            add(cap - n, 1)
    order = np.asarray([k for b in bins for k in sorted(b)], dtype=np.int64)
    bounds = np.cumsum([0] + [len(b) for b in bins], dtype=np.int64)
    return order, bounds
