"""Training FLOPs for MFU, with causal attention counted per document of a packed batch.

A packed ``[B, S]`` micro-batch holds documents told apart by ``position_ids`` restarting at 0;
attention never crosses a document, so its cost is ``sum(n_i^2)`` over the documents, not ``S^2``
per row. Everything here runs on host arrays: it never touches (or waits for) a GPU.
Formulas: docs/configuration.md, section "MFU".
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from seqpar.config import ModelConfig, is_moe_layer

if TYPE_CHECKING:  # torch is only needed for the annotation; this module stays light to import
    import torch


def matmul_flops_per_token(m: ModelConfig) -> float:
    """6 x N_active: fwd (2) + bwd (4) FLOPs per weight of every matmul a token passes through.

    N_active: q/k/v/o projections, the dense SwiGLU or (MoE layers) top_k experts + router +
    shared expert (and its gate), and the LM head; the embedding lookup is not a matmul.
    """
    h, d = m.hidden_size, m.dim_per_head
    attn = h * d * (m.num_attention_heads + 2 * m.kv_heads) + m.num_attention_heads * d * h
    dense_mlp = 3 * h * m.intermediate_size
    n = 0
    for i in range(m.num_hidden_layers):
        n += attn
        if m.moe is not None and is_moe_layer(m, i):
            e = m.moe
            n += e.top_k * 3 * h * e.intermediate_size + h * e.num_experts
            n += 3 * h * e.shared_expert_intermediate_size + (h if e.shared_expert_gate else 0)
        else:
            n += dense_mlp
    n += h * m.vocab_size  # lm_head
    return 6.0 * n


def causal_attention_flops(m: ModelConfig, doc_lengths: np.ndarray | list[int]) -> float:
    """Forward + backward FLOPs of causal attention over documents of ``doc_lengths`` tokens.

    Per layer and document of n tokens: QK^T and PV are 2 matmuls of 2 x H x d x n^2 FLOPs, halved
    by the causal mask (2 H d n^2), and the backward is twice the forward: 6 x H x d x n^2.
    Total = 6 x L x H x d x sum(n_i^2) (H query heads; GQA shares k/v but not this work).
    """
    n = np.asarray(doc_lengths, dtype=np.int64)
    squares = int(np.sum(n * n))  # exact: a Python int, no float rounding before the product
    return float(6 * m.num_hidden_layers * m.num_attention_heads * m.dim_per_head * squares)


def doc_lengths_from_positions(position_ids: torch.Tensor | np.ndarray) -> np.ndarray:
    """Document lengths of a ``[B, S]`` (or flat) array of position ids, in order.

    A document starts where ``position == 0``, and every row starts one. Host (CPU) input only:
    call it on the loader's batches before ``.to(device)``; a device tensor is refused rather
    than copied, because the copy would make the caller wait for the GPU.
    """
    if hasattr(position_ids, "device") and hasattr(position_ids, "numpy"):  # a torch tensor
        if position_ids.device.type != "cpu":
            raise ValueError(f"doc_lengths_from_positions needs host position ids, got a tensor on "
                             f"{position_ids.device}: pass the batch before .to(device)")
        position_ids = position_ids.detach().numpy()
    a = np.asarray(position_ids)
    if a.size == 0:
        return np.zeros(0, dtype=np.int64)
    rows = a.reshape(-1, a.shape[-1]) if a.ndim > 1 else a.reshape(1, -1)
    starts = rows == 0
    starts[:, 0] = True
    bounds = np.append(np.flatnonzero(starts), starts.size)
    return np.diff(bounds).astype(np.int64)


def step_flops(m: ModelConfig, position_ids: torch.Tensor | np.ndarray) -> float:
    """Training FLOPs of the tokens in ``position_ids`` (host array): every token's matmuls plus
    causal attention within each document. Padding counts: the kernels compute it too."""
    lengths = doc_lengths_from_positions(position_ids)
    return float(lengths.sum()) * matmul_flops_per_token(m) + causal_attention_flops(m, lengths)


__all__ = ["causal_attention_flops", "doc_lengths_from_positions", "matmul_flops_per_token", "step_flops"]
