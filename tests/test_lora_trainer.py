"""LoRA through the trainer (issue 14): checkpoints hold the trainable tensors and the base's
identity only; resume is bitwise at a boundary and mid-window (ZeRO 0, 1, 2); a base whose
weights changed is refused; the adapter checkpoint is a small fraction of a full one."""

from __future__ import annotations

import json

import pytest
import torch

from common import ENV, command, final_hashes, run
from seqpar.models import build_model
from seqpar.models.hf import save_hf_checkpoint


def lora_run(tmp_path, name: str, stage: int, nproc: int, base, **over):
    # ZeRO-0 trains adapters only (a PEFT adapter), the others norms too (LongLoRA)
    extra = [] if stage == 0 else ["norms"]
    sections = {"model": {"hf_path": str(base), "lora": {"rank": 4, "alpha": 8, "trainable": extra}},
                "parallel": {"zero_stage": stage, "zero3_init": False}, "train": {"max_steps": 3, "global_batch_size": 4},
                "checkpoint": {"every_micro_batches": 0, "keep_last": 2}, "logging": {"log_every": 1}}
    for k, v in over.items():
        for key, value in v.items():  # one level deeper for model.lora
            if isinstance(value, dict) and isinstance(sections.get(k, {}).get(key), dict):
                sections[k][key] = {**sections[k][key], **value}
            else:
                sections.setdefault(k, {})[key] = value
    return command(tmp_path, name, nproc, **sections)


def make_base(tmp_path, seed: int = 1):
    from common import BASE
    from seqpar.config import ModelConfig

    cfg = ModelConfig(**BASE["model"])
    model = build_model(cfg, seed=seed)
    out = tmp_path / f"base{seed}"
    save_hf_checkpoint(dict(model.state_dict()), cfg, out)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("stage,nproc", [(0, 1), (1, 1), (2, 2), (3, 2)])
def test_lora_checkpoints_hold_adapters_and_resume_bitwise(tmp_path, stage, nproc):
    base = make_base(tmp_path)
    full_cmd, full_dir = lora_run(tmp_path, "full", stage, nproc, base)
    full = run(full_cmd, timeout=600)
    assert full.returncode == 0, full.stdout[-3000:] + full.stderr[-3000:]
    assert "LoRA r4 on q_proj" in full.stdout and "trainable" in full.stdout
    ck = full_dir / "checkpoints"
    tag = (ck / "latest").read_text().strip()
    files = json.loads((ck / tag / "manifest.json").read_text())["files"]
    assert any(k.startswith("adapter/") for k in files) and not any(k.startswith("model/") for k in files)
    from safetensors.torch import load_file

    held = load_file(str(ck / tag / "adapter" / "trainable.safetensors"))
    assert held and all("lora_" in k or "norm" in k for k in held)  # the frozen base is not copied
    assert any("norm" in k for k in held) == (stage != 0)
    # the size seqpar.optim.sizes reports (bench_checkpoint.py --sizes) is what the file holds
    from seqpar.config import load_config
    from seqpar.optim.sizes import checkpoint_bytes

    want = checkpoint_bytes(load_config(full_dir.parent / "full.yaml"))["weights"]
    got = int(files["adapter/trainable.safetensors"]["size"])
    assert want <= got <= want + 20_000, (got, want)
    assert json.loads((ck / tag / "adapter" / "base.json").read_text())["hf_path"] == str(base)
    # stopped mid-window (micro-batch 6 of 4-per-step / dp), resumed: bitwise the uninterrupted run
    stop_cmd, stop_dir = lora_run(tmp_path, "stopped", stage, nproc, base)
    stop_at = "6" if nproc == 1 else "3"
    stopped = run(stop_cmd, timeout=600, env={**ENV, "SEQPAR_STOP_AFTER_MICRO_BATCHES": stop_at})
    # exit 75 (preempted); under torchrun the agent reports its workers' non-zero exit as 1
    assert stopped.returncode == (75 if nproc == 1 else 1), stopped.stdout[-3000:]
    assert "stop requested (SEQPAR_STOP_AFTER_MICRO_BATCHES): saved" in stopped.stdout
    resumed = run(stop_cmd + ["--resume", "auto"], timeout=600)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stdout[-3000:]
    assert "seq000000" not in resumed.stdout.split("resumed from")[1].splitlines()[0]  # mid-window
    assert final_hashes(stop_dir) == final_hashes(full_dir)
    if stage in (0, 1):
        check_exports(tmp_path, full_dir, base, peft_ok=stage == 0)


def check_exports(tmp_path, run_dir, base, peft_ok: bool) -> None:
    """ckpt inspect shows sizes by part; export merges the adapters into the base (transformers
    loads it), --peft writes the adapter alone (peft loads it onto the base): equal logits."""
    import contextlib
    import io

    import peft
    import transformers

    from seqpar import ckpt

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert ckpt.main(["inspect", str(run_dir)]) == 0
    assert "adapters (trainable tensors)" in buf.getvalue() and "model weights" not in buf.getvalue()
    assert ckpt.main(["export", str(run_dir), str(tmp_path / "merged")]) == 0
    ids = torch.randint(0, 320, (1, 16), generator=torch.Generator().manual_seed(0))
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    plain = transformers.AutoModelForCausalLM.from_pretrained(base).eval()
    with torch.no_grad():
        a, b = merged(input_ids=ids).logits, plain(input_ids=ids).logits
    assert not torch.allclose(a, b)  # the adapters trained
    if not peft_ok:  # norms trained in full are not part of a PEFT LoRA adapter: refused, one line
        assert ckpt.main(["export", "--peft", str(run_dir), str(tmp_path / "peft")]) == 1
        return
    assert ckpt.main(["export", "--peft", str(run_dir), str(tmp_path / "peft")]) == 0
    adapted = peft.PeftModel.from_pretrained(plain, tmp_path / "peft").eval()
    with torch.no_grad():
        torch.testing.assert_close(adapted(input_ids=ids).logits, a, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_resume_refuses_a_changed_base(tmp_path):
    base = make_base(tmp_path)
    cmd, run_dir = lora_run(tmp_path, "run", 1, 1, base, train={"max_steps": 1})
    assert run(cmd, timeout=600).returncode == 0
    # same path, other weights (e.g. the directory was overwritten by another download)
    from common import BASE
    from seqpar.config import ModelConfig

    cfg = ModelConfig(**BASE["model"])
    sd = dict(build_model(cfg, seed=2).state_dict())
    import shutil

    shutil.rmtree(base)
    save_hf_checkpoint(sd, cfg, base)
    again = run(cmd + ["--resume", "auto", "--train.max_steps", "2", "--checkpoint.allow_changes", "[train.max_steps]"],
                timeout=600)
    assert again.returncode != 0
    assert "trained on another base model" in (again.stdout + again.stderr), (again.stdout + again.stderr)[-2000:]


@pytest.mark.slow
def test_qlora_trains_and_resumes_bitwise(tmp_path):
    """QLoRA (4-bit NF4 base) through the trainer, ZeRO-2 on one rank: the summary says so, and a
    mid-window stop resumes bitwise (the base is re-quantized identically from the Hub weights)."""
    base = make_base(tmp_path)
    over = {"model": {"lora": {"rank": 4, "alpha": 8, "quantize_base": "nf4"}}}
    full_cmd, full_dir = lora_run(tmp_path, "full", 2, 1, base, **over)
    full = run(full_cmd, timeout=600)
    assert full.returncode == 0, full.stdout[-3000:] + full.stderr[-3000:]
    assert "QLoRA (NF4 base) r4" in full.stdout
    losses = [json.loads(line)["loss"] for line in (full_dir / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert losses[-1] < losses[0]
    stop_cmd, stop_dir = lora_run(tmp_path, "stopped", 2, 1, base, **over)
    stopped = run(stop_cmd, timeout=600, env={**ENV, "SEQPAR_STOP_AFTER_MICRO_BATCHES": "6"})
    assert stopped.returncode == 75, stopped.stdout[-3000:]
    resumed = run(stop_cmd + ["--resume", "auto"], timeout=600)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stdout[-3000:]
    assert final_hashes(stop_dir) == final_hashes(full_dir)
