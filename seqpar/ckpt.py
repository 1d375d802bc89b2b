"""Checkpoint tool: ``python -m seqpar.ckpt list|inspect|verify|export``.

    python -m seqpar.ckpt list runs/x                        (a run dir: its checkpoints/)
    python -m seqpar.ckpt inspect runs/x/checkpoints         (the newest; verifies it too)
    python -m seqpar.ckpt verify runs/x/checkpoints          (every checkpoint; exit 1 if any fails)
    python -m seqpar.ckpt export runs/x/checkpoints/latest out/hf-model

Every command takes a run dir, a checkpoints root (``list``/``verify``: all, ``inspect``/``export``:
the newest), one checkpoint dir, or a ``latest`` file. ``export`` writes a Hugging Face model
directory (config.json + safetensors) from the files the manifest lists and verify checked; under
ZeRO-3 it consolidates the per-rank parameter partitions. Runs on CPU, no process group needed.
A checkpoint is untrusted input: bad content gives one line and exit status 1 (2: bad arguments).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

# torch (and what imports it: the codec, the manager) is imported where a command needs it, so
# `--help` and argument errors answer at once; the light modules below import neither.
from seqpar.checkpoint.store import LATEST, MARKER, parse_tag
from seqpar.checkpoint.verify import (NotACheckpoint, is_checkpoint_dir, load_manifest, read_latest,
                                      resolve_checkpoints, safe_member, verify_checkpoint)

if TYPE_CHECKING:
    import torch

# Tokenizer files exported next to the weights when a checkpoint has them (top level or tokenizer/)
TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")


class CliError(Exception):
    """One line for the user, and the exit status."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def _targets(path: Path, newest: bool) -> list[Path]:
    """Checkpoint dirs ``path`` means: itself, the one ``latest`` names, or a root's (newest) ones."""
    try:
        found = resolve_checkpoints(path, newest)
    except NotACheckpoint as e:
        raise CliError(str(e), e.code) from None
    if newest and len(found) == 1 and not is_checkpoint_dir(path) and path.name != LATEST:
        root = found[0].parent
        if os.path.lexists(root / LATEST) and read_latest(root) != found[0].name:
            # a hint only: a resume may have moved that one aside
            print(f"{root / LATEST} names no checkpoint here; using the newest, {found[0].name}", file=sys.stderr)
    return found


def _size(path: Path) -> int:
    """Bytes of the regular files under ``path`` (symlinks are not followed)."""
    total = 0
    for d, _, files in os.walk(path):
        for f in files:
            st = os.lstat(os.path.join(d, f))
            total += st.st_size if stat.S_ISREG(st.st_mode) else 0
    return total


def _without_name(problem: str, name: str) -> str:
    return problem.removeprefix(f"{name}: ")


def cmd_list(path: Path) -> int:
    """One row per checkpoint; problems found without hashing (fast); 0 unless none found."""
    rows = []
    for ck in _targets(path, newest=False):
        manifest, _ = load_manifest(ck)
        pos = manifest.position.consumed_samples if manifest is not None and manifest.position else None
        problems = [_without_name(p, ck.name) for p in verify_checkpoint(ck, check_hashes=False)]
        if not problems:
            status = "committed"
        elif problems[0].startswith(f"no {MARKER}"):
            status = "INCOMPLETE"
        else:
            status = "FAIL: " + problems[0] + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else "")
        latest = " <- latest" if read_latest(ck.parent) == ck.name else ""
        parsed = parse_tag(ck.name)
        rows.append((ck.name, parsed[0] if parsed else "?", pos, _size(ck) / 2**20, status + latest))
    with_pos = any(r[2] is not None for r in rows)
    print(f"{'tag':<26} {'step':>8}" + (f" {'samples':>10}" if with_pos else "") + f" {'MiB':>9}  status")
    for tag, step, pos, mib, status in rows:
        col = f" {pos if pos is not None else '-':>10}" if with_pos else ""
        print(f"{tag:<26} {step:>8}{col} {mib:>9.1f}  {status}")
    return 0


def _read(ck: Path, name: str, parse: Callable[[str], Any]) -> Any:
    """A small file of the checkpoint, through ``safe_member``; ``CliError`` with the reason."""
    try:
        f = safe_member(ck, name)
        if not f.is_file():
            raise CliError(f"cannot read {name}: missing")
        return parse(f.read_text())
    except CliError:
        raise
    except (OSError, ValueError, yaml.YAMLError, RecursionError) as e:
        raise CliError(f"cannot read {name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _elastic(path: Path, state: dict, cfg: dict) -> str:
    """Whether (and with what constraint) the checkpoint resumes on another layout."""
    if not (path / "rank00000" / "fragments.json").is_file():
        return "no: written before elastic resume"
    copies = state["topology"].get("ep", 1) if state.get("optimizer_kind") in ("torch", "unfused16") else 1
    if any(not (path / f"rank{r:05d}" / "fragments.json").is_file() for r in range(1, copies)):
        # ZeRO-0 with split experts: ranks 0..P-1 each save one expert slice's optimizer copy
        return "no: ZeRO-0 with experts split over ranks, saved with rank 0's optimizer state only: resume on this layout"
    from seqpar.engine.reshard import ELASTIC_KINDS, partial_grads_form  # imports DeepSpeed: only when needed

    if state.get("optimizer_kind") not in ELASTIC_KINDS:
        return f"no: optimizer state {state.get('optimizer_kind')!r} cannot be resharded"
    if not state["micro_step"]:
        return "yes: resumable on another layout with the same global batch"
    if partial_grads_form(_read(path, "rank00000/grads.json", json.loads)) is None:
        return "no: its partial gradients have no slice map (an older seqpar): resume on this layout"
    done = state["micro_step"] * cfg["train"]["micro_batch_size"] * state["topology"]["dp"]
    return (f"yes: same global batch, and micro_batch_size x dp must divide the {done} sequences "
            "done in the open window")


def _show(label: str, text: Callable[[], str]) -> None:
    """Print one line; a field the (untrusted) files lack or mistype shows as unreadable."""
    try:
        print(f"{label:<11} {text()}")
    except (CliError, KeyError, IndexError, TypeError, ValueError, AttributeError, OSError) as e:
        print(f"{label:<11} unreadable ({type(e).__name__}: {e})")


def cmd_inspect(path: Path) -> int:
    """What the newest (or given) checkpoint holds, then whether it verifies (sha256 included);
    1 when it does not verify or its trainer state / config cannot be parsed."""
    from seqpar.checkpoint.manager import CONFIG_FILE, TRAINER_STATE

    ck = _targets(path, newest=True)[0]
    print(f"checkpoint  {ck}")
    readable = True
    try:
        state = _read(ck, TRAINER_STATE, json.loads)
        cfg = _read(ck, CONFIG_FILE, yaml.safe_load)
    except CliError as e:
        print(e)
        readable = False
    manifest, _ = load_manifest(ck)
    if readable:
        losses = state.get("losses", []) if isinstance(state, dict) else []
        lines = [
            ("position", lambda: f"step {state['step']}, micro-step {state['micro_step']} "
                                 f"({'inside an accumulation window' if state['micro_step'] else 'at a step boundary'})"),
            ("consumed", lambda: f"{state['consumed_samples']:,} samples, {state['consumed_tokens']:,} labelled tokens"),
            ("layout", lambda: f"{state['topology']}"),
            ("elastic", lambda: _elastic(ck, state, cfg)),
            ("model", lambda: f"{cfg['model']['arch']}, {cfg['model']['num_hidden_layers']} layers, "
                              f"hidden {cfg['model']['hidden_size']}"),
            ("versions", lambda: f"{state['versions']}, format {state['format_version']}, "
                                 f"config hash {state['config_hash']}"),
        ]
        moe = (cfg.get("model") or {}).get("moe") if isinstance(cfg, dict) else None
        if moe:
            lines.append(("experts", lambda: _expert_assignment(int(moe["num_experts"]), int(state["topology"].get("ep", 1)),
                                                                int(state["topology"]["world_size"]))))
        if losses:
            lines.append(("loss", lambda: f"first {losses[0]:.4f}, last {losses[-1]:.4f} ({len(losses)} steps)"))
        elif isinstance(state, dict) and state.get("last_loss") is not None:  # newer trainer states
            lines.append(("loss", lambda: f"first {state['first_loss']:.4f}, last {state['last_loss']:.4f}"))
        for label, text in lines:
            _show(label, text)
    if manifest is not None:
        print(f"files       {len(manifest.files)}, {_size(ck) / 2**20:.1f} MiB")
        parts = _sizes_by_component(manifest.files)
        print("by part     " + ", ".join(f"{name} {n / 2**20:.2f} MiB" for name, n in parts.items()))
    problems = verify_checkpoint(ck)
    print("verified: OK" if not problems else "verified: FAIL" + "".join(f"\n  {p}" for p in problems))
    return 0 if not problems and readable else 1


def _expert_assignment(experts: int, ep: int, world: int) -> str:
    """Which rank holds which experts (expert parallelism: consecutive EP groups of ``ep`` ranks)."""
    if ep <= 1:
        return f"{experts} per MoE layer, every rank holds all of them"
    per = experts // ep
    held = "; ".join(f"ranks {','.join(str(r) for r in range(i, world, ep))}: experts {i * per}-{(i + 1) * per - 1}"
                     for i in range(ep))
    return f"{experts} per MoE layer split over {ep} ranks ({held})"


def _component(rel: str) -> str:
    """Which part of the training state a checkpoint file belongs to (for sizes)."""
    top, _, rest = rel.partition("/")
    if top in ("model", "adapter", "tokenizer", "qweights"):
        return {"model": "model weights", "adapter": "adapters (trainable tensors)", "tokenizer": "tokenizer",
                "qweights": "model weights (Q-GaLore: INT8 codes + scales)"}[top]
    if top.startswith("rank"):
        stem = rest.split(".")[0].split("/")[0]
        return {"optimizer": "optimizer", "model_shard": "model weights", "grads": "partial gradients",
                "qgrads": "partial gradients",
                "fragments": "optimizer", "router": "router"}.get(stem, "rank state (rng, counters)")
    return "trainer state and config"


def _sizes_by_component(files: dict) -> dict[str, int]:
    out: dict[str, int] = {}
    for rel, rec in files.items():
        name = _component(rel)
        out[name] = out.get(name, 0) + int(rec.size)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def cmd_verify(path: Path) -> int:
    failed = 0
    for t in _targets(path, newest=False):
        problems = verify_checkpoint(t)
        print(f"{'OK  ' if not problems else 'FAIL'} {t.name}" + "".join(f"\n     {p}" for p in problems))
        failed += bool(problems)
    return 1 if failed else 0


def consolidate_zero3(path: Path, cfg_model) -> dict[str, torch.Tensor]:
    """Full parameters from every rank's ZeRO-3 partitions (+ router buffers from rank 0)."""
    import torch

    from seqpar.checkpoint.codec import load_tree
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


def _copy_checked(src: Path, dst: Path, sha256: str) -> None:
    """Copy a verified file, hashing what is read: a file changed since ``verify`` aborts the export."""
    h = hashlib.sha256()
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as fin, open(dst, "xb") as fout:
        while block := fin.read(1 << 24):
            h.update(block)
            fout.write(block)
        fout.flush()
        os.fsync(fout.fileno())
    if h.hexdigest() != sha256:
        raise CliError(f"{src} changed after it was verified; export aborted")


def _adapted_model(ck: Path, files: dict):
    """A LoRA checkpoint's model: the base it names (its identity checked), with the saved
    trainable tensors loaded."""
    from safetensors.torch import load_file

    from seqpar.checkpoint.manager import CONFIG_FILE
    from seqpar.config import ModelConfig
    from seqpar.models import build_model
    from seqpar.models.lora import ADAPTER_FILE, BASE_FILE, base_identity, check_base_identity, load_trainable_state_dict

    cfg = _read(ck, CONFIG_FILE, yaml.safe_load)
    model_cfg = ModelConfig.model_validate(cfg["model"])
    saved = json.loads(safe_member(ck, f"adapter/{BASE_FILE}").read_text())
    seed = int(cfg["train"].get("seed", 0))
    check_base_identity(saved, base_identity(model_cfg, seed), str(ck))
    model = build_model(model_cfg, seed=seed)
    where = safe_member(ck, f"adapter/{ADAPTER_FILE}")
    load_trainable_state_dict(model, load_file(str(where)), str(where))
    return model, model_cfg


def cmd_export(path: Path, out: Path, peft: bool = False) -> int:
    from seqpar.checkpoint.manager import CONFIG_FILE, TRAINER_STATE
    from seqpar.config import ModelConfig
    from seqpar.models.hf import save_hf_checkpoint

    ck = _targets(path, newest=True)[0]
    problems = verify_checkpoint(ck)
    if problems:
        print("refusing to export a checkpoint that does not verify:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    if os.path.lexists(out) and (not out.is_dir() or out.is_symlink() or any(out.iterdir())):
        print(f"{out} exists and is not empty; choose a new directory", file=sys.stderr)
        return 1
    manifest, _ = load_manifest(ck)
    files = manifest.files
    # only files the manifest lists (and verify just checked), by their relative names
    model = {rel.removeprefix("model/"): rel for rel in files if rel.startswith("model/")}
    tokenizer = {rel.split("/")[-1]: rel for rel in files
                 if (rel.startswith(f"{TOKENIZER_DIR}/") and rel.count("/") == 1) or rel in TOKENIZER_FILES}
    adapters = any(rel.startswith("adapter/") for rel in files)
    if peft and not adapters:
        print(f"{ck.name} holds no LoRA adapters (model.lora was not set): export without --peft", file=sys.stderr)
        return 1
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        hf = stage / "hf"
        if adapters:  # LoRA: the adapter alone (PEFT), or merged into the base it names
            from seqpar.models.lora import merged_state_dict, save_peft_adapter

            adapted, model_cfg = _adapted_model(ck, files)
            if peft:
                save_peft_adapter(adapted, hf, base_model=str(model_cfg.hf_path) if model_cfg.hf_path else None)
            else:
                save_hf_checkpoint(merged_state_dict(adapted), model_cfg.model_copy(update={"lora": None}), hf)
        elif any(rel.startswith("qweights/") for rel in files):  # Q-GaLore: INT8 codes dequantized
            import torch
            from safetensors.torch import load_file

            from seqpar.models.transformer import Transformer
            from seqpar.optim.qgalore import QWEIGHTS_DIR, QWEIGHTS_FILE, expand_state_dict

            saved_cfg = _read(ck, CONFIG_FILE, yaml.safe_load)
            model_cfg = ModelConfig.model_validate({**saved_cfg["model"], "hf_path": None})
            dtype = torch.bfloat16 if saved_cfg["train"].get("precision") == "bf16" else torch.float32
            with torch.device("meta"):
                like = Transformer(model_cfg).to(dtype).state_dict()
            tensors = load_file(str(safe_member(ck, f"{QWEIGHTS_DIR}/{QWEIGHTS_FILE}")))
            state = _read(ck, TRAINER_STATE, json.loads) if TRAINER_STATE in files else {}
            ids = state.get("special_tokens") or {}
            save_hf_checkpoint(expand_state_dict(tensors, like), model_cfg, hf,
                               **{k: v for k, v in ids.items() if k in ("bos_token_id", "eos_token_id", "pad_token_id")})
        elif model:  # ZeRO 0-2: rank 0 wrote the HF layout
            for name, rel in model.items():
                _copy_checked(safe_member(ck, rel), safe_member(hf, name), files[rel].sha256)
        else:
            saved = _read(ck, CONFIG_FILE, yaml.safe_load)["model"]
            model_cfg = ModelConfig.model_validate({**saved, "hf_path": None})  # architecture as trained
            state = _read(ck, TRAINER_STATE, json.loads) if TRAINER_STATE in files else {}
            ids = state.get("special_tokens") or {}  # written since exports carry them
            save_hf_checkpoint(consolidate_zero3(ck, model_cfg), model_cfg, hf,
                               **{k: v for k, v in ids.items() if k in ("bos_token_id", "eos_token_id", "pad_token_id")})
        for name, rel in tokenizer.items():
            if name not in model:  # the model dir's own copy wins
                _copy_checked(safe_member(ck, rel), hf / name, files[rel].sha256)
        os.chmod(hf, 0o755)
        os.rename(hf, out)  # atomic; replaces an empty directory
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    print(f"exported {ck.name} -> {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # inspect imports DeepSpeed; no device is needed
    p = argparse.ArgumentParser(prog="python -m seqpar.ckpt", description="Inspect, verify and export seqpar checkpoints.")
    sub = p.add_subparsers(dest="cmd", required=True)
    where = "a run dir, checkpoints dir, one checkpoint, or a latest file"
    for name, help_ in [("list", "checkpoints under a directory (fast checks, no hashing)"),
                        ("inspect", "one checkpoint's contents, and whether it verifies"),
                        ("verify", "sizes and sha256 of one or all checkpoints")]:
        sub.add_parser(name, help=help_).add_argument("path", type=Path, help=where)
    ex = sub.add_parser("export", help="write a Hugging Face model directory (LoRA: merged into the base)")
    ex.add_argument("path", type=Path, help=where)
    ex.add_argument("out", type=Path)
    ex.add_argument("--peft", action="store_true", help="LoRA checkpoints: the adapter alone, in PEFT's format")
    a = p.parse_args(argv)
    try:
        if a.cmd == "export":
            return cmd_export(a.path, a.out, a.peft)
        return {"list": cmd_list, "inspect": cmd_inspect, "verify": cmd_verify}[a.cmd](a.path)
    except CliError as e:
        print(e, file=sys.stderr)
        return e.code
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError) as e:  # untrusted files: no traceback
        print(f"{a.cmd}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
