"""Operator output: start-up summary, rank-0 progress bar, metrics.jsonl and TensorBoard."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) for MFU; anything else: set
# logging.peak_tflops. Keys are matched against torch.cuda.get_device_name().
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


def peak_tflops(device: torch.device, configured: float | None) -> float | None:
    if configured is not None:
        return configured
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_TFLOPS.items():
            if key in name:
                return value
    return None


def memory_gib(device: torch.device) -> float:
    """Peak allocated GPU memory, or this process's resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import psutil

    return psutil.Process(os.getpid()).memory_info().rss / 2**30


class RunLogger:
    """Rank 0 writes; other ranks hold a logger that does nothing."""

    def __init__(self, run_dir: Path, enabled: bool, total_steps: int, progress: bool, tensorboard: str):
        self.enabled = enabled
        self.bar = None
        self.tb = None
        self.jsonl = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard != "off":
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                if tensorboard == "on":
                    raise ImportError(
                        "logging.tensorboard='on' but tensorboard is not installed: "
                        "pip install tensorboard, or set logging.tensorboard: auto"
                    ) from None
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, desc="train", unit="step", dynamic_ncols=True)

    def print(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def start_at(self, step: int) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.refresh()

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **metrics}
        self.jsonl.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)
        if self.bar is not None:
            self.bar.n = step
            shown = {"loss": "{:.4f}", "lr": "{:.2e}", "tok_s": "{:,.0f}", "mfu": "{:.1%}", "mem_gib": "{:.1f}"}
            self.bar.set_postfix_str(
                " ".join(f"{k}={fmt.format(metrics[k])}" for k, fmt in shown.items() if metrics.get(k) is not None),
                refresh=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()
