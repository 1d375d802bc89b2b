"""Task metrics computed with the training model (currently: passkey retrieval)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from seqpar.data import PasskeyDataset


@torch.no_grad()
def passkey_accuracy(
    model: Callable, dataset: PasskeyDataset, indices: list[int], turns: int, device: torch.device
) -> int:
    """Number of ``indices`` whose key digits are all the model's argmax after the question.

    ``turns`` >= len(indices) forwards are run (repeating the last sample) because under ZeRO-3
    every rank must take part in every forward.
    """
    correct = 0
    for t in range(turns):
        i = indices[min(t, len(indices) - 1)] if indices else 0
        s = dataset[i]
        ids = torch.from_numpy(s["input_ids"])[None].to(device)
        pos = torch.from_numpy(s["position_ids"])[None].to(device)
        logits = model(ids, pos).logits[0]
        key, start = dataset.answer(i)
        pred = logits[start : start + len(key)].argmax(-1)
        target = torch.from_numpy(s["input_ids"][start + 1 : start + 1 + len(key)]).to(device)
        if t < len(indices):
            correct += int(torch.equal(pred, target))
    return correct
