"""ZeRO-Offload (memory.offload_optimizer / memory.offload_params): the DeepSpeed config it derives,
what is refused, and (2 processes, tests/zero_offload_worker.py) training, bitwise resume at a step
boundary and inside an accumulation window, offload on vs off, elastic moves, the engine check."""

from __future__ import annotations

import pytest
from common import read_rows, tiny_model, torchrun
from zero_offload_worker import CELLS, ELASTIC

from seqpar.config import ConfigError, validate_config


def _config(stage: int, train: dict | None = None, **memory: bool) -> dict:
    return {"model": tiny_model(False), "parallel": {"zero_stage": stage}, "memory": memory,
            "train": {"micro_batch_size": 1, "global_batch_size": 2, **(train or {})}}


def test_deepspeed_config_maps_the_memory_switches():
    plain = validate_config(_config(2))
    for device in ("cpu", "cuda"):
        ds = plain.deepspeed_config(plain.layout(2), device)
        assert "offload_optimizer" not in ds["zero_optimization"] and "zero_force_ds_cpu_optimizer" not in ds
    cfg = validate_config(_config(3, offload_optimizer=True, offload_params=True))
    cpu, cuda = cfg.deepspeed_config(cfg.layout(2), "cpu"), cfg.deepspeed_config(cfg.layout(2), "cuda")
    assert cpu["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": False},
                                        "offload_param": {"device": "cpu", "pin_memory": False}}
    assert cuda["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert cuda["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": True}
    # the step runs on the CPU: "auto" is not fused there even on a CUDA machine; torch's AdamW stays
    assert cuda["optimizer"]["params"]["fused"] is False and cuda["optimizer"]["params"]["torch_adam"] is True
    assert cuda["zero_force_ds_cpu_optimizer"] is False
    on = validate_config(_config(1, {"fused_optimizer": "on"}, offload_optimizer=True))
    ds = on.deepspeed_config(on.layout(2), "cuda")
    assert ds["optimizer"]["params"]["fused"] is True and "offload_param" not in ds["zero_optimization"]
    params_only = validate_config(_config(3, offload_params=True))
    ds = params_only.deepspeed_config(params_only.layout(2), "cuda")
    assert "offload_optimizer" not in ds["zero_optimization"] and ds["optimizer"]["params"]["fused"] is True


REFUSED = {  # config -> fragments the one-line message must hold (the key and the fix)
    "params at zero2": (_config(2, offload_params=True), ["memory.offload_params needs ZeRO-3", "parallel.zero_stage 3"]),
    "params at zero1": (_config(1, offload_optimizer=True, offload_params=True), ["memory.offload_params", "zero_stage is 1"]),
    "optimizer at zero0": (_config(0, offload_optimizer=True), ["memory.offload_optimizer", "parallel.zero_stage 1, 2 or 3"]),
    "raw offload_optimizer": ({**_config(2), "deepspeed": {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}},
                              ["deepspeed.zero_optimization.offload_optimizer", "memory.offload_optimizer: true"]),
    "raw offload_param nvme": ({**_config(3), "deepspeed": {"zero_optimization": {"offload_param": {"device": "nvme"}}}},
                               ["deepspeed.zero_optimization.offload_param", "memory.offload_params: true", "NVMe"]),
    "legacy cpu_offload": ({**_config(2), "deepspeed": {"zero_optimization": {"cpu_offload": True}}},
                           ["zero_optimization.cpu_offload", "memory.offload_optimizer"]),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_offload_refusals_name_the_key_and_the_fix(case):
    data, fragments = REFUSED[case]
    with pytest.raises(ConfigError) as e:
        validate_config(data)
    for frag in fragments:
        assert frag in str(e.value), f"{case}: {frag!r} not in {e.value}"


def test_offload_device_none_is_not_refused():
    validate_config({**_config(2), "deepspeed": {"zero_optimization": {"offload_optimizer": {"device": "none"}}}})


@pytest.mark.slow
def test_offload_trains_and_resumes_bitwise(tmp_path):
    out = tmp_path / "rows.jsonl"
    r = torchrun(2, "zero_offload_worker.py", str(out), cwd=tmp_path, timeout=900)
    rows = read_rows(out)
    failed = [row for row in rows if not row["ok"]]
    # per cell: trains + boundary + mid-window; 2 controls, the elastic moves, 1 toggle, 5 engine checks
    assert r.returncode == 0 and len(rows) == 3 * len(CELLS) + 2 + len(ELASTIC) + 1 + 5 and not failed, \
        f"{failed}\n{r.stderr[-4000:]}"
    by_cell = {row["cell"]: row for row in rows}
    for name in CELLS:  # the mid-window saves really were inside a window
        assert not by_cell[f"{name} mid-window"]["resumed_from"].endswith("seq000000")
    assert all(not by_cell[f"elastic {e}"]["resumed_from"].endswith("seq000000") for e in ELASTIC)
