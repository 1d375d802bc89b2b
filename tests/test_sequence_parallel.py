"""Sequence parallelism: sharding rules (one process) and exactness against one process (gloo,
2 and 4 processes; the checks themselves live in tests/sp_worker.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from seqpar.config import ConfigError, validate_config
from seqpar.data.packing import IGNORE_INDEX
from seqpar.parallel.ring import segments
from seqpar.parallel.sharding import RingMeta, padded_length, ring_local_indices, shard_batch
from seqpar.parallel.ulysses import kv_repeats

ROOT = Path(__file__).resolve().parents[1]


def test_zigzag_and_padding():
    assert ring_local_indices(16, 2, 0).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert ring_local_indices(16, 2, 1).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    assert padded_length(30, 2, 2) == 32 and padded_length(30, 1, 4) == 32 and padded_length(32, 4, 1) == 32
    ids = torch.arange(1, 31)[None]
    labels = torch.arange(2, 32)[None]
    pos = torch.cat([torch.arange(10), torch.arange(20)])[None]
    shards = [shard_batch(ids, labels, pos, 2, r, 2, u, pad_id=0) for r in range(2) for u in range(2)]
    allidx = torch.cat([s.local_index for s in shards]).sort().values
    assert allidx.tolist() == list(range(32))  # every token exactly once, padding included
    for s in shards:
        real = s.local_index < 30
        assert torch.equal(s.input_ids[real], ids[0, s.local_index[real]])
        assert torch.equal(s.labels[real], labels[0, s.local_index[real]])  # shifted before splitting
        assert (s.labels[~real] == IGNORE_INDEX).all() and (s.input_ids[~real] == 0).all()
        assert torch.equal(s.position_ids[real], pos[0, s.local_index[real]])  # global positions
    assert shards[0].meta.cu_seqlens == [0, 10, 30, 32]  # padding is its own document


@pytest.mark.parametrize("ring", [1, 2, 3])
def test_ring_segments_cover_exactly_the_visible_pairs(ring):
    """Union of segments over all source ranks = the causal-within-document mask."""
    cu, total = [0, 3, 7, 8, 11, 12, 19, 24], 24
    doc = torch.searchsorted(torch.tensor(cu[1:]), torch.arange(total), right=True)
    want = (doc[:, None] == doc[None, :]) & (torch.arange(total)[:, None] >= torch.arange(total)[None, :])
    got = torch.zeros(total, total, dtype=torch.int32)
    for r in range(ring):
        meta = RingMeta(cu, total, ring, r)
        qi = ring_local_indices(total, ring, r)
        for src in range(ring):
            ki = ring_local_indices(total, ring, src)
            for s in segments(meta, src):
                for a in range(s.q_lo, s.q_hi):
                    for b in range(s.k_lo, s.k_hi):
                        if not s.causal or a - s.q_lo >= b - s.k_lo:
                            got[qi[a], ki[b]] += 1
    assert torch.equal(got, want.int())  # each visible pair once, nothing else


def test_gqa_kv_repeats():
    assert kv_repeats(8, 4) == 1 and kv_repeats(2, 8) == 4 and kv_repeats(1, 4) == 4
    with pytest.raises(ValueError, match="not a multiple of ulysses_degree"):
        kv_repeats(6, 4)
    with pytest.raises(ValueError, match="not a multiple of num_key_value_heads"):
        kv_repeats(3, 4)


@pytest.mark.parametrize(
    "cfg, fragment",
    [
        ({"parallel": {"ulysses_degree": 3}}, "num_attention_heads=4"),
        ({"model": {"hidden_size": 96, "num_attention_heads": 12, "num_key_value_heads": 3},
          "parallel": {"ulysses_degree": 4}}, "it is not a multiple of num_key_value_heads"),
        ({"model": {"hidden_size": 192, "num_attention_heads": 24, "num_key_value_heads": 6},
          "parallel": {"ulysses_degree": 4}}, "kv heads are not a multiple of the degree"),
        ({"data": {"seq_len": 48}, "parallel": {"ring_degree": 8, "ulysses_degree": 4}}, "2 x ring_degree x ulysses_degree"),
    ],
)
def test_sp_constraints_fail_at_startup(cfg, fragment):
    with pytest.raises(ConfigError, match=fragment):
        validate_config(cfg)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [2, 4])
def test_sp_attention_and_model_exact(tmp_path, nproc):
    port = free_port()
    out = tmp_path / "results.jsonl"
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}",
         str(ROOT / "tests" / "sp_worker.py"), str(out)],
        capture_output=True, text=True, timeout=900,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    failed = [row for row in rows if not row["ok"]]
    assert r.returncode == 0 and rows and not failed, f"{failed}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    layouts = {2: 2, 4: 3}[nproc]
    # 6 attention + 2 model + 2 model-with-memory-policy checks + 1 peak-memory check per layout
    assert len(rows) == layouts * 11
    assert sum("memory" in row["check"] and "peak" not in row["check"] for row in rows) == layouts * 2
    assert sum(row["check"].startswith("peak memory") for row in rows) == layouts


@pytest.mark.slow
def test_bench_attention_sp_layouts_run_on_cpu(tmp_path):
    """scripts/bench_attention.py under torchrun times every Ulysses x ring layout (gloo smoke)."""
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
         str(ROOT / "scripts" / "bench_attention.py"), "--device", "cpu", "--seqlens", "128",
         "--heads", "4", "--kv-heads", "2", "--dim", "16", "--docs", "3", "--iters", "1"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [line for line in r.stdout.splitlines() if line.startswith("| 128 |")]
    assert len(rows) == 2 and "ulysses2 x ring1" in rows[0] and "ulysses1 x ring2" in rows[1]


def test_ring_of_one_rank_equals_local_attention():
    """The ring's own-block path (step 0 assigns, no merge) alone: packed documents, GQA, odd length."""
    from seqpar.kernels.torch_math import TorchBlockKernel, varlen_attention
    from seqpar.parallel.ring import RingAttention

    g = torch.Generator().manual_seed(0)
    cu = [0, 5, 17, 18, 29]
    q, k, v = (torch.randn(29, h, 8, generator=g, dtype=torch.float32) for h in (4, 2, 2))
    dout = torch.randn(29, 4, 8, generator=g)
    grads = []
    for f in (lambda q, k, v: RingAttention([0], 0, None, TorchBlockKernel(chunk=4))(q, k, v, RingMeta(cu, 29, 1, 0), 0.3),
              lambda q, k, v: varlen_attention(q, k, v, torch.tensor(cu), 0.3)[0]):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out = f(*leaves)
        torch.autograd.backward(out, dout)
        grads.append([out.detach()] + [x.grad for x in leaves])
    for a, b in zip(*grads):
        assert a.dtype == torch.float32 and torch.allclose(a, b, rtol=1e-5, atol=1e-6)
