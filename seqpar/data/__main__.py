"""``python -m seqpar.data --config X.yaml [--show N] [--section.key value ...]``: prepare a run's data
ahead of the job, and see what it trains on.

Tokenizes ``data.paths`` (and ``data.eval_paths`` when ``train.eval_every`` is on) into the run's
cache exactly as the training job would at start-up, checks the ids against ``model.vocab_size``
and prints what the job will train on. Run it on a CPU node (or while the GPU job waits in the
queue): the job then finds the entries and starts without tokenizing. ``--show N`` prints the first
N training documents as text with the trained-on tokens marked (a chat template or a loss mask
checked before a long job). Exit status 2 on a mistake in
the config or the data (one line naming the key or file and the fix).
"""

from __future__ import annotations

import argparse
import math
import sys
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m seqpar.data", allow_abbrev=False,
        description="Tokenize a config's data into its cache ahead of training (the job then starts without "
                    "tokenizing). Other arguments are --section.key value overrides.")
    ap.add_argument("--config", help="config YAML (default: the embedded tiny-cpu config)")
    ap.add_argument("--show", type=int, default=0, metavar="N",
                    help="print the first N training documents as text, the trained-on tokens marked")
    ap.add_argument("--show-chars", type=int, default=2000, metavar="C",
                    help="with --show: longer stretches of text show their first and last C/2 characters")
    args, rest = ap.parse_known_args(argv)

    from seqpar.config import ConfigError, load_config
    from seqpar.data.prepare import cache_dir_of, prepare_data
    from seqpar.errors import UserError

    def say(message: str) -> None:
        print(f"seqpar.data: {message}", flush=True)

    try:
        cfg = load_config(args.config, rest)
        start = time.monotonic()
        train, held_out = prepare_data(cfg, say)
    except (ConfigError, UserError) as e:
        print(f"seqpar.data: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the half-built entry was deleted on the way out (cache.cached)
        print("\nseqpar.data: interrupted: nothing was cached for the data being tokenized", file=sys.stderr)
        return 130
    say(f"train: {train.describe()}")
    if (gbs := cfg.train.global_batch_size) is not None:  # else it depends on the world size
        if cfg.train.epochs is not None:
            steps = max(1, math.ceil(cfg.train.epochs * len(train) / gbs))
            say(f"train.epochs {cfg.train.epochs:g} of this data at {gbs} sequences per step = {steps} steps")
        else:
            epochs = cfg.train.max_steps * gbs / max(len(train), 1)
            say(f"train.max_steps {cfg.train.max_steps} x {gbs} sequences per step = {epochs:.2f} epochs of this data")
    if args.show > 0:
        try:
            show(cfg, train, args.show, max(args.show_chars, 2))
        except UserError as e:  # e.g. a token file's tokenizer that cannot be loaded to decode
            print(f"seqpar.data: {e}", file=sys.stderr)
            return 2
    for name, ds in (held_out or {}).items():
        say(f"held-out{'' if name is None else ' ' + name}: {ds.describe()}")
    if cfg.data.type in ("text", "sft"):
        say(f"ready in {time.monotonic() - start:.1f} s: cache {cache_dir_of(cfg).resolve()} (the job reads it "
            f"while its data.cache_dir, or logging.run_dir, resolves there and data.paths, data.tokenizer and "
            f"the data settings stay the same)")
    else:
        say(f"ready: data.type '{cfg.data.type}' needs no tokenizing (nothing cached)")
    return 0


def show(cfg, train, n: int, max_chars: int) -> None:
    """The first documents of the training set as the model gets them (``seqpar.data.preview``)."""
    from seqpar.data import build_tokenizer
    from seqpar.data.preview import TRAINED_CLOSE, TRAINED_OPEN, preview

    # token files have no text unless a tokenizer is named; their ids are shown then
    tok = build_tokenizer(cfg.data) if cfg.data.type != "tokens" or cfg.data.tokenizer is not None else None
    color = sys.stdout.isatty()
    how = "in green" if color else f"between {TRAINED_OPEN} and {TRAINED_CLOSE}"
    print(f"seqpar.data: the first {n} training document{'s' if n != 1 else ''}, trained-on tokens {how} "
          f"(the loss counts only those):", flush=True)
    print(preview(train, tok, n, color=color, max_chars=max_chars), flush=True)


if __name__ == "__main__":
    sys.exit(main())
