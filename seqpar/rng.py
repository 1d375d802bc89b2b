"""Every random number generator a rank uses, as one state_dict (python, numpy, torch CPU, CUDA)."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def set_deterministic(enabled: bool) -> None:
    """``train.deterministic``: repeatable kernels for the whole process. Call before any CUDA work:
    cuBLAS reads its workspace setting when it initialises."""
    if enabled:
        import os

        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)


def seed_everything(seed: int) -> None:
    """Same seed on every rank: model init and any sampling agree across ranks and layouts."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rng_state_dict() -> dict[str, Any]:
    """Snapshot of all global generators of this process (tensors are CPU uint8)."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def load_rng_state_dict(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        if not torch.cuda.is_available() or torch.cuda.device_count() != len(state["cuda"]):
            raise ValueError("checkpoint has CUDA RNG state for a different number of devices")
        torch.cuda.set_rng_state_all(state["cuda"])
