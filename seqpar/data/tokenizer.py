"""Tokenizers: a dependency-free byte tokenizer and a thin wrapper around a HF ``tokenizer.json``.

Both expose the same small surface: ``encode`` / ``encode_batch`` (never add special tokens: the
datasets place bos/eos themselves), ``decode``, ``bos_id`` (may be None), ``eos_id``, ``pad_id``,
``vocab_size`` and ``cache_key`` (identifies the exact vocabulary, for tokenized-data caches).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Protocol

# Looked up in this order; the first one present in the vocabulary wins.
EOS_TOKENS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>")
BOS_TOKENS = ("<|begin_of_text|>", "<s>", "<bos>", "<|bos|>", "<|startoftext|>")
PAD_TOKENS = ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>")


class Tokenizer(Protocol):
    bos_id: int | None
    eos_id: int
    pad_id: int
    vocab_size: int
    cache_key: str

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then pad=256, bos=257, eos=258."""

    pad_id = 256
    bos_id = 257
    eos_id = 258
    vocab_size = 259
    cache_key = "bytes-v1"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: list[int]) -> str:
        # Special ids are not bytes: drop them rather than fail, so any model output decodes.
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face ``tokenizers`` file; special ids are found from well-known token strings."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as _HFTok

        self.path = Path(path)
        try:
            self._tok = _HFTok.from_file(str(self.path))
        except Exception as e:  # the library's own message does not say which file
            raise ValueError(f"cannot load tokenizer '{self.path}': {e}") from None
        # Some tokenizer.json files ship with truncation/padding enabled: that would silently cut
        # documents, so both are switched off; packing owns lengths.
        self._tok.no_truncation()
        self._tok.no_padding()

        eos = self._find(EOS_TOKENS)
        if eos is None:
            raise ValueError(
                f"tokenizer '{self.path}' has no end-of-sequence token: none of "
                f"{', '.join(EOS_TOKENS)} is in its vocabulary; add one of them as a special token"
            )
        self.eos_id: int = eos
        bos = self._find(BOS_TOKENS)
        self.bos_id: int | None = bos if bos != eos else None
        pad = self._find(PAD_TOKENS)
        self.pad_id: int = eos if pad is None else pad  # padding is never a target, eos is safe
        self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)
        digest = hashlib.sha256(self.path.read_bytes()).hexdigest()
        self.cache_key = f"hf-{digest}"

    def _find(self, candidates: tuple[str, ...]) -> int | None:
        for tok in candidates:
            i = self._tok.token_to_id(tok)
            if i is not None:
                return i
        return None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)
