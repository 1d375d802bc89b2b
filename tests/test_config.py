"""Config: every error names the key and says how to fix it; overrides; DeepSpeed derivation."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from seqpar.config import ConfigError, load_config, parse_overrides, validate_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def write(tmp_path: Path, data: dict | str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return p


def error_of(tmp_path: Path, data: dict | str, overrides: list[str] | None = None) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, data), overrides)
    return str(e.value)


# (yaml content, fragments that must all appear in the message)
ERROR_CASES = {
    "unknown section": ({"trian": {"lr": 1}}, ["trian", "unknown key", "did you mean 'train'"]),
    "unknown key": ({"train": {"lrr": 1}}, ["train.lrr", "did you mean 'train.lr'"]),
    "unknown nested key": ({"model": {"moe": {"num_expert": 4}, "arch": "mixtral"}}, ["model.moe.num_expert", "num_experts"]),
    "wrong type": ({"train": {"lr": "fast"}}, ["train.lr", "valid number", "'fast'"]),
    "bad literal": ({"parallel": {"zero_stage": 4}}, ["parallel.zero_stage", "0, 1, 2 or 3"]),
    "negative": ({"train": {"max_steps": 0}}, ["train.max_steps", "greater than or equal to 1"]),
    "kv heads": ({"model": {"num_attention_heads": 4, "num_key_value_heads": 3}}, ["num_key_value_heads=3", "divide"]),
    "hidden vs heads": ({"model": {"hidden_size": 130, "num_attention_heads": 4}}, ["hidden_size=130", "model.head_dim"]),
    "odd head dim": ({"model": {"hidden_size": 12, "num_attention_heads": 4}}, ["head dim 3", "even"]),
    "moe arch without moe": ({"model": {"arch": "mixtral"}}, ["mixtral", "add a model.moe section"]),
    "moe with dense arch": ({"model": {"arch": "llama", "moe": {}}}, ["model.moe is set", "dense"]),
    "top_k > experts": ({"model": {"arch": "mixtral", "moe": {"num_experts": 2, "top_k": 3}}}, ["top_k=3", "model.moe.top_k"]),
    "shared gate w/o expert": ({"model": {"arch": "qwen2_moe", "moe": {"shared_expert_gate": True}}}, ["shared_expert_intermediate_size"]),
    "mlp_only_layers range": ({"model": {"arch": "qwen2_moe", "num_hidden_layers": 2, "moe": {"mlp_only_layers": [5]}}}, ["mlp_only_layers", "[5]"]),
    "warmup > steps": ({"train": {"max_steps": 5, "warmup_steps": 10}}, ["warmup_steps=10", "max_steps=5"]),
    "betas": ({"train": {"betas": [0.9, 1.5]}}, ["train.betas", "[0, 1)"]),
    "derived ds key": ({"deepspeed": {"train_batch_size": 8}}, ["deepspeed.train_batch_size", "train.global_batch_size"]),
    "derived ds stage": ({"deepspeed": {"zero_optimization": {"stage": 1}}}, ["zero_optimization.stage", "parallel.zero_stage"]),
    "offload": ({"deepspeed": {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}},
                ["zero_optimization.offload_optimizer", "memory.offload_optimizer", "remove it"]),
    "legacy offload": ({"deepspeed": {"zero_optimization": {"cpu_offload": True}}}, ["zero_optimization.cpu_offload"]),
    "bfloat16 key": ({"deepspeed": {"bfloat16": {"enabled": True}}}, ["deepspeed.bfloat16", "train.precision"]),
    "zero_optimization not a mapping": ({"deepspeed": {"zero_optimization": True}}, ["must be a mapping", "parallel.zero_stage"]),
    "fp32 accumulation at zero-2 bf16": ({"train": {"precision": "bf16"}, "deepspeed": {"data_types": {"grad_accum_dtype": "fp32"}}},
                                         ["grad_accum_dtype=fp32", "zero_stage 1 or 3"]),
    "fp16": ({"deepspeed": {"fp16": {"enabled": True}}}, ["deepspeed.fp16", "bf16"]),
    "ulysses vs heads": ({"parallel": {"ulysses_degree": 3}}, ["num_attention_heads=4", "ulysses_degree=3"]),
    "text needs paths": ({"data": {"type": "text"}}, ["data.type 'text'", "data.paths"]),
    "missing data file": ({"data": {"type": "tokens", "paths": ["/nonexistent/x.bin"]}}, ["/nonexistent/x.bin", "does not exist"]),
    "tokenizer not file": ({"data": {"type": "sft", "paths": ["/"], "tokenizer": "/nonexistent.json"}}, ["data.tokenizer", "not a file"]),
    "tokenizer with passkey": ({"data": {"tokenizer": __file__}}, ["data.tokenizer", "passkey"]),
    "chat template": ({"data": {"chat_template": "{content}"}}, ["chat_template", "{role}"]),
    "negative seed": ({"data": {"seed": -1}}, ["data.seed", "greater than or equal to 0"]),
    "vocab too small": ({"model": {"vocab_size": 100}}, ["model.vocab_size=100", "259"]),
    "hf_path missing": ({"model": {"hf_path": "/nonexistent/model"}}, ["model.hf_path", "config.json", "not found"]),
    "eval positions not increasing": ({"train": {"eval_by_position": [64, 32]}}, ["train.eval_by_position", "increasing"]),
    "eval positions past seq_len": ({"train": {"eval_by_position": [1024]}, "data": {"seq_len": 1024}},
                                    ["train.eval_by_position=[1024]", "below data.seq_len=1024"]),
    "eval per file, same names": ({"data": {"type": "text", "paths": [__file__], "eval_per_file": True,
                                            "eval_paths": ["/x/held.jsonl", "/y/held.jsonl"]}},
                                  ["data.eval_paths[0] and [1] are both 'held'", "rename"]),
    "eval per file, passkey": ({"data": {"eval_per_file": True}}, ["data.eval_per_file", "passkey", "remove"]),
    "not a mapping": ("- 1\n- 2\n", ["must be a mapping"]),
    "bad yaml": ("train: [1, 2\n", ["not valid YAML"]),
    "bad tensorboard": ({"logging": {"tensorboard": "maybe"}}, ["logging.tensorboard", "'auto', 'on' or 'off'"]),
    # YAML 1.1 reads an unquoted 0640 as the octal number 416
    "unquoted file mode": ("checkpoint:\n  file_mode: 0640\n", ["checkpoint.file_mode", "number 416", "'0640'"]),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_config_errors_name_key_and_fix(tmp_path, case):
    data, fragments = ERROR_CASES[case]
    msg = error_of(tmp_path, data)
    for frag in fragments:
        assert frag in msg, f"{case}: {frag!r} not in:\n{msg}"


def test_a_cross_key_error_names_the_flag_that_set_a_key(tmp_path):
    """A check over several keys (its message names them) says which the command line set: the
    file is named in the head, so the flag would otherwise look innocent."""
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, {"model": {"arch": "llama"}}), ["--model.moe.top_k", "2"])
    assert "model.moe is set but arch 'llama' is dense" in str(e.value)
    assert str(e.value).endswith("(set by --model.moe.top_k on the command line)")
    with pytest.raises(ConfigError) as e:  # set in the file: no such note
        load_config(write(tmp_path, {"model": {"arch": "llama", "moe": {"top_k": 2}}}), [])
    assert "set by" not in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent/config.yaml")
    (tmp_path / "a.yaml").write_text("{}")
    with pytest.raises(ConfigError, match=r"is a directory: pass a YAML file in it, e.g. --config .*a.yaml \(1 there\)"):
        load_config(str(tmp_path))


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--train.lr"], "has no value"),
        (["train.lr", "1"], "unexpected argument"),
        (["--lr", "1"], "unexpected argument"),
    ],
)
def test_malformed_overrides(args, fragment):
    with pytest.raises(ConfigError, match=fragment):
        parse_overrides(args)


def test_overrides_are_typed_and_nested(tmp_path):
    cfg = load_config(
        write(tmp_path, {"model": {"arch": "mixtral", "moe": {"num_experts": 4}}}),
        ["--train.lr", "1e-3", "--model.moe.top_k=1", "--memory.activation_checkpointing", "true",
         "--deepspeed.zero_optimization.overlap_comm", "false"],
    )
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)
    assert cfg.model.moe.top_k == 1 and cfg.model.moe.num_experts == 4
    assert cfg.memory.activation_checkpointing == "full"
    ds = cfg.deepspeed_config(cfg.layout(1))
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": False}


def test_override_of_unknown_key_is_an_error(tmp_path):
    msg = error_of(tmp_path, {}, ["--train.learning_rate", "1"])
    assert "train.learning_rate" in msg and "unknown key" in msg


def test_layout_and_deepspeed_config():
    cfg = validate_config({"train": {"micro_batch_size": 2, "global_batch_size": 16}, "parallel": {"zero_stage": 3}})
    lay = cfg.layout(4)
    assert (lay.dp, lay.grad_accum_steps, lay.global_batch_size) == (4, 2, 16)
    ds = cfg.deepspeed_config(lay)
    assert ds["train_batch_size"] == 16 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["zero_optimization"]["stage"] == 3
    assert ds["optimizer"]["params"]["torch_adam"] is True and "bf16" not in ds
    bf = validate_config({"train": {"precision": "bf16"}})
    assert bf.deepspeed_config(bf.layout(1))["bf16"] == {"enabled": True}
    # grad_accum_steps instead of a global batch: global = micro x dp x accum
    cfg = validate_config({"train": {"grad_accum_steps": 3}})
    assert cfg.layout(2).global_batch_size == 6


@pytest.mark.parametrize(
    "train, world, fragment",
    [
        ({"global_batch_size": 6, "micro_batch_size": 4}, 1, "not a multiple of micro_batch_size 4"),
        ({"global_batch_size": 8}, 3, "data-parallel degree 3"),
        ({"global_batch_size": 8, "grad_accum_steps": 3}, 2, "set only one"),
    ],
)
def test_layout_errors(train, world, fragment):
    cfg = validate_config({"train": train})
    with pytest.raises(ConfigError, match=fragment):
        cfg.layout(world)


def test_world_not_divisible_by_sp():
    cfg = validate_config({"parallel": {"ulysses_degree": 2, "ring_degree": 2}})
    with pytest.raises(ConfigError, match="launch a multiple of 4"):
        cfg.layout(6)


def test_fingerprint_changes_with_config():
    a, b = validate_config({}), validate_config({"train": {"lr": 1e-4}})
    assert a.fingerprint() == validate_config({}).fingerprint() != b.fingerprint()


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_validate(path, tmp_path):
    """As documented in each file's header: data files come from --data.paths."""
    needs_files = yaml.safe_load(path.read_text())["data"]["type"] != "passkey"
    corpus = tmp_path / "corpus.bin"
    corpus.write_bytes(b"\0" * 64)
    cfg = load_config(path, ["--data.paths", f"[{corpus}]"] if needs_files else None)
    world = {"llama3-8b-32k": 8, "qwen3-moe-64k": 8, "llama3.2-1b-long": 1}.get(path.stem, 2)  # as in the headers
    cfg.layout(world)


def test_realistic_configs_present(tmp_path):
    names = {p.stem for p in CONFIGS}
    assert {"tiny-cpu", "llama3-8b-32k", "qwen3-moe-64k"} <= names
    corpus = tmp_path / "c.bin"
    corpus.write_bytes(b"\0" * 64)
    files = ["--data.paths", f"[{corpus}]"]
    llama = load_config(ROOT / "configs" / "llama3-8b-32k.yaml", files)
    assert llama.data.seq_len == 32768 and llama.model.num_hidden_layers == 32
    moe = load_config(ROOT / "configs" / "qwen3-moe-64k.yaml", files)
    assert moe.data.seq_len == 65536 and moe.model.moe.num_experts == 128


def test_hf_path_reads_architecture(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({
        "model_type": "qwen2", "vocab_size": 400, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rope_theta": 10000.0, "tie_word_embeddings": True,
    }))
    cfg = validate_config({"model": {"hf_path": str(hf), "rope_theta": 50000.0}})
    assert cfg.model.arch == "qwen2" and cfg.model.attention_bias and cfg.model.tie_word_embeddings
    assert cfg.model.rope_theta == 50000.0  # a permitted override (context extension)
    with pytest.raises(ConfigError, match=r"model.hidden_size=128 \(config.json: 64\)"):
        validate_config({"model": {"hf_path": str(hf), "hidden_size": 128}})


def test_cli_rejects_bad_config_before_any_work(tmp_path):
    bad = write(tmp_path, {"train": {"lrr": 1}})
    r = subprocess.run(
        [sys.executable, str(ROOT / "seqpar" / "train.py"), "--config", str(bad)],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 2
    assert "train.lrr" in r.stderr and "did you mean 'train.lr'" in r.stderr
    r = subprocess.run(
        [sys.executable, str(ROOT / "seqpar" / "train.py"), "--print-config", "--train.lr", "0.5"],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0 and yaml.safe_load(r.stdout)["train"]["lr"] == 0.5


def test_configuration_doc_is_current():
    """docs/configuration.md embeds the generated key table; regenerate it when keys change."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from config_reference import reference

    doc = (ROOT / "docs" / "configuration.md").read_text()
    start = doc.index("<!-- GENERATED")
    body = doc[doc.index("\n", start) + 1 : doc.index("<!-- END GENERATED -->")]
    assert body == reference(), "run: python scripts/config_reference.py and paste into docs/configuration.md"


def test_resume_ignores_keys_added_since_the_checkpoint():
    """A checkpoint's config lacks keys a newer seqpar added: they take their defaults, not count
    as changes; real changes are still refused."""
    from seqpar.checkpoint.manager import ResumeError, check_resume_config
    from seqpar.engine.resume import _with_defaults

    now = validate_config({"model": {"rope_scaling": {"rope_type": "llama3"}}}).model_dump(mode="json")
    old = copy.deepcopy(now)
    del old["parallel"]["zero3_init"], old["model"]["rope_scaling"]["beta_fast"], old["checkpoint"]["elastic"]
    with pytest.raises(ResumeError, match="beta_fast"):
        check_resume_config(old, now, [])
    assert check_resume_config(_with_defaults(old), now, []) == []
    old["model"]["hidden_size"] = 64
    with pytest.raises(ResumeError, match="model.hidden_size"):
        check_resume_config(_with_defaults(old), now, [])


def test_unsupported_deepspeed_settings_are_refused(tmp_path):
    """Settings that keep state where checkpoints do not look are refused after start-up too,
    whatever spelling reached DeepSpeed (the YAML checks above see only the usual keys)."""
    from common import torchrun

    r = torchrun(1, "ds_settings_worker.py", str(tmp_path / "found.json"), cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    found = json.loads((tmp_path / "found.json").read_text())
    assert found["supported"] == []
    assert any("offload_optimizer" in w for w in found["legacy cpu_offload"]), found
    assert any("train.precision" in w for w in found["bfloat16 key"]), found
    assert any("grad_accum_dtype" in w for w in found["fp32 accumulation spelt float"]), found
    assert any("elastic_checkpoint" in w for w in found["elastic_checkpoint"]), found
    assert any("compute_grad_norm false" in w and "not finite" in w for w in found["no grad norm"]), found
    assert "managed_gradient_accumulation" in found["trainer"] and "not supported" in found["trainer"], found
