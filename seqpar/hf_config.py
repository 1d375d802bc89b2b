"""Hugging Face ``config.json`` <-> seqpar's model fields, for the architectures seqpar builds.

No import of ``seqpar.config`` at run time: ``config.py`` uses these mappers to validate
``model.hf_path`` and ``model.arch``, and ``models/hf.py`` to read and write checkpoints.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from seqpar.config import ModelConfig

MOE_ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe")
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
