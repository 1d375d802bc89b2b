"""Checkpoint tool: ``python -m seqpar.ckpt list|inspect|verify|export``.

    python -m seqpar.ckpt list runs/x/checkpoints
    python -m seqpar.ckpt inspect runs/x/checkpoints/step00000100-micro0000
    python -m seqpar.ckpt verify runs/x/checkpoints            (every checkpoint; exit 1 if any fails)
    python -m seqpar.ckpt export runs/x/checkpoints/latest out/hf-model

``export`` writes a Hugging Face model directory (config.json + safetensors); under ZeRO-3 it
consolidates the per-rank parameter partitions. Runs on CPU, no process group needed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
import yaml

from seqpar.checkpoint.codec import load_tree
from seqpar.checkpoint.manager import CONFIG_FILE, TRAINER_STATE
from seqpar.checkpoint.store import LATEST, MARKER, CheckpointStore


def _resolve(path: Path) -> Path:
    """A checkpoint dir, or a checkpoints root / its ``latest`` file meaning the newest."""
    if path.name == LATEST and path.is_file():
        return path.parent / path.read_text().strip()
    if (path / LATEST).is_file() and not (path / MARKER).exists():
        return path / (path / LATEST).read_text().strip()
    return path


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def cmd_list(root: Path) -> int:
    store = CheckpointStore(root)
    rows = store.list()
    if not rows:
        print(f"no checkpoints in {root}")
        return 1
    latest = store.latest_hint()
    print(f"{'tag':<26} {'step':>8} {'micro':>5} {'MiB':>9}  status")
    for c in rows:
        status = "committed" if (c.path / MARKER).is_file() else "INCOMPLETE"
        mark = "  <- latest" if c.tag == latest else ""
        print(f"{c.tag:<26} {c.step:>8} {c.micro_step:>5} {_size(c.path) / 2**20:>9.1f}  {status}{mark}")
    return 0


def _elastic(path: Path, state: dict, cfg: dict) -> str:
    """Whether (and with what constraint) the checkpoint resumes on another layout."""
    from seqpar.engine.reshard import ELASTIC_KINDS, partial_grads_form

    if not (path / "rank00000" / "fragments.json").is_file():
        return "no: written before elastic resume"
    if state.get("optimizer_kind") not in ELASTIC_KINDS:
        return f"no: optimizer state {state.get('optimizer_kind')!r} cannot be resharded"
    if not state["micro_step"]:
        return "yes: resumable on another layout with the same global batch"
    if partial_grads_form(json.loads((path / "rank00000" / "grads.json").read_text())) is None:
        return "no: its partial gradients have no slice map (an older seqpar): resume on this layout"
    done = state["micro_step"] * cfg["train"]["micro_batch_size"] * state["topology"]["dp"]
    return (f"yes: same global batch, and micro_batch_size x dp must divide the {done} sequences "
            "done in the open window")


def cmd_inspect(path: Path) -> int:
    path = _resolve(path)
    state = json.loads((path / TRAINER_STATE).read_text())
    cfg = yaml.safe_load((path / CONFIG_FILE).read_text())
    manifest = CheckpointStore(path.parent).manifest(path)
    losses = state.get("losses", [])
    print(f"checkpoint  {path}")
    print(f"position    step {state['step']}, micro-step {state['micro_step']} "
          f"({'inside an accumulation window' if state['micro_step'] else 'at a step boundary'})")
    print(f"consumed    {state['consumed_samples']:,} samples, {state['consumed_tokens']:,} labelled tokens")
    print(f"layout      {state['topology']}")
    print("elastic     " + _elastic(path, state, cfg))
    print(f"model       {cfg['model']['arch']}, {cfg['model']['num_hidden_layers']} layers, "
          f"hidden {cfg['model']['hidden_size']}")
    print(f"versions    {state['versions']}, format {state['format_version']}, config hash {state['config_hash']}")
    print(f"files       {len(manifest['files'])}, {_size(path) / 2**20:.1f} MiB")
    if losses:
        print(f"loss        first {losses[0]:.4f}, last {losses[-1]:.4f} ({len(losses)} steps)")
    return 0


def cmd_verify(path: Path) -> int:
    store = CheckpointStore(path if not (path / MARKER).exists() else path.parent)
    targets = [path] if (path / MARKER).exists() or (path / "manifest.json").exists() else [c.path for c in store.list()]
    if not targets:
        print(f"no checkpoints in {path}")
        return 1
    failed = 0
    for t in targets:
        problems = store.verify(t)
        print(f"{'OK  ' if not problems else 'FAIL'} {t.name}" + "".join(f"\n     {p}" for p in problems))
        failed += bool(problems)
    return 1 if failed else 0


def consolidate_zero3(path: Path, cfg_model) -> dict[str, torch.Tensor]:
    """Full parameters from every rank's ZeRO-3 partitions (+ router buffers from rank 0)."""
    from seqpar.models.transformer import Transformer

    with torch.device("meta"):
        shapes = {n: p.shape for n, p in Transformer(cfg_model).named_parameters()}
    ranks = sorted(p for p in path.glob("rank*") if p.is_dir())
    shards = [load_tree(r / "model_shard") for r in ranks]
    out = {}
    for name, shape in shapes.items():
        flat = torch.cat([s[name].flatten() for s in shards])
        out[name] = flat[: shape.numel()].view(shape).clone()
    router = ranks[0] / "router.json"
    if router.exists():
        for key, value in load_tree(ranks[0] / "router").items():
            if key.endswith(".expert_bias"):
                out[key] = value
    return out


def cmd_export(path: Path, out: Path) -> int:
    from seqpar.config import ModelConfig
    from seqpar.models.hf import save_hf_checkpoint

    path = _resolve(path)
    problems = CheckpointStore(path.parent).verify(path)
    if problems:
        print("refusing to export a checkpoint that does not verify:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    if out.exists() and any(out.iterdir()):
        print(f"{out} exists and is not empty; choose a new directory", file=sys.stderr)
        return 1
    saved = yaml.safe_load((path / CONFIG_FILE).read_text())["model"]
    model_cfg = ModelConfig.model_validate({**saved, "hf_path": None})  # architecture as trained
    if (path / "model").is_dir():  # ZeRO 0-2: rank 0 already wrote the HF layout
        if out.exists():
            out.rmdir()
        shutil.copytree(path / "model", out)
    else:
        save_hf_checkpoint(consolidate_zero3(path, model_cfg), model_cfg, out)
    print(f"exported {path.name} -> {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m seqpar.ckpt", description="Inspect, verify and export seqpar checkpoints.")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, help_ in [("list", "checkpoints under a directory"), ("inspect", "one checkpoint's contents"),
                        ("verify", "sizes and sha256 of one or all checkpoints")]:
        sub.add_parser(name, help=help_).add_argument("path", type=Path)
    ex = sub.add_parser("export", help="write a Hugging Face model directory")
    ex.add_argument("path", type=Path)
    ex.add_argument("out", type=Path)
    a = p.parse_args(argv)
    if a.cmd == "export":
        return cmd_export(a.path, a.out)
    return {"list": cmd_list, "inspect": cmd_inspect, "verify": cmd_verify}[a.cmd](a.path)


if __name__ == "__main__":
    sys.exit(main())
