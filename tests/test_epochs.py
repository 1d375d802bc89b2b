"""train.epochs: max_steps from the training data's size at start-up; extending a run by epochs
resumes like extending it by steps."""

from __future__ import annotations

import json

import pytest
import yaml
from common import BASE, command, run

from seqpar.config import ConfigError, load_config


def test_epochs_config(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train: {epochs: 2, warmup_steps: 500}\n")
    cfg = load_config(path)  # a warmup longer than the default max_steps waits for the data's size
    assert cfg.train.epochs == 2 and cfg.train.warmup_steps == 500
    both = tmp_path / "both.yaml"
    both.write_text("train: {epochs: 2, max_steps: 10}\n")
    with pytest.raises(ConfigError, match=r"both train\.epochs and train\.max_steps are set in .*both\.yaml"):
        load_config(both)
    # a higher layer wins: the command line over the file, with a note
    cfg = load_config(path, ["--train.max_steps", "10", "--train.warmup_steps", "2"])
    assert cfg.train.epochs is None and cfg.train.max_steps == 10
    assert any("--train.max_steps replaces train.epochs=2" in n for n in cfg.notices)
    cfg = load_config(None, ["--train.epochs", "3"])  # the embedded default sets max_steps
    assert cfg.train.epochs == 3 and any("--train.epochs replaces train.max_steps=1200" in n for n in cfg.notices)
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        load_config(path, ["--train.epochs", "0"])
    with pytest.raises(ConfigError, match=r"did you mean.*train\.epochs"):
        load_config(None, ["--train.num_train_epochs", "3"])


@pytest.mark.slow
def test_epochs_set_max_steps_and_extend(tmp_path):
    over = {"data": {**BASE["data"], "num_samples": 40}, "train": {**BASE["train"], "epochs": 0.5,
                                                                   "global_batch_size": 8, "warmup_steps": 1}}
    cmd, run_dir = command(tmp_path, "ep", 1, **over)
    conf = tmp_path / "ep.yaml"  # the base config sets max_steps: epochs replaces it
    data = yaml.safe_load(conf.read_text())
    del data["train"]["max_steps"]
    conf.write_text(yaml.safe_dump(data))
    r = run(cmd)
    assert r.returncode == 0, r.stderr[-3000:]
    # ceil(0.5 x 40 sequences / 8 per step) = 3 steps
    assert "optim   3 steps (0.60 epochs of 40 sequences)" in r.stdout, r.stdout
    steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert steps[-1] == 3
    r = run(cmd + ["--train.epochs", "1"])
    assert r.returncode != 0 and "train.epochs: 0.5 -> 1" in r.stderr and "allow_changes" in r.stderr
    r = run(cmd + ["--train.epochs", "1", "--checkpoint.allow_changes", "[train.epochs]"])
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr[-3000:]
    assert "optim   5 steps" in r.stdout
    steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert steps[-1] == 5

    # a warmup longer than the steps epochs give is fitted into them, with a note
    r = run(cmd + ["--train.warmup_steps", "10", "--logging.run_dir", str(tmp_path / "clamp")])
    assert r.returncode == 0 and "train.warmup_steps=10 is more than the 3 steps of train.epochs=0.5" in r.stderr
    assert "warmup 3," in r.stdout
