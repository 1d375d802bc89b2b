"""MFU's FLOP count: matmuls per token and causal attention per packed document (seqpar/flops.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from seqpar.config import ModelConfig, MoEConfig, flops_per_token
from seqpar.flops import (
    causal_attention_flops,
    doc_lengths_from_positions,
    matmul_flops_per_token,
    step_flops,
)

# hidden 32, 4 heads of d = 8 (2 kv heads), 2 layers, SwiGLU 64, vocab 97
DENSE = {"vocab_size": 97, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2}
# by hand: q,k,v,o = 32*8*(4+2+2) + 4*8*32 = 3072; SwiGLU 3*32*64 = 6144; 2 layers + lm_head 32*97
N_DENSE = 2 * (3072 + 6144) + 32 * 97  # 21,536 weights per token
ATTN = 6 * 2 * 4 * 8  # 6 x L x H x d = 384 FLOPs per n^2


def positions(*rows: list[int]) -> torch.Tensor:
    """[B, S] position ids of rows given as document lengths."""
    return torch.from_numpy(np.stack([np.concatenate([np.arange(n) for n in docs]) for docs in rows]))


def test_matmul_flops_dense():
    assert matmul_flops_per_token(ModelConfig(**DENSE)) == 6 * N_DENSE


def test_packed_batch_exact():
    m = ModelConfig(**DENSE)
    pos = positions([16], [4, 4, 8])  # B=2, S=16
    assert doc_lengths_from_positions(pos).tolist() == [16, 4, 4, 8]
    expect = 32 * 6 * N_DENSE + ATTN * (16**2 + 4**2 + 4**2 + 8**2)
    assert step_flops(m, pos) == expect == 4_270_080
    # an all-one-document row: a fragment whose positions do not start at 0 is still one document
    fragment = torch.arange(5, 21)[None]
    assert doc_lengths_from_positions(fragment).tolist() == [16]
    assert step_flops(m, fragment) == 16 * 6 * N_DENSE + ATTN * 16**2
    three = torch.cat([pos, fragment])
    assert step_flops(m, three) == step_flops(m, pos) + step_flops(m, fragment)
    # packing is cheaper than one long document, by exactly the attention saved
    assert step_flops(m, positions([16], [16])) - step_flops(m, pos) == ATTN * (256 - 96)


def test_one_full_document_equals_per_token_formula():
    for kw in (DENSE, {**DENSE, "num_attention_heads": 8, "num_key_value_heads": 8, "head_dim": 16}):
        m = ModelConfig(**kw)
        for s in (1, 16, 4096):
            assert step_flops(m, torch.arange(s)[None]) == pytest.approx(flops_per_token(m, s) * s, rel=1e-12)
        assert step_flops(m, torch.arange(64).repeat(3, 1)) == pytest.approx(3 * 64 * flops_per_token(m, 64))


def test_causal_attention_formula():
    m = ModelConfig(**DENSE)
    assert causal_attention_flops(m, [3, 5]) == 6 * 2 * 4 * 8 * (9 + 25)
    assert causal_attention_flops(m, np.array([], dtype=np.int64)) == 0.0
    big = ModelConfig(**{**DENSE, "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
                         "hidden_size": 8192})
    # 1M-token documents: exact in integers before the one conversion to float
    assert causal_attention_flops(big, [2**20] * 4) == float(6 * 80 * 64 * 128 * 4 * 2**40)


def test_moe_counts_top_k_experts():
    def moe(**kw) -> ModelConfig:
        e = {"num_experts": 4, "top_k": 2, "intermediate_size": 16, "shared_expert_intermediate_size": 8,
             "shared_expert_gate": True}
        return ModelConfig(**DENSE, arch="qwen2_moe", moe=MoEConfig(**{**e, **kw}))

    # per layer: attention 3072 + 2 experts x 3*32*16 + router 32*4 + shared 3*32*8 + its gate 32
    n = 2 * (3072 + 2 * 3 * 32 * 16 + 32 * 4 + 3 * 32 * 8 + 32) + 32 * 97
    assert matmul_flops_per_token(moe()) == 6 * n
    # more experts at the same top_k: only the router grows; top_k 1: one expert fewer per layer
    assert matmul_flops_per_token(moe(num_experts=8)) - 6 * n == 6 * 2 * 32 * 4
    assert 6 * n - matmul_flops_per_token(moe(top_k=1)) == 6 * 2 * 3 * 32 * 16
    # dense layers of a sparse_step 2 model count the dense SwiGLU
    assert matmul_flops_per_token(moe(sparse_step=2)) == 6 * (n - (2 * 3 * 32 * 16 + 32 * 4 + 3 * 32 * 8 + 32)
                                                             + 3 * 32 * 64)


def test_doc_lengths_torch_and_numpy():
    pos = positions([2, 6], [8], [3, 3, 2])
    want = [2, 6, 8, 3, 3, 2]
    assert doc_lengths_from_positions(pos).tolist() == want
    assert doc_lengths_from_positions(pos.numpy()).tolist() == want
    assert doc_lengths_from_positions(pos.reshape(-1)).tolist() == want  # flat: zeros mark the rows too
    assert doc_lengths_from_positions(pos.to(torch.int32).numpy()).tolist() == want
    assert doc_lengths_from_positions(np.arange(5)).tolist() == [5]
    assert doc_lengths_from_positions(np.zeros((0, 4), dtype=np.int64)).tolist() == []
    out = doc_lengths_from_positions(torch.zeros(2, 3, dtype=torch.long))  # every token its own document
    assert out.dtype == np.int64 and out.tolist() == [1] * 6


def test_device_tensors_are_refused():
    # a device tensor would need a copy that waits for the GPU; "meta" stands in for it here
    with pytest.raises(ValueError, match="host position ids"):
        doc_lengths_from_positions(torch.zeros(2, 4, dtype=torch.long, device="meta"))
