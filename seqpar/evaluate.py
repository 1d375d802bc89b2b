"""Task metrics computed with the training model (currently: passkey retrieval)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from seqpar.data import PasskeyDataset


@torch.no_grad()
def passkey_results(
    predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    dataset: PasskeyDataset,
    indices: list[int],
    turns: int,
    device: torch.device,
) -> list[tuple[int, bool]]:
    """(index, all key digits predicted) for each of ``indices``, teacher forced.

    ``predict(input_ids [1, S], position_ids [1, S]) -> greedy next-token ids [S]``. ``turns`` >=
    len(indices) predictions are made (repeating the last sample) because under ZeRO-3 and
    sequence parallelism every rank must take part in every forward.
    """
    results = []
    for t in range(turns):
        i = indices[min(t, len(indices) - 1)] if indices else 0
        s = dataset[i]
        ids = torch.from_numpy(s["input_ids"])[None].to(device)
        pos = torch.from_numpy(s["position_ids"])[None].to(device)
        pred = predict(ids, pos)
        key, start = dataset.answer(i)
        target = ids[0, start + 1 : start + 1 + len(key)]
        if t < len(indices):
            results.append((i, bool(torch.equal(pred[start : start + len(key)], target))))
    return results


def passkey_chance(digits: int) -> float:
    """Probability that a guess gets all ``digits`` of a uniformly random digit key right."""
    return 10.0 ** -digits


def percent(x: float) -> str:
    """``0.8125 -> '81.2%'``; small shares keep their significant digits (``1e-05 -> '0.001%'``)."""
    if x == 0 or x >= 0.001:
        return f"{x:.1%}"
    return f"{x * 100:.{-math.floor(math.log10(x * 100))}f}%"


def passkey_summary(accuracy: float, samples: int, digits: int) -> str:
    """``passkey accuracy 81.2% on 64 held-out 3-digit keys (chance 0.1%)``, for the run's last line."""
    return (f"passkey accuracy {percent(accuracy)} on {samples} held-out {digits}-digit keys "
            f"(chance {percent(passkey_chance(digits))})")
