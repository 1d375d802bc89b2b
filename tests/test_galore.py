"""GaLore (train.optimizer: galore, seqpar.optim.galore): low-rank moments, projector refresh on
schedule, state of plain tensors; through the trainer a resume that crosses a projector refresh is
bitwise (boundary and mid-window, ZeRO-0 fp32 and bf16), and the optimizer part of a checkpoint
is a fraction of AdamW's."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from common import ENV, command, final_hashes, run
from seqpar.config import ConfigError, load_config
from seqpar.optim.galore import GaLoreAdamW, galore_state_bytes


def test_low_rank_state_and_refresh_schedule():
    torch.manual_seed(0)
    tall, wide, vec = (torch.nn.Parameter(torch.randn(*s)) for s in ((24, 8), (8, 24), (24,)))
    opt = GaLoreAdamW([{"params": [tall, wide], "galore": True, "rank": 3, "update_interval": 2, "scale": 0.5},
                       {"params": [vec]}], lr=1e-2)
    x = torch.randn(8, 24)
    projectors = []
    for step in range(5):
        opt.zero_grad()
        loss = (x @ tall @ wide).pow(2).mean() + vec.pow(2).sum()
        loss.backward()
        opt.step()
        projectors.append(opt.state[tall]["projector"].clone())
    # the smaller side is projected: moments [24, 3] for [24, 8] (right), [3, 24] for [8, 24] (left)
    assert opt.state[tall]["exp_avg"].shape == (24, 3) and opt.state[tall]["projector"].shape == (3, 8)
    assert opt.state[wide]["exp_avg"].shape == (3, 24) and opt.state[wide]["projector"].shape == (8, 3)
    assert opt.state[vec]["exp_avg"].shape == (24,)  # plain AdamW
    # refreshed at steps 0, 2, 4 (state step before the update), kept in between
    same = [torch.equal(a, b) for a, b in zip(projectors, projectors[1:])]
    assert same == [True, False, True, False]
    # every piece of state is a tensor (seqpar's checkpoint codec stores no Python objects)
    for st in opt.state.values():
        assert all(isinstance(v, torch.Tensor) for v in st.values())
    got = sum(v.numel() * v.element_size() for k, v in opt.state[tall].items() if k != "left")
    assert got == galore_state_bytes((24, 8), 3)
    with pytest.raises(ValueError, match="GaLore projects matrices"):
        GaLoreAdamW([{"params": [vec], "galore": True}])
    # a state_dict round trip (torch casts loaded state to the parameter's dtype) continues the
    # same trajectory bitwise, through the next refresh
    twin = [torch.nn.Parameter(p.detach().clone()) for p in (tall, wide, vec)]
    opt2 = GaLoreAdamW([{"params": twin[:2], "galore": True, "rank": 3, "update_interval": 2, "scale": 0.5},
                        {"params": twin[2:]}], lr=1e-2)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # as from a file: no shared buffers
    for a, b in zip((tall, wide, vec), twin):  # the state a later checkpoint writes is the same state
        assert {k: (v.dtype, v.shape) for k, v in opt.state[a].items()} == \
            {k: (v.dtype, v.shape) for k, v in opt2.state[b].items()}
    for _ in range(3):
        for o, (a, b, c) in ((opt, (tall, wide, vec)), (opt2, twin)):
            o.zero_grad()
            ((x @ a @ b).pow(2).mean() + c.pow(2).sum()).backward()
            o.step()
    assert all(torch.equal(a, b) for a, b in zip((tall, wide, vec), twin))


def test_galore_refusals_say_why():
    for argv, fragment in ((["--parallel.zero_stage", "2"], "ZeRO-2 flattens parameters"),
                           (["--parallel.zero_stage", "0", "--model.lora.rank", "4"], "alternatives"),
                           (["--parallel.zero_stage", "0", "--memory.offload_optimizer", "true"], "offload")):
        with pytest.raises(ConfigError, match=fragment):
            load_config(None, ["--train.optimizer", "galore", *argv])


def galore_run(tmp_path, name: str, precision: str, **over):
    sections = {"parallel": {"zero_stage": 0},
                "train": {"max_steps": 4, "global_batch_size": 4, "optimizer": "galore", "precision": precision,
                          "galore": {"rank": 8, "update_interval": 2}},
                "checkpoint": {"every_micro_batches": 0, "keep_last": 2}, "logging": {"log_every": 1}}
    for k, v in over.items():
        sections.setdefault(k, {}).update(v)
    return command(tmp_path, name, 1, **sections)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resume_across_a_projector_refresh_is_bitwise(tmp_path, precision):
    full_cmd, full_dir = galore_run(tmp_path, "full", precision)
    full = run(full_cmd, timeout=600)
    assert full.returncode == 0, full.stdout[-3000:] + full.stderr[-3000:]
    assert "GaLore-AdamW rank 8, refresh every 2" in full.stdout
    # refreshes happen at optimizer steps 1 and 3 (state step 0 and 2); stops before each of them
    for name, stop in (("boundary", "8"), ("mid", "10")):  # 4 micro-batches per step
        cmd, run_dir = galore_run(tmp_path, name, precision)
        stopped = run(cmd, timeout=600, env={**ENV, "SEQPAR_STOP_AFTER_MICRO_BATCHES": stop})
        assert stopped.returncode == 75, stopped.stdout[-3000:]
        resumed = run(cmd + ["--resume", "auto"], timeout=600)
        assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stdout[-3000:]
        assert final_hashes(run_dir) == final_hashes(full_dir), name
    if precision == "fp32":  # the optimizer part of the checkpoint: GaLore's vs AdamW's, same model
        adam_cmd, adam_dir = galore_run(tmp_path, "adamw", precision, train={"optimizer": "adamw"})
        assert run(adam_cmd, timeout=600).returncode == 0

        def part_bytes(d, part):
            ck = d / "checkpoints"
            files = json.loads((ck / (ck / "latest").read_text().strip() / "manifest.json").read_text())["files"]
            return sum(int(f["size"]) for rel, f in files.items() if part in rel)

        ratio = part_bytes(full_dir, "/optimizer.") / part_bytes(adam_dir, "/optimizer.")
        assert ratio < 0.75, ratio  # the tiny model's matrices are 32 wide: rank 8 is 1/4
        # seqpar.optim.sizes (what bench_checkpoint.py --sizes reports for the 1B shape) = real files
        from seqpar.config import load_config
        from seqpar.optim.sizes import checkpoint_bytes

        for d in (full_dir, adam_dir):
            want = checkpoint_bytes(load_config(d.parent / f"{d.name}.yaml"))
            got = {"weights": part_bytes(d, "model/model.safetensors"), "optimizer": part_bytes(d, "/optimizer.")}
            for k in got:  # file headers and tensor metadata on top of the raw bytes
                assert want[k] <= got[k] <= 1.1 * want[k] + 20_000, (d.name, k, got[k], want[k])
