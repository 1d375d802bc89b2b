"""What the model is trained on, as text: the first documents of a dataset decoded, with the tokens
that are targets of the loss marked (``python -m seqpar.data --config X.yaml --show N``).

Before a long fine-tuning job, this is how to check a chat template, a prompt/response separator or
a loss mask: the trained text is between ``TRAINED_OPEN`` and ``TRAINED_CLOSE`` (green on a
terminal), and every document says how many of its tokens are trained on.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from seqpar.data.packing import IGNORE_INDEX, PackedDataset
from seqpar.data.tokenizer import Tokenizer

TRAINED_OPEN, TRAINED_CLOSE = "⟦", "⟧"
_GREEN, _RESET = "\033[32m", "\033[0m"


def documents(ds: PackedDataset, limit: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """``(sequence index, token ids, trained flags)`` of the first ``limit`` documents, padding
    skipped. Token ``j`` is trained when it is the target of position ``j - 1`` (``labels`` are
    shifted by one), so a document's first token never is."""
    shown = 0
    for i in range(len(ds)):
        s = ds[i]
        ids, labels, pos = s["input_ids"], s["labels"], s["position_ids"]
        starts = [*np.flatnonzero(pos == 0).tolist(), len(ids)]
        for a, b in zip(starts[:-1], starts[1:]):
            doc, lab = ids[a:b], labels[a:b]
            trained = np.concatenate([[False], lab[:-1] != IGNORE_INDEX])
            if np.all(doc == ds.pad_id) and not trained.any():
                continue  # the padding pseudo-document
            yield i, doc, trained
            shown += 1
            if shown == limit:
                return


def render(ids: np.ndarray, trained: np.ndarray, tok: Tokenizer | None, color: bool, max_chars: int) -> str:
    """One document as text, trained runs marked; longer than ``max_chars``: its start and end."""
    opening, closing = (_GREEN, _RESET) if color else (TRAINED_OPEN, TRAINED_CLOSE)
    cuts = [0, *(np.flatnonzero(np.diff(trained.astype(np.int8))) + 1).tolist(), len(ids)]
    parts = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        run = ids[a:b].tolist()
        text = tok.decode(run) if tok is not None else " ".join(map(str, run)) + " "
        parts.append((_clip(text, max_chars), bool(trained[a])))
    return "".join(f"{opening}{t}{closing}" if on else t for t, on in parts)


def _clip(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    half = max_chars // 2
    return f"{text[:half]} [... {len(text) - 2 * half:,} characters ...] {text[-half:]}"


def preview(ds: PackedDataset, tok: Tokenizer | None, limit: int, color: bool = False,
            max_chars: int = 2000) -> str:
    """The first ``limit`` documents of ``ds``, each with a header line and its marked text."""
    out = []
    for k, (seq, ids, trained) in enumerate(documents(ds, limit)):
        out.append(f"--- document {k} (in sequence {seq}): {len(ids):,} tokens, {int(trained.sum()):,} trained")
        out.append(render(ids, trained, tok, color, max_chars))
    return "\n".join(out)
