"""Config usability (issue 10): short runs, suggestions by meaning, --model.hf_path with the embedded
default, paths relative to the config file, --print-config reporting what a run would refuse.

Most tests call ``load_config`` or ``seqpar.train.main([...])`` in-process; a few run the command
line itself where the item is about it (all with --print-config, which exits before any training).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from seqpar.config import (
    _ALIASES,
    _SECTION_ALIASES,
    Config,
    ConfigError,
    _all_keys,
    load_config,
    validate_config,
)

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "seqpar" / "train.py"


def write(path: Path, data: dict | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def error(path: Path | None, overrides: list[str] | None = None) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides)
    return str(e.value)


@pytest.fixture
def main(monkeypatch, capsys):
    """``seqpar/train.py ARGS`` in this process: (exit status, stdout, stderr). The preemption
    handlers main() installs are put back afterwards."""
    from seqpar.checkpoint.signals import SIGNALS, StopSignal

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("SEQPAR_PID_DIR", raising=False)
    before = {s: signal.getsignal(s) for s in SIGNALS}
    installed = StopSignal._installed

    def run(*argv: str) -> tuple[int, str, str]:
        from seqpar.train import main as train_main

        capsys.readouterr()
        code = train_main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    yield run
    for s, h in before.items():
        signal.signal(s, h)
    StopSignal._installed = installed


def cli(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    env.pop("RANK", None)
    return subprocess.run([sys.executable, str(TRAIN), *argv], capture_output=True, text=True, timeout=120, check=False,
                          cwd=cwd or ROOT, env=env)


def hf_dir(root: Path, weights: bool = False, **over) -> Path:
    """A Hugging Face model directory: config.json, and with ``weights`` a placeholder
    model.safetensors (the config checks only that the weights are there)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({
        "model_type": "qwen2", "vocab_size": 400, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rope_theta": 10000.0, "tie_word_embeddings": True, "max_position_embeddings": 32768, **over,
    }))
    if weights:
        (root / "model.safetensors").write_bytes(b"")
    return root


# ----------------------------------------------------------------------------------------------
# item 3: a short run needs one flag
# ----------------------------------------------------------------------------------------------
def test_docs_short_run_example_works():
    """The command docs/configuration.md shows, as written: a 10-step run of the embedded default
    (warmup 20) prints its config; the warmup is fitted to the run, with one notice line."""
    doc = (ROOT / "docs" / "configuration.md").read_text()
    line = next(ln for ln in doc.splitlines() if ln.startswith("python seqpar/train.py --print-config"))
    argv = line.split("#")[0].split()[2:]
    assert argv == ["--print-config", "--train.max_steps", "10"]
    r = cli(*argv)
    assert r.returncode == 0, r.stderr
    train = yaml.safe_load(r.stdout)["train"]  # stdout stays pure YAML: the notice is on stderr
    assert (train["max_steps"], train["warmup_steps"]) == (10, 10)
    notes = [ln for ln in r.stderr.splitlines() if ln.startswith("seqpar:")]
    assert len(notes) == 1 and "train.warmup_steps=20" in notes[0] and "--train.warmup_steps" in notes[0], r.stderr


@pytest.mark.parametrize(
    "file_train, argv, expect",
    [
        # warmup from a lower layer than max_steps: fitted to the run, with a notice
        ({"warmup_steps": 100}, ["--train.max_steps", "10"], 10),
        ({"max_steps": 5}, [], 5),  # seqpar's default warmup (10) under a file's max_steps
        ({}, ["--train.max_steps", "3"], 3),
        # both chosen in the same place, or the warmup later: an error naming the key and the value
        ({"max_steps": 5, "warmup_steps": 10}, [], "set train.warmup_steps to at most 5"),
        ({}, ["--train.max_steps", "10", "--train.warmup_steps", "50"], "set train.warmup_steps to at most 10"),
        ({"max_steps": 5}, ["--train.warmup_steps", "7"], "--train.warmup_steps 5"),
    ],
)
def test_warmup_longer_than_the_run(tmp_path, capsys, monkeypatch, file_train, argv, expect):
    monkeypatch.delenv("RANK", raising=False)
    path = write(tmp_path / "c.yaml", {"train": file_train})
    if isinstance(expect, str):
        msg = error(path, argv)
        assert expect in msg and "train.warmup_steps=" in msg and "\n" not in msg, msg
        return
    cfg = load_config(path, argv)
    assert cfg.train.warmup_steps == expect == cfg.train.max_steps
    assert len(cfg.notices) == 1 and "train.warmup_steps" in cfg.notices[0]
    err = capsys.readouterr().err
    assert err.count("seqpar: note:") == 1 and f"warming up over all {expect} steps" in err


def test_notices_print_once_per_job(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "3")
    cfg = load_config(None, ["--train.max_steps", "10"])
    assert cfg.notices and capsys.readouterr().err == ""  # only rank 0 prints
    assert validate_config({"train": {"max_steps": 10}}).notices == []


# ----------------------------------------------------------------------------------------------
# item 4: suggestions by meaning, then spelling among keys of the same section and kind
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "typed, meant",
    [
        ("train.steps", ["train.max_steps"]),
        ("train.stepz", ["train.max_steps"]),
        ("train.learning_rate", ["train.lr"]),
        ("train.num_train_epochs", ["train.epochs"]),
        ("train.max_epochs", ["train.epochs"]),
        ("train.warmup", ["train.warmup_steps"]),
        ("train.lr_warmup", ["train.warmup_steps"]),
        ("train.batch_size", ["train.micro_batch_size", "train.global_batch_size"]),
        ("train.per_device_train_batch_size", ["train.micro_batch_size"]),
        ("train.gradient_accumulation_steps", ["train.grad_accum_steps"]),
        ("train.seq_length", ["data.seq_len"]),
        ("train.max_seq_len", ["data.seq_len"]),
        ("train.seq_len", ["data.seq_len"]),  # our own name, in another section
        ("data.model_name_or_path", ["model.hf_path"]),
        ("train.adam_epsilon", ["train.eps"]),  # a real synonym of eps is still found
        ("train.lrr", ["train.lr"]),
        ("train.weight_dacay", ["train.weight_decay"]),
        ("train.learnig_rate", ["train.lr"]),  # a misspelt alias
        ("training.steps", ["train.max_steps"]),  # another trainer's section name, completed
    ],
)
def test_command_line_suggestions(typed, meant):
    msg = error(None, [f"--{typed}", "10"])
    assert "\n" not in msg, msg  # one problem, one line
    assert f"--{typed}: unknown key" in msg, msg
    for key in meant:
        assert f"'--{key}'" in msg, msg
    assert "train.eps'" not in msg or meant == ["train.eps"], msg


def test_cli_suggestion_is_one_line_and_never_eps(main):
    code, out, err = main("--print-config", "--train.steps", "10")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("seqpar: "), err
    assert "did you mean '--train.max_steps' (optimizer steps)?" in err and "train.eps" not in err


def test_spelling_only_suggests_keys_that_accept_the_value():
    """`seeed 3` is train.seed; `seeed fast` fits no key of train (seed wants an int): no guess."""
    assert "'--train.seed'" in error(None, ["--train.seeed", "3"])
    msg = error(None, ["--train.seeed", "fast"])
    assert "did you mean" not in msg and "valid keys in train: max_steps" in msg, msg
    # the same name in another section counts only when the value fits there
    assert "'--model.arch'" in error(None, ["--model.type", "qwen2"])


@pytest.mark.parametrize(
    "data, fragment",
    [
        ({"train": {"steps": 10}}, "train.steps: unknown key; did you mean 'train.max_steps' (optimizer steps)?"),
        ({"train": {"learning_rate": 1e-3}}, "did you mean 'train.lr'"),
        ({"model": {"model_name_or_path": "x"}}, "did you mean 'model.hf_path'"),
        ({"lr": 1e-3}, "lr: unknown key; did you mean 'train.lr'"),
        ({"trainer": {"lr": 1e-3}}, "did you mean 'train'"),
        ({"data": {"max_seq_length": 512}}, "did you mean 'data.seq_len'"),
    ],
)
def test_yaml_suggestions(tmp_path, data, fragment):
    msg = error(write(tmp_path / "c.yaml", data))
    assert fragment in msg and "\n" not in msg, msg
    assert "train.eps" not in msg, msg


def test_alias_table_names_real_keys():
    keys = _all_keys()
    for alias, (targets, _) in _ALIASES.items():
        assert alias not in keys and all(t in keys for t in targets), alias
    assert set(_SECTION_ALIASES.values()) <= set(Config.model_fields)


# ----------------------------------------------------------------------------------------------
# item 7: --model.hf_path without --config
# ----------------------------------------------------------------------------------------------
def test_hf_path_with_the_embedded_default(tmp_path, main):
    """The embedded default's tiny model is not the user's: with --model.hf_path its model section is
    dropped (one notice), so config.json decides the architecture, max_position_embeddings included."""
    hf = hf_dir(tmp_path / "hf", weights=True)
    code, out, err = main("--print-config", "--model.hf_path", str(hf))
    assert code == 0, err
    model = yaml.safe_load(out)["model"]
    assert (model["arch"], model["hidden_size"], model["max_position_embeddings"]) == ("qwen2", 64, 32768)
    assert err.count("seqpar: note:") == 1 and "embedded default's model section" in err, err
    # a clash the user typed is still refused, naming the flag to drop
    msg = error(None, ["--model.hf_path", str(hf), "--model.hidden_size", "32"])
    assert "model.hidden_size=32 (config.json: 64)" in msg and "drop --model.hidden_size" in msg
    assert msg.count("embedded default") == 1  # the header only: nothing blamed on the default


def test_hf_path_clash_names_the_file(tmp_path):
    hf = hf_dir(tmp_path / "hf", weights=True)
    cfg = write(tmp_path / "mine.yaml", {"model": {"hidden_size": 128}})
    msg = error(cfg, ["--model.hf_path", str(hf)])
    assert f"remove model.hidden_size from {cfg}" in msg and "without a model section" in msg, msg


# ----------------------------------------------------------------------------------------------
# item 8: paths relative to the config file; bare values for list keys
# ----------------------------------------------------------------------------------------------
def test_relative_input_paths_follow_the_config_file(tmp_path, monkeypatch):
    conf = tmp_path / "exp" / "configs"
    write(conf / "data" / "train.jsonl", '{"text": "hello"}\n')
    write(conf / "data" / "eval.jsonl", '{"text": "held out"}\n')
    write(conf / "tok" / "tokenizer.json", "{}")
    hf = hf_dir(conf / "hf")
    path = write(conf / "run.yaml", {
        "model": {"hf_path": "hf", "load_weights": False},
        "data": {"type": "text", "paths": ["data/train.jsonl"], "eval_paths": ["data/eval.jsonl"],
                 "tokenizer": "tok/tokenizer.json", "cache_dir": "cache"},
        "train": {"eval_every": 10},
        "logging": {"run_dir": "runs/x"},
    })
    elsewhere = tmp_path / "somewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(path)
    assert cfg.data.paths == [conf / "data" / "train.jsonl"]
    assert cfg.data.eval_paths == [conf / "data" / "eval.jsonl"]
    assert cfg.data.tokenizer == conf / "tok" / "tokenizer.json" and cfg.model.hf_path == hf
    # what a run writes stays relative to the working directory
    assert cfg.logging.run_dir == Path("runs/x") and cfg.data.cache_dir == Path("cache")
    # the command line is relative to the working directory, as a shell user expects
    write(elsewhere / "mine.jsonl", '{"text": "x"}\n')
    assert load_config(path, ["--data.paths", "[mine.jsonl]"]).data.paths == [Path("mine.jsonl")]


def test_missing_file_says_how_the_path_was_resolved(tmp_path, monkeypatch):
    conf = tmp_path / "configs"
    path = write(conf / "c.yaml", {"data": {"type": "text", "paths": ["train.jsonl"]}})
    monkeypatch.chdir(tmp_path)
    msg = error(path)
    assert f"data.paths[0] 'train.jsonl' (relative to the config file's directory {conf}) does not exist" in msg
    assert "\n" not in msg
    # the file sits where the working directory would have found it: say so, and what to write
    write(tmp_path / "train.jsonl", '{"text": "x"}\n')
    msg = error(path)
    assert "exists relative to the current directory" in msg and "write '../train.jsonl'" in msg, msg
    # on the command line: relative to the working directory
    msg = error(None, ["--data.type", "text", "--data.paths", "nope.jsonl"])
    assert f"data.paths[0] 'nope.jsonl' (relative to the current directory {tmp_path}) does not exist" in msg
    # several missing files: one list item each, not one long line
    msg = error(None, ["--data.type", "text", "--data.paths", "[a.jsonl, b.jsonl]", "--data.tokenizer", "t.json"])
    items = [line for line in msg.splitlines() if line.startswith("  - ")]
    assert [i.split("'")[0] for i in items] == ["  - data.paths[0] ", "  - data.paths[1] ", "  - data.tokenizer "], msg


@pytest.mark.parametrize(
    "argv, key, want",
    [
        (["--data.paths", "FILE"], "paths", ["FILE"]),
        (["--checkpoint.allow_changes", "train.lr"], "allow_changes", ["train.lr"]),
        (["--model.moe.mlp_only_layers", "0"], "mlp_only_layers", [0]),
    ],
)
def test_bare_value_for_a_list_key(tmp_path, monkeypatch, argv, key, want):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "FILE", '{"text": "x"}\n')
    extra = {"paths": ["--data.type", "text"], "allow_changes": [],
             "mlp_only_layers": ["--model.arch", "qwen3_moe", "--model.qk_norm", "true", "--model.moe", "{}"]}[key]
    cfg = load_config(None, [*extra, *argv])
    got = {"paths": lambda: cfg.data.paths, "allow_changes": lambda: cfg.checkpoint.allow_changes,
           "mlp_only_layers": lambda: cfg.model.moe.mlp_only_layers}[key]()
    assert [str(g) if isinstance(g, Path) else g for g in got] == want


def test_bare_list_on_the_command_line(tmp_path):
    """`--data.paths file.jsonl`, no brackets, through the real command line."""
    write(tmp_path / "train.jsonl", '{"text": "hello"}\n')
    r = cli("--print-config", "--data.type", "text", "--data.paths", "train.jsonl", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert yaml.safe_load(r.stdout)["data"]["paths"] == ["train.jsonl"]
    # two bare values: the message shows the list syntax
    r = cli("--print-config", "--data.type", "text", "--data.paths", "train.jsonl", "b.jsonl", cwd=tmp_path)
    assert r.returncode == 2 and "write --data.paths '[train.jsonl, b.jsonl]'" in r.stderr, r.stderr


def test_scalar_for_a_list_in_yaml_shows_the_list_syntax(tmp_path):
    msg = error(write(tmp_path / "c.yaml", {"data": {"type": "tokens", "paths": "x.bin"}}))
    assert "data.paths" in msg and "write a list: [x.bin]" in msg, msg


# ----------------------------------------------------------------------------------------------
# item 2: --print-config refuses what a run would, one line each
# ----------------------------------------------------------------------------------------------
def test_print_config_reports_missing_inputs_in_one_line(tmp_path, main, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "a.jsonl", '{"text": "x"}\n')
    cases = {
        ("--data.type", "text", "--data.paths", "[missing.jsonl]"): "data.paths[0] 'missing.jsonl'",
        ("--data.type", "text", "--data.paths", "[a.jsonl]", "--data.eval_paths", "[gone.jsonl]"):
            "data.eval_paths[0] 'gone.jsonl'",
        ("--data.type", "text", "--data.paths", "[a.jsonl]", "--data.tokenizer", "tok.json"): "data.tokenizer 'tok.json'",
        ("--data.type", "text", "--data.paths", "[.]"): "is a directory",
        ("--model.hf_path", "nomodel"): "model.hf_path 'nomodel'",
        ("--data.paths", "[a.jsonl]"): "data.type is 'passkey'",  # would silently train on passkey
    }
    for argv, fragment in cases.items():
        code, out, err = main("--print-config", *argv)
        assert code == 2 and out == "", (argv, err)
        assert err.count("\n") == 1 and err.startswith("seqpar: ") and fragment in err, (argv, err)


def test_print_config_reports_missing_hf_weights(tmp_path, main):
    """config.json alone: the run would fail loading weights; the config check says so first."""
    hf = hf_dir(tmp_path / "hf")
    code, _, err = main("--print-config", "--model.hf_path", str(hf))
    assert code == 2 and err.count("\n") == 1 and "model.safetensors" in err and "model.load_weights false" in err
    code, out, _ = main("--print-config", "--model.hf_path", str(hf), "--model.load_weights", "false")
    assert code == 0 and yaml.safe_load(out)["model"]["hidden_size"] == 64


def test_print_config_error_matches_a_training_run(tmp_path):
    """Same message from --print-config and from a real start (which stops before any work)."""
    argv = ["--data.type", "tokens", "--data.paths", "nothere.bin"]
    a, b = cli("--print-config", *argv, cwd=tmp_path), cli(*argv, cwd=tmp_path)
    assert a.returncode == b.returncode == 2
    lines = [ln for ln in b.stderr.splitlines() if ln.startswith("seqpar:")]
    assert a.stderr.strip() == lines[0] and re.search(r"data\.paths\[0\] 'nothere\.bin' \(relative to", lines[0])


def test_moved_key_is_read_in_its_new_section(tmp_path):
    """train.activation_checkpointing moved to memory.activation_checkpointing: an old config
    still loads (with one note saying where it went); setting both is one clear error; the memory
    section's own consistency checks name their keys."""
    old = tmp_path / "old.yaml"
    old.write_text("train:\n  activation_checkpointing: true\n")
    cfg = load_config(old)
    assert cfg.memory.activation_checkpointing == "full"
    assert len(cfg.notices) == 1 and "memory.activation_checkpointing" in cfg.notices[0]
    both = tmp_path / "both.yaml"
    both.write_text("train:\n  activation_checkpointing: true\nmemory:\n  activation_checkpointing: selective\n")
    with pytest.raises(ConfigError, match="both train.activation_checkpointing and memory.activation_checkpointing"):
        load_config(both)
    with pytest.raises(ConfigError, match="memory.offload_activations"):
        load_config(None, ["--memory.offload_activations", "true"])
    with pytest.raises(ConfigError, match="memory.mlp_tile_tokens"):
        load_config(None, ["--memory.mlp_tile_tokens", "512"])


def test_readme_own_data_config_validates(tmp_path):
    """The README's "Your own data" config is valid as written (its paths replaced by stand-ins:
    a model directory, a tokenizer, data files), and its layout fits 8 ranks."""
    import re

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"## Your own data.*?```yaml\n(.*?)```", text, re.S).group(1)
    stand_in = {"/models/Llama-3.2-1B": str(hf_dir(tmp_path / "model", weights=True, vocab_size=400)),
                "/data/": str(tmp_path) + "/", "/runs/": str(tmp_path / "runs") + "/"}
    for a, b in stand_in.items():
        block = block.replace(a, b)
    for name in ("books.jsonl", "web.jsonl", "heldout-books.jsonl", "heldout-web.jsonl"):
        write(tmp_path / name, '{"text": "x"}\n')
    from test_data import make_hf_tokenizer

    make_hf_tokenizer(tmp_path / "model" / "tokenizer.json", ["<|endoftext|>"])
    path = write(tmp_path / "my-run.yaml", block)
    cfg = load_config(path)
    assert cfg.data.weights == [0.3, 0.7] and cfg.train.decay == "wsd" and cfg.model.arch == "qwen2"
    assert cfg.data.eval_per_file and cfg.train.eval_by_position == [4096, 16384]
    lay = cfg.layout(8)
    assert lay.dp == 2 and lay.global_batch_size == 32


def test_readme_chat_sft_config_validates(tmp_path):
    """The README's chat fine-tuning config is valid as written (stand-ins for the model folder and
    the data), fits 8 ranks, and its data builds: a chat record rendered in the model's template."""
    import re

    from test_data_chat import CHATML, CONVERSATIONS, SPECIALS, examples, unmarked

    from seqpar.data import build_dataset

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"# chat-sft\.yaml\n(.*?)```", text, re.S).group(1)
    model = hf_dir(tmp_path / "model", weights=True, vocab_size=400)
    from test_data import make_hf_tokenizer

    make_hf_tokenizer(model / "tokenizer.json", SPECIALS)
    (model / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>",
                                                             "chat_template": unmarked(CHATML)}))
    for a, b in {"/models/Qwen2.5-7B-Instruct": str(model), "/data/": str(tmp_path) + "/",
                 "/runs/": str(tmp_path / "runs") + "/"}.items():
        block = block.replace(a, b)
    write(tmp_path / "chats.jsonl", "".join(json.dumps({"messages": m}) + "\n" for m in CONVERSATIONS))
    cfg = load_config(write(tmp_path / "chat-sft.yaml", block))
    assert cfg.data.chat_template == "hf" and cfg.data.packing == "best_fit" and cfg.layout(8).dp == 2
    ds = build_dataset(cfg.data.model_copy(update={"seq_len": 256}), tmp_path / "cache")
    assert len(examples(ds)) == len(CONVERSATIONS)


def test_sequence_longer_than_declared_context_is_noted(tmp_path, capsys):
    """data.seq_len beyond model.max_position_embeddings: a note names what context extension
    usually sets; raising max_position_embeddings silences it."""
    path = write(tmp_path / "c.yaml", "data: {seq_len: 8192}\nmodel: {max_position_embeddings: 4096}\n")
    cfg = load_config(path)
    (note,) = [n for n in cfg.notices if "data.seq_len" in n]
    assert note.startswith("data.seq_len=8192 is longer than model.max_position_embeddings=4096") and \
        "raise model.rope_theta or set model.rope_scaling" in note and "at least 8192" in note
    assert "seqpar: note: data.seq_len=8192" in capsys.readouterr().err
    cfg = load_config(path, ["--model.max_position_embeddings", "8192"])
    assert not [n for n in cfg.notices if "data.seq_len" in n]
    cfg = load_config(path, ["--model.rope_scaling", "{rope_type: linear, factor: 2.0}"])
    (note,) = [n for n in cfg.notices if "data.seq_len" in n]
    assert "rope_theta" not in note and "at least 8192" in note
    # YaRN without the length it scales from: the default is named (transformers' differs)
    cfg = load_config(path, ["--model.rope_scaling", "{rope_type: yarn, factor: 2.0}"])
    (note,) = [n for n in cfg.notices if "original_max_position_embeddings" in n and "rope_scaling (yarn)" in n]
    assert "seqpar uses 8192 (transformers would read max_position_embeddings)" in note
    cfg = load_config(path, ["--model.rope_scaling",
                             "{rope_type: yarn, factor: 2.0, original_max_position_embeddings: 4096}"])
    assert not [n for n in cfg.notices if "rope_scaling (yarn)" in n]


def test_context_change_on_resume_points_to_stages():
    """Rerunning a run_dir with a longer data.seq_len (or other RoPE settings) is refused with the
    staged route (export, then a new run from it), not just --resume none, which would silently
    start over from the original weights."""
    from seqpar.checkpoint.manager import ResumeError, check_resume_config

    saved = {"data": {"seq_len": 8192}, "model": {"rope_theta": 1e6}}
    with pytest.raises(ResumeError, match=r"data\.seq_len: 8192 -> 32768 \(changes what training computes; to "
                                          r"extend the context in a new stage, export this run's checkpoint .*"
                                          r"model\.hf_path and a new logging\.run_dir; --resume none would start over"):
        check_resume_config(saved, {"data": {"seq_len": 32768}, "model": {"rope_theta": 1e6}}, [])
    with pytest.raises(ResumeError, match=r"model\.rope_theta: 1000000\.0 -> 5000000\.0 \(.*new stage"):
        check_resume_config(saved, {"data": {"seq_len": 8192}, "model": {"rope_theta": 5e6}}, [])
