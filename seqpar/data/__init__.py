"""Data pipeline: tokenizers, datasets of packed samples, the global sampler and the loader.

Typical use (every DP rank)::

    tokenizer = build_tokenizer(cfg.data)
    dataset = build_dataset(cfg.data, cache_dir)          # rank 0 first if it must tokenize
    sampler = GlobalSampler(len(dataset), cfg.data.seed, cfg.data.shuffle)
    loader = MicroBatchLoader(dataset, sampler, layout.micro_batch_size, dp_rank, layout.dp,
                              layout.grad_accum_steps)
    for micro_step, batch in enumerate(loader.window(step)): ...
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from seqpar.config import DataConfig
from seqpar.data.cache import Say
from seqpar.data.loader import Batch, MicroBatchLoader
from seqpar.data.mixture import MixtureDataset
from seqpar.data.packing import IGNORE_INDEX, PackedDataset, Sample
from seqpar.data.sampler import GlobalSampler
from seqpar.data.sources import SFTDataset, TextDataset, TokenDataset
from seqpar.data.synthetic import PasskeyDataset
from seqpar.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer
from seqpar.errors import DataError

Dataset = PackedDataset


def build_tokenizer(cfg: DataConfig) -> Tokenizer:
    """``cfg.tokenizer`` (a tokenizer.json; ``cfg.eos_token`` picks its eos) or, when unset, the
    byte tokenizer. Raises ``DataError`` for a file that does not load or has no eos token."""
    if cfg.tokenizer is None:
        return ByteTokenizer()
    # A chat model stops at its end-of-turn token (<|im_end|>, <|eot_id|>), which its
    # tokenizer_config.json names as eos_token; the built-in look-up would find <|endoftext|> first.
    return HFTokenizer(cfg.tokenizer, eos_token=cfg.eos_token, config_first=cfg.chat_template == "hf")


def build_dataset(cfg: DataConfig, cache_dir: Path, say: Say | None = None, key: str = "data.paths",
                  stop: Callable[[], bool] | None = None, tokenizer: Tokenizer | None = None) -> PackedDataset:
    """The training dataset selected by ``cfg.type``. ``cache_dir`` holds tokenized text/SFT;
    ``say`` (the first rank's printer) reports tokenizing progress, naming the files ``key``;
    ``stop`` true ends tokenizing with ``cache.Stopped`` (a preemption); ``tokenizer``: the one
    ``build_tokenizer(cfg)`` gives, when the caller has it already (loaded once per run).

    Every file is read (or its cache entry loaded) here, so a mistake in a data file or the
    tokenizer raises ``DataError`` (one line naming the file, line and fix) before any model or
    engine exists; only ``TokenDataset.vocab_size_needed`` scans token files later, on request.
    """
    if cfg.type == "passkey":
        return PasskeyDataset(cfg)
    if cfg.type in ("text", "sft") and tokenizer is None:
        tokenizer = build_tokenizer(cfg)
    if cfg.weights is not None:  # each file its own source, mixed in proportion
        parts = [build_dataset(cfg.model_copy(update={"paths": [p], "weights": None}), cache_dir, say,
                               f"{key}[{i}]", stop, tokenizer) for i, p in enumerate(cfg.paths)]
        names = [Path(p).name for p in cfg.paths]
        return MixtureDataset(parts, cfg.weights, names if len(set(names)) == len(names) else [str(p) for p in cfg.paths])
    if cfg.type == "tokens":
        return TokenDataset(cfg, Path(cache_dir))
    if cfg.type == "text":
        return TextDataset(cfg, tokenizer, Path(cache_dir), say, key, stop)
    if cfg.type == "sft":
        return SFTDataset(cfg, tokenizer, Path(cache_dir), say, key, stop)
    raise ValueError(f"unknown data.type '{cfg.type}'")


__all__ = [
    "IGNORE_INDEX",
    "Batch",
    "ByteTokenizer",
    "DataError",
    "Dataset",
    "GlobalSampler",
    "HFTokenizer",
    "MicroBatchLoader",
    "MixtureDataset",
    "PackedDataset",
    "PasskeyDataset",
    "SFTDataset",
    "Sample",
    "TextDataset",
    "TokenDataset",
    "Tokenizer",
    "build_dataset",
    "build_tokenizer",
]
