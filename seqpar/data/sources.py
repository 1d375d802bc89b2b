"""File-backed datasets: jsonl text, pre-tokenized token files, and supervised fine-tuning jsonl.

Text and SFT files are tokenized once and cached as ``.npy`` under ``cache_dir`` (keyed by the
sha256 of the files, the tokenizer file and the settings), then memory-mapped: a second run, and
every data-parallel rank after the first, loads instantly. Token files are memory-mapped directly.

Stream datasets (text, tokens) cut the concatenated token stream into back-to-back windows: sample
``i`` reads ``stream[i*S : i*S + S + 1]`` (inputs = first S, targets = the next token of each).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from functools import cached_property
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from seqpar.config import DataConfig
from seqpar.data.packing import PackedDataset, Sample, greedy_pack, pack_documents, window_sample
from seqpar.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)

CACHE_VERSION = "v1"  # bump when the cached layout or the document format changes
_ENCODE_BATCH = 1024  # records per tokenizer call (HF tokenizers parallelise within a batch)


# ----------------------------------------------------------------------------------------------
# helpers: jsonl reading, caching
# ----------------------------------------------------------------------------------------------
def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line_number, record)`` for each non-blank line; errors name ``file:line``."""
    with open(path, "rb") as f:  # bytes, so a UTF-8 error can name its line too
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid UTF-8 ({e})") from None
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            yield lineno, rec


def _get_str(rec: dict[str, Any], field: str, where: str) -> str:
    if field not in rec:
        raise ValueError(f"{where}: missing field '{field}' (record has keys: {', '.join(rec) or 'none'})")
    value = rec[field]
    if not isinstance(value, str):
        raise ValueError(f"{where}: field '{field}' must be a string, got {type(value).__name__}")
    return value


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _cache_key(kind: str, paths: list[Path], tokenizer: Tokenizer, settings: dict[str, Any]) -> str:
    """Content hash: renaming or moving a file keeps the cache, editing one invalidates it."""
    blob = json.dumps(
        {
            "version": CACHE_VERSION,
            "kind": kind,
            "files": [_file_sha256(p) for p in paths],
            "tokenizer": tokenizer.cache_key,
            "settings": settings,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def _cached(
    cache_dir: Path, name: str, build: Callable[[], tuple[dict[str, np.ndarray], dict[str, Any]]]
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Load ``cache_dir/name`` (arrays memory-mapped), building it first if absent.

    The entry is written to a temporary folder and renamed into place, so a reader never sees a
    half-written cache and concurrent builders (several ranks) are safe: the first rename wins.
    """
    final = Path(cache_dir) / name
    if not (final / "meta.json").is_file():
        final.parent.mkdir(parents=True, exist_ok=True)
        arrays, meta = build()
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=final.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        for key, arr in arrays.items():
            np.save(tmp / f"{key}.npy", arr)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first; its entry is identical
            shutil.rmtree(tmp, ignore_errors=True)
    meta = json.loads((final / "meta.json").read_text())
    arrays = {k: np.load(final / f"{k}.npy", mmap_mode="r") for k in meta["arrays"]}
    return arrays, meta


def _stream_dtype(vocab_size: int) -> type[np.unsignedinteger]:
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def _too_small(paths: list[Path], total: int, seq_len: int) -> ValueError:
    names = ", ".join(str(p) for p in paths)
    return ValueError(
        f"data.paths ({names}) hold {total} tokens in total, but one sequence needs "
        f"data.seq_len + 1 = {seq_len + 1}: add data or lower data.seq_len"
    )


# ----------------------------------------------------------------------------------------------
# text: jsonl -> token stream
# ----------------------------------------------------------------------------------------------
def _join_docs(
    docs: list[list[int]], bos: int | None, eos: int, dtype: type
) -> tuple[np.ndarray, np.ndarray]:
    """``[bos] + ids + [eos]`` for each document, concatenated; also each document's length."""
    lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    extra = 1 + (bos is not None)
    doc_len = lengths + extra
    ends = np.cumsum(doc_len) - 1
    out = np.empty(int(doc_len.sum()), dtype=dtype)
    content = np.ones(len(out), dtype=bool)
    content[ends] = False
    out[ends] = eos
    if bos is not None:
        starts = ends - doc_len + 1
        content[starts] = False
        out[starts] = bos
    out[content] = np.fromiter(chain.from_iterable(docs), dtype=dtype, count=int(lengths.sum()))
    return out, doc_len


class _StreamDataset(PackedDataset):
    """Back-to-back windows over one token stream; subclasses say where documents end."""

    seq_len: int
    num_tokens: int

    def __len__(self) -> int:
        return (self.num_tokens - 1) // self.seq_len

    def _window(self, lo: int, hi: int) -> np.ndarray:
        raise NotImplementedError

    def _doc_ends(self, lo: int, window: np.ndarray) -> np.ndarray:
        """Input positions (relative to ``lo``) holding the last token of a document."""
        raise NotImplementedError

    def _sample(self, i: int) -> Sample:
        lo = i * self.seq_len
        window = self._window(lo, lo + self.seq_len + 1)
        return window_sample(window, self._doc_ends(lo, window))

    def describe(self) -> str:
        return (
            f"{type(self).__name__}: {len(self.paths)} file(s), {self.num_tokens:,} tokens, "
            f"{len(self):,} sequences of {self.seq_len}"
        )


class TextDataset(_StreamDataset):
    """jsonl documents (``cfg.text_field``), each ``[bos] + encode(text) + [eos]``, as a stream.

    Documents are delimited by recorded offsets, not by searching for eos, so a literal eos
    string inside a text cannot fake a boundary.
    """

    def __init__(self, cfg: DataConfig, tokenizer: Tokenizer, cache_dir: Path):
        self.seq_len = cfg.seq_len
        self.paths = list(cfg.paths)
        self.pad_id = tokenizer.pad_id
        self.text_field = cfg.text_field
        key = _cache_key("text", self.paths, tokenizer, {"text_field": cfg.text_field})
        arrays, meta = _cached(cache_dir, f"text-{key[:24]}", lambda: self._tokenize(tokenizer))
        self.tokens: np.ndarray = arrays["tokens"]
        self.doc_ends: np.ndarray = arrays["doc_ends"]  # stream index of each document's eos
        self.num_tokens = len(self.tokens)
        self.vocab_size_needed = int(meta["max_id"]) + 1
        if len(self) == 0:
            raise _too_small(self.paths, self.num_tokens, self.seq_len)

    def _tokenize(self, tok: Tokenizer) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        dtype = _stream_dtype(tok.vocab_size)
        chunks: list[np.ndarray] = []
        lengths: list[np.ndarray] = []
        for path in self.paths:
            log.info("tokenizing %s", path)
            batch: list[str] = []
            for lineno, rec in _iter_jsonl(path):
                batch.append(_get_str(rec, self.text_field, f"{path}:{lineno}"))
                if len(batch) == _ENCODE_BATCH:
                    self._add(tok, batch, dtype, chunks, lengths)
                    batch = []
            if batch:
                self._add(tok, batch, dtype, chunks, lengths)
        if not chunks:
            raise ValueError(f"no documents in data.paths ({', '.join(map(str, self.paths))})")
        tokens = np.concatenate(chunks)
        doc_ends = np.cumsum(np.concatenate(lengths)) - 1
        meta = {"arrays": ["tokens", "doc_ends"], "max_id": int(tokens.max()), "docs": len(doc_ends)}
        return {"tokens": tokens, "doc_ends": doc_ends}, meta

    @staticmethod
    def _add(tok: Tokenizer, texts: list[str], dtype: type, chunks: list, lengths: list) -> None:
        tokens, doc_len = _join_docs(tok.encode_batch(texts), tok.bos_id, tok.eos_id, dtype)
        chunks.append(tokens)
        lengths.append(doc_len)

    def _window(self, lo: int, hi: int) -> np.ndarray:
        return self.tokens[lo:hi]

    def _doc_ends(self, lo: int, window: np.ndarray) -> np.ndarray:
        a, b = np.searchsorted(self.doc_ends, [lo, lo + self.seq_len])
        return np.asarray(self.doc_ends[a:b]) - lo


# ----------------------------------------------------------------------------------------------
# tokens: .npy / .bin files, memory-mapped
# ----------------------------------------------------------------------------------------------
def _open_token_file(path: Path, dtype: str) -> np.ndarray:
    if path.suffix == ".npy":
        try:
            arr = np.load(path, mmap_mode="r")
        except ValueError as e:
            raise ValueError(f"token file '{path}': cannot read as .npy ({e})") from None
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(
                f"token file '{path}' holds a {arr.ndim}-D {arr.dtype} array; want 1-D integers"
            )
        return arr
    if path.suffix == ".bin":
        size = path.stat().st_size
        itemsize = np.dtype(dtype).itemsize
        if size % itemsize:
            raise ValueError(
                f"token file '{path}' is {size} bytes, not a multiple of {itemsize} "
                f"(data.token_dtype={dtype}): is the dtype right?"
            )
        if size == 0:  # numpy cannot memory-map an empty file
            return np.empty(0, dtype=dtype)
        return np.memmap(path, dtype=dtype, mode="r")
    raise ValueError(f"token file '{path}': unknown type '{path.suffix}', want .npy or .bin")


class TokenDataset(_StreamDataset):
    """Pre-tokenized files concatenated into one stream.

    ``cfg.eos_id`` separates documents (None: no boundaries inside a file). The end of each file
    is also a document end, so no label ever links the last token of one file to the next.
    """

    def __init__(self, cfg: DataConfig):
        self.seq_len = cfg.seq_len
        self.paths = list(cfg.paths)
        self.eos_id = cfg.eos_id
        self.pad_id = cfg.eos_id if cfg.eos_id is not None else 0  # never emitted: no padding
        self.files = [_open_token_file(Path(p), cfg.token_dtype) for p in self.paths]
        self.offsets = np.cumsum([0] + [len(f) for f in self.files])
        self.num_tokens = int(self.offsets[-1])
        if len(self) == 0:
            raise _too_small(self.paths, self.num_tokens, self.seq_len)

    @cached_property
    def vocab_size_needed(self) -> int:  # type: ignore[override]
        # Scans the files once (at memory-map speed), only when someone asks.
        return max(int(f.max()) for f in self.files if len(f)) + 1

    def _window(self, lo: int, hi: int) -> np.ndarray:
        parts = []
        first = int(np.searchsorted(self.offsets, lo, side="right")) - 1
        for k in range(first, len(self.files)):
            start = self.offsets[k]
            if start >= hi:
                break
            parts.append(self.files[k][max(lo - start, 0) : hi - start])
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _doc_ends(self, lo: int, window: np.ndarray) -> np.ndarray:
        inputs = window[: self.seq_len]
        ends = np.flatnonzero(inputs == self.eos_id) if self.eos_id is not None else np.empty(0, np.int64)
        file_ends = self.offsets[1:-1] - 1 - lo
        file_ends = file_ends[(file_ends >= 0) & (file_ends < self.seq_len)]
        return np.union1d(ends, file_ends).astype(np.int64)


# ----------------------------------------------------------------------------------------------
# sft: prompt/response or chat messages, packed whole
# ----------------------------------------------------------------------------------------------
class SFTDataset(PackedDataset):
    """Supervised examples packed whole, in file order, into ``seq_len`` sequences.

    A record is ``{prompt_field, response_field}`` (strings, concatenated as is) or
    ``{messages_field: [{role, content}, ...]}`` rendered with ``cfg.chat_template``. Loss is on
    the response (or every rendered ``assistant`` message) and on the final eos. Examples longer
    than ``seq_len`` are cut to ``seq_len`` and counted in ``truncated``.
    """

    def __init__(self, cfg: DataConfig, tokenizer: Tokenizer, cache_dir: Path):
        self.seq_len = cfg.seq_len
        self.paths = list(cfg.paths)
        self.pad_id = tokenizer.pad_id
        self.cfg = cfg
        settings = {
            "prompt_field": cfg.prompt_field,
            "response_field": cfg.response_field,
            "messages_field": cfg.messages_field,
            "chat_template": cfg.chat_template,
        }
        key = _cache_key("sft", self.paths, tokenizer, settings)
        arrays, meta = _cached(cache_dir, f"sft-{key[:24]}", lambda: self._tokenize(tokenizer))
        self.tokens: np.ndarray = arrays["tokens"]
        self.loss_mask: np.ndarray = arrays["loss_mask"]  # 1 where the token is a target
        self.offsets: np.ndarray = arrays["offsets"]  # example k = tokens[offsets[k]:offsets[k+1]]
        self.num_examples = len(self.offsets) - 1
        self.bounds, self.truncated = greedy_pack(np.diff(self.offsets), self.seq_len)
        self.vocab_size_needed = max(int(meta["max_id"]), self.pad_id) + 1
        if self.truncated:
            log.warning(
                "%d of %d SFT examples are longer than data.seq_len=%d and were truncated",
                self.truncated, self.num_examples, self.seq_len,
            )

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def describe(self) -> str:
        return (
            f"SFTDataset: {self.num_examples:,} examples in {len(self):,} sequences of "
            f"{self.seq_len} ({self.truncated} truncated)"
        )

    # -- tokenization ---------------------------------------------------------------------------
    def _segments(self, rec: dict[str, Any], where: str) -> list[tuple[str, bool]]:
        """``(text, trained_on)`` pieces of one record, in order."""
        c = self.cfg
        if c.messages_field in rec:
            messages = rec[c.messages_field]
            if not isinstance(messages, list) or not messages:
                raise ValueError(f"{where}: field '{c.messages_field}' must be a non-empty list")
            out = []
            for j, m in enumerate(messages):
                if not isinstance(m, dict):
                    raise ValueError(f"{where}: {c.messages_field}[{j}] must be an object")
                role = _get_str(m, "role", f"{where}: {c.messages_field}[{j}]")
                content = _get_str(m, "content", f"{where}: {c.messages_field}[{j}]")
                try:
                    text = c.chat_template.format(role=role, content=content)
                except (KeyError, IndexError, ValueError) as e:
                    raise ValueError(f"data.chat_template cannot be formatted: {e!r}") from None
                out.append((text, role == "assistant"))
            if not any(trained for _, trained in out):
                raise ValueError(f"{where}: '{c.messages_field}' has no 'assistant' message to train on")
            return out
        if c.prompt_field not in rec and c.response_field not in rec:
            raise ValueError(
                f"{where}: missing field '{c.messages_field}' or '{c.prompt_field}'/"
                f"'{c.response_field}' (record has keys: {', '.join(rec) or 'none'})"
            )
        prompt = _get_str(rec, c.prompt_field, where)
        response = _get_str(rec, c.response_field, where)
        return [(prompt, False), (response, True)]

    def _tokenize(self, tok: Tokenizer) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        dtype = _stream_dtype(tok.vocab_size)
        ids: list[int] = []
        mask: list[int] = []
        lengths: list[int] = []

        def flush(records: list[list[tuple[str, bool]]]) -> None:
            encoded = iter(tok.encode_batch([text for segs in records for text, _ in segs]))
            for segs in records:
                start = len(ids)
                if tok.bos_id is not None:
                    ids.append(tok.bos_id)
                    mask.append(0)
                for _, trained in segs:
                    seg = next(encoded)
                    ids.extend(seg)
                    mask.extend([int(trained)] * len(seg))
                ids.append(tok.eos_id)
                mask.append(1)  # the model learns to stop
                lengths.append(len(ids) - start)

        for path in self.paths:
            log.info("tokenizing %s", path)
            records: list[list[tuple[str, bool]]] = []
            for lineno, rec in _iter_jsonl(path):
                records.append(self._segments(rec, f"{path}:{lineno}"))
                if len(records) == _ENCODE_BATCH:
                    flush(records)
                    records = []
            if records:
                flush(records)
        if not lengths:
            raise ValueError(f"no examples in data.paths ({', '.join(map(str, self.paths))})")
        tokens = np.asarray(ids, dtype=dtype)
        arrays = {
            "tokens": tokens,
            "loss_mask": np.asarray(mask, dtype=np.uint8),
            "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        }
        meta = {"arrays": list(arrays), "max_id": int(tokens.max()), "examples": len(lengths)}
        return arrays, meta

    # -- packing --------------------------------------------------------------------------------
    def _sample(self, i: int) -> Sample:
        a, b = int(self.bounds[i]), int(self.bounds[i + 1])
        lo = int(self.offsets[a])
        hi = min(int(self.offsets[b]), lo + self.seq_len)  # only a lone example can be cut
        starts = np.asarray(self.offsets[a:b]) - lo
        return pack_documents(self.tokens[lo:hi], self.loss_mask[lo:hi], starts, self.seq_len, self.pad_id)
