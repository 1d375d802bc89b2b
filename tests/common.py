"""Shared by the multi-process tests and their workers: launching torchrun, the tiny models."""

from __future__ import annotations

import json
import os

import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, script: str, *args: str, cwd: Path, timeout: float = 1500) -> subprocess.CompletedProcess:
    """Run ``tests/<script>`` on ``nproc`` gloo processes (CPU DeepSpeed, one thread each)."""
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
         str(ROOT / "tests" / script), *args],
        capture_output=True, text=True, timeout=timeout, cwd=cwd,
        env={**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)},
    )


def write_config(tmp: Path, name: str, base: dict, **sections: dict) -> tuple[Path, Path]:
    """``base`` with each section updated, logging to ``tmp/name``; written to ``tmp/name.yaml``.
    Returns (config path, run dir)."""
    import yaml

    cfg = json.loads(json.dumps(base))
    for sec, kv in sections.items():
        cfg.setdefault(sec, {}).update(kv)
    run_dir = tmp / name
    cfg.setdefault("logging", {})["run_dir"] = str(run_dir)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, run_dir


# -- command-line runs of seqpar/train.py (fault and preemption tests) -------------------------------
TRAIN = str(ROOT / "seqpar" / "train.py")
BASE = {
    "model": {"arch": "llama", "vocab_size": 320, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2},
    "data": {"type": "passkey", "seq_len": 128, "passkey": {"eval_samples": 0, "key_digits": 2}},
    "parallel": {"zero_stage": 2},
    "train": {"max_steps": 8, "micro_batch_size": 1, "global_batch_size": 8, "lr": 1e-2, "warmup_steps": 1},
    "checkpoint": {"every_micro_batches": 1, "keep_last": 2},
    "logging": {"progress_bar": False, "tensorboard": "off"},
}


def command(tmp: Path, name: str, nproc: int, **over) -> tuple[list[str], Path]:
    path, run_dir = write_config(tmp, name, BASE, **over)
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                    f"--nproc_per_node={nproc}", f"--master_port={free_port()}"]
    return launcher + [TRAIN, "--config", str(path)], run_dir


ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run(cmd: list[str], timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env or ENV)


def final_hashes(run_dir: Path) -> dict[str, str]:
    """sha256 of the state files of the last checkpoint (config.yaml differs: it names run_dir)."""
    ck = run_dir / "checkpoints"
    tag = (ck / "latest").read_text().strip()
    files = json.loads((ck / tag / "manifest.json").read_text())["files"]
    keep = ("model/", "adapter/", "qweights/", "/optimizer.", "/rng.", "/grads.")
    return {k: v["sha256"] for k, v in files.items() if any(s in k for s in keep)} | {"tag": tag}


def newest_committed(ck: Path) -> str | None:
    from seqpar.checkpoint.store import CheckpointStore

    store = CheckpointStore(ck)
    good = [c.tag for c in store.list() if not store.verify(c.path)]
    return good[-1] if good else None


def kill_all(proc: subprocess.Popen, sig: int) -> None:
    """Signal the launcher and every rank (torchrun puts ranks in sessions of their own)."""
    import psutil

    family = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    for pid in family:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=ENV,
                            start_new_session=True)


def read_rows(path: Path) -> list[dict]:
    """The JSON lines a worker wrote (none if it died before writing)."""
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def tiny_model(moe: bool, tie: bool | None = None) -> dict:
    """A 2-layer Llama (GQA 4/2) or Qwen2-MoE (4 experts, top-2, shared expert, expert bias)."""
    model = {"arch": "llama", "vocab_size": 320, "hidden_size": 32, "intermediate_size": 64,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "tie_word_embeddings": moe if tie is None else tie}
    if moe:
        model.update(arch="qwen2_moe", moe={
            "num_experts": 4, "top_k": 2, "intermediate_size": 32, "shared_expert_intermediate_size": 16,
            "shared_expert_gate": True, "aux_loss_coef": 0.01, "bias_update_rate": 0.01})
    return model


# -- inside workers (torch.distributed initialized) ------------------------------------------------
def shared_tmpdir(prefix: str) -> Path:
    """A temporary directory made by rank 0, the same path on every rank."""
    import tempfile

    import torch.distributed as dist

    name = [tempfile.mkdtemp(prefix=prefix) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(name)
    return Path(name[0])


def every_rank(problems: list[str]) -> list[list[str]]:
    """Each rank's first problems (collective)."""
    import torch.distributed as dist

    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, problems[:4])
    return out


def report(row: dict, rows: list[dict]) -> None:
    import torch.distributed as dist

    rows.append(row)
    if dist.get_rank() == 0:
        print(json.dumps(row), flush=True)


def finish(rows: list[dict], out: Path) -> int:
    """Rank 0 writes the rows as JSON lines; exit status 1 when any row failed."""
    import torch.distributed as dist

    if dist.get_rank() == 0:
        out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dist.barrier()
    return 0 if all(r["ok"] for r in rows) else 1
