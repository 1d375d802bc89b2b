"""Passkey retrieval: a key planted somewhere in filler text, asked for at the end.

Each sample is one byte-level document of exactly ``seq_len`` tokens::

    <bos> filler ... The pass key is 48213. Remember it. 48213 is the pass key. filler ...
    What is the pass key? The pass key is 48213<eos>

generated from ``Generator(PCG64([seed, i]))`` alone, so any sample can be rebuilt at any time.

Curriculum (``passkey.curriculum_samples`` = N): training sample ``i < N`` packs ``seq_len // L(i)``
whole documents, ``L(i)`` growing linearly from ``curriculum_start_len`` to ``seq_len / 2`` (the last
document takes the remainder; document ``j`` from ``PCG64([seed, i, 1 + j])``); from sample N on,
one full-length document each. Why: a small model learns to copy the key within
a few hundred short documents, but from full-length ones alone it needs far longer than the default
run has (docs/benchmarks.md); ending on full-length documents teaches it to look back the whole
sequence. The held-out split is always one full-length document per sample.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from seqpar.config import DataConfig
from seqpar.data.packing import IGNORE_INDEX, PackedDataset, Sample
from seqpar.data.tokenizer import ByteTokenizer

FILLER = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
    "The river flows to the sea.",
    "Birds sing in the morning.",
    "The mountains are far away.",
)
# A third, non-zero seed word: SeedSequence([seed, i]) equals SeedSequence([seed, i, 0]), so a
# zero tag would replay training; any other constant gives an unrelated stream.
_EVAL_TAG = 0x6576616C  # "eval"


def _key_line(key: str) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key. "


def _question(key: str) -> str:
    return f"\nWhat is the pass key? The pass key is {key}"


class PasskeyDataset(PackedDataset):
    """Synthetic long-context retrieval (byte tokens). ``split="eval"`` is a disjoint held-out set.

    ``cfg.passkey.loss_on``: ``all`` trains every next token; ``answer`` only the key digits after
    the question and the final eos.
    """

    def __init__(self, cfg: DataConfig, split: Literal["train", "eval"] = "train"):
        if split not in ("train", "eval"):
            raise ValueError(f"PasskeyDataset split must be 'train' or 'eval', got {split!r}")
        if cfg.seed < 0:
            raise ValueError(f"data.seed={cfg.seed} must be >= 0 (it seeds numpy's PCG64)")
        self.split = split
        self.seq_len = cfg.seq_len
        self.seed = cfg.seed
        self.digits = cfg.passkey.key_digits
        self.loss_on = cfg.passkey.loss_on
        self.num_samples = cfg.num_samples if split == "train" else cfg.passkey.eval_samples
        self.curriculum = cfg.passkey.curriculum_samples if split == "train" else 0
        self.start_len = min(cfg.passkey.curriculum_start_len, self.seq_len)
        self.tokenizer = ByteTokenizer()
        self.pad_id = self.tokenizer.pad_id
        self.vocab_size_needed = self.tokenizer.vocab_size
        key = "0" * self.digits
        need = 2 + len(_key_line(key)) + len(_question(key))  # + bos + eos
        if need > self.seq_len:
            raise ValueError(
                f"data.seq_len={self.seq_len} is too short for the passkey task: the key line and "
                f"question need {need} tokens with key_digits={self.digits}; raise data.seq_len "
                f"or lower data.passkey.key_digits"
            )
        if self.curriculum and need > self.start_len:
            raise ValueError(
                f"data.passkey.curriculum_start_len={self.start_len} is too short for the passkey task: "
                f"a document needs {need} tokens with key_digits={self.digits}; set it to at least {need}"
            )

    def __len__(self) -> int:
        return self.num_samples

    def doc_lengths(self, i: int) -> list[int]:
        """Lengths of the documents packed into sample ``i`` (one of ``seq_len`` after the curriculum)."""
        if i >= self.curriculum:
            return [self.seq_len]
        length = self.start_len + (self.seq_len // 2 - self.start_len) * i // self.curriculum
        lengths = [length] * (self.seq_len // length)
        lengths[-1] += self.seq_len - sum(lengths)  # the last document takes the remainder
        return lengths

    def _words(self, i: int, doc: int | None = None) -> list[int]:
        if self.split == "eval":
            return [self.seed, i, _EVAL_TAG]
        # doc 1 + j, never 0: SeedSequence([seed, i, 0]) is SeedSequence([seed, i])
        return [self.seed, i] if doc is None else [self.seed, i, 1 + doc]

    def _rng_and_key(self, words: list[int]) -> tuple[np.random.Generator, str]:
        rng = np.random.Generator(np.random.PCG64(words))
        # The key is the first draw, so answer() need not build the text.
        return rng, "".join(str(d) for d in rng.integers(0, 10, size=self.digits))

    def _single(self, i: int) -> int:
        i = self._index(i)
        if len(self.doc_lengths(i)) > 1:
            raise ValueError(f"training sample {i} packs curriculum documents: answer() and needle() "
                             "describe one-document samples (the eval split, or past the curriculum)")
        return i

    def _generate(self, words: list[int], length: int) -> tuple[np.ndarray, str, int]:
        """``(tokens, key, needle)`` of one document of ``length`` tokens: needle is the token
        position where the key line starts."""
        rng, key = self._rng_and_key(words)
        line, question = _key_line(key), _question(key)
        n_filler = length - 2 - len(line) - len(question)

        # Enough random sentences to cover n_filler bytes, cut to exactly that length.
        shortest = min(len(s) for s in FILLER) + 1
        picks = rng.integers(0, len(FILLER), size=n_filler // shortest + 1)
        sentences = [FILLER[k] + " " for k in picks]
        filler = "".join(sentences)[:n_filler]
        ends = np.cumsum([len(s) for s in sentences])
        # Sentence boundaries only (the cut-off last sentence has none), from very start to end.
        boundaries = np.concatenate([[0], ends[ends <= n_filler]])
        at = int(boundaries[rng.integers(len(boundaries))])

        text = filler[:at] + line + filler[at:] + question
        tokens = np.empty(length, dtype=np.int64)
        tokens[0] = self.tokenizer.bos_id
        tokens[1:-1] = np.frombuffer(text.encode("ascii"), dtype=np.uint8)
        tokens[-1] = self.tokenizer.eos_id
        return tokens, key, 1 + at

    def answer(self, i: int) -> tuple[str, int]:
        """``(key, start)``: ``labels[start:start + digits]`` are the key digits after the question,
        i.e. feed ``input_ids[:start + 1]`` and the model should continue with the key."""
        _, key = self._rng_and_key(self._words(self._single(i)))
        return key, self.seq_len - 2 - self.digits

    def needle(self, i: int) -> int:
        """Token position where the key line starts (for accuracy-by-depth reports)."""
        return self._generate(self._words(self._single(i)), self.seq_len)[2]

    def _labels(self, tokens: np.ndarray) -> np.ndarray:
        labels = np.full(len(tokens), IGNORE_INDEX, dtype=np.int64)
        if self.loss_on == "all":
            labels[:-1] = tokens[1:]
        else:  # the key digits and the eos that follows them
            start = len(tokens) - 2 - self.digits
            labels[start:-1] = tokens[start + 1 :]
        return labels

    def _sample(self, i: int) -> Sample:
        lengths = self.doc_lengths(i)
        docs = ([self._generate(self._words(i), self.seq_len)[0]] if len(lengths) == 1 else
                [self._generate(self._words(i, j), n)[0] for j, n in enumerate(lengths)])
        return {
            "input_ids": np.concatenate(docs),
            "labels": np.concatenate([self._labels(d) for d in docs]),  # last token of each: ignored
            "position_ids": np.concatenate([np.arange(len(d), dtype=np.int64) for d in docs]),
        }

    def describe(self) -> str:
        curriculum = (f", curriculum: the first {self.curriculum:,} pack documents of "
                      f"{self.start_len} growing to {self.seq_len // 2} tokens" if self.curriculum else "")
        return (
            f"PasskeyDataset[{self.split}]: {len(self):,} samples of {self.seq_len} bytes, "
            f"{self.digits}-digit keys, loss on {self.loss_on}{curriculum}"
        )
