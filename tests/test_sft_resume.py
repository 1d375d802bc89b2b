"""Chat fine-tuning resumes bitwise: 2 processes, the model's own chat template (data.chat_template
hf), best-fit packing (sequences gather examples from all over the files), weight-0 replies, a long
example cut and one left out, shuffled; a run stopped inside an accumulation window and resumed ends
in the same state, file for file, as one that ran straight through."""

from __future__ import annotations

import os

import numpy as np
import pytest
from common import BASE, ENV, command, final_hashes, run
from test_data import write_jsonl

from seqpar.checkpoint.runstate import read_run_state
from test_data_chat import CHATML, model_dir, unmarked


@pytest.mark.slow
def test_chat_sft_resume_is_bitwise(tmp_path):
    d = model_dir(tmp_path, unmarked(CHATML), eos_token="<|im_end|>")
    rng = np.random.default_rng(0)
    words = ["hello", "world", "tokens", "labels", "the", "quick", "brown", "fox", "lazy", "dog"]
    records = []
    for k in range(48):
        turns, n = [], int(rng.integers(1, 4))
        for t in range(n):
            turns.append({"role": "user", "content": " ".join(rng.choice(words, int(rng.integers(2, 12))))})
            reply = {"role": "assistant", "content": " ".join(rng.choice(words, int(rng.integers(1, 30))))}
            if t == 0 and n > 1 and k % 5 == 0:
                reply["weight"] = 0  # kept in context, not trained
            turns.append(reply)
        records.append({"messages": turns})
    records[7] = {"messages": [{"role": "user", "content": "fox " * 300}, {"role": "assistant", "content": "no"}]}
    records[9] = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "dog " * 300}]}
    path = write_jsonl(tmp_path / "chat.jsonl", records)
    sections = {
        "model": {**BASE["model"], "vocab_size": 512},
        "data": {"type": "sft", "paths": [str(path)], "tokenizer": str(d / "tokenizer.json"), "seq_len": 128,
                 "chat_template": "hf", "packing": "best_fit", "passkey": {}},
        "train": {**BASE["train"], "max_steps": 3, "global_batch_size": 4},
        "checkpoint": {"every_micro_batches": 0, "keep_last": 3},
    }
    straight, a_dir = command(tmp_path, "straight", 2, **sections)
    r = run(straight, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "best_fit packing" in r.stdout and "1 left out with nothing to train on" in r.stdout, r.stdout

    stopped, b_dir = command(tmp_path, "stopped", 2, **sections)
    env = {**ENV, "SEQPAR_STOP_AFTER_MICRO_BATCHES": "3"}  # inside the second step's window
    r = run(stopped, timeout=600, env=env)
    assert read_run_state(b_dir / "run_state.json")["state"] == "preempted", r.stderr[-3000:]  # torchrun: exit 1
    r = run(stopped, timeout=600)
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr[-3000:]
    resumed = [line for line in r.stdout.splitlines() if line.startswith("resumed from")][0]
    assert "seq000000" not in resumed, resumed  # really mid-window
    assert final_hashes(a_dir) == final_hashes(b_dir)
    assert os.path.isdir(b_dir / "cache")  # the run's own cache was used by both attempts
