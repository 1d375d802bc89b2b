"""A user's own stateful object (examples/loss_watch.py) is checkpointed and restored bitwise like
the built-ins, through the same command line; bad registrations are refused at once."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from common import BASE, ENV, ROOT, final_hashes, run, write_config
from seqpar.engine.extensions import Extensions
from seqpar.errors import UserError

EXAMPLE = str(ROOT / "examples" / "loss_watch.py")


def extra_files(run_dir) -> dict[str, str]:
    ck = run_dir / "checkpoints"
    tag = (ck / "latest").read_text().strip()
    files = json.loads((ck / tag / "manifest.json").read_text())["files"]
    return {k: v["sha256"] for k, v in files.items() if "/extra-loss_watch." in k}


@pytest.mark.slow
def test_own_state_resumes_bitwise_mid_window(tmp_path):
    over = {"train": {"max_steps": 4}, "checkpoint": {"every_micro_batches": 0}}
    path, ref_dir = write_config(tmp_path, "ref", BASE, **over)
    r = run([sys.executable, EXAMPLE, "--config", str(path)])
    assert r.returncode == 0, r.stderr[-3000:]
    reference = extra_files(ref_dir)
    assert len(reference) == 2  # the skeleton and the generator state tensor
    path, run_dir = write_config(tmp_path, "stopped", BASE, **over)
    stop = run([sys.executable, EXAMPLE, "--config", str(path)], env={**ENV, "SEQPAR_STOP_AFTER_MICRO_BATCHES": "13"})
    assert stop.returncode == 75, stop.stderr[-3000:]
    assert extra_files(run_dir) != reference  # saved mid-window, before the end
    r = run([sys.executable, EXAMPLE, "--config", str(path)])
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr[-3000:]
    assert extra_files(run_dir) == reference
    assert {k: v for k, v in final_hashes(run_dir).items() if k != "tag"} == \
        {k: v for k, v in final_hashes(ref_dir).items() if k != "tag"}


class Box:
    def __init__(self, value):
        self.value = value

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, sd):
        self.value = sd["value"]


def test_registration_is_checked_at_once():
    with pytest.raises(UserError, match="lowercase letters"):
        Extensions({"../x": Box(1)})
    with pytest.raises(UserError, match="has no state_dict"):
        Extensions({"thing": object()})
    with pytest.raises(UserError, match=r"extra_state\['box'\].state_dict\(\) cannot be stored"):
        Extensions({"box": Box({1, 2})})  # a set: not storable without pickle
    ext = Extensions({"box": Box(torch.arange(3)), "other": Box(1)})
    told = []
    ext.load(lambda stem: {"value": torch.ones(2)} if stem == "extra-box" else None, told.append)
    assert torch.equal(ext.objects["box"].value, torch.ones(2)) and ext.objects["other"].value == 1
    assert told == ["extra_state 'other': not in the checkpoint (registered after it was saved); starting it fresh"]


@pytest.mark.slow
def test_export_is_a_usable_hf_directory_with_tokenizer(tmp_path):
    """Own jsonl + tokenizer.json: the checkpoint carries the tokenizer, and `ckpt export` writes it
    next to the weights with the special tokens the run used, so transformers loads both."""
    from transformers import AutoConfig, AutoTokenizer

    from test_data import make_hf_tokenizer

    tok = make_hf_tokenizer(tmp_path / "tok", ["<|endoftext|>", "<pad>"])
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": f"document {i}: the grass is green and the sky is blue."}) + "\n"
                            for i in range(200)))
    path, run_dir = write_config(tmp_path, "own", BASE, train={"max_steps": 1},
                                 checkpoint={"every_micro_batches": 0},
                                 data={"type": "text", "paths": [str(data)], "tokenizer": str(tok), "seq_len": 64,
                                       "passkey": {}}, model={"vocab_size": 512})
    r = run([sys.executable, str(ROOT / "seqpar" / "train.py"), "--config", str(path)])
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "hf"
    ex = run([sys.executable, "-m", "seqpar.ckpt", "export", str(run_dir), str(out)])
    assert ex.returncode == 0, ex.stderr
    assert {"tokenizer.json", "tokenizer_config.json", "config.json"} <= {p.name for p in out.iterdir()}
    loaded = AutoTokenizer.from_pretrained(out)
    config = AutoConfig.from_pretrained(out)
    assert loaded.eos_token == "<|endoftext|>" and config.eos_token_id == loaded.eos_token_id
