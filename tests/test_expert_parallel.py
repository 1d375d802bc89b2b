"""Expert parallelism (seqpar.parallel.experts) on 2 and 4 gloo processes: loss, aux loss, routing
and every gradient equal one process without EP, with data and sequence parallelism (the checks
live in tests/ep_worker.py)."""

from __future__ import annotations

import pytest
import torch
from common import read_rows, tiny_model, torchrun

from seqpar.parallel.experts import ExpertParallel, ep_groups, expert_major


MOE_MODEL = tiny_model(True)


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [2, 4])
def test_expert_parallel_equals_one_process(tmp_path, nproc):
    out = tmp_path / "rows.jsonl"
    r = torchrun(nproc, "ep_worker.py", str(out), cwd=tmp_path, timeout=900)
    rows = read_rows(out)
    failed = [row for row in rows if not row["ok"]]
    assert r.returncode == 0 and rows and not failed, f"{failed}\n{r.stderr[-4000:]}"
    assert len(rows) == {2: 5, 4: 7}[nproc] and "starved" in rows[-1]["check"]
    assert {row["local_experts"] for row in rows} >= ({8, 4} if nproc == 2 else {4, 2})


def test_groups_and_regrouping():
    assert ep_groups(4, 2) == ([[0, 1], [2, 3]], [[0, 2], [1, 3]])
    assert ep_groups(4, 4) == ([[0, 1, 2, 3]], [[0], [1], [2], [3]])
    with pytest.raises(ValueError, match="does not divide the world size"):
        ep_groups(6, 4)
    with pytest.raises(ValueError, match="num_experts=6 is not divisible"):
        ExpertParallel(None, 4, 0, 6)
    ep = ExpertParallel(None, 4, 2, 8)
    assert (ep.local, ep.first) == (2, 4)
    # received from 3 sources x 2 local experts: [[1, 2], [0, 3], [2, 0]] tokens
    idx = expert_major([[1, 2], [0, 3], [2, 0]], torch.device("cpu"))
    # source blocks start at 0 (1 + 2), 3 (0 + 3), 6 (2 + 0): expert 0 = [0] + [] + [6, 7]; expert 1 = [1, 2] + [3, 4, 5]
    assert idx.tolist() == [0, 6, 7, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("over,fragment", [
    ({}, "the model is dense"),
    ({"model": MOE_MODEL, "parallel": {"zero_stage": 3, "expert_degree": 2}}, "refuses native MoE"),
    ({"model": MOE_MODEL, "parallel": {"expert_degree": 3}}, "num_experts=4 is not divisible"),
    ({"model": MOE_MODEL, "parallel": {"expert_degree": 2}, "train": {"compile": True}}, "train.compile"),
])
def test_expert_parallel_config_refusals(over, fragment):
    from seqpar.config import ConfigError, validate_config

    cfg = {"parallel": {"expert_degree": 2}, **over}
    with pytest.raises((ConfigError, ValueError), match=fragment):
        validate_config(cfg)


def test_lora_with_expert_parallelism_is_accepted():
    """(Refused until the frozen base experts were marked for DeepSpeed; trained and resumed in
    tests/test_ep_trainer.py::test_expert_parallel_with_lora_adapters.)"""
    from seqpar.config import validate_config

    cfg = validate_config({"model": {**MOE_MODEL, "lora": {"rank": 4, "experts": True}},
                           "parallel": {"expert_degree": 2}})
    assert cfg.model.lora.experts and cfg.parallel.expert_degree == 2


def test_world_must_be_a_multiple_of_the_degree():
    from seqpar.config import ConfigError, validate_config

    cfg = validate_config({"model": MOE_MODEL, "parallel": {"expert_degree": 2},
                           "train": {"global_batch_size": 8}})
    with pytest.raises(ConfigError, match="not divisible by parallel.expert_degree=2"):
        cfg.layout(3)
