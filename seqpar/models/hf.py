"""Hugging Face checkpoint import/export (config.json + safetensors), without ``transformers``.

Our parameter names equal the Hub's except MoE experts, which we keep stacked per layer
(``model.layers.{i}.mlp.experts.gate_proj`` [E, I, H], ``up_proj`` [E, I, H], ``down_proj``
[E, H, I]). On disk we read and write the canonical per-expert Hub layout:

* Mixtral: ``model.layers.{i}.block_sparse_moe.gate.weight`` and
  ``...block_sparse_moe.experts.{e}.w1|w3|w2.weight`` (gate | up | down);
* Qwen2-MoE / Qwen3-MoE: ``model.layers.{i}.mlp.experts.{e}.gate_proj|up_proj|down_proj.weight``.

Import also accepts the fused layout of transformers 5 modules (``mlp.experts.gate_up_proj``
[E, 2I, H] = gate then up, ``mlp.experts.down_proj`` [E, H, I]) and our own stacked names.
(transformers 5.24's ``save_pretrained`` itself writes the per-expert layout.)
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from seqpar.config import MOE_ARCHS, ModelConfig
from seqpar.models.transformer import Transformer

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")

_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}

# transformers' class defaults for keys a config.json may omit (they decide what HF builds).
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(rms_norm_eps=1e-6, rope_theta=1e4, max_position_embeddings=2048),
    "mistral": dict(rms_norm_eps=1e-6, rope_theta=1e4, max_position_embeddings=131072,
                    num_key_value_heads=8, sliding_window=4096),
    "qwen2": dict(rms_norm_eps=1e-6, rope_theta=1e4, max_position_embeddings=32768,
                  num_key_value_heads=32),
    "qwen3": dict(rms_norm_eps=1e-6, rope_theta=1e4, max_position_embeddings=32768,
                  num_key_value_heads=32, head_dim=128),
    "mixtral": dict(rms_norm_eps=1e-5, rope_theta=1e6, max_position_embeddings=131072,
                    num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(rms_norm_eps=1e-6, rope_theta=1e4, max_position_embeddings=32768,
                      num_key_value_heads=16, num_experts=60, num_experts_per_tok=4,
                      moe_intermediate_size=1408, shared_expert_intermediate_size=5632),
    "qwen3_moe": dict(rms_norm_eps=1e-6, rope_theta=1e4, max_position_embeddings=32768,
                      num_key_value_heads=4, num_experts=128, num_experts_per_tok=8,
                      moe_intermediate_size=768),
}

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


# ----------------------------------------------------------------------------------------------
# config.json <-> ModelConfig
# ----------------------------------------------------------------------------------------------
def _rope_fields(c: dict[str, Any], arch: str) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling dict or None) from either config.json layout.

    transformers 5 writes ``rope_parameters`` {rope_theta, rope_type, ...}; 4.x writes top-level
    ``rope_theta`` plus ``rope_scaling`` {rope_type | legacy type, ...} (or null).
    """
    if c.get("rope_parameters") is not None:
        key, params = "rope_parameters", dict(c["rope_parameters"])
        if "rope_type" not in params and "type" not in params and "rope_theta" not in params:
            raise ValueError(
                f"config.json: rope_parameters per layer type ({sorted(params)}) is not supported "
                f"for model_type '{arch}': expected one flat dict"
            )
    else:
        key, params = "rope_scaling", dict(c.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", c.get("rope_theta", _DEFAULTS[arch]["rope_theta"])))
    type_key = "rope_type" if "rope_type" in params else "type"
    rope_type = params.get(type_key, "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"config.json: {key}.{type_key}='{rope_type}' is not supported by seqpar "
            f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    prf = params.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0))
    if prf is not None and float(prf) != 1.0:
        raise ValueError(f"config.json: partial_rotary_factor={prf} is not supported (need 1.0)")
    if rope_type == "default":
        return theta, None
    if "factor" not in params:
        raise ValueError(f"config.json: {key} of type '{rope_type}' lacks 'factor'")
    if rope_type == "linear":
        return theta, {"rope_type": "linear", "factor": float(params["factor"])}
    # transformers: a top-level original_max_position_embeddings wins, then the dict's, then
    # max_position_embeddings.
    orig = c.get("original_max_position_embeddings") or params.get(
        "original_max_position_embeddings", c.get("max_position_embeddings")
    )
    if rope_type == "yarn":
        out: dict[str, Any] = {"rope_type": "yarn", "factor": float(params["factor"]),
                               "original_max_position_embeddings": int(orig)}
        for k in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor"):
            if params.get(k):  # transformers treats 0 / None as "use the default"
                out[k] = float(params[k])
        if "truncate" in params:
            out["truncate"] = bool(params["truncate"])
        return theta, out
    for k in ("low_freq_factor", "high_freq_factor"):
        if k not in params:
            raise ValueError(f"config.json: {key} of type 'llama3' lacks '{k}'")
    return theta, {
        "rope_type": "llama3",
        "factor": float(params["factor"]),
        "low_freq_factor": float(params["low_freq_factor"]),
        "high_freq_factor": float(params["high_freq_factor"]),
        "original_max_position_embeddings": int(orig),
    }


def _check_sliding_window(c: dict[str, Any], arch: str, n_layers: int) -> None:
    """Raise when the checkpoint uses sliding-window attention (seqpar attends to the full doc)."""
    window = c.get("sliding_window", _DEFAULTS[arch].get("sliding_window"))
    if arch in ("mistral", "mixtral"):
        used = window is not None  # Mistral/Mixtral slide whenever the key is non-null
    else:
        used = bool(c.get("use_sliding_window", False)) and bool(window)
        if used and c.get("layer_types") is not None:
            used = "sliding_attention" in c["layer_types"]
        elif used and arch in ("qwen2", "qwen3"):
            # Qwen2/3 slide only in layers >= max_window_layers
            used = int(c.get("max_window_layers", 28)) < n_layers
    if used:
        flag = "" if arch in ("mistral", "mixtral") else " with use_sliding_window=true"
        raise ValueError(
            f"config.json: sliding_window={window}{flag} ({arch}) is not supported: seqpar only "
            f"has full causal attention. Set sliding_window to null"
            + ("" if arch in ("mistral", "mixtral") else " or use_sliding_window to false")
            + " if the model works without it (e.g. all training sequences fit in the window)"
        )


def hf_config_to_fields(cfg_json: dict[str, Any]) -> dict[str, Any]:
    """Map a Hub ``config.json`` dict to ``ModelConfig`` field values (MoE under ``moe``).

    ``hf_path``/``load_weights`` are not set (they say where to load from, not what to build).
    Raises ``ValueError`` for model types, RoPE variants or features seqpar does not implement.
    """
    c = cfg_json
    arch = c.get("model_type")
    if arch not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"config.json: model_type '{arch}' is not supported; supported model types: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    d = _DEFAULTS[arch]
    for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads"):
        if c.get(k) is None:
            raise ValueError(f"config.json ({arch}) lacks required key '{k}'")
    if c.get("hidden_act", "silu") not in ("silu", "swish"):
        raise ValueError(f"config.json: hidden_act='{c['hidden_act']}' is not supported (need silu)")
    if c.get("mlp_bias"):
        raise ValueError("config.json: mlp_bias=true is not supported (seqpar MLPs have no bias)")
    n_layers = int(c["num_hidden_layers"])
    _check_sliding_window(c, arch, n_layers)
    theta, scaling = _rope_fields(c, arch)

    if arch in ("qwen2", "qwen2_moe"):
        # Qwen2 always has q/k/v bias; transformers 5 Qwen2-MoE made it a flag (qkv_bias).
        attention_bias = bool(c.get("qkv_bias", True)) if arch == "qwen2_moe" else True
    elif arch in ("mistral", "mixtral"):
        attention_bias = False  # no bias anywhere in their attention
    else:
        # llama/qwen3/qwen3_moe: attention_bias also puts a bias on o_proj, which seqpar lacks;
        # load_hf_checkpoint accepts that bias only when it is all zero (our own exports).
        attention_bias = bool(c.get("attention_bias", False))

    head_dim = c.get("head_dim", d.get("head_dim"))
    kv = c.get("num_key_value_heads", d.get("num_key_value_heads"))
    fields: dict[str, Any] = {
        "arch": arch,
        "vocab_size": int(c["vocab_size"]),
        "hidden_size": int(c["hidden_size"]),
        "intermediate_size": int(c["intermediate_size"]),
        "num_hidden_layers": n_layers,
        "num_attention_heads": int(c["num_attention_heads"]),
        "num_key_value_heads": int(kv) if kv is not None else None,
        "head_dim": int(head_dim) if head_dim is not None else None,
        "rms_norm_eps": float(c.get("rms_norm_eps", d["rms_norm_eps"])),
        "rope_theta": theta,
        "rope_scaling": scaling,
        "max_position_embeddings": int(c.get("max_position_embeddings", d["max_position_embeddings"])),
        "attention_bias": attention_bias,
        "qk_norm": arch in ("qwen3", "qwen3_moe"),
        "tie_word_embeddings": bool(c.get("tie_word_embeddings", False)),
        "initializer_range": float(c.get("initializer_range", 0.02)),
        "moe": None,
    }
    if arch in MOE_ARCHS:
        # aux loss only if the checkpoint's config trains with it (HF adds it iff output_router_logits)
        aux = float(c.get("router_aux_loss_coef", 0.001)) if c.get("output_router_logits") else 0.0
        if arch == "mixtral":
            moe = {
                "num_experts": int(c.get("num_local_experts", d["num_local_experts"])),
                "top_k": int(c.get("num_experts_per_tok", d["num_experts_per_tok"])),
                "intermediate_size": int(c["intermediate_size"]),  # Mixtral's experts' size
                "norm_topk_prob": True,  # Mixtral always renormalises the top-k weights
            }
        else:
            # transformers 5 writes Qwen3-MoE's expert count as num_local_experts (attribute_map)
            n_exp = c.get("num_experts", c.get("num_local_experts", d["num_experts"]))
            moe = {
                "num_experts": int(n_exp),
                "top_k": int(c.get("num_experts_per_tok", d["num_experts_per_tok"])),
                "intermediate_size": int(c.get("moe_intermediate_size", d["moe_intermediate_size"])),
                "norm_topk_prob": bool(c.get("norm_topk_prob", False)),
                "sparse_step": int(c.get("decoder_sparse_step", 1)),
                "mlp_only_layers": [int(i) for i in (c.get("mlp_only_layers") or [])],
            }
            if arch == "qwen2_moe":
                shared = int(c.get("shared_expert_intermediate_size",
                                   d["shared_expert_intermediate_size"]))
                moe["shared_expert_intermediate_size"] = shared
                moe["shared_expert_gate"] = shared > 0  # HF always sigmoid-gates the shared expert
        moe["score_func"] = "softmax"
        moe["aux_loss_coef"] = aux
        fields["moe"] = moe
    return fields


def _dtype_name(dtype: torch.dtype | str) -> str:
    return dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")


def fields_to_hf_config(
    cfg: ModelConfig, dtype: torch.dtype | str = torch.float32, *,
    bos_token_id: int | None = None, eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
) -> dict[str, Any]:
    """The Hub ``config.json`` dict for ``cfg`` (v4-style rope keys: loads in transformers 4.x and 5).

    ``bos/eos/pad_token_id`` (the training tokenizer's; ``eos`` may be a list) are written when
    given. Without them transformers falls back to its class defaults (Llama/Mistral/Mixtral:
    bos 1, eos 2; Qwen: none), which are not seqpar's tokenizer ids.
    Raises ``ValueError`` when the architecture ``cfg.arch`` cannot express ``cfg`` exactly.
    """
    arch = cfg.arch
    if arch not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"arch '{arch}' cannot be exported; supported: {SUPPORTED_MODEL_TYPES}")
    special: dict[str, int | list[int]] = {}
    for k, v in (("bos_token_id", bos_token_id), ("eos_token_id", eos_token_id), ("pad_token_id", pad_token_id)):
        if v is None:
            continue
        many = isinstance(v, (list, tuple)) and k == "eos_token_id"
        ids = list(v) if many else [v]
        # python or numpy integers (not bools), inside the vocabulary
        if not ids or not all(hasattr(i, "__index__") and not isinstance(i, bool) and 0 <= int(i) < cfg.vocab_size
                              for i in ids):
            raise ValueError(f"{k}={v!r} is not a token id (or list of ids, for eos) in "
                             f"[0, model.vocab_size={cfg.vocab_size})")
        special[k] = [int(i) for i in ids] if many else int(ids[0])

    def bad(what: str) -> ValueError:
        return ValueError(f"cannot export as model_type '{arch}': {what}")

    if cfg.qk_norm != (arch in ("qwen3", "qwen3_moe")):
        raise bad(f"qk_norm={cfg.qk_norm}, but {arch} {'always' if not cfg.qk_norm else 'never'} "
                  f"has q/k norms")
    if cfg.attention_bias and arch in ("mistral", "mixtral"):
        raise bad("attention_bias=true (this architecture has no attention bias; use qwen2)")
    scaling = None
    if cfg.rope_scaling is not None:
        r = cfg.rope_scaling
        scaling = {"rope_type": r.rope_type, "factor": r.factor}
        if r.rope_type == "llama3":
            scaling.update(
                low_freq_factor=r.low_freq_factor,
                high_freq_factor=r.high_freq_factor,
                original_max_position_embeddings=r.original_max_position_embeddings,
            )
        if r.rope_type == "yarn":
            scaling.update(original_max_position_embeddings=r.original_max_position_embeddings,
                           beta_fast=r.beta_fast, beta_slow=r.beta_slow, truncate=r.truncate)
            scaling.update({k: v for k, v in (("mscale", r.mscale), ("mscale_all_dim", r.mscale_all_dim),
                                               ("attention_factor", r.attention_factor)) if v is not None})
    out: dict[str, Any] = {
        "architectures": [_ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.dim_per_head,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": scaling,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "initializer_range": cfg.initializer_range,
        "attention_dropout": 0.0,
        "use_cache": True,
        # 4.x reads torch_dtype, 5.x dtype (and prefers it when both are present)
        "torch_dtype": _dtype_name(dtype),
        "dtype": _dtype_name(dtype),
    }
    if arch in ("llama", "qwen3", "qwen3_moe"):
        # True also gives o_proj a bias in HF: save_hf_checkpoint writes it as zeros
        out["attention_bias"] = cfg.attention_bias
    if arch == "llama":
        out.update(mlp_bias=False, pretraining_tp=1)
    if arch in ("mistral", "mixtral"):
        out["sliding_window"] = None
    if arch in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe"):
        out.update(use_sliding_window=False, sliding_window=None,
                   max_window_layers=cfg.num_hidden_layers)
    if arch == "qwen2_moe":
        out["qkv_bias"] = True  # 4.x has no flag (always bias); missing biases are written as 0

    m = cfg.moe
    if m is not None:
        if m.score_func != "softmax":
            raise bad(f"moe.score_func='{m.score_func}' (HF routers use softmax)")
        out.update(
            num_experts_per_tok=m.top_k,
            output_router_logits=m.aux_loss_coef > 0,
            router_aux_loss_coef=m.aux_loss_coef if m.aux_loss_coef > 0 else 0.001,
        )
        if arch == "mixtral":
            if not m.norm_topk_prob:
                raise bad("moe.norm_topk_prob=false (Mixtral always renormalises top-k weights)")
            if m.shared_expert_intermediate_size or m.sparse_step != 1 or m.mlp_only_layers:
                raise bad("shared experts / sparse_step / mlp_only_layers (every Mixtral layer is "
                          "a plain MoE); use qwen2_moe or qwen3_moe")
            out.update(num_local_experts=m.num_experts, intermediate_size=m.intermediate_size,
                       router_jitter_noise=0.0)
        else:
            out.update(
                num_experts=m.num_experts,
                moe_intermediate_size=m.intermediate_size,
                norm_topk_prob=m.norm_topk_prob,
                decoder_sparse_step=m.sparse_step,
                mlp_only_layers=list(m.mlp_only_layers),
            )
            if arch == "qwen2_moe":
                if not (m.shared_expert_intermediate_size and m.shared_expert_gate):
                    raise bad("Qwen2-MoE always has a sigmoid-gated shared expert: set "
                              "moe.shared_expert_intermediate_size > 0 and shared_expert_gate")
                out["shared_expert_intermediate_size"] = m.shared_expert_intermediate_size
            elif m.shared_expert_intermediate_size:
                raise bad("shared expert (Qwen3-MoE has none); use qwen2_moe")
    out.update(special)
    return out


# ----------------------------------------------------------------------------------------------
# import
# ----------------------------------------------------------------------------------------------
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
_PROJ = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj",
         "gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"}
_STACKED = re.compile(r"^model\.layers\.\d+\.mlp\.experts\.(gate_proj|up_proj|down_proj)$")


def _is_ignored(key: str) -> bool:
    # rotary tables are recomputed from the config; old checkpoints saved them as buffers
    return key.endswith(".inv_freq") or ".rotary_emb." in key


def _targets(key: str) -> list[tuple[str, int | None, slice | None]]:
    """Hub tensor name -> [(our name, expert index or None, slice of dim 1 or None)]."""
    name = key.replace(".block_sparse_moe.", ".mlp.")  # Mixtral's MoE block is our mlp
    m = _LAYER.match(name)
    if m is None:
        return [(name, None, None)]
    prefix, rest = f"model.layers.{m[1]}.", m[2]
    e = _EXPERT.match(rest)
    if e:
        return [(f"{prefix}mlp.experts.{_PROJ[e[2]]}", int(e[1]), None)]
    if rest == "mlp.experts.gate_up_proj":  # transformers-5 fused [E, 2I, H]: gate then up
        return [(f"{prefix}mlp.experts.gate_proj", None, slice(0, 1)),
                (f"{prefix}mlp.experts.up_proj", None, slice(1, 2))]
    if rest == "mlp.gate.e_score_correction_bias":  # DeepSeek's name for the expert bias
        return [(f"{prefix}mlp.gate.expert_bias", None, None)]
    return [(name, None, None)]


def _checkpoint_files(path: Path) -> tuple[list[Path], dict[str, Path]]:
    """Safetensors files of a Hub model dir and (for sharded ones) the index's weight map."""
    path = Path(path)
    if path.is_file():
        return [path], {}
    index = path / SAFETENSORS_INDEX
    if index.is_file():
        from seqpar.checkpoint.verify import UnsafePath, safe_member

        try:
            wmap = json.loads(index.read_text())["weight_map"]
            if not isinstance(wmap, dict):
                raise TypeError(f"weight_map is a {type(wmap).__name__}, not an object")
            # the index is input: a shard name must be a plain file name inside ``path`` (Hub
            # cache snapshots are symlinks into blobs/, so symlinks themselves are allowed)
            by_key = {k: safe_member(path, f, symlinks=True) for k, f in wmap.items()}
        except (ValueError, KeyError, TypeError) as e:
            why = f"bad shard name {e}" if isinstance(e, UnsafePath) else f"{type(e).__name__}: {e}"
            raise ValueError(f"{index}: unusable index ({why})") from None
        files = sorted(set(by_key.values()))
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shard files that do not exist: {missing}")
        return files, by_key
    single = path / SAFETENSORS_FILE
    if single.is_file():
        return [single], {}
    raise FileNotFoundError(
        f"no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX} in '{path}' (only safetensors checkpoints "
        f"are supported; convert .bin files with transformers' save_pretrained first)"
    )


def _listing(names: Iterable[str], limit: int = 20) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


@torch.no_grad()
def load_hf_checkpoint(model: nn.Module, path: str | Path, write: Callable[[str, Tensor], None] | None = None,
                       shapes: dict[str, torch.Size] | None = None) -> None:
    """Copy a Hub safetensors checkpoint (single file or sharded) into ``model`` (cast to its dtype).

    Strict: every parameter must be found and every tensor used, else ``ValueError`` listing them
    (rotary ``inv_freq`` buffers and LoRA adapters are ignored). The expert bias (``mlp.gate.e_score_correction_bias``)
    is optional: without it the model's ``expert_bias`` buffer keeps its value. All names and
    shapes are checked before anything is copied. ``model`` is an unwrapped ``Transformer``.

    ``write(name, value)``: instead of copying piece by piece in place, each parameter is first
    assembled whole on the CPU (one at a time) and handed over; ``shapes`` then gives the full
    shapes of parameters that have none of their own (ZeRO-3 partitions).
    """
    from seqpar.models.lora import is_adapter

    files, by_key = _checkpoint_files(Path(path))
    # LoRA adapters are not part of a base checkpoint (they are initialised, or resumed, apart)
    ours = {k: v for k, v in model.state_dict(keep_vars=True).items() if not is_adapter(k)}
    full_shape = {k: tuple((shapes or {}).get(k, v.shape)) for k, v in ours.items()}
    cfg: ModelConfig | None = getattr(model, "cfg", None)
    tied = bool(cfg is not None and cfg.tie_word_embeddings)

    # -- pass 1: names and shapes only (no tensor data read) --------------------------------------
    plan: dict[Path, list[tuple[str, str, int | None, slice | None]]] = {}
    covered: dict[str, set[int]] = {}  # our name -> experts (or {-1} = whole tensor) provided
    extras: list[tuple[Path, str, str]] = []  # (file, key, kind) checked by value in pass 2
    unexpected, problems = [], []
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            keys = list(sf.keys())
            shapes = {k: tuple(sf.get_slice(k).get_shape()) for k in keys}
        for key in keys:
            if by_key and by_key.get(key, f) != f:
                continue  # a stray tensor the index assigns to another shard
            if _is_ignored(key):
                continue
            shape = shapes[key]
            if key not in ours and key.endswith(("self_attn.o_proj.bias", "self_attn.q_proj.bias",
                                                 "self_attn.k_proj.bias", "self_attn.v_proj.bias")):
                # HF llama/qwen3 attention_bias adds an o_proj bias, Qwen2 always has q/k/v bias;
                # a model without them can load them only when they are all zero (our exports)
                extras.append((f, key, "zero"))
                continue
            if key == "lm_head.weight" and tied and key not in ours:
                extras.append((f, key, "tied"))  # some tied checkpoints keep a copy
                continue
            for name, expert, part in _targets(key):
                if name not in ours:
                    unexpected.append(key)
                    break
                want = full_shape[name]
                if expert is not None:
                    want = want[1:]
                    if not 0 <= expert < full_shape[name][0]:
                        unexpected.append(key)
                        break
                elif part is not None:
                    want = (want[0], 2 * want[1], *want[2:])
                if shape != want:
                    problems.append(f"tensor '{key}' in {f} has shape {list(shape)}, but the model "
                                    f"expects {list(want)} (for {name})")
                    break
                got = covered.setdefault(name, set())
                new = {expert} if expert is not None else {-1}
                if got & new or (-1 in got) or (got and expert is None):
                    problems.append(f"tensor '{key}' in {f} duplicates another source of {name}")
                    break
                got |= new
                plan.setdefault(f, []).append((key, name, expert, part))
    missing = []
    for name, t in ours.items():
        got = covered.get(name, set())
        if -1 in got:
            continue
        if _STACKED.match(name):
            lost = sorted(set(range(full_shape[name][0])) - got)
            missing += [f"{name}[expert {e}]" for e in lost]
        elif not got and not name.endswith("mlp.gate.expert_bias"):  # expert bias is optional
            missing.append(name)
    if unexpected:
        hint = ""
        if any(k.endswith("e_score_correction_bias") for k in unexpected):
            hint = " (an expert bias needs model.moe.bias_update_rate > 0 to be loaded)"
        problems.append(f"unexpected tensors in the checkpoint{hint}: {_listing(unexpected)}")
    if missing:
        problems.append(f"tensors missing from the checkpoint: {_listing(missing)}")
    if problems:
        raise ValueError(f"cannot load '{path}' into this model:\n  - " + "\n  - ".join(problems))

    # -- pass 2a: value checks of tensors we accept without a place to put them ----------------
    for f, key, kind in extras:
        with safe_open(str(f), framework="pt") as sf:
            t = sf.get_tensor(key)
        if kind == "zero" and t.any():
            raise ValueError(f"'{key}' in {f} is non-zero, but seqpar's attention has no o_proj "
                             f"bias: this checkpoint cannot be represented")
        if kind == "tied":
            src = _read(files, by_key, "model.embed_tokens.weight")
            if tuple(t.shape) != full_shape["model.embed_tokens.weight"] or not torch.equal(t, src):
                raise ValueError(f"'{key}' in {f} differs from model.embed_tokens.weight but the "
                                 f"config ties them (tie_word_embeddings=true)")

    # -- pass 2b: copy ------------------------------------------------------------------------------
    pieces_left = {name: sum(n == name for items in plan.values() for _, n, _, _ in items) for name in covered}
    assembling: dict[str, Tensor] = {}
    for f, items in plan.items():
        with safe_open(str(f), framework="pt") as sf:
            for key, name, expert, part in items:
                t = sf.get_tensor(key)
                if write is None:
                    dst = ours[name]
                else:
                    dst = assembling.setdefault(name, torch.empty(full_shape[name], dtype=t.dtype))
                if expert is not None:
                    dst[expert].copy_(t)
                elif part is not None:
                    half = t.shape[1] // 2
                    dst.copy_(t[:, half * part.start : half * part.stop])
                else:
                    dst.copy_(t)
                pieces_left[name] -= 1
                if write is not None and pieces_left[name] == 0:
                    write(name, assembling.pop(name))


def _read(files: list[Path], by_key: dict[str, Path], key: str) -> Tensor:
    for f in [by_key[key]] if key in by_key else files:
        with safe_open(str(f), framework="pt") as sf:
            if key in sf.keys():
                return sf.get_tensor(key)
    raise KeyError(key)


# ----------------------------------------------------------------------------------------------
# export
# ----------------------------------------------------------------------------------------------
def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Our state-dict names and shapes for ``cfg`` (built on the meta device: no memory)."""
    with torch.device("meta"):
        ref = Transformer(cfg)
    return {k: tuple(v.shape) for k, v in ref.state_dict().items()}


def _hub_entries(sd: dict[str, Tensor], cfg: ModelConfig) -> list[tuple[str, Callable[[], Tensor], int]]:
    """[(Hub name, tensor producer, bytes)] in state-dict order; producers copy lazily."""
    mixtral = cfg.arch == "mixtral"
    out: list[tuple[str, Callable[[], Tensor], int]] = []

    def add(name: str, fn: Callable[[], Tensor], shape: Iterable[int], dtype: torch.dtype) -> None:
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        out.append((name, fn, nbytes))

    for name, t in sd.items():
        m = _LAYER.match(name)
        rest = m[2] if m else ""
        if m and _STACKED.match(name):
            proj = rest.rsplit(".", 1)[1]
            w = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}[proj] if mixtral else proj
            block = "block_sparse_moe" if mixtral else "mlp"
            for e in range(t.shape[0]):
                # clone: safetensors refuses tensors that share storage
                add(f"model.layers.{m[1]}.{block}.experts.{e}.{w}.weight",
                    lambda t=t, e=e: t[e].detach().cpu().clone(), t.shape[1:], t.dtype)
            continue
        hub = name
        if m and rest == "mlp.gate.expert_bias":
            hub = f"model.layers.{m[1]}.mlp.gate.e_score_correction_bias"
        if mixtral and m and rest.startswith("mlp."):
            hub = hub.replace(".mlp.", ".block_sparse_moe.", 1)
        add(hub, lambda t=t: t.detach().cpu().contiguous(), t.shape, t.dtype)

    # Biases HF has but we do not: zeros compute exactly what our model computes.
    wdt = sd["model.embed_tokens.weight"].dtype
    h, d = cfg.hidden_size, cfg.dim_per_head
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}.self_attn."
        if cfg.arch in ("qwen2", "qwen2_moe") and not cfg.attention_bias:
            for proj, n in (("q_proj", cfg.num_attention_heads * d), ("k_proj", cfg.kv_heads * d),
                            ("v_proj", cfg.kv_heads * d)):
                add(f"{p}{proj}.bias", lambda n=n: torch.zeros(n, dtype=wdt), (n,), wdt)
        if cfg.arch in ("llama", "qwen3", "qwen3_moe") and cfg.attention_bias:
            add(f"{p}o_proj.bias", lambda: torch.zeros(h, dtype=wdt), (h,), wdt)
    return out


def _shards(entries: list[tuple[str, Callable[[], Tensor], int]], max_bytes: float) -> list[list[int]]:
    """Greedy split in order (like transformers): a new shard when the next tensor would not fit."""
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, _, n) in enumerate(entries):
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += n
    return shards


def save_hf_checkpoint(
    state_dict: dict[str, Tensor], cfg: ModelConfig, out_dir: str | Path, max_shard_bytes: float = 5e9,
    write_tensors: Callable[[Path, dict[str, Tensor], dict[str, str]], Any] | None = None, *,
    bos_token_id: int | None = None, eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
) -> Path:
    """Write our state dict as a Hub checkpoint: config.json + safetensors (sharded with
    ``model.safetensors.index.json`` above ``max_shard_bytes``), per-expert names.

    Given token ids (the training tokenizer's ``bos_id`` / ``eos_id`` / ``pad_id``) go into
    config.json and, when any is given, ``generation_config.json`` (what ``generate`` reads in
    transformers 4.x and 5; without that file it falls back to config.json), so generation stops
    at our eos. Tokenizer files are not written here.

    The expert bias (``moe.bias_update_rate > 0``) is written as
    ``model.layers.{i}.mlp.gate.e_score_correction_bias`` (DeepSeek's name) so seqpar can resume
    from the export; transformers ignores it for these architectures (it reports an unexpected
    key), so there routing is plain top-k and can pick different experts.
    Missing HF biases (Qwen2 q/k/v; llama/qwen3 o_proj with attention_bias) are written as zeros.
    The directory appears atomically (temp dir + rename); an existing non-empty ``out_dir`` is an
    error. ``write_tensors(path, tensors, metadata)`` replaces safetensors' ``save_file`` (the
    checkpoint writer hashes while it writes). Returns ``out_dir``.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"export directory '{out_dir}' exists and is not empty: choose a new "
                              f"path or remove it first (refusing to overwrite)")
    want = _expected_shapes(cfg)
    missing = sorted(set(want) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(want))
    wrong = [f"{k}: state dict {list(state_dict[k].shape)} vs config {list(want[k])}"
             for k in want if k in state_dict and tuple(state_dict[k].shape) != want[k]]
    optional = [k for k in missing if k.endswith("mlp.gate.expert_bias")]
    missing = [k for k in missing if k not in optional]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing: {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected: {_listing(unexpected)}")
        if wrong:
            parts.append(f"shape mismatch: {_listing(wrong)}")
        raise ValueError("state dict does not match the model config:\n  - " + "\n  - ".join(parts))
    dtype = state_dict["model.embed_tokens.weight"].dtype
    hf_cfg = fields_to_hf_config(cfg, dtype, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                                 pad_token_id=pad_token_id)  # raises before anything is written
    gen_cfg = {k: hf_cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in hf_cfg}
    entries = _hub_entries(state_dict, cfg)
    shards = _shards(entries, max_shard_bytes)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2, sort_keys=True) + "\n")
        if gen_cfg:
            (tmp / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2, sort_keys=True) + "\n")
        weight_map: dict[str, str] = {}
        for s, idx in enumerate(shards):
            fname = (SAFETENSORS_FILE if len(shards) == 1
                     else f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors")
            tensors = {entries[i][0]: entries[i][1]() for i in idx}
            if write_tensors is not None:
                write_tensors(tmp / fname, tensors, {"format": "pt"})
            else:
                save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in tensors})
            del tensors
        if len(shards) > 1:
            index = {
                "metadata": {"total_size": sum(n for _, _, n in entries)},
                "weight_map": dict(sorted(weight_map.items())),
            }
            (tmp / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        for p in tmp.iterdir():  # data on disk before the rename makes it visible
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        # rename(2) replaces an empty directory atomically and fails if it gained files meanwhile
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "fields_to_hf_config",
    "hf_config_to_fields",
    "load_hf_checkpoint",
    "save_hf_checkpoint",
]
