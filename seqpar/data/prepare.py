"""A run's data, ready to train: its datasets built (text and SFT tokenized into the cache) and
checked against the model's vocabulary. The trainer calls ``prepare_data`` at start-up; so does
``python -m seqpar.data``, which does it ahead of a job (on a CPU node, say), so the job starts
without tokenizing.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from seqpar.config import Config, eval_set_name
from seqpar.data import PackedDataset, PasskeyDataset, build_dataset, build_tokenizer
from seqpar.data.cache import Say
from seqpar.data.tokenizer import Tokenizer, tokenizer_name
from seqpar.errors import DataError


def progress_printer(rank: int) -> Say:
    """How a rank reports tokenizing: the first rank always (it builds the cache); another rank
    only when it has to tokenize (or wait for a rank of its node tokenizing) too, because rank 0's
    entry is not in its data.cache_dir (node-local storage), which its first line says."""
    first = [True]

    def say(message: str) -> None:
        if rank == 0:
            print(f"seqpar: {message}", flush=True)
            return
        if message.startswith("warning:"):  # about the data, the same on every rank: said once, by rank 0
            return
        note = (" (rank 0's entry is not in this rank's data.cache_dir: on node-local storage one rank per "
                "node tokenizes again while the others wait for it; put data.cache_dir where all nodes see "
                "it)") if first[0] else ""
        first[0] = False
        print(f"seqpar: rank {rank}: {message}{note}", flush=True)

    return say


def cache_dir_of(cfg: Config) -> Path:
    return Path(cfg.data.cache_dir or Path(cfg.logging.run_dir) / "cache")


def check_tokenizer_fits(cfg: Config, tok: Tokenizer) -> None:
    """A tokenizer with more ids than the model's vocabulary is refused before a corpus is
    tokenized for nothing (a model's embedding always has a row for every id of its tokenizer)."""
    if tok.vocab_size > cfg.model.vocab_size:
        raise DataError(
            f"data.tokenizer: {tokenizer_name(tok)} has more ids than model.vocab_size={cfg.model.vocab_size}: "
            f"raise model.vocab_size to at least {tok.vocab_size} or use the model's own tokenizer")


# Held-out sets by name: None = one set (the passkey split, or data.eval_paths read together);
# with data.eval_per_file each file is its own set, named by config.eval_set_name.
HeldOut = dict[str | None, PackedDataset]


def build_eval_dataset(cfg: Config, cache_dir: Path, say: Say | None = None,
                       stop: Callable[[], bool] | None = None,
                       tokenizer: Tokenizer | None = None) -> HeldOut | None:
    """The held-out sets, or None when ``train.eval_every`` is off: the passkey task's eval
    split, or ``data.eval_paths`` read as one set or (``data.eval_per_file``) one set per file,
    each cached on its own (``data.weights`` apply to training files only)."""
    if not cfg.train.eval_every:
        return None
    if cfg.data.type == "passkey":
        return {None: PasskeyDataset(cfg.data.model_copy(update={"passkey": cfg.data.passkey.model_copy(
            update={"eval_samples": max(cfg.train.eval_samples, cfg.data.passkey.eval_samples)})}), split="eval")}
    if not cfg.data.eval_per_file:
        held_out = cfg.data.model_copy(update={"paths": list(cfg.data.eval_paths), "weights": None})
        return {None: build_dataset(held_out, cache_dir, say, "data.eval_paths", stop, tokenizer)}
    return {eval_set_name(path): build_dataset(cfg.data.model_copy(update={"paths": [path], "weights": None}),
                                               cache_dir, say, f"data.eval_paths[{i}]", stop, tokenizer)
            for i, path in enumerate(cfg.data.eval_paths)}


def prepare_data(cfg: Config, say: Say | None = None, stop: Callable[[], bool] | None = None,
                 tokenizer: Tokenizer | None = None) -> tuple[PackedDataset, HeldOut | None]:
    """(training set, held-out sets or None), built and checked; ``say``: progress printer;
    ``stop``: true when the process is asked to stop (tokenizing then raises ``cache.Stopped``);
    ``tokenizer``: ``build_tokenizer(cfg.data)`` when the caller already has it (loaded once)."""
    tok = None
    if cfg.data.type in ("text", "sft"):
        tok = tokenizer if tokenizer is not None else build_tokenizer(cfg.data)
    if tok is not None:
        check_tokenizer_fits(cfg, tok)
    unused = [k for k, v in (("data.eval_paths", cfg.data.eval_paths), ("data.eval_per_file", cfg.data.eval_per_file),
                             ("train.eval_by_position", cfg.train.eval_by_position)) if v]
    if unused and not cfg.train.eval_every and say is not None:
        # a warning, not an error: runs (and checkpoints) with this setting existed before the check
        say(f"warning: {' and '.join(unused)} {'is' if len(unused) == 1 else 'are'} not used: train.eval_every is 0 "
            "(set it to N for a held-out loss every N steps)")
    cache_dir = cache_dir_of(cfg)
    train = build_dataset(cfg.data, cache_dir, say, stop=stop, tokenizer=tok)
    held_out = build_eval_dataset(cfg, cache_dir, say, stop, tok)
    for ds, key in ((train, "data.paths"), *((ds, "data.eval_paths" + ("" if name is None else f" ({name})"))
                                             for name, ds in (held_out or {}).items())):
        if ds.vocab_size_needed > cfg.model.vocab_size:
            source = getattr(ds, "vocab_source", "")
            raise DataError(
                f"{key}: the data emits token ids up to {ds.vocab_size_needed - 1}"
                + (f" ({source})" if source else "") + f" but model.vocab_size={cfg.model.vocab_size}: raise "
                f"model.vocab_size to at least {ds.vocab_size_needed} or use a tokenizer that fits")
    return train, held_out
