"""Trainer vs plain loop: seqpar's training step against the eager PyTorch loop a user would write,
same model, data and process, per sequence length (issue 11).

    python scripts/bench_train.py --device cpu                                  # tiny shape
    python scripts/bench_train.py --device cuda --model llama3.2-1b --seq-lens 4096,8192
    python scripts/bench_train.py --config my.yaml --train.micro_batch_size 2 --json rows.json
    python scripts/bench_train.py --device cuda --config configs/llama3.2-1b-long.yaml --longest   # issue 12

seqpar: a ``Trainer`` built from the config (DeepSpeed, its ZeRO stage and precision, packed varlen
attention, chunked cross-entropy); a step is ``Trainer.train_micro_batch`` until the optimizer step
closes the window (one call here: grad_accum_steps is 1).
plain: the same ``Transformer`` with the same config and init, ``[B, S]`` rows of one document each,
causal ``F.scaled_dot_product_attention``, full logits + ``F.cross_entropy`` (under ``torch.autocast``
bf16 on CUDA when train.precision is bf16, else fp32), ``clip_grad_norm_`` as train.grad_clip,
``torch.optim.AdamW`` (fused on CUDA). When that runs out of GPU memory (``--plain auto``, e.g. the 1B
shape at 128K), the loop a user writes next: ``torch.utils.checkpoint`` around every decoder layer
and a chunked cross-entropy (each chunk's logits recomputed in backward); the table says which ran.
``--variant train.deterministic=true`` (repeatable) also times the Trainer with those overrides, each
in its own process (process-wide settings such as deterministic algorithms apply from its start, and
a crash costs that row only), and prints each against the Trainer's own row (issue 11's
deterministic / fast ratio).
Both read the same passkey samples (``seqpar.data``, curriculum off: one document per row) with the
same micro-batch size, run ``--warmup`` steps, then time ``--steps`` steps (CUDA synchronized around
them); tokens/s counts every token of the batch. MFU = step FLOPs / (time x peak), FLOPs from
``seqpar.flops.step_flops`` (the trainer's count), peak from ``seqpar.metrics.peak_tflops`` or
``--peak-tflops``. Peak GiB: on CUDA the most allocated during the run above what was allocated
before it; on CPU the process RSS after it (indicative only: both runs live in one process).
The default config is the embedded tiny CPU default (configs/tiny-cpu.yaml).

``--longest``: the longest sequence the trainer can train on this device, by bisection over
data.seq_len (multiples of ``--granularity``, from ``--seq-lens``' first value up to ``--max-len``).
Each probe is a fresh process that builds the Trainer at that length and runs ``--warmup`` +
``--steps`` optimizer steps (seqpar only, no plain loop); it fits when the steps finish without
running out of memory and its peak stays within ``--memory-limit-gib`` (when given). Peak: on CUDA
the most allocated (``--memory-limit-gib`` also caps the allocator); on CPU the probe process's
maximum RSS (``wait4``), a real measurement the CPU test can bisect on.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# DeepSpeed 0.19.8 calls a collective torch has deprecated (as seqpar/train.py)
warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.*deprecated", category=FutureWarning)

# Llama-3.2-1B (random init): 1.24B parameters, tied 128K vocabulary
LLAMA_1B = {
    "model.arch": "llama", "model.vocab_size": 128256, "model.hidden_size": 2048,
    "model.intermediate_size": 8192, "model.num_hidden_layers": 16, "model.num_attention_heads": 32,
    "model.num_key_value_heads": 8, "model.tie_word_embeddings": True, "model.rope_theta": 500000.0,
    "model.max_position_embeddings": 131072, "train.micro_batch_size": 1,
}
PRESETS: dict[str, dict[str, Any]] = {"tiny": {}, "llama3.2-1b": LLAMA_1B}
DEFAULT_SEQ_LENS = {"tiny": "256,512", "llama3.2-1b": "4096,8192"}


@dataclass
class Row:
    """One sequence length. A side that ran out of GPU memory has None for its numbers."""

    seq_len: int
    seqpar_tok_s: float | None
    plain_tok_s: float | None
    ratio: float | None
    seqpar_mfu: float | None
    plain_mfu: float | None
    seqpar_peak_gib: float | None
    plain_peak_gib: float | None
    seqpar_step_s: float | None
    plain_step_s: float | None
    flops_per_step: float
    seqpar_loss0: float | None  # loss of the first step: equal up to kernel rounding (same model, init and data)
    plain_loss0: float | None
    plain_mode: str  # "eager", "checkpointed" (per-layer checkpoint + chunked CE) or "out of memory"
    variants: list[dict[str, Any]]  # --variant runs: {"variant", "tok_s", "vs_seqpar", "mfu", "peak_gib", "error"}


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="scripts/bench_train.py", description=__doc__.split("\n")[0], allow_abbrev=False,
                                epilog="Any config key can be overridden as --section.key value.")
    p.add_argument("--config", default=None, help="base YAML (default: the embedded tiny-cpu config)")
    p.add_argument("--model", default="tiny", choices=sorted(PRESETS), help="tiny: the config's own model")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--seq-lens", default=None, help="comma-separated (default: 256,512 tiny, 4096,8192 1B)")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps per run")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--peak-tflops", type=float, default=None, help="per-device peak for MFU (default: known GPUs)")
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--longest", action="store_true", help="bisect for the longest trainable sequence instead")
    p.add_argument("--max-len", type=int, default=2**21, help="--longest: upper end of the search")
    p.add_argument("--granularity", type=int, default=None, help="--longest: seq_len step (default 8192 CUDA, 64 CPU)")
    p.add_argument("--memory-limit-gib", type=float, default=None, help="--longest: a probe fits only under this peak")
    p.add_argument("--plain", default="auto", choices=["auto", "eager", "checkpointed"],
                   help="the baseline loop: eager (full logits), checkpointed (torch.utils.checkpoint per layer + "
                        "chunked CE, what a user writes when eager does not fit); auto: eager, checkpointed after "
                        "a CUDA out-of-memory")
    p.add_argument("--variant", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                   help="also time the Trainer with these config overrides (repeatable), e.g. "
                        "train.deterministic=true; printed against the Trainer's own row")
    p.add_argument("--doc-len", type=int, default=None,
                   help="--longest/--probe: pack documents of this many tokens into each row (same memory as one "
                        "document: the attention kernels are varlen; a fraction of the attention time)")
    p.add_argument("--write-config", default=None, metavar="PATH",
                   help="write the Trainer's config at the first of --seq-lens (or --probe) as YAML and exit: the "
                        "benchmarked run for seqpar/train.py --config PATH (e.g. with --logging.profile)")
    p.add_argument("--probe", type=int, default=None,
                   help="only the Trainer at this seq_len (no plain loop): one JSON line with s/step and peak")
    args, overrides = p.parse_known_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    if args.doc_len is not None and not (args.longest or args.probe):
        p.error("--doc-len is for --longest / --probe (the plain loop's rows hold one document each)")
    if args.doc_len is not None and args.doc_len < 64:
        p.error("--doc-len must be >= 64 (a passkey document needs room for its key and question)")
    try:
        args.variant = [(v, variant_overrides(v)) for v in args.variant]
    except ValueError as e:
        p.error(str(e))
    return args, overrides


def variant_overrides(text: str) -> list[str]:
    """``"train.deterministic=true,train.compile=true"`` -> ``--train.deterministic true --train.compile true``."""
    out: list[str] = []
    for item in text.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep or not key or "." not in key:
            raise ValueError(f"--variant {text!r}: write section.key=value[,section.key=value]")
        out += [f"--{key}", value]
    return out


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def base_config(args: argparse.Namespace, overrides: list[str]) -> dict[str, Any]:
    """The config file (default: the embedded tiny CPU one), the model preset, then the user's
    overrides; as a plain dict."""
    from seqpar.config import load_config

    first = ["--train.device", args.device, "--train.precision", "bf16" if args.device == "cuda" else "fp32"]
    for k, v in PRESETS[args.model].items():
        first += [f"--{k}", json.dumps(v)]
    return load_config(args.config, first + overrides).model_dump(mode="json")


def build_config(args: argparse.Namespace, base: dict[str, Any], seq_len: int, run_dir: Path):
    """``base`` with what the benchmark fixes: one passkey document per row of ``seq_len`` tokens,
    grad_accum_steps 1, no checkpoints, evaluation or resume."""
    from seqpar.config import validate_config

    d = copy.deepcopy(base)
    data, train, ck, log = d["data"], d["train"], d["checkpoint"], d["logging"]
    data.update(type="passkey", seq_len=seq_len, paths=[], eval_paths=[], tokenizer=None, eos_token=None)
    data["passkey"]["eval_samples"] = 0
    if "curriculum_samples" in data["passkey"]:  # packed shorter documents would not be one per row
        data["passkey"]["curriculum_samples"] = 0
    doc = getattr(args, "doc_len", None)
    if doc is not None and doc <= seq_len // 2:
        # the passkey curriculum packs seq_len // L documents of L tokens into sample i, L growing from
        # curriculum_start_len by (seq_len/2 - L) * i / curriculum_samples: so large a count keeps L fixed
        data.update(shuffle=False)
        data["passkey"].update(curriculum_samples=2**50, curriculum_start_len=doc)
    steps = args.warmup + args.steps
    train.update(max_steps=steps, warmup_steps=min(train["warmup_steps"], steps), grad_accum_steps=None,
                 global_batch_size=train["micro_batch_size"], eval_every=0)
    ck.update(at_end=False, every_steps=0, every_micro_batches=0, resume="none", keep_best=False, mirror=None,
              dir=None)
    log.update(run_dir=str(run_dir), log_every=steps, progress_bar=False, tensorboard="off",
               peak_tflops=args.peak_tflops)
    return validate_config(d, source="bench_train")


# -- measuring -------------------------------------------------------------------------------------
def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _mem_start(device) -> int:
    import torch

    gc.collect()
    if device.type != "cuda":
        return 0
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def _mem_peak(device, base: int) -> float:
    import torch

    from seqpar.metrics import memory_gib

    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated(device) - base) / 2**30
    return memory_gib(device)  # process RSS


def _timed(step: Callable[[int], None], warmup: int, steps: int, device) -> float:
    """Seconds for steps ``warmup .. warmup + steps - 1`` after the untimed ones."""
    for i in range(warmup):
        step(i)
    _sync(device)
    t0 = time.perf_counter()
    for i in range(warmup, warmup + steps):
        step(i)
    _sync(device)
    return time.perf_counter() - t0


def run_seqpar(cfg, topo, args) -> tuple[float, float, float]:
    """(seconds for the timed steps, peak GiB, first step's loss) of the Trainer's own step."""
    from seqpar.checkpoint.signals import StopSignal
    from seqpar.engine import Trainer

    base = _mem_start(topo.device)
    trainer = None
    # the trainer's own lines (its final progress record) go to stderr: stdout is the table's
    with contextlib.redirect_stdout(sys.stderr):
        try:
            trainer = Trainer(cfg, topo, config_path="bench_train")
            trainer.engine.train()

            def step(i: int) -> None:
                assert trainer.state.step == i and trainer.state.micro_step == 0
                while trainer.state.step == i:  # every micro-batch of the window; the last one steps
                    trainer.train_micro_batch()
                    if trainer.stop.received is not None:  # the Trainer catches SIGTERM (timeout's)
                        raise SystemExit(f"bench_train: stopped by {trainer.stop.describe()}")

            dt = _timed(step, args.warmup, args.steps, topo.device)
            peak = _mem_peak(topo.device, base)
            loss0 = trainer.state.losses[0]
        finally:
            if trainer is not None:
                with contextlib.suppress(Exception):  # a failed run's cleanup must not hide why it failed
                    trainer.ckpt.finish()
                    trainer.logger.close()
                    trainer.loader.close()
                    trainer.engine.destroy()
            StopSignal.install().restore()  # signals back to their defaults for what runs next
    return dt, peak, loss0  # the trainer goes with this frame (freed before the next run)


class CausalSDPA:
    """The model's attention hook as a plain loop has it: ``[B, H, S, d]`` causal SDPA, one
    document per row (the packed layout's ``meta`` is not used)."""

    def __init__(self, batch: int, seq_len: int):
        self.batch, self.seq_len = batch, seq_len

    def __call__(self, q, k, v, meta, scale: float):
        import torch.nn.functional as F

        t, h, d = q.shape
        q, k, v = (x.view(self.batch, self.seq_len, x.shape[1], d).transpose(1, 2) for x in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
        return out.transpose(1, 2).reshape(t, h, d)


def plain_chunked_ce(chunk: int):
    """The chunked cross-entropy a user writes when full logits do not fit: per chunk of tokens,
    logits -> ``F.cross_entropy`` (sum) under ``torch.utils.checkpoint``, so no chunk's logits are
    kept for backward. Returns the model head's ``(hidden, weight, labels, chunk) -> sum`` hook."""
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    from seqpar.data import IGNORE_INDEX

    def piece(h, w, y):
        return F.cross_entropy(F.linear(h, w).float(), y, ignore_index=IGNORE_INDEX, reduction="sum")

    def loss(h, w, y, _chunk):
        return sum(checkpoint(piece, h[i:i + chunk], w, y[i:i + chunk], use_reentrant=False)
                   for i in range(0, h.shape[0], chunk))

    return loss


def run_plain(cfg, device, loader, args, mode: str) -> tuple[float, float, float]:
    """(seconds for the timed steps, peak GiB, first step's loss) of the eager loop; ``mode``
    "checkpointed": every decoder layer under ``torch.utils.checkpoint`` and a chunked loss."""
    import torch
    import torch.nn.functional as F

    from seqpar.data import IGNORE_INDEX
    from seqpar.kernels import AttnMeta
    from seqpar.models import build_model

    base = _mem_start(device)
    t, b, s = cfg.train, cfg.train.micro_batch_size, cfg.data.seq_len
    model = build_model(cfg.model, seed=cfg.train.seed).to(device)
    model.train()
    model.set_attention(CausalSDPA(b, s))
    checkpointed = mode == "checkpointed"
    if checkpointed:
        model.activation_checkpointing = True  # torch.utils.checkpoint(layer, ..., use_reentrant=False)
        model.set_loss(plain_chunked_ce(t.loss_chunk_size))
    # a fixed layout: spares the model's own boundary search (a device sync) that SDPA ignores
    meta = AttnMeta(torch.tensor([0, b * s], device=device), s)
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=t.betas, eps=t.eps, weight_decay=t.weight_decay,
                            **({"fused": True} if device.type == "cuda" else {}))
    amp = device.type == "cuda" and t.precision == "bf16"
    vocab = cfg.model.vocab_size
    loss0: list[float] = []

    def step(i: int) -> None:
        batch = loader.micro_batch(i, 0)
        ids, pos, labels = (x.to(device, non_blocking=True) for x in
                            (batch.input_ids, batch.position_ids, batch.labels))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            if checkpointed:
                out = model(ids, pos, labels, meta)
                loss = out.loss_sum / (labels != IGNORE_INDEX).sum()
            else:
                out = model(ids, pos, None, meta)
                loss = F.cross_entropy(out.logits.reshape(-1, vocab), labels.reshape(-1), ignore_index=IGNORE_INDEX)
            if cfg.model.moe is not None:
                loss = loss + out.aux_loss
        loss.backward()
        if i == 0:
            loss0.append(loss.item())  # one sync, in the warmup unless --warmup 0
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    dt = _timed(step, args.warmup, args.steps, device)
    return dt, _mem_peak(device, base), loss0[0]


def _free(device) -> None:
    """What an out-of-memory run left: its frames are gone once the exception is dropped."""
    import torch

    gc.collect()
    if device.type == "cuda":
        with contextlib.suppress(Exception):  # after a sticky CUDA error this raises too
            torch.cuda.empty_cache()


def measure_plain(cfg, device, loader, args) -> tuple[str, tuple[float, float, float] | None]:
    """The baseline in ``--plain``'s mode; auto falls back to checkpointed after a CUDA OOM."""
    import torch

    modes = ["eager", "checkpointed"] if args.plain == "auto" else [args.plain]
    for mode in modes:
        try:
            return mode, run_plain(cfg, device, loader, args, mode)
        except torch.OutOfMemoryError:
            print(f"bench_train: seq_len {cfg.data.seq_len}: plain loop ({mode}) ran out of memory",
                  file=sys.stderr, flush=True)
        _free(device)
    return "out of memory", None


def measure_seqpar(cfg, topo, args) -> tuple[float, float, float] | None:
    """The Trainer's (seconds, peak GiB, first loss), or None after a CUDA out-of-memory."""
    import torch

    try:
        return run_seqpar(cfg, topo, args)
    except torch.OutOfMemoryError:
        print(f"bench_train: seq_len {cfg.data.seq_len}: seqpar Trainer ran out of memory", file=sys.stderr, flush=True)
    _free(topo.device)
    return None


def measure_variant(args, overrides: list[str], extra: list[str], s: int) -> tuple[float | None, float | None, str]:
    """A ``--variant``: the Trainer with ``extra`` overrides in a fresh process (``--probe``), so
    process-wide settings apply from the start (train.deterministic's cuBLAS workspace and
    deterministic algorithms, as seqpar/train.py sets them) and a crash (a compiler error, a
    sticky CUDA error) costs this row only. (s/step, peak GiB, "" or why it did not run)."""
    p = run_probe(args, overrides + extra, s)
    return p.step_s, p.peak_gib, p.why if not p.fits else ""


# -- the run ---------------------------------------------------------------------------------------
def card_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"CPU {name} ({cores} cores, {torch.get_num_threads()} threads)"


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(header: list[str], rows: list[Row], formula: str) -> str:
    columns = ("seq_len", "seqpar tok/s", "plain tok/s", "ratio", "seqpar MFU", "plain MFU", "seqpar peak GiB",
               "plain peak GiB", "plain loop")
    lines = [*header, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append(f"| {r.seq_len} | {_fmt(r.seqpar_tok_s, ',.0f')} | {_fmt(r.plain_tok_s, ',.0f')} | "
                     f"{_fmt(r.ratio, '.2f')} | {_fmt(r.seqpar_mfu, '.1%')} | {_fmt(r.plain_mfu, '.1%')} | "
                     f"{_fmt(r.seqpar_peak_gib, '.2f')} | {_fmt(r.plain_peak_gib, '.2f')} | {r.plain_mode} |")
    if any(r.variants for r in rows):
        lines += ["", "| seq_len | seqpar variant | tok/s | x seqpar | MFU | peak GiB | note |",
                  "|---|---|---|---|---|---|---|"]
        for r in rows:
            for v in r.variants:
                note = (v.get("error") or "").replace("|", "/")
                lines.append(f"| {r.seq_len} | {v['variant']} | {_fmt(v['tok_s'], ',.0f')} | "
                             f"{_fmt(v['vs_seqpar'], '.2f')} | {_fmt(v['mfu'], '.1%')} | {_fmt(v['peak_gib'], '.2f')} | "
                             f"{note} |")
    return "\n".join([*lines, "", formula])


# -- longest trainable sequence (--longest) -----------------------------------------------------------
@dataclass
class Probe:
    seq_len: int
    fits: bool
    peak_gib: float | None
    step_s: float | None
    why: str  # "" when it fits; "out of memory", "over the memory limit", or the error line
    docs_per_row: int | None = None  # documents packed into a timed row (--doc-len), None: not known


PROBE_MARK = "bench_train probe: "


def probe_child(args: argparse.Namespace, overrides: list[str], tmp: Path) -> int:
    """One ``--longest`` probe (a fresh process): build the Trainer at ``args.probe`` tokens, run
    the steps, print a ``PROBE_MARK`` JSON line (a CUDA out-of-memory is a result, not a crash)."""
    import torch

    from seqpar.metrics import quiet_deepspeed
    from seqpar.parallel import init_topology, pick_device

    from seqpar.rng import set_deterministic

    s = args.probe
    cfg = build_config(args, base_config(args, overrides), s, tmp / "run")
    set_deterministic(cfg.train.deterministic)  # as seqpar/train.py: before any CUDA work
    quiet_deepspeed(announce=lambda line: print(line, file=sys.stderr, flush=True))
    device = pick_device(args.device)
    if device.type == "cuda" and args.memory_limit_gib:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_limit_gib * 2**30 / total), device)
    topo = init_topology(1, 1, device, "auto")
    from seqpar.data import build_dataset

    # documents in the first timed row (1 unless --doc-len): the record says what was measured
    row = build_dataset(cfg.data, tmp / "cache")[args.warmup]
    result = {"seq_len": s, "fits": True, "peak_gib": None, "step_s": None, "why": "",
              "docs_per_row": int((row["position_ids"] == 0).sum())}
    try:
        dt, peak, _ = run_seqpar(cfg, topo, args)
        result.update(peak_gib=peak if device.type == "cuda" else None, step_s=dt / args.steps)
    except torch.OutOfMemoryError:
        result.update(fits=False, why="out of memory")
    print(PROBE_MARK + json.dumps(result), flush=True)
    return 0


def run_probe(args: argparse.Namespace, overrides: list[str], s: int) -> Probe:
    import subprocess

    argv = [sys.executable, __file__, "--probe", str(s), "--device", args.device, "--model", args.model,
            "--steps", str(args.steps), "--warmup", str(args.warmup)]
    for flag, value in (("--config", args.config), ("--memory-limit-gib", args.memory_limit_gib),
                        ("--peak-tflops", args.peak_tflops), ("--doc-len", args.doc_len)):
        if value is not None:
            argv += [flag, str(value)]
    # the child's temporary files go in a directory this process removes: a probe the OOM killer
    # ends (SIGKILL) cannot clean up after itself
    with tempfile.TemporaryFile("w+") as fo, tempfile.TemporaryFile("w+") as fe, \
            scratch("probe") as tmp:
        # the child's own process group: not the rendezvous this process (--variant) may hold
        env = {k: v for k, v in os.environ.items()
               if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
        if "TORCHINDUCTOR_CACHE_DIR" not in env:  # torch's compile cache stays where it was (warm)
            from torch._inductor.runtime.cache_dir_utils import cache_dir

            env["TORCHINDUCTOR_CACHE_DIR"] = cache_dir()
        env["TMPDIR"] = str(tmp)
        child = subprocess.Popen(argv + overrides, stdout=fo, stderr=fe, text=True, env=env)
        _, status, usage = os.wait4(child.pid, 0)  # reaped here, with the child's resource usage
        child.returncode = os.waitstatus_to_exitcode(status)
        fo.seek(0)
        fe.seek(0)
        out, err = fo.read(), fe.read()
    lines = [line[len(PROBE_MARK):] for line in out.splitlines() if line.startswith(PROBE_MARK)]
    if not lines:  # killed (the kernel's OOM killer on CPU) or failed: say why, count it as not fitting
        last = (err.strip().splitlines() or [f"exit {child.returncode}"])[-1]
        return Probe(s, False, None, None, last[:200])
    r = json.loads(lines[-1])
    peak = r["peak_gib"]
    if peak is None:  # CPU: the probe process's maximum resident set (kilobytes on Linux)
        peak = usage.ru_maxrss * 1024 / 2**30
    p = Probe(s, r["fits"], peak, r["step_s"], r["why"], r.get("docs_per_row"))
    if p.fits and args.memory_limit_gib is not None and peak is not None and peak > args.memory_limit_gib:
        p.fits, p.why = False, f"over the memory limit ({peak:.2f} > {args.memory_limit_gib:g} GiB)"
    return p


def longest(args: argparse.Namespace, overrides: list[str]) -> int:
    g = args.granularity or (8192 if args.device == "cuda" else 64)
    lo_start = int((args.seq_lens or str(g)).split(",")[0])
    lo_start = max(g, lo_start // g * g)
    probes: list[Probe] = []

    def fits(s: int) -> bool:
        p = run_probe(args, overrides, s)
        probes.append(p)
        state = "fits" if p.fits else f"does not fit ({p.why})"
        peak = f", peak {p.peak_gib:.2f} GiB" if p.peak_gib is not None else ""
        print(f"bench_train: {s} tokens: {state}{peak}", file=sys.stderr, flush=True)
        return p.fits

    best = None
    if fits(lo_start):
        best = lo_start
        hi = lo_start * 2
        while hi <= args.max_len and fits(hi):  # doubling until one does not fit
            best, hi = hi, hi * 2
        hi = min(hi, args.max_len + g)
        while hi - best > g:  # bisection between the longest that fits and the shortest that does not
            mid = (best + hi) // 2 // g * g
            if mid <= best:
                break
            if fits(mid):
                best = mid
            else:
                hi = mid
    import torch

    from seqpar.parallel import pick_device

    print(f"# seqpar bench_train --longest | {card_name(pick_device(args.device))} | torch {torch.__version__} | "
          f"{datetime.date.today().isoformat()} | granularity {g}"
          + (f" | rows packed with documents of {args.doc_len} tokens" if args.doc_len else "")
          + (f" | memory limit {args.memory_limit_gib:g} GiB" if args.memory_limit_gib else ""))
    print("| seq_len | fits | peak GiB | s/step |\n|---|---|---|---|")
    for p in sorted(probes, key=lambda p: p.seq_len):
        print(f"| {p.seq_len} | {'yes' if p.fits else 'no: ' + p.why} | {_fmt(p.peak_gib, '.2f')} | {_fmt(p.step_s, '.3g')} |")
    if best is None:
        print(f"longest trainable sequence: none (even {lo_start} tokens does not fit)")
        return 1
    peak = next(p.peak_gib for p in probes if p.seq_len == best)
    capped = " = --max-len, the end of the search" if best + g > args.max_len else ""
    print(f"longest trainable sequence: {best} tokens (peak {_fmt(peak, '.2f')} GiB){capped}")
    if args.json:
        Path(args.json).write_text(json.dumps({"longest": best, "probes": [asdict(p) for p in probes]}, indent=1) + "\n")
    return 0


@contextlib.contextmanager
def scratch(kind: str) -> Iterator[Path]:
    """Run directories and data caches of one invocation, removed when it ends (also on error)."""
    with tempfile.TemporaryDirectory(prefix=f"seqpar-bench-{kind}-", ignore_cleanup_errors=True) as d:
        yield Path(d)


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("DS_ACCELERATOR", args.device)
    if args.write_config:
        return write_config(args, overrides)
    if args.probe is not None:
        with scratch("probe") as tmp:
            return probe_child(args, overrides, tmp)
    if args.longest:
        return longest(args, overrides)
    if int(os.environ.get("WORLD_SIZE", "1")) != 1:
        sys.exit("bench_train.py runs as one process (world size 1): start it with python, not a launcher")
    with scratch("train") as tmp:
        return bench(args, overrides, tmp)


def seq_lengths(args: argparse.Namespace) -> list[int]:
    """``--seq-lens``, or the model's default lengths."""
    return [int(x) for x in (args.seq_lens or DEFAULT_SEQ_LENS[args.model]).split(",") if x.strip()]


def write_config(args: argparse.Namespace, overrides: list[str]) -> int:
    """``--write-config``: the config the Trainer would run with, as a file ``seqpar/train.py`` takes."""
    import yaml

    from seqpar.config import ConfigError

    s = args.probe or seq_lengths(args)[0]
    try:
        cfg = build_config(args, base_config(args, overrides), s, Path("runs") / f"bench_train-{s}")
    except ConfigError as e:
        print(f"bench_train: {e}", file=sys.stderr)
        return 2
    Path(args.write_config).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    print(f"bench_train: wrote {args.write_config}: the Trainer's run at {s} tokens ({cfg.train.max_steps} steps; "
          f"python seqpar/train.py --config {args.write_config} [--section.key value ...])", flush=True)
    return 0


def bench(args: argparse.Namespace, overrides: list[str], tmp: Path) -> int:
    """The table: each sequence length through the trainer and the plain loop, in this process."""
    seq_lens = seq_lengths(args)

    import torch
    import torch.distributed as dist

    from seqpar.config import ConfigError
    from seqpar.data import GlobalSampler, MicroBatchLoader, build_dataset
    from seqpar.flops import step_flops
    from seqpar.metrics import peak_tflops, quiet_deepspeed
    from seqpar.parallel import init_topology, pick_device

    try:
        base = base_config(args, overrides)
        cfgs = {s: build_config(args, base, s, tmp / f"seq{s}") for s in seq_lens}
        for i, (_, extra) in enumerate(args.variant):  # each variant's config is valid before any run
            for s in seq_lens:
                build_config(args, base_config(args, overrides + extra), s, tmp / f"seq{s}-v{i}")
    except ConfigError as e:
        print(f"bench_train: {e}", file=sys.stderr)
        return 2
    from seqpar.rng import set_deterministic

    set_deterministic(base["train"]["deterministic"])  # as seqpar/train.py: before any CUDA work
    quiet_deepspeed(announce=lambda line: print(line, file=sys.stderr, flush=True))
    device = pick_device(args.device)
    topo = init_topology(1, 1, device, "auto")  # gloo on CPU, nccl on CUDA, 127.0.0.1 and a free port
    peak = peak_tflops(device, args.peak_tflops)

    def per_second(result, tokens: int) -> tuple[float | None, float | None]:  # tok/s, MFU
        if result is None:
            return None, None
        return tokens / result[0], (flops / result[0] / (peak * 1e12) if peak else None)

    rows: list[Row] = []
    for s, cfg in cfgs.items():
        b = cfg.train.micro_batch_size
        dataset = build_dataset(cfg.data, tmp / "cache")  # the trainer's data: same samples, same order
        loader = MicroBatchLoader(dataset, GlobalSampler(len(dataset), cfg.data.seed, cfg.data.shuffle), b, 0, 1, 1)
        timed = [loader.micro_batch(i, 0) for i in range(args.warmup, args.warmup + args.steps)]
        pos = torch.cat([x.position_ids for x in timed])
        if bool((pos[:, 0] != 0).any()) or int((pos == 0).sum()) != pos.shape[0]:
            raise SystemExit("bench_train: the data is not one document per row (the plain loop needs that)")
        flops = sum(step_flops(cfg.model, x.position_ids) for x in timed)
        tokens = args.steps * b * s
        print(f"bench_train: seq_len {s}: plain loop", file=sys.stderr, flush=True)
        plain_mode, plain = measure_plain(cfg, device, loader, args)
        print(f"bench_train: seq_len {s}: seqpar Trainer", file=sys.stderr, flush=True)
        ours = measure_seqpar(cfg, topo, args)
        (ours_tok, ours_mfu), (plain_tok, plain_mfu) = per_second(ours, tokens), per_second(plain, tokens)
        extra = []
        if args.variant:
            _free(device)  # this process's cached GPU blocks back to the driver: the variants' processes need them
        for name, more in args.variant:
            print(f"bench_train: seq_len {s}: seqpar Trainer, {name} (own process)", file=sys.stderr, flush=True)
            step_s, v_peak, why = measure_variant(args, overrides, more, s)
            v_tok, v_mfu = per_second((step_s * args.steps, v_peak) if step_s else None, tokens)
            extra.append({"variant": name, "tok_s": v_tok, "mfu": v_mfu, "peak_gib": v_peak,
                          "vs_seqpar": v_tok / ours_tok if v_tok and ours_tok else None, "error": why or None})
        rows.append(Row(s, ours_tok, plain_tok, ours_tok / plain_tok if ours_tok and plain_tok else None,
                        ours_mfu, plain_mfu, ours and ours[1], plain and plain[1], ours and ours[0] / args.steps,
                        plain and plain[0] / args.steps, flops / args.steps, ours and ours[2], plain and plain[2],
                        plain_mode, extra))

    import deepspeed

    from seqpar.models import Transformer, count_parameters

    cfg = next(iter(cfgs.values()))
    m = cfg.model
    with torch.device("meta"):
        n_params = count_parameters(Transformer(m))[0]
    machine = (f"# seqpar bench_train | {card_name(device)} | torch {torch.__version__} | deepspeed "
               f"{deepspeed.__version__} | {datetime.date.today().isoformat()}")
    shape = (f"# model {m.arch}: {m.num_hidden_layers} layers, hidden {m.hidden_size}, heads "
             f"{m.num_attention_heads}/{m.kv_heads} kv, vocab {m.vocab_size}, {n_params / 1e6:,.2f}M params | "
             f"micro-batch {cfg.train.micro_batch_size} | {cfg.train.precision} | seqpar ZeRO-"
             f"{cfg.parallel.zero_stage} | {args.steps} timed steps after {args.warmup} warmup")
    header = [machine, shape]
    formula = ("MFU = step FLOPs / (step time x peak), step FLOPs = T x 6 x N_active + 6 x L x H x d x sum(n_doc^2) "
               "(seqpar/flops.py)" + (f", peak {peak:g} TFLOP/s" if peak else
                                      ": not shown, no peak TFLOP/s known for this device (--peak-tflops)")
               + "; ratio = seqpar tok/s / plain tok/s; plain loop: eager (full logits) or checkpointed "
               "(torch.utils.checkpoint per layer + chunked CE, after eager ran out of memory); peak GiB: "
               + ("max allocated during the run" if device.type == "cuda" else "process RSS after the run (CPU)"))
    print(table(header, rows, formula), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header, "formula": formula,
                                               "rows": [asdict(r) for r in rows]}, indent=1) + "\n")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
