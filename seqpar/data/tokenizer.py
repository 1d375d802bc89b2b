"""Tokenizers: a dependency-free byte tokenizer and a thin wrapper around a HF ``tokenizer.json``.

Both expose the same small surface: ``encode`` / ``encode_batch`` (never add special tokens: the
datasets place bos/eos themselves), ``decode``, ``bos_id`` (may be None), ``eos_id``, ``pad_id``,
``vocab_size`` and ``cache_key`` (identifies the exact vocabulary, for tokenized-data caches).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Protocol

from seqpar.errors import DataError

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
    """A Hugging Face ``tokenizers`` file; special ids are found from well-known token strings.

    The end-of-sequence token is, in this order: ``eos_token`` (``data.eos_token``), the first of
    ``EOS_TOKENS`` in the vocabulary, or the ``eos_token`` of a ``tokenizer_config.json`` next to
    the file (that one first with ``config_first``: a chat model's end-of-turn token). The bos token likewise (``BOS_TOKENS``, then ``tokenizer_config.json``; none is fine),
    and padding falls back to eos (padding is never a target). Problems raise ``DataError``.
    """

    def __init__(self, path: str | Path, eos_token: str | None = None, config_first: bool = False):
        from tokenizers import Tokenizer as _HFTok

        self.path = Path(path)
        try:
            self._tok = _HFTok.from_file(str(self.path))
        except Exception as e:  # the library's own message does not say which file
            raise DataError(
                f"data.tokenizer: cannot load '{self.path}' ({_one_line(e)}): it must be a Hugging "
                f"Face tokenizer.json (tokenizer_config.json, vocab files and sentencepiece .model "
                f"files are not it; AutoTokenizer's save_pretrained writes one)"
            ) from None
        # Some tokenizer.json files ship with truncation/padding enabled: that would silently cut
        # documents, so both are switched off; packing owns lengths.
        self._tok.no_truncation()
        self._tok.no_padding()
        side = _side_config(self.path)

        if eos_token is not None:
            eos = self._tok.token_to_id(eos_token)
            if eos is None:
                raise DataError(
                    f"data.eos_token '{eos_token}' is not in the vocabulary of tokenizer "
                    f"'{self.path}': set data.eos_token to one of its tokens (or remove it)"
                )
            self.eos_token, found_by = eos_token, "setting"
        else:
            self.eos_token, eos = self._find(EOS_TOKENS)
            found_by = "builtin"
            if eos is None or (config_first and side.get("eos_token") and self._find(side["eos_token"])[1] is not None):
                self.eos_token, eos = self._find(side.get("eos_token", ()))
                found_by = "side"
        if eos is None:
            looked = ", ".join(EOS_TOKENS)
            cfg_note = (f"; tokenizer_config.json next to it names eos_token {side['eos_token'][0]!r}, "
                        f"which is not in the vocabulary" if side.get("eos_token") else
                        "; no eos_token in a tokenizer_config.json next to it")
            raise DataError(
                f"tokenizer '{self.path}' has no end-of-sequence token (looked for {looked}{cfg_note}): "
                f"set data.eos_token to the token that ends a document (e.g. data.eos_token: '</s>'), "
                f"or add one of those tokens to the tokenizer as a special token"
            )
        self.eos_id: int = eos
        self.bos_token, bos = self._find(BOS_TOKENS)
        if bos is None:
            self.bos_token, bos = self._find(side.get("bos_token", ()))
            found_by = found_by if bos is None else "side"
        if bos == eos:
            self.bos_token, bos = None, None
        self.bos_id: int | None = bos
        self.pad_token, pad = self._find(PAD_TOKENS)
        if pad is None:
            self.pad_token, pad = self._find(side.get("pad_token", ()))
        if pad is None:
            self.pad_token, pad = self.eos_token, eos  # padding is never a target, eos is safe
        self.pad_id: int = pad
        # ids can be sparse (added tokens above the base vocabulary): size by the largest id
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.vocab_size: int = max(self._tok.get_vocab_size(with_added_tokens=True),
                                   max(vocab.values(), default=-1) + 1)
        digest = hashlib.sha256(self.path.read_bytes()).hexdigest()
        # The built-in look-up is a function of the file alone; anything else must key the cache too.
        self.cache_key = f"hf-{digest}" if found_by == "builtin" else f"hf-{digest}-eos{eos}-bos{bos}"

    def _find(self, candidates: tuple[str, ...]) -> tuple[str | None, int | None]:
        """The first candidate in the vocabulary, and its id."""
        for tok in candidates:
            i = self._tok.token_to_id(tok)
            if i is not None:
                return tok, i
        return None, None

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        try:
            return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]
        except Exception as e:  # e.g. a WordLevel/WordPiece model without an unk token
            raise DataError(
                f"tokenizer '{self.path}' cannot encode this text ({_one_line(e)}): use a tokenizer "
                f"that covers it (byte-level BPE covers any text)"
            ) from None

    def encode_with_offsets(self, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """``(ids, offsets)`` per text: ``offsets[k]`` is token k's ``[start, end)`` in characters.
        Special tokens written in the text (a chat template's ``<|im_start|>``) become their ids."""
        try:
            return [(e.ids, e.offsets) for e in self._tok.encode_batch(texts, add_special_tokens=False)]
        except Exception as e:
            raise DataError(
                f"tokenizer '{self.path}' cannot encode this text ({_one_line(e)}): use a tokenizer "
                f"that covers it (byte-level BPE covers any text)"
            ) from None

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def tokenizer_name(tok: Tokenizer) -> str:
    """How errors name a tokenizer: its file (or the byte tokenizer) and its vocabulary size."""
    path = getattr(tok, "path", None)
    name = f"tokenizer '{path}'" if path is not None else "the byte tokenizer"
    return f"{name} (vocabulary of {tok.vocab_size})"


def _one_line(e: BaseException | str) -> str:
    return " ".join(str(e).split())


def tokenizer_config(path: Path) -> dict[str, Any]:
    """The ``tokenizer_config.json`` beside tokenizer file ``path``; ``{}`` when there is none or it
    is unreadable (for the uses that only fall back on it: the eos look-up, what a checkpoint
    carries; a chat template it must hold is read strictly, by seqpar.data.chat)."""
    side = path.with_name("tokenizer_config.json")
    if side == path or not side.is_file():
        return {}
    try:
        data: Any = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _side_config(path: Path) -> dict[str, tuple[str, ...]]:
    """``eos_token`` / ``bos_token`` / ``pad_token`` of a ``tokenizer_config.json`` beside ``path``
    (each a 1-tuple of the token string, absent when unset); ``{}`` when there is none or it is
    unreadable (it is only a fallback: the error for a missing eos says what was looked at)."""
    data = tokenizer_config(path)
    out = {}
    for key in ("eos_token", "bos_token", "pad_token"):
        v = data.get(key)
        if isinstance(v, dict):  # {"content": "</s>", "lstrip": false, ...}
            v = v.get("content")
        if isinstance(v, str) and v:
            out[key] = (v,)
    return out
