"""Task metrics computed with the training model (currently: passkey retrieval)."""

from __future__ import annotations

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
