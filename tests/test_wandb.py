"""logging.wandb: the metrics records go to a W&B run (rank 0), a resumed run continues the same W&B
run, a fresh start opens a new one; without wandb installed, one line before any work. W&B itself
is replaced by a stand-in module that records its calls (the real one needs an account)."""

from __future__ import annotations

import json
from pathlib import Path

from common import ENV, command, run

FAKE = '''
import json, os, uuid

def _rec(x):
    with open(os.environ["FAKE_WANDB_LOG"], "a") as f:
        f.write(json.dumps(x) + "\\n")

class util:
    @staticmethod
    def generate_id():
        return uuid.uuid4().hex[:8]

class _Run:
    def log(self, data, step=None):
        _rec({"log": data, "step": step})

    def finish(self):
        _rec({"finish": True})

def init(**kw):
    config = kw.pop("config") or {}
    _rec({"init": kw, "config_sections": sorted(config)})
    return _Run()
'''


def _calls(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_metrics_go_to_one_wandb_run_across_a_resume(tmp_path):
    (tmp_path / "fake" / "wandb").mkdir(parents=True)
    (tmp_path / "fake" / "wandb" / "__init__.py").write_text(FAKE)
    log = tmp_path / "calls.jsonl"
    env = {**ENV, "PYTHONPATH": f"{tmp_path / 'fake'}:{ENV.get('PYTHONPATH', '')}", "FAKE_WANDB_LOG": str(log)}
    sections = {"logging": {"progress_bar": False, "tensorboard": "off", "log_every": 1,
                            "wandb": {"project": "seqpar-test", "tags": ["ci"], "mode": "offline"}},
                "train": {"max_steps": 3, "global_batch_size": 2},
                "checkpoint": {"every_micro_batches": 0, "every_steps": 1}}
    cmd, run_dir = command(tmp_path, "run", 1, **sections)
    first = run(cmd, timeout=300, env=env)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    calls = _calls(log)
    init = calls[0]["init"]
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    assert init == {"project": "seqpar-test", "entity": None, "name": "run", "group": None, "tags": ["ci"],
                    "mode": "offline", "dir": str(run_dir), "id": run_id, "resume": "allow"}
    assert {"model", "data", "train", "logging"} <= set(calls[0]["config_sections"])
    steps = [c["step"] for c in calls if "log" in c and "loss" in c["log"]]
    assert steps == [1, 2, 3] and calls[-1] == {"finish": True}
    # the metrics records are the ones metrics.jsonl holds
    rows = {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}
    assert {c["step"]: c["log"]["loss"] for c in calls if "log" in c and "loss" in c["log"]} == rows

    # a resumed (extended) run continues the same W&B run
    log.unlink()
    more = run(cmd + ["--train.max_steps", "5", "--checkpoint.allow_changes", "[train.max_steps]"], env=env)
    assert more.returncode == 0 and "resumed from" in more.stdout, more.stdout[-2000:] + more.stderr[-2000:]
    calls = _calls(log)
    assert calls[0]["init"]["id"] == run_id
    assert [c["step"] for c in calls if "log" in c and "loss" in c["log"]] == [4, 5]
    # a fresh start in the same run_dir is a new W&B run
    log.unlink()
    fresh = run(cmd + ["--resume", "none"], env=env)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    new_id = _calls(log)[0]["init"]["id"]
    assert new_id != run_id and (run_dir / "wandb_run_id").read_text().strip() == new_id


def test_wandb_not_installed_is_one_line_before_any_work(tmp_path):
    cmd, run_dir = command(tmp_path, "nowandb", 1, logging={"wandb": {"project": "p"}})
    r = run(cmd, timeout=120)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == ("seqpar: logging.wandb is set but wandb is not installed: "
                                                  "pip install wandb, or remove logging.wandb")
    assert not (run_dir / "checkpoints").exists()
