"""Entry point: ``deepspeed seqpar/train.py --config configs/tiny-cpu.yaml [--section.key value ...]``.

Also runs under ``torchrun --nproc_per_node N seqpar/train.py`` and as ``python seqpar/train.py``
(one process). Without ``--config`` the embedded CPU default is used.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script: put the repo root (not seqpar/) on sys.path, so `import seqpar` works from a
    # fresh clone and our subpackage names (data, kernels, ...) never shadow other libraries.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import warnings  # noqa: E402

# DeepSpeed 0.19.8 calls a collective torch has deprecated; nothing for users to act on.
warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.*deprecated", category=FutureWarning)
# Ulysses and expert parallelism use torch.distributed.nn's autograd all-to-all (tested on gloo,
# used on NCCL); torch 2.13 deprecates it in favour of functional collectives
warnings.filterwarnings("ignore", message=r".*nn\.functional\.all_to_all_single is deprecated", category=FutureWarning)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(
        prog="seqpar/train.py",
        description="Long-context sequence-parallel training on DeepSpeed.",
        epilog="Any config key can be overridden as --section.key value, e.g. --train.lr 1e-3.",
    )
    p.add_argument("--config", default=None, help="YAML config (default: the embedded tiny-cpu config)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--resume", default=None, metavar="auto|none|PATH",
                   help="resume from the newest valid checkpoint (auto, default), none, or a checkpoint dir")
    # The deepspeed launcher appends --local_rank=N; the rank comes from the environment anyway.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_known_args(argv)


def main(argv: list[str] | None = None, extra_state: dict | None = None) -> int:
    """The command line. ``extra_state``: your own stateful objects, checkpointed with the run
    (a script of yours calls ``main(extra_state={...})``; docs/extending.md)."""
    # First of all: a preemption signal during start-up is kept (the run exits 75 before its first
    # micro-batch), and a restart wrapper can signal this process (scripts/auto_restart.sh).
    from seqpar.checkpoint.runstate import register_pid, write_run_state
    from seqpar.checkpoint.signals import EXIT_IO, EXIT_PREEMPTED, EXIT_USAGE, SIGNALS, StopSignal

    StopSignal.install()
    register_pid()
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not _cuda_available() else "cuda")

    from seqpar.config import ConfigError, load_config
    from seqpar.errors import UserError

    if args.resume is not None:
        overrides = overrides + ["--checkpoint.resume", args.resume]
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"seqpar: {e}", file=sys.stderr)
        return EXIT_USAGE
    if args.print_config:
        import yaml

        print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        return 0

    from seqpar.metrics import quiet_deepspeed

    quiet_deepspeed()  # before DeepSpeed starts: no INFO lines, no "op built successfully" on every start
    from seqpar.data.cache import Stopped
    from seqpar.engine import Trainer
    from seqpar.engine.nonfinite import Diverged
    from seqpar.engine.trainer import CheckpointIOError
    from seqpar.parallel import init_topology, pick_device

    from seqpar.rng import set_deterministic

    set_deterministic(cfg.train.deterministic)  # before any CUDA work
    device = pick_device(cfg.train.device)
    topo = init_topology(cfg.parallel.ulysses_degree, cfg.parallel.ring_degree, device, cfg.parallel.backend)

    trainer = None

    def outcome(state: str, code: int, reason: str) -> int:
        """Record why the run ended where restart loops look (launchers lose exit codes), with the
        step reached and the newest checkpoint this run wrote or resumed when it got that far."""
        if topo.is_main or os.environ.get("LOCAL_RANK", "0") == "0":
            step = getattr(getattr(trainer, "state", None), "step", None)
            write_run_state(cfg.logging.run_dir if topo.is_main else None, state, exit_code=code, reason=reason,
                            step=step, checkpoint=_newest_committed(trainer))
        return code

    try:
        cfg.layout(topo.world_size)  # batch / layout consistency, before any data or model work
        if cfg.logging.wandb is not None:  # on every rank (rank 0 logs): all stop together
            from seqpar.metrics import import_wandb

            import_wandb()
    except UserError as e:
        if topo.is_main:
            print(f"seqpar: {e}", file=sys.stderr)
        return outcome("usage_error", EXIT_USAGE, str(e))
    try:
        trainer = Trainer(cfg, topo, config_path=args.config or "<embedded tiny-cpu>", extra_state=extra_state)
        trainer.train()
    except UserError as e:  # config, data, tokenizer, resume, a checkpoint dir in use: one line, exit 2
        if topo.is_main:
            print(f"seqpar: {e}", file=sys.stderr)
        return outcome("usage_error", EXIT_USAGE, str(e))
    except CheckpointIOError as e:
        if topo.is_main:
            print(f"seqpar: {e}", file=sys.stderr)
        return outcome("io_error", EXIT_IO, str(e))
    except Diverged as e:  # a restart would skip the same steps again: a person decides (exit 2)
        if topo.is_main:
            print(f"seqpar: {e}", file=sys.stderr)
        return outcome("diverged", EXIT_USAGE, str(e))
    except Stopped:  # asked to stop while tokenizing: nothing trained, nothing to save
        reason = "stop requested while tokenizing the data (nothing to save; the next run tokenizes again)"
        if topo.is_main:
            print(f"seqpar: {reason}", file=sys.stderr)
        return outcome("preempted", EXIT_PREEMPTED, reason)
    except KeyboardInterrupt:  # Ctrl-C twice: aborted on the spot, nothing saved since the newest checkpoint
        reason = "interrupted twice (Ctrl-C): aborted without saving; --resume auto continues from the newest checkpoint"
        if topo.is_main:
            print(f"\nseqpar: {reason}", file=sys.stderr)
        return outcome("failed", EXIT_INTERRUPTED, reason)
    except BaseException as e:
        outcome("failed", 1, f"{type(e).__name__}: {e}")
        raise
    # Everything is committed and recorded: a launcher tearing the job down now (torchrun SIGTERMs
    # the other ranks when one exits) must not turn this rank's status into "killed by SIGTERM"
    # while the interpreter shuts down (it restores the default action of signals it handles).
    for s in SIGNALS:
        if s == signal.SIGINT:  # Ctrl-C gets its old meaning back (a script of yours may go on after main())
            previous = StopSignal.install().previous(s)
            if previous is not None:
                signal.signal(s, previous)
        else:
            signal.signal(s, signal.SIG_IGN)
    import torch.distributed as dist

    if dist.is_initialized():  # its background threads must not be torn down by interpreter exit
        dist.destroy_process_group()
    return trainer.exit_code


EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report an interrupted command


def _newest_committed(trainer) -> str | None:
    """The newest checkpoint with its final name (committed) in the run's store, for the record of
    a run that ended on an error (a write still in flight is not counted)."""
    try:
        found = trainer.ckpt.store.list() if trainer is not None else []
    except (AttributeError, OSError):
        return None
    return found[-1].tag if found else None


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
