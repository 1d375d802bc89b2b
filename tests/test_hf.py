"""Hugging Face import/export checked against transformers (a test-only dependency).

Each case builds a tiny random transformers model, loads its ``save_pretrained`` output into our
model (logits must match), exports ours with ``save_hf_checkpoint`` and loads that back with
``AutoModelForCausalLM.from_pretrained`` (no missing/unexpected keys, logits must match).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from seqpar.config import ModelConfig
from seqpar.models.hf import (
    hf_config_to_fields,
    load_hf_checkpoint,
    save_hf_checkpoint,
)
from seqpar.models.transformer import Transformer

import transformers  # noqa: E402  (the reference; installed by the `test` extra, never skipped)

TOL = 1e-4
SEQ = 24
BASE = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # GQA
    max_position_embeddings=256,
)
LLAMA3 = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}  # small, so positions < 24 hit all 3 bands

CASES = {
    "llama": dict(model_type="llama", rope_theta=10000.0, rope_scaling=LLAMA3),
    "llama_tied": dict(model_type="llama", tie_word_embeddings=True,
                       rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "mistral": dict(model_type="mistral", sliding_window=None, rope_theta=50000.0),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=True),
    "qwen3": dict(model_type="qwen3", head_dim=24),  # != hidden / heads = 16
    # YaRN (Qwen long context): the frequency ramp and the cos/sin attention factor
    "qwen3_yarn": dict(model_type="qwen3", rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                         "original_max_position_embeddings": 16}),
    "qwen2_yarn_tuned": dict(model_type="qwen2", rope_scaling={
        "rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32, "beta_fast": 8.0,
        "beta_slow": 2.0, "attention_factor": 0.9, "truncate": False}),
    "mixtral": dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(model_type="qwen2_moe", num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=32, shared_expert_intermediate_size=48,
                      decoder_sparse_step=2, norm_topk_prob=False),
    "qwen3_moe": dict(model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=32, head_dim=16, mlp_only_layers=[0],
                      norm_topk_prob=True),
}
# sharded on both sides (index.json) for these
SHARDED = {"llama", "mixtral"}


def _hf_model(name: str):
    kw = copy.deepcopy(CASES[name])  # transformers edits rope dicts in place
    model_type = kw.pop("model_type")
    cfg = transformers.AutoConfig.for_model(model_type, **BASE, **kw)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        cfg, attn_implementation="eager", dtype=torch.float32
    )
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-trivial values everywhere (norms != 1, biases != 0, sharp routers)
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif pname.endswith("gate.weight"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))
    return model.eval()


def _ids_pos(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, vocab, (2, SEQ), generator=torch.Generator().manual_seed(2))
    return ids, torch.arange(SEQ).expand(2, SEQ).contiguous()


@torch.no_grad()
def _ours_logits(model: Transformer, ids, pos) -> torch.Tensor:
    return model(ids, pos).logits


@torch.no_grad()
def _hf_logits(model, ids) -> torch.Tensor:
    return model(input_ids=ids).logits


@pytest.mark.parametrize("name", list(CASES))
def test_roundtrip_matches_transformers(name: str, tmp_path: Path) -> None:
    hf = _hf_model(name)
    src = tmp_path / "hf"
    hf.save_pretrained(src, max_shard_size="40KB" if name in SHARDED else "1GB")
    assert (src / "model.safetensors.index.json").is_file() == (name in SHARDED)

    fields = hf_config_to_fields(json.loads((src / "config.json").read_text()))
    cfg = ModelConfig(**fields)
    ours = Transformer(cfg).eval()
    load_hf_checkpoint(ours, src)

    ids, pos = _ids_pos(cfg.vocab_size)
    ref = _hf_logits(hf, ids)
    got = _ours_logits(ours, ids, pos)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= TOL

    dst = tmp_path / "export"
    save_hf_checkpoint(ours.state_dict(), cfg, dst, max_shard_bytes=40e3 if name in SHARDED else 5e9)
    assert (dst / "model.safetensors.index.json").is_file() == (name in SHARDED)
    hf2, info = transformers.AutoModelForCausalLM.from_pretrained(
        dst, output_loading_info=True, attn_implementation="eager"
    )
    for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info.get(k), (k, info[k])
    assert type(hf2) is type(hf)
    back = _hf_logits(hf2.eval().float(), ids)
    assert (back - got).abs().max().item() <= TOL

    # our export's config (v4-style rope keys) maps back to the same fields
    again = ModelConfig(**hf_config_to_fields(json.loads((dst / "config.json").read_text())))
    assert again.dim_per_head == cfg.dim_per_head  # head_dim may become explicit
    assert again.model_copy(update={"head_dim": cfg.head_dim}) == cfg


@pytest.mark.parametrize("arch, bias", [("llama", True), ("qwen2", False)])
def test_export_adds_zero_biases_hf_has(arch: str, bias: bool, tmp_path: Path) -> None:
    """llama+attention_bias: HF also biases o_proj; qwen2 always biases q/k/v: zeros are exact."""
    cfg = ModelConfig(arch=arch, attention_bias=bias, **BASE)
    ours = Transformer(cfg).eval()
    ours.init_weights(torch.Generator().manual_seed(0))
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if n.endswith("_proj.bias"):
                p.normal_(0, 0.1)
    save_hf_checkpoint(ours.state_dict(), cfg, tmp_path / "x")
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "x", output_loading_info=True, attn_implementation="eager"
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids, pos = _ids_pos(cfg.vocab_size)
    got = _ours_logits(ours, ids, pos)
    assert (_hf_logits(hf.eval(), ids) - got).abs().max().item() <= TOL
    back = Transformer(ModelConfig(**hf_config_to_fields(hf.config.to_dict()))).eval()
    load_hf_checkpoint(back, tmp_path / "x")  # the zero o_proj / q,k,v biases are accepted
    assert torch.equal(_ours_logits(back, ids, pos), got)


# ----------------------------------------------------------------------------------------------
# checkpoints of our own (no transformers model needed)
# ----------------------------------------------------------------------------------------------
def _ours(arch: str = "llama", **kw) -> Transformer:
    fields = dict(arch=arch, vocab_size=64, hidden_size=32, intermediate_size=48,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    fields.update(kw)
    model = Transformer(ModelConfig(**fields))
    model.init_weights(torch.Generator().manual_seed(0))
    return model


MOE = {"num_experts": 4, "top_k": 2, "intermediate_size": 16}


def _rewrite(src: Path, dst: Path, edit) -> None:
    """Copy a single-file checkpoint, changing its tensors with ``edit(dict)``."""
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})


def test_missing_and_unexpected_tensor(tmp_path: Path) -> None:
    model = _ours()
    save_hf_checkpoint(model.state_dict(), model.cfg, tmp_path / "ok")
    _rewrite(tmp_path / "ok", tmp_path / "bad",
             lambda t: (t.pop("model.layers.1.mlp.up_proj.weight"),
                        t.__setitem__("model.layers.0.extra.weight", torch.zeros(2))))
    fresh = _ours(arch="llama")
    with pytest.raises(ValueError) as e:
        load_hf_checkpoint(fresh, tmp_path / "bad")
    msg = str(e.value)
    assert "missing" in msg and "model.layers.1.mlp.up_proj.weight" in msg
    assert "unexpected" in msg and "model.layers.0.extra.weight" in msg
    # rotary buffers of old checkpoints are ignored
    _rewrite(tmp_path / "ok", tmp_path / "rot",
             lambda t: t.__setitem__("model.layers.0.self_attn.rotary_emb.inv_freq", torch.ones(4)))
    load_hf_checkpoint(fresh, tmp_path / "rot")


def test_missing_expert(tmp_path: Path) -> None:
    model = _ours("mixtral", intermediate_size=16, moe=MOE)
    save_hf_checkpoint(model.state_dict(), model.cfg, tmp_path / "ok")
    with safe_open(str(tmp_path / "ok" / "model.safetensors"), "pt") as f:
        assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in f.keys()
    _rewrite(tmp_path / "ok", tmp_path / "bad",
             lambda t: t.pop("model.layers.0.block_sparse_moe.experts.3.w2.weight"))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.experts\.down_proj\[expert 3\]"):
        load_hf_checkpoint(_ours("mixtral", intermediate_size=16, moe=MOE), tmp_path / "bad")


def test_shape_mismatch_names_tensor_file_and_shapes(tmp_path: Path) -> None:
    model = _ours()
    save_hf_checkpoint(model.state_dict(), model.cfg, tmp_path / "ok")
    other = _ours(intermediate_size=40)
    with pytest.raises(ValueError) as e:
        load_hf_checkpoint(other, tmp_path / "ok")
    msg = str(e.value)
    assert "model.layers.0.mlp.gate_proj.weight" in msg and "model.safetensors" in msg
    assert "[48, 32]" in msg and "[40, 32]" in msg


def test_export_refuses_non_empty_dir(tmp_path: Path) -> None:
    model = _ours()
    out = tmp_path / "out"
    out.mkdir()
    save_hf_checkpoint(model.state_dict(), model.cfg, out)  # empty dir is fine
    with pytest.raises(FileExistsError, match="not empty"):
        save_hf_checkpoint(model.state_dict(), model.cfg, out)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp dir left behind


def test_fused_expert_layout_and_expert_bias(tmp_path: Path) -> None:
    moe = dict(MOE, bias_update_rate=1e-3)
    model = _ours("qwen3_moe", qk_norm=True, moe=moe)
    for _, r in model.routers():
        r.expert_bias.copy_(torch.randn(4))
    sd = model.state_dict()
    save_hf_checkpoint(sd, model.cfg, tmp_path / "ok")
    with safe_open(str(tmp_path / "ok" / "model.safetensors"), "pt") as f:
        assert "model.layers.0.mlp.gate.e_score_correction_bias" in f.keys()
    fresh = _ours("qwen3_moe", qk_norm=True, moe=moe)
    load_hf_checkpoint(fresh, tmp_path / "ok")
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, sd[k]), k

    def fuse(t: dict) -> None:  # transformers-5 module layout: gate_up_proj [E, 2I, H]
        for i in range(2):
            p = f"model.layers.{i}.mlp.experts."
            for proj in ("gate_proj", "up_proj", "down_proj"):
                for e in range(4):
                    t.pop(f"{p}{e}.{proj}.weight")
            t[f"{p}gate_up_proj"] = torch.cat([sd[f"{p}gate_proj"], sd[f"{p}up_proj"]], dim=1)
            t[f"{p}down_proj"] = sd[f"{p}down_proj"].clone()
            t.pop(f"model.layers.{i}.mlp.gate.e_score_correction_bias")  # optional

    _rewrite(tmp_path / "ok", tmp_path / "fused", fuse)
    fresh = _ours("qwen3_moe", qk_norm=True, moe=moe)
    load_hf_checkpoint(fresh, tmp_path / "fused")
    for k, v in fresh.state_dict().items():
        if not k.endswith("expert_bias"):
            assert torch.equal(v, sd[k]), k

    # a bias in the file but no bias buffer in the model: strict, with a hint
    with pytest.raises(ValueError, match="bias_update_rate"):
        load_hf_checkpoint(_ours("qwen3_moe", qk_norm=True, moe=MOE), tmp_path / "ok")


def test_bf16_export_and_cast_on_load(tmp_path: Path) -> None:
    model = _ours("qwen2", attention_bias=False, tie_word_embeddings=True)
    sd = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    save_hf_checkpoint(sd, model.cfg, tmp_path / "bf16")
    cfg = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert cfg["torch_dtype"] == cfg["dtype"] == "bfloat16"
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()
        b = f.get_tensor("model.layers.0.self_attn.q_proj.bias")  # Qwen2 always has q/k/v bias
        assert b.dtype == torch.bfloat16 and not b.any()
    fields = hf_config_to_fields(cfg)
    fresh = Transformer(ModelConfig(**fields))  # attention_bias=True: zero biases load into it
    load_hf_checkpoint(fresh, tmp_path / "bf16")
    w = fresh.state_dict()["model.embed_tokens.weight"]
    assert w.dtype == torch.float32 and torch.equal(w, sd["model.embed_tokens.weight"].float())


# ----------------------------------------------------------------------------------------------
# config mapping errors
# ----------------------------------------------------------------------------------------------
def _cfg_json(**kw) -> dict:
    c = dict(BASE, model_type="llama", rope_theta=10000.0)
    c.update(kw)
    return c


def test_unknown_model_type() -> None:
    with pytest.raises(ValueError, match=r"'gpt2'.*llama.*qwen3_moe"):
        hf_config_to_fields(_cfg_json(model_type="gpt2"))


@pytest.mark.parametrize(
    "kw, pattern",
    [
        (dict(rope_parameters={"rope_type": "dynamic", "factor": 4.0, "rope_theta": 1e4}),
         r"rope_parameters\.rope_type='dynamic'"),
        (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), r"rope_scaling\.type='dynamic'"),
        (dict(rope_scaling={"rope_type": "longrope", "factor": 2.0}),
         r"rope_scaling\.rope_type='longrope'"),
    ],
)
def test_unsupported_rope_type(kw: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        hf_config_to_fields(_cfg_json(**kw))


def test_rope_layouts() -> None:
    v5 = hf_config_to_fields(_cfg_json(rope_theta=None, rope_parameters=dict(LLAMA3, rope_theta=5e5)))
    v4 = hf_config_to_fields(_cfg_json(rope_theta=5e5, rope_scaling=LLAMA3))
    assert v5 == v4 and v5["rope_theta"] == 5e5 and v5["rope_scaling"]["rope_type"] == "llama3"
    legacy = hf_config_to_fields(_cfg_json(rope_scaling={"type": "linear", "factor": 2.0}))
    assert legacy["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    plain = hf_config_to_fields(_cfg_json(rope_parameters={"rope_type": "default", "rope_theta": 7.0}))
    assert plain["rope_scaling"] is None and plain["rope_theta"] == 7.0


@pytest.mark.parametrize(
    "kw",
    [
        dict(model_type="mistral", sliding_window=4096),
        dict(model_type="qwen2", use_sliding_window=True, sliding_window=4096, max_window_layers=0),
        dict(model_type="qwen3", use_sliding_window=True, sliding_window=4096,
             layer_types=["full_attention", "sliding_attention"]),
    ],
)
def test_sliding_window_in_use(kw: dict) -> None:
    with pytest.raises(ValueError, match="sliding_window.*not supported"):
        hf_config_to_fields(_cfg_json(**kw))


def test_sliding_window_unused_is_ignored() -> None:
    hf_config_to_fields(_cfg_json(model_type="mistral", sliding_window=None))
    hf_config_to_fields(_cfg_json(model_type="qwen2", use_sliding_window=False, sliding_window=4096))
    hf_config_to_fields(_cfg_json(model_type="qwen2", use_sliding_window=True, sliding_window=4096,
                                  max_window_layers=28))  # no layer >= 28: nothing slides


def test_moe_field_mapping() -> None:
    mix = hf_config_to_fields(_cfg_json(model_type="mixtral", intermediate_size=80,
                                        num_local_experts=8, num_experts_per_tok=2,
                                        output_router_logits=True, router_aux_loss_coef=0.02))
    assert mix["moe"]["intermediate_size"] == 80 and mix["moe"]["num_experts"] == 8
    assert mix["moe"]["aux_loss_coef"] == 0.02 and mix["moe"]["norm_topk_prob"] is True
    q2 = hf_config_to_fields(_cfg_json(model_type="qwen2_moe", num_experts=4, moe_intermediate_size=8,
                                       shared_expert_intermediate_size=16, mlp_only_layers=[1],
                                       router_aux_loss_coef=0.5))
    m = q2["moe"]
    assert m["shared_expert_gate"] and m["shared_expert_intermediate_size"] == 16
    assert m["mlp_only_layers"] == [1] and m["aux_loss_coef"] == 0.0 and not m["norm_topk_prob"]
    assert q2["attention_bias"] is True
    ModelConfig(**q2)


def test_export_rejects_unrepresentable() -> None:
    """A model its `arch` cannot express is refused when the config is validated (checkpoints
    store the HF layout), with the reason."""
    with pytest.raises(ValueError, match="model.arch='mixtral' cannot represent.*norm_topk_prob"):
        ModelConfig(arch="mixtral", intermediate_size=16, moe=dict(MOE, norm_topk_prob=False))
    with pytest.raises(ValueError, match="shared expert"):
        ModelConfig(arch="qwen2_moe", moe=MOE)


def test_nonzero_o_proj_bias_is_rejected(tmp_path: Path) -> None:
    model = _ours(attention_bias=True)
    save_hf_checkpoint(model.state_dict(), model.cfg, tmp_path / "ok")
    _rewrite(tmp_path / "ok", tmp_path / "bad",
             lambda t: t["model.layers.0.self_attn.o_proj.bias"].fill_(0.5))
    with pytest.raises(ValueError, match="o_proj.bias.*non-zero"):
        load_hf_checkpoint(_ours(attention_bias=True), tmp_path / "bad")
