"""File-backed datasets: jsonl text, pre-tokenized token files, and supervised fine-tuning jsonl.

Text and SFT files are tokenized once into ``cache_dir`` (``data/cache.py``: keyed by the sha256 of
the files, the tokenizer and the settings; written a batch of records at a time, so a corpus larger
than memory tokenizes), then memory-mapped: a second run, and every data-parallel rank after the
first, loads instantly. Token files are memory-mapped directly.

Every problem with a user's file raises ``DataError`` (one line: the file, the line or token
position, and the fix) while the dataset is constructed: all of a text/SFT file is read then
anyway; token files are checked cheaply (header, size, the first tokens), and their one full
pass (``vocab_size_needed``, negative ids) runs when the trainer asks, still before the engine.

Stream datasets (text, tokens) cut the concatenated token stream into back-to-back windows: sample
``i`` reads ``stream[i*S : i*S + S + 1]`` (inputs = first S, targets = the next token of each).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from seqpar.config import DataConfig
from seqpar.data.chat import ChatTemplate, load_chat_template, token_mask, tokenizer_has_template
from seqpar.data.cache import ArrayWriter, Progress, Say, cache_key, cached, file_sha256, remembered
from seqpar.data.packing import PackedDataset, Sample, best_fit_pack, greedy_pack, pack_documents, window_sample
from seqpar.data.tokenizer import Tokenizer, _one_line, tokenizer_name
from seqpar.errors import DataError

log = logging.getLogger(__name__)

_ENCODE_BATCH = 1024  # records per tokenizer call (HF tokenizers parallelise within a batch)
# Chat roles a record may use (loss goes on "assistant"); anything else is most likely a dataset in
# another convention (ShareGPT's human/gpt) that would otherwise train on nothing or the wrong turns.
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "function", "ipython")
_JSONL_HINT = "data.paths wants JSON Lines: one JSON object per line"


# ----------------------------------------------------------------------------------------------
# helpers: jsonl reading, caching
# ----------------------------------------------------------------------------------------------
def _iter_jsonl(path: Path, progress: Progress | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line_number, record)`` for each non-blank line; errors name ``file:line``. ``progress``
    counts the bytes read.

    A file without a single record (empty, or only blank lines) is an error too, raised when the
    iteration reaches its end.
    """
    count = 0
    try:
        f = open(path, "rb")  # noqa: SIM115  (bytes, so a UTF-8 error can name its line too)
    except OSError as e:
        raise DataError(f"data.paths: cannot read '{path}' ({e.strerror or e})") from None
    with f:
        for lineno, raw in enumerate(f, start=1):
            if progress is not None:
                progress.advance(len(raw))
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw.decode("utf-8").rstrip())  # columns count on this line alone
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{path}:{lineno}: not valid UTF-8 (byte {e.start + 1} of the line): is it a text file? "
                    f"{_JSONL_HINT}, UTF-8 encoded"
                ) from None
            except json.JSONDecodeError as e:
                if count == 0 and (raw.lstrip()[:1] == b"[" or raw.strip() == b"{"):
                    raise DataError(
                        f"{path}:{lineno}: this looks like one JSON document (an array or a pretty-printed "
                        f"object), not JSON Lines: {_JSONL_HINT} (convert it, e.g. jq -c '.[]' file.json "
                        f"> file.jsonl)"
                    ) from None
                raise DataError(
                    f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.pos + 1}): fix or remove "
                    f"this line ({_JSONL_HINT})"
                ) from None
            if not isinstance(rec, dict):
                raise DataError(
                    f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__} ({_JSONL_HINT})"
                )
            count += 1
            yield lineno, rec
    if count == 0:
        raise DataError(
            f"data.paths: '{path}' holds no records (it is empty or only blank lines): fill it or "
            f"remove it from data.paths"
        )


def _keys(rec: dict[str, Any]) -> str:
    keys = [" ".join(str(k).split()) for k in rec]  # one line, whatever the keys hold
    shown = ", ".join(keys[:12]) + (f", ... ({len(keys)} keys)" if len(keys) > 12 else "")
    return shown or "none"


def _get_str(rec: dict[str, Any], field: str, where: str, key: str | None = None) -> str:
    """``rec[field]`` as a string; ``key`` is the config key naming ``field`` (for the hint)."""
    if field not in rec:
        texts = [k for k, v in rec.items() if isinstance(v, str) and re.fullmatch(r"[\w.-]+", str(k))]
        hint = (f": set {key}: {texts[0]} if that field holds it" if key and len(texts) == 1 else
                f": set {key} to the field that holds it" if key else "")
        raise DataError(f"{where}: missing field '{field}' (record has keys: {_keys(rec)}){hint}")
    value = rec[field]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{field}' must be a string, got {type(value).__name__}")
    return value


def _encode(tok: Tokenizer, texts: list[str], path: Path, lines: tuple[int, int]) -> list[list[int]]:
    """``tok.encode_batch(texts)``; a tokenizer failure names the records (``file:first-last``)."""
    try:
        return tok.encode_batch(texts)
    except DataError as e:
        where = f"{path}:{lines[0]}" + (f"-{lines[1]}" if lines[1] != lines[0] else "")
        raise DataError(f"{where}: {e}") from None


def _eos_name(tok: Tokenizer) -> str:
    """How the summary names the end-of-sequence token: its text and id."""
    return f"{getattr(tok, 'eos_token', None) or 'eos'} (id {tok.eos_id})"


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def _stream_dtype(vocab_size: int) -> type[np.unsignedinteger]:
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def _too_small(paths: list[Path], total: int, seq_len: int) -> DataError:
    names = ", ".join(str(p) for p in paths)
    return DataError(
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
        eos = f", documents end with {self.eos_name}" if getattr(self, "eos_name", None) else ""
        return (
            f"{type(self).__name__}: {len(self.paths)} file(s), {self.num_tokens:,} tokens, "
            f"{len(self):,} sequences of {self.seq_len}{eos}"
        )


class TextDataset(_StreamDataset):
    """jsonl documents (``cfg.text_field``), each ``[bos] + encode(text) + [eos]``, as a stream.

    Documents are delimited by recorded offsets, not by searching for eos, so a literal eos
    string inside a text cannot fake a boundary.
    """

    def __init__(self, cfg: DataConfig, tokenizer: Tokenizer, cache_dir: Path, say: Say | None = None,
                 key: str = "data.paths", stop: Callable[[], bool] | None = None):
        self.seq_len = cfg.seq_len
        self.paths = list(cfg.paths)
        self.pad_id = tokenizer.pad_id
        self.text_field = cfg.text_field
        self.file_hashes = [file_sha256(p, cache_dir) for p in self.paths]  # large files' remembered
        self.tokenizer_key = tokenizer.cache_key
        name = "text-" + cache_key("text", self.file_hashes, tokenizer.cache_key, {"text_field": cfg.text_field})[:24]
        arrays, meta = cached(cache_dir, name, lambda w: self._tokenize(
            tokenizer, w, Progress(say, key, self.paths, Path(cache_dir) / name, heartbeat=w.heartbeat, stop=stop)),
            say, stop)
        self.tokens: np.ndarray = arrays["tokens"]
        self.doc_ends: np.ndarray = arrays["doc_ends"]  # stream index of each document's eos
        self.num_tokens = len(self.tokens)
        # the stream holds every id it can emit (eos/bos included; no padding in stream windows)
        self.vocab_size_needed = int(meta["max_id"]) + 1
        self.vocab_source = tokenizer_name(tokenizer)
        self.eos_name = _eos_name(tokenizer)
        if len(self) == 0:
            raise _too_small(self.paths, self.num_tokens, self.seq_len)

    def _tokenize(self, tok: Tokenizer, out: ArrayWriter, progress: Progress) -> dict[str, Any]:
        """Appends ``tokens`` and ``doc_ends`` a batch of documents at a time; returns the meta."""
        dtype = _stream_dtype(tok.vocab_size)
        out.declare("tokens", dtype)
        out.declare("doc_ends", np.int64)
        total = all_docs = max_id = 0
        for path in self.paths:
            batch: list[str] = []
            lines: list[int] = []
            content = docs = 0
            for lineno, rec in _iter_jsonl(path, progress):
                if self.text_field not in rec and any(k in rec for k in ("messages", "conversations", "prompt")):
                    raise DataError(f"{path}:{lineno}: this record is a conversation or a prompt/response pair "
                                    f"(keys: {_keys(rec)}), not a document: set data.type: sft to fine-tune on "
                                    f"it (data.type text trains on every token of data.text_field)")
                batch.append(_get_str(rec, self.text_field, f"{path}:{lineno}", "data.text_field"))
                lines.append(lineno)
                if len(batch) == _ENCODE_BATCH:
                    n, total, max_id = self._add(tok, batch, (path, lines), dtype, out, total, max_id, progress)
                    content, docs, batch, lines = content + n, docs + len(batch), [], []
            if batch:
                n, total, max_id = self._add(tok, batch, (path, lines), dtype, out, total, max_id, progress)
                content, docs = content + n, docs + len(batch)
            if content == 0:
                raise DataError(
                    f"{path}: all {docs} records have an empty '{self.text_field}': nothing to train "
                    f"on; check data.text_field or remove the file from data.paths"
                )
            all_docs += docs
        progress.finish(f"{all_docs:,} documents")
        return {"max_id": max_id, "docs": all_docs}

    @staticmethod
    def _add(tok: Tokenizer, texts: list[str], where: tuple[Path, list[int]], dtype: type, out: ArrayWriter,
             total: int, max_id: int, progress: Progress) -> tuple[int, int, int]:
        """Appends the batch's documents; returns (text tokens in it (bos/eos excluded), stream
        length so far, largest id so far)."""
        encoded = _encode(tok, texts, where[0], (where[1][0], where[1][-1]))
        tokens, doc_len = _join_docs(encoded, tok.bos_id, tok.eos_id, dtype)
        out.append("tokens", tokens)
        out.append("doc_ends", total + np.cumsum(doc_len) - 1)
        progress.advance(ntokens=len(tokens))
        return sum(len(d) for d in encoded), total + len(tokens), max(max_id, int(tokens.max()))

    def content_fingerprint(self) -> dict[str, str]:
        return {**{str(p): h for p, h in zip(self.paths, self.file_hashes)}, "tokenizer": self.tokenizer_key}

    def _window(self, lo: int, hi: int) -> np.ndarray:
        return self.tokens[lo:hi]

    def _doc_ends(self, lo: int, window: np.ndarray) -> np.ndarray:
        a, b = np.searchsorted(self.doc_ends, [lo, lo + self.seq_len])
        return np.asarray(self.doc_ends[a:b]) - lo


# ----------------------------------------------------------------------------------------------
# tokens: .npy / .bin files, memory-mapped
# ----------------------------------------------------------------------------------------------
_NPY_MAGIC = b"\x93NUMPY"
_PROBE = 4096  # tokens of each .bin looked at for a wrong data.token_dtype
_MAX_PLAUSIBLE_ID = 1 << 24  # no tokenizer comes near 16.7M tokens
_SCAN_CHUNK = 1 << 24  # tokens per step of the full-file scan


def _open_token_file(path: Path, dtype: str) -> np.ndarray:
    """Memory-map a token file, checking what can be checked without reading all of it."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(len(_NPY_MAGIC))
    except OSError as e:
        raise DataError(f"data.paths: cannot read token file '{path}' ({e.strerror or e})") from None
    if size == 0:
        raise DataError(f"token file '{path}' is empty: fill it or remove it from data.paths")
    if path.suffix == ".npy":
        if head != _NPY_MAGIC:
            raise DataError(
                f"token file '{path}' is not a .npy file (no NUMPY header): write it with numpy.save, "
                f"or name a raw array of token ids '.bin' (dtype data.token_dtype)"
            )
        try:
            arr = np.load(path, mmap_mode="r")
        except (ValueError, OSError, EOFError) as e:
            raise DataError(
                f"token file '{path}': cannot read as .npy ({_one_line(e)}): is it truncated? write it "
                f"again with numpy.save"
            ) from None
        if arr.ndim != 1:
            raise DataError(
                f"token file '{path}' holds a {arr.ndim}-D {arr.dtype} array of shape {arr.shape}; "
                f"want 1-D token ids: save tokens.reshape(-1) (documents separated by data.eos_id)"
            )
        if not np.issubdtype(arr.dtype, np.integer):
            raise DataError(
                f"token file '{path}' holds a 1-D {arr.dtype} array; want integer token ids: save "
                f"tokens.astype(numpy.uint32)"
            )
        if len(arr) == 0:
            raise DataError(f"token file '{path}' holds no tokens: fill it or remove it from data.paths")
        return arr
    if path.suffix == ".bin":
        itemsize = np.dtype(dtype).itemsize
        if size % itemsize:
            raise DataError(
                f"token file '{path}' is {size} bytes, not a multiple of {itemsize} "
                f"(data.token_dtype={dtype}): is the dtype right?"
            )
        arr = np.memmap(path, dtype=dtype, mode="r")
        _check_bin_dtype(path, arr, dtype)
        return arr
    raise DataError(
        f"token file '{path}': unknown type '{path.suffix}', want .npy or .bin (jsonl text is "
        f"data.type: text)"
    )


def _check_bin_dtype(path: Path, arr: np.ndarray, dtype: str) -> None:
    """A raw file read with the wrong ``data.token_dtype`` shows in its first tokens."""
    head = np.asarray(arr[:_PROBE])
    # uint32 ids below 65536, read as uint16 (little endian): every second value is 0
    wide = len(head) >= 128 and len(arr) % 2 == 0 and not head[1::2].any() and head[0::2].any()
    if dtype == "uint16" and wide:
        raise DataError(
            f"token file '{path}' looks like uint32 tokens read as uint16 (every second value of "
            f"its first {len(head)} is 0): set data.token_dtype: uint32"
        )
    if dtype == "uint32" and len(head) and int(head.max()) >= _MAX_PLAUSIBLE_ID:
        k = int(np.argmax(head >= _MAX_PLAUSIBLE_ID))
        raise DataError(
            f"token file '{path}': token {k} reads as {int(head[k])}, larger than any vocabulary: "
            f"is it uint16? set data.token_dtype: uint16"
        )


class TokenDataset(_StreamDataset):
    """Pre-tokenized files concatenated into one stream.

    ``cfg.eos_id`` separates documents (None: no boundaries inside a file). The end of each file
    is also a document end, so no label ever links the last token of one file to the next.
    """

    def __init__(self, cfg: DataConfig, memo_dir: Path | None = None):
        self.seq_len = cfg.seq_len
        self.paths = list(cfg.paths)
        self.memo_dir = memo_dir  # where a large file's scan result is remembered (the data cache)
        self.eos_id = cfg.eos_id
        self.pad_id = cfg.eos_id if cfg.eos_id is not None else 0  # never emitted: no padding
        self.files = [_open_token_file(Path(p), cfg.token_dtype) for p in self.paths]
        self.offsets = np.cumsum([0] + [len(f) for f in self.files])
        self.num_tokens = int(self.offsets[-1])
        if len(self) == 0:
            raise _too_small(self.paths, self.num_tokens, self.seq_len)

    @cached_property
    def _scan(self) -> tuple[int, str]:
        """One pass over every file (at memory-map speed), only when someone asks: the largest id
        and where it is. Negative ids (a signed .npy) raise ``DataError`` naming file and token.
        A large file's result is remembered in the cache (``cache.remembered``): restarts skip it."""
        best, where = -1, ""
        for path, f in zip(self.paths, self.files):
            # the dtype is part of the key: the same bytes read as another data.token_dtype differ
            top, at = map(int, remembered(Path(path), f"maxid-{f.dtype.name}", lambda: self._scan_file(path, f),
                                          self.memo_dir, valid=lambda v: len(v.split()) == 2).split())
            if top > best:
                best, where = top, f"token file '{path}' (id {top} at token {at})"
        return best, where

    @staticmethod
    def _scan_file(path: Path, f: np.ndarray) -> str:
        """"<largest id> <its position>" of one file."""
        best, pos = -1, 0
        signed = np.issubdtype(f.dtype, np.signedinteger)
        for lo in range(0, len(f), _SCAN_CHUNK):
            chunk = np.asarray(f[lo : lo + _SCAN_CHUNK])
            j = int(chunk.argmax())
            if int(chunk[j]) > best:
                best, pos = int(chunk[j]), lo + j
            k = int(chunk.argmin()) if signed else 0
            if chunk[k] < 0:
                raise DataError(
                    f"token file '{path}': token {lo + k} is {int(chunk[k])}; token ids must be "
                    f">= 0 (is the array's dtype right?): fix the file"
                )
        return f"{best} {pos}"

    def content_fingerprint(self) -> dict[str, str]:
        """Size and the sha256 of the first and last 64 KiB of each file: cheap at any size and
        shard count (token files are written whole by a pipeline; an edit inside that keeps the
        size goes unseen)."""
        out = {}
        for p in self.paths:
            size = Path(p).stat().st_size
            with open(p, "rb") as f:
                head = f.read(1 << 16)
                f.seek(max(size - (1 << 16), 0))
                tail = f.read()
            out[str(p)] = f"{size}:{hashlib.sha256(head).hexdigest()[:16]}:{hashlib.sha256(tail).hexdigest()[:16]}"
        return out

    @property
    def vocab_size_needed(self) -> int:  # type: ignore[override]
        return self._scan[0] + 1

    @property
    def vocab_source(self) -> str:
        """Where the largest id is (for an error that says which file to look at)."""
        return self._scan[1]

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
def _check_message(m: Any, at: str) -> tuple[str, bool]:
    """``(role, trained)`` of one chat message: an object with a known role; an assistant message
    is trained unless its ``weight`` is 0 (OpenAI's fine-tuning format)."""
    if not isinstance(m, dict):
        raise DataError(f"{at} must be a {{role, content}} object, got {type(m).__name__}")
    if "role" not in m and "from" in m:
        raise DataError(f"{at} has ShareGPT keys (from/value): convert messages to {{role, content}} with roles "
                        f"{'/'.join(CHAT_ROLES[2:4])} (ShareGPT human/gpt = user/assistant)")
    role = _get_str(m, "role", at)
    if role not in CHAT_ROLES:
        raise DataError(
            f"{at} has role {_one_line(repr(role))}; known roles: {', '.join(CHAT_ROLES)} (loss is on "
            f"'assistant'): rename it in the data (ShareGPT human/gpt = user/assistant)")
    weight = m.get("weight", 1)
    if weight not in (0, 1) or isinstance(weight, bool):
        raise DataError(f"{at} has weight {_one_line(repr(weight))}: a message's weight is 0 (not trained on) or "
                        f"1 (trained on, the default for assistant messages)")
    return role, role == "assistant" and weight == 1


def _require_trained(trained: list[bool], messages: list[Any], where: str, field: str) -> None:
    if any(trained):
        return
    if any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
        raise DataError(f"{where}: every assistant message in '{field}' has weight 0: nothing to train on "
                        f"(remove the record, or set a weight to 1)")
    raise DataError(f"{where}: '{field}' has no 'assistant' message to train on")


@dataclass
class _Rendered:
    """A record rendered by the model's chat template: its text and the trained character spans."""

    text: str
    spans: list[tuple[int, int]]


class SFTDataset(PackedDataset):
    """Supervised examples packed whole into ``seq_len`` sequences (``cfg.packing``: in file order,
    or best fit).

    A record is ``{prompt_field, response_field}`` (strings; ``prompt + cfg.sft_separator`` is
    tokenized as one piece, then the response) or ``{messages_field: [{role, content}, ...]}``
    rendered with ``cfg.chat_template`` (roles from ``CHAT_ROLES``). Loss is on the response (or
    every rendered ``assistant`` message) and on the final eos, never on the separator. Examples
    longer than ``seq_len`` are cut to ``seq_len`` and counted in ``truncated``; those left with no
    trained token are not packed (``left_out``).
    """

    def __init__(self, cfg: DataConfig, tokenizer: Tokenizer, cache_dir: Path, say: Say | None = None,
                 key: str = "data.paths", stop: Callable[[], bool] | None = None):
        self.seq_len = cfg.seq_len
        self.paths = list(cfg.paths)
        self.pad_id = tokenizer.pad_id
        self.cfg = cfg
        settings = {
            "prompt_field": cfg.prompt_field,
            "response_field": cfg.response_field,
            "messages_field": cfg.messages_field,
            "chat_template": cfg.chat_template,
            "sft_separator": cfg.sft_separator,
            "records": 2,  # 2: message weights honoured, examples' lines recorded
        }
        self.chat: ChatTemplate | None = None
        if cfg.chat_template == "hf":
            path = getattr(tokenizer, "path", None)
            if path is None:
                raise DataError("data.chat_template hf needs a Hugging Face tokenizer: set data.tokenizer")
            self.chat = load_chat_template(Path(path), cfg.chat_template_file, cfg.chat_template_kwargs)
            settings["jinja"] = self.chat.digest  # the template text and its variables
            del settings["sft_separator"]  # the template places every separator
        self.file_hashes = [file_sha256(p, cache_dir) for p in self.paths]
        self.tokenizer_key = tokenizer.cache_key
        name = "sft-" + cache_key("sft", self.file_hashes, tokenizer.cache_key, settings)[:24]
        arrays, meta = cached(cache_dir, name, lambda w: self._tokenize(
            tokenizer, w, Progress(say, key, self.paths, Path(cache_dir) / name, heartbeat=w.heartbeat, stop=stop)),
            say, stop)
        self.tokens: np.ndarray = arrays["tokens"]
        self.loss_mask: np.ndarray = arrays["loss_mask"]  # 1 where the token is a target
        self.offsets: np.ndarray = arrays["offsets"]  # example k = tokens[offsets[k]:offsets[k+1]]
        self.num_examples = len(self.offsets) - 1
        self.weighted = bool(meta.get("weight0"))  # records with weight-0 messages
        self.lines: np.ndarray | None = arrays.get("lines")  # each example's line in its file (cache v2+)
        self.file_examples: list[int] | None = meta.get("file_examples")
        lengths = np.diff(self.offsets)
        long = np.flatnonzero(lengths > self.seq_len)
        # An example cut so that none of its targets is left would fill a sequence with nothing to
        # learn (and a global batch of such sequences has no token to normalise the loss by).
        empty = [int(k) for k in long
                 if not self.loss_mask[int(self.offsets[k]) + 1:int(self.offsets[k]) + self.seq_len].any()]
        # sequence b holds examples order[bounds[b]:bounds[b+1]] (order None: all, in file order)
        self.order: np.ndarray | None = None
        kept = np.arange(self.num_examples)
        if empty:
            kept = np.setdiff1d(kept, np.asarray(empty, dtype=np.int64))
            self.order = kept
        if cfg.packing == "best_fit":
            within, self.bounds = best_fit_pack(lengths[kept], self.seq_len)
            self.order = kept[within]
        else:
            self.bounds, _ = greedy_pack(lengths[kept], self.seq_len)
        self.truncated, self.left_out = len(long), len(empty)
        # real (not padding) tokens per sequence token: what packing leaves to compute
        self.fill = float(np.minimum(lengths[kept], self.seq_len).sum()) / max(len(self) * self.seq_len, 1)
        # trained tokens per sequence token (caches from before it was recorded: unknown)
        self.trained_share: float | None = None
        if "trained_tokens" in meta:
            cut = sum(int(np.count_nonzero(self.loss_mask[int(self.offsets[k]) + self.seq_len:int(self.offsets[k + 1])]))
                      for k in long)
            self.trained_share = (int(meta["trained_tokens"]) - cut) / max(len(self) * self.seq_len, 1)
        if len(self) == 0:
            raise DataError(f"{key}: every example is longer than data.seq_len={self.seq_len} with no trained "
                            f"token in its first {self.seq_len} (first: {self._where(empty[0])}): nothing to train "
                            f"on; raise data.seq_len, or shorten or split the records")
        self.vocab_size_needed = max(int(meta["max_id"]), self.pad_id) + 1  # padding is emitted too
        self.vocab_source = tokenizer_name(tokenizer)
        self.eos_name = _eos_name(tokenizer)
        path = getattr(tokenizer, "path", None)
        if meta.get("chat_records") and self.chat is None and path is not None and tokenizer_has_template(Path(path)):
            warning = (f"warning: {meta['chat_records']} SFT records are chat messages rendered in "
                       f"data.chat_template's per-message format, but tokenizer '{path}' ships the model's own chat "
                       f"template: set data.chat_template: hf to fine-tune in the format the model was tuned (and is "
                       f"prompted) in")
            say(warning) if say is not None else log.warning(warning.removeprefix("warning: "))
        if meta.get("string_arguments"):
            warning = (f"warning: {meta['string_arguments']} records have tool calls whose 'arguments' is a JSON "
                       f"string (first: {meta.get('string_arguments_at')}): chat templates write it with tojson, so "
                       f"the model learns the arguments as an escaped string; store them as JSON objects (json.loads "
                       f"them), as transformers expects")
            say(warning) if say is not None else log.warning(warning.removeprefix("warning: "))
        if self.truncated:
            warning = self._truncation_warning(long, empty)
            say(warning) if say is not None else log.warning(warning.removeprefix("warning: "))

    def _where(self, k: int) -> str:
        """``file:line`` of example ``k`` (caches built before lines were recorded: its index)."""
        if self.lines is None or self.file_examples is None:
            return f"example {k}"
        f = int(np.searchsorted(np.cumsum(self.file_examples), k, side="right"))
        return f"{self.paths[f]}:{int(self.lines[k])}"

    def _truncation_warning(self, long: np.ndarray, empty: list[int]) -> str:
        shown = ", ".join(self._where(int(k)) for k in long[:3]) + (", ..." if len(long) > 3 else "")
        msg = (f"warning: {self.truncated} of {_plural(self.num_examples, 'SFT example')} are longer than "
               f"data.seq_len={self.seq_len} and are cut to their first {self.seq_len} tokens, so their ends are "
               f"not trained on ({shown}); raise data.seq_len, or shorten or split those records")
        if empty:
            where = ", ".join(self._where(k) for k in empty[:3]) + (", ..." if len(empty) > 3 else "")
            msg += (f"; {len(empty)} of them keep no trained token in that part and are left out of training "
                    f"({where})")
        return msg

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def content_fingerprint(self) -> dict[str, str]:
        out = {**{str(p): h for p, h in zip(self.paths, self.file_hashes)}, "tokenizer": self.tokenizer_key}
        if self.weighted:  # checkpoints from before weights were honoured trained these messages
            out["records"] = "message weights honoured"
        if self.chat is not None:  # an edited template changes the tokens as much as edited data
            out["chat_template"] = self.chat.digest
        return out

    def describe(self) -> str:
        how = (f"chat template {self.chat.origin}, eos {self.eos_name}" if self.chat is not None
               else f"examples end with {self.eos_name}")
        hint = " (data.packing: best_fit packs tighter)" if self.cfg.packing == "greedy" and self.fill < 0.85 else ""
        return (
            f"SFTDataset: {_plural(self.num_examples, 'example')} in {_plural(len(self), 'sequence')} of "
            f"{self.seq_len}, {self.cfg.packing} packing {100 * self.fill:.0f}% full"
            + (f", {100 * self.trained_share:.0f}% trained" if self.trained_share is not None else "")
            + f"{hint} ({self.truncated} truncated"
            + (f", {self.left_out} left out with nothing to train on" if self.left_out else "") + f"; {how})"
        )

    # -- tokenization ---------------------------------------------------------------------------
    def _segments(self, rec: dict[str, Any], where: str) -> list[tuple[str, bool]] | _Rendered:
        """``(text, trained_on)`` pieces of one record, in order; with the model's own template
        (``self.chat``) the whole rendered record and its trained character spans."""
        c = self.cfg
        if self.chat is not None:
            return self._rendered(rec, where)
        if c.messages_field in rec:
            messages = self._messages(rec, where)
            out = []
            for j, m in enumerate(messages):
                at = f"{where}: {c.messages_field}[{j}]"
                role, trained = _check_message(m, at)
                if m.get("content") is None and m.get("tool_calls"):
                    raise DataError(f"{at} is a tool call without text 'content': the per-message format "
                                    f"renders text only; data.chat_template: hf renders tool calls with the "
                                    f"model's own template")
                content = _get_str(m, "content", at)
                out.append((c.chat_template.format(role=role, content=content), trained))
            _require_trained([t for _, t in out], messages, where, c.messages_field)
            return out
        prompt, response = self._pair(rec, where)
        # the separator belongs to the prompt (tokenized with it, as a prompt is at inference)
        return [(prompt + c.sft_separator, False), (response, True)]

    def _messages(self, rec: dict[str, Any], where: str) -> list[Any]:
        messages = rec[self.cfg.messages_field]
        if not isinstance(messages, list) or not messages:
            got = "an empty list" if isinstance(messages, list) else type(messages).__name__
            raise DataError(
                f"{where}: field '{self.cfg.messages_field}' must be a non-empty list of "
                f"{{role, content}} objects, got {got}"
            )
        return messages

    def _pair(self, rec: dict[str, Any], where: str) -> tuple[str, str]:
        c = self.cfg
        if c.prompt_field not in rec and c.response_field not in rec:
            sharegpt = next((k for k, v in rec.items() if isinstance(v, list) and v and isinstance(v[0], dict)
                             and "from" in v[0] and "value" in v[0]), None)
            if sharegpt is not None:
                raise DataError(
                    f"{where}: this is a ShareGPT record ('{sharegpt}' holds from/value turns): convert it to "
                    f"'{c.messages_field}' with {{role, content}} messages (human -> user, gpt -> assistant, "
                    f"system -> system)")
            raise DataError(
                f"{where}: missing field '{c.messages_field}' or '{c.prompt_field}'/"
                f"'{c.response_field}' (record has keys: {_keys(rec)}): set data.messages_field or "
                f"data.prompt_field/data.response_field to the fields your records use"
            )
        return (_get_str(rec, c.prompt_field, where, "data.prompt_field"),
                _get_str(rec, c.response_field, where, "data.response_field"))

    def _rendered(self, rec: dict[str, Any], where: str) -> _Rendered:
        """A record through the model's template: messages as given (extra keys such as
        ``reasoning_content`` or ``tool_calls`` reach the template; a record's ``tools`` and
        ``documents`` too), a prompt/response pair as one user and one assistant message."""
        assert self.chat is not None
        c = self.cfg
        if c.messages_field in rec:
            messages = self._messages(rec, where)
            trained = [_check_message(m, f"{where}: {c.messages_field}[{j}]")[1] for j, m in enumerate(messages)]
            _require_trained(trained, messages, where, c.messages_field)
            self._note_string_arguments(messages, where)
        else:
            prompt, response = self._pair(rec, where)
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
            trained = [False, True]
        extra = {}
        for key in ("tools", "documents"):  # given to the template as transformers gives them
            value = rec.get(key)
            if value is not None and not (isinstance(value, list) and all(isinstance(v, dict) for v in value)):
                raise DataError(f"{where}: field '{key}' must be a list of objects (JSON schemas for tools, "
                                f"{{title, text}} for documents), got {type(value).__name__}")
            extra[key] = value
        text, spans = self.chat.trained_spans(messages, where, **extra)
        assistants = [j for j, m in enumerate(messages) if m.get("role") == "assistant"]
        if not all(trained[j] for j in assistants):  # some replies have weight 0
            if len(spans) != len(assistants):
                raise DataError(f"{where}: an assistant message has weight 0, but the chat template's "
                                f"{{% generation %}} blocks ({len(spans)}) do not pair with the {len(assistants)} "
                                f"assistant messages: drop the weights or the messages not to train on")
            spans = [sp for sp, j in zip(spans, assistants) if trained[j]]
        return _Rendered(text, spans)

    def _note_string_arguments(self, messages: list[Any], where: str) -> None:
        """Counts tool calls whose ``arguments`` is a JSON string (OpenAI exports store it so):
        templates apply ``tojson`` to it again, training the model to emit escaped JSON."""
        for m in messages:
            calls = m.get("tool_calls")
            for call in calls if isinstance(calls, list) else []:
                function = call.get("function") if isinstance(call, dict) else None
                args = function.get("arguments") if isinstance(function, dict) else None
                if isinstance(args, str) and args.lstrip().startswith("{"):
                    self._string_args = getattr(self, "_string_args", 0) + 1
                    self._string_args_at = getattr(self, "_string_args_at", where)
                    return

    def _tokenize(self, tok: Tokenizer, out: ArrayWriter, progress: Progress) -> dict[str, Any]:
        """Appends ``tokens``, ``loss_mask`` and ``offsets`` a batch of records at a time."""
        dtype = _stream_dtype(tok.vocab_size)
        out.declare("tokens", dtype)
        out.declare("loss_mask", np.uint8)
        out.declare("lines", np.int64)  # each example's line in its file (for messages naming it)
        out.append("offsets", np.zeros(1, np.int64))
        state = {"total": 0, "examples": 0, "max_id": 0, "chat_records": 0, "weight0": 0}
        file_examples = []

        def flush(records: list[Any], path: Path, lines: list[int]) -> None:
            if self.chat is not None:
                return flush_rendered(records, path, lines)
            texts = [text for segs in records for text, _ in segs]
            encoded = iter(_encode(tok, texts, path, (lines[0], lines[-1])))
            ids: list[int] = []
            mask: list[int] = []
            lengths: list[int] = []
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
            tokens = np.asarray(ids, dtype=dtype)
            write(tokens, np.asarray(mask, dtype=np.uint8), lengths, lines)

        def flush_rendered(records: list[_Rendered], path: Path, lines: list[int]) -> None:
            # the whole rendering tokenized as one string (as apply_chat_template does; the template
            # writes bos and end-of-turn tokens itself), loss where tokens overlap a trained span
            try:
                encoded = tok.encode_with_offsets([r.text for r in records])  # type: ignore[attr-defined]
            except DataError as e:
                raise DataError(f"{path}:{lines[0]}-{lines[-1]}: {e}") from None
            ids = [np.asarray(i, dtype=np.int64) for i, _ in encoded]
            mask = [token_mask(np.asarray(o, dtype=np.int64).reshape(-1, 2), r.spans)
                    for (_, o), r in zip(encoded, records)]
            for r, m, line in zip(records, mask, lines):
                if not m.any():
                    raise DataError(f"{path}:{line}: no token of this record's assistant text survived "
                                    f"tokenization: it has nothing to train on")
            write(np.concatenate(ids).astype(dtype), np.concatenate(mask), [len(i) for i in ids], lines)

        def write(tokens: np.ndarray, mask: np.ndarray, lengths: list[int], lines: list[int]) -> None:
            out.append("tokens", tokens)
            out.append("loss_mask", mask)
            out.append("lines", np.asarray(lines, dtype=np.int64))
            out.append("offsets", state["total"] + np.cumsum(lengths, dtype=np.int64))
            state["total"] += len(tokens)
            state["trained"] = state.get("trained", 0) + int(np.count_nonzero(mask))
            state["examples"] += len(lengths)
            state["max_id"] = max(state["max_id"], int(tokens.max()))
            progress.advance(ntokens=len(tokens))

        for path in self.paths:
            records: list[Any] = []
            lines: list[int] = []
            for lineno, rec in _iter_jsonl(path, progress):
                records.append(self._segments(rec, f"{path}:{lineno}"))
                state["chat_records"] += self.cfg.messages_field in rec
                msgs = rec.get(self.cfg.messages_field)
                state["weight0"] += isinstance(msgs, list) and any(isinstance(m, dict) and m.get("weight") == 0
                                                                   for m in msgs)
                lines.append(lineno)
                if len(records) == _ENCODE_BATCH:
                    flush(records, path, lines)
                    records, lines = [], []
            if records:
                flush(records, path, lines)
            file_examples.append(state["examples"] - sum(file_examples))
        progress.finish(f"{state['examples']:,} examples")
        return {"max_id": state["max_id"], "examples": state["examples"], "chat_records": state["chat_records"],
                "file_examples": file_examples, "weight0": state["weight0"], "trained_tokens": state.get("trained", 0),
                "string_arguments": getattr(self, "_string_args", 0),
                "string_arguments_at": getattr(self, "_string_args_at", None)}

    # -- packing --------------------------------------------------------------------------------
    def _sample(self, i: int) -> Sample:
        a, b = int(self.bounds[i]), int(self.bounds[i + 1])
        if self.order is not None:
            idx = self.order[a:b]
            if idx[-1] - idx[0] != b - a - 1:  # not consecutive in the files: gather them
                pieces = [(int(self.offsets[k]), int(self.offsets[k + 1])) for k in idx]
                tokens = np.concatenate([self.tokens[x:y] for x, y in pieces])[: self.seq_len]
                mask = np.concatenate([self.loss_mask[x:y] for x, y in pieces])[: self.seq_len]
                starts = np.cumsum([0] + [y - x for x, y in pieces[:-1]])
                return pack_documents(tokens, mask, starts, self.seq_len, self.pad_id)
            a, b = int(idx[0]), int(idx[-1]) + 1
        lo = int(self.offsets[a])
        hi = min(int(self.offsets[b]), lo + self.seq_len)  # only a lone example can be cut
        starts = np.asarray(self.offsets[a:b]) - lo
        return pack_documents(self.tokens[lo:hi], self.loss_mask[lo:hi], starts, self.seq_len, self.pad_id)
