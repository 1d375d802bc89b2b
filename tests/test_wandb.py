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
    def __init__(self, run_id):
        self.id = run_id

    def log(self, data, step=None):
        if os.environ.get("FAKE_WANDB_BROKEN"):  # W&B's service process gone (a preemption's SIGTERM)
            raise BrokenPipeError("wandb-core is gone")
        _rec({"log": data, "step": step})

    def mark_preempting(self):
        _rec({"preempting": True})

    def finish(self, exit_code=None):
        _rec({"finish": exit_code})

def init(**kw):
    config = kw.pop("config") or {}
    _rec({"init": kw, "config_sections": sorted(config), "resumed_from": config.get("resumed_from_wandb_run")})
    return _Run(kw["id"])
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
                    "mode": "offline", "dir": str(run_dir), "id": run_id, "resume": "allow", "allow_val_change": True}
    assert {"model", "data", "train", "logging"} <= set(calls[0]["config_sections"])
    steps = [c["step"] for c in calls if "log" in c and "loss" in c["log"]]
    assert steps == [1, 2, 3] and calls[-1] == {"finish": 0}
    # the metrics records are the ones metrics.jsonl holds
    rows = {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}
    assert {c["step"]: c["log"]["loss"] for c in calls if "log" in c and "loss" in c["log"]} == rows

    # the checkpoints record the W&B run
    ck = run_dir / "checkpoints"
    newest = ck / (ck / "latest").read_text().strip()
    assert json.loads((newest / "trainer_state.json").read_text())["wandb_run_id"] == run_id

    # a stop (preemption): the stop's checkpoint is saved although W&B's service is gone, and the
    # resumed run (--resume auto, extended) continues the same W&B run
    log.unlink()
    more_cmd = cmd + ["--train.max_steps", "6", "--checkpoint.allow_changes", "[train.max_steps]"]
    stopped = run(more_cmd, env={**env, "SEQPAR_STOP_AFTER_MICRO_BATCHES": "3", "FAKE_WANDB_BROKEN": "1"})
    assert stopped.returncode == 75 and "W&B logging stopped (BrokenPipeError" in stopped.stdout, stopped.stdout[-2000:]
    assert _calls(log)[0]["init"]["id"] == run_id
    log.unlink()
    more = run(more_cmd, env=env)
    assert more.returncode == 0 and "resumed from" in more.stdout, more.stdout[-2000:] + more.stderr[-2000:]
    calls = _calls(log)
    assert calls[0]["init"]["id"] == run_id and calls[0]["resumed_from"] is None
    assert [c["step"] for c in calls if "log" in c and "loss" in c["log"]] == [5, 6]
    # a rollback to a chosen older checkpoint: a new W&B run (continuing would drop the repeated
    # steps), its config naming the one it came from
    log.unlink()
    older = sorted(p for p in ck.iterdir() if p.name.startswith("step"))[0]
    back = run(cmd + ["--train.max_steps", "6", "--checkpoint.allow_changes", "[train.max_steps]",
                      "--resume", str(older)], env=env)
    assert back.returncode == 0, back.stderr[-2000:]
    first = _calls(log)[0]
    assert first["init"]["id"] != run_id and first["resumed_from"] == run_id
    # a fresh start in the same run_dir is a new W&B run
    log.unlink()
    fresh = run(cmd + ["--resume", "none"], env={**env, "SEQPAR_STOP_AFTER_MICRO_BATCHES": "3"})
    assert fresh.returncode == 75, fresh.stderr[-2000:]
    calls = _calls(log)
    new_id = calls[0]["init"]["id"]
    assert new_id not in (run_id, first["init"]["id"]) and (run_dir / "wandb_run_id").read_text().strip() == new_id
    assert calls[0]["resumed_from"] is None
    assert calls[-2:] == [{"preempting": True}, {"finish": 75}]  # W&B shows the run preempted


def test_wandb_not_installed_is_one_line_before_any_work(tmp_path):
    cmd, run_dir = command(tmp_path, "nowandb", 1, logging={"wandb": {"project": "p"}})
    r = run(cmd, timeout=120)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == ("seqpar: logging.wandb is set but wandb is not installed: "
                                                  "pip install wandb, or remove logging.wandb")
    assert not (run_dir / "checkpoints").exists()
