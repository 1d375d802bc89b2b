"""Typed run configuration: YAML file + ``--section.key value`` overrides -> validated ``Config``.

Everything a run does is decided here, before any process group, file or tensor exists. Errors
name the offending key and say how to fix it (``ConfigError``). Checks that need the world size
(data-parallel degree, batch divisibility) live in ``Config.layout(world_size)``, which the entry
point calls right after reading the launcher's environment and before any work starts.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from seqpar.errors import UserError
from seqpar.hf_config import MOE_ARCHS, fields_to_hf_config, hf_config_to_fields

# Default config: tiny model on the built-in passkey task; runs on a laptop CPU in minutes.
DEFAULT_CONFIG_NAME = "tiny-cpu"


class ConfigError(UserError, ValueError):
    """A configuration problem, with the key(s) involved and how to fix it."""


class _Section(BaseModel):
    # extra="forbid": a misspelt key is an error, never silently ignored.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


# Input files a config names. A relative value in a config file is relative to that file's
# directory (files shipped next to a config keep working from any working directory); on the
# command line, and for everything a run writes (logging.run_dir, checkpoint.dir, data.cache_dir,
# checkpoint.mirror, checkpoint.resume), relative to the current directory.
INPUT_PATH_KEYS = ("data.paths", "data.eval_paths", "data.tokenizer", "model.hf_path")
CLI = "the command line"


@dataclass
class _Origins:
    """Where each value of a config being loaded came from, for messages (pydantic context)."""

    source: str = "<dict>"  # the YAML layer, as shown to the user
    file_keys: set[str] = field(default_factory=set)  # dotted keys (and their sections) set by the file
    cli_keys: set[str] = field(default_factory=set)  # ... set by --section.key overrides
    paths: dict[str, list[_Written]] = field(default_factory=dict)  # input path key -> items as written
    notices: list[str] = field(default_factory=list)

    def where(self, key: str) -> str | None:
        return CLI if key in self.cli_keys else self.source if key in self.file_keys else None

    def shown(self, key: str) -> str:
        """The key as the user wrote it: ``--train.lr`` on the command line, else ``train.lr``."""
        leaf = key in self.cli_keys and not any(k.startswith(f"{key}.") for k in self.cli_keys)
        return f"--{key}" if leaf else key


def eval_set_name(path: Path) -> str:
    """A held-out file's name in the logs with ``data.eval_per_file``: ``eval_loss/<this>``."""
    return Path(path).stem


def _origins(info: ValidationInfo | None) -> _Origins:
    ctx = getattr(info, "context", None)
    found = ctx.get("seqpar") if isinstance(ctx, dict) else None
    return found if isinstance(found, _Origins) else _Origins()


@dataclass(frozen=True)
class _Written:
    """One input path as the user wrote it, and the directory a relative one was resolved against."""

    text: str
    base: Path | None = None  # None: absolute as written
    in_file: bool = False  # base is the config file's directory (else the current directory)

    @property
    def how(self) -> str:
        if self.base is None:
            return ""
        where = "the config file's directory" if self.in_file else "the current directory"
        return f" (relative to {where} {self.base})"


def _written(origins: _Origins, key: str, i: int, value: Path) -> _Written:
    items = origins.paths.get(key)
    if items and i < len(items):
        return items[i]
    return _Written(str(value), None if value.is_absolute() else Path.cwd())


def _path_problem(origins: _Origins, key: str, i: int | None, value: Path, directory: bool = False) -> str | None:
    """None when ``value`` exists (a file, or a directory when ``directory``); else one clause naming
    the key, the value as written, how it was resolved and what to do."""
    if value.is_dir() if directory else value.is_file():
        return None
    w = _written(origins, key, i or 0, value)
    shown = f"{key}[{i}]" if i is not None else key
    shown = f"{shown} '{w.text}'{w.how}"
    if key == "data.tokenizer":
        if value.is_dir():
            inner = Path(w.text) / "tokenizer.json"
            return f"{shown} is not a file: " + (f"set data.tokenizer: {inner}" if (value / "tokenizer.json").is_file()
                                                 else "it is a directory (want tokenizer.json)")
        msg = f"{shown} is not a file: it does not exist (want tokenizer.json)"
    elif directory:
        if value.exists():
            return f"{shown} is a file: config.json not found (want a Hugging Face model directory)"
        msg = f"{shown} does not exist: config.json not found (want a Hugging Face model directory)"
    elif value.is_dir():
        return f"{shown} is a directory: list the files in it instead"
    else:
        msg = f"{shown} does not exist"
    here = Path.cwd() / Path(w.text).expanduser()
    if w.in_file and w.base is not None and here.exists():
        # the old reading (relative to the working directory) would have found it
        msg += (f"; it exists relative to the current directory ({here}): relative paths in a config file "
                f"are read from the file's directory, so write '{os.path.relpath(here, w.base)}' or an absolute path")
    return msg


# ----------------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------------
ARCHS = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe")


class RopeScalingConfig(_Section):
    """RoPE frequency scaling as in transformers: linear, llama3 (Llama-3.1) or yarn (Qwen long context).

    ``llama3`` is Llama-3.1's wavelength-dependent scaling; ``yarn`` ramps between kept and
    interpolated frequencies and also scales cos/sin by an attention factor."""

    rope_type: Literal["linear", "llama3", "yarn"] = "llama3"
    factor: float = Field(8.0, gt=0)
    low_freq_factor: float = Field(1.0, gt=0, description="llama3")
    high_freq_factor: float = Field(4.0, gt=0, description="llama3")
    original_max_position_embeddings: int = Field(8192, gt=0, description="llama3, yarn")
    beta_fast: float = Field(32.0, gt=0, description="yarn: ramp bound (rotations) for extrapolation")
    beta_slow: float = Field(1.0, gt=0, description="yarn: ramp bound (rotations) for interpolation")
    mscale: float | None = Field(None, description="yarn: with mscale_all_dim, sets the attention factor")
    mscale_all_dim: float | None = Field(None, description="yarn")
    attention_factor: float | None = Field(None, gt=0, description="yarn: cos/sin scale; None = from factor")
    truncate: bool = Field(True, description="yarn: round the ramp bounds to whole dimensions")


class MoEConfig(_Section):
    """Mixture-of-experts feed-forward (top-k; dropless unless capacity_factor is set)."""

    num_experts: int = Field(8, ge=1)
    top_k: int = Field(2, ge=1)
    intermediate_size: int = Field(256, ge=1, description="hidden size of each routed expert")
    shared_expert_intermediate_size: int = Field(
        0, ge=0, description="0 = no shared expert; else one always-on expert of this size"
    )
    shared_expert_gate: bool = Field(False, description="Qwen2-MoE: sigmoid gate on the shared expert")
    score_func: Literal["softmax", "sigmoid"] = "softmax"
    norm_topk_prob: bool = Field(True, description="renormalise the top-k weights to sum to 1")
    sparse_step: int = Field(1, ge=1, description="every sparse_step-th layer is MoE (Qwen2/3-MoE)")
    mlp_only_layers: list[int] = Field(default_factory=list, description="layers kept dense")
    aux_loss_coef: float = Field(0.0, ge=0, description="load-balancing aux loss weight (0 = off)")
    bias_update_rate: float = Field(
        0.0, ge=0, description="aux-loss-free expert-bias step gamma (DeepSeek-V3; 0 = off)"
    )
    capacity_factor: float | None = Field(
        None, gt=0, description="None = dropless; else each expert takes at most ceil(factor x tokens x top_k / "
        "num_experts) (token, slot) pairs of a rank's micro-batch, later tokens first dropped (logged as moe_dropped)"
    )

    @model_validator(mode="after")
    def _check(self) -> "MoEConfig":
        if self.top_k > self.num_experts:
            raise ValueError(
                f"top_k={self.top_k} > num_experts={self.num_experts}: lower model.moe.top_k"
            )
        if self.shared_expert_gate and self.shared_expert_intermediate_size == 0:
            raise ValueError(
                "shared_expert_gate needs a shared expert: set "
                "model.moe.shared_expert_intermediate_size > 0 or shared_expert_gate: false"
            )
        return self


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRAConfig(_Section):
    """Low-rank adapters (seqpar.models.lora): base weights frozen; adapters and `trainable` train."""

    rank: int = Field(16, ge=1, description="r: adapter rank")
    alpha: float = Field(32.0, gt=0, description="scaling = alpha / rank")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapters' input (dense projections)")
    targets: list[Literal[LORA_TARGETS]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: list(LORA_TARGETS), description="projections that get adapters (every layer)"
    )
    experts: bool = Field(False, description="also adapt the routed experts' gate/up/down projections")
    trainable: list[Literal["norms", "embed_tokens", "lm_head"]] = Field(
        default_factory=list, description="modules trained in full next to the adapters (LongLoRA: norms, embed_tokens)"
    )
    quantize_base: Literal["nf4"] | None = Field(
        None, description="QLoRA: the adapted projections' frozen weights in 4-bit NF4 (bitsandbytes; extra 'qlora')"
    )

    @model_validator(mode="after")
    def _check(self) -> "LoRAConfig":
        if not self.targets and not self.experts:
            raise ValueError("model.lora.targets is empty and experts is false: nothing would get an adapter")
        return self


# Training choices that may differ from a loaded checkpoint's config.json (context extension,
# balancing); everything else defines weight shapes or the function computed and must match.
HF_OVERRIDABLE = {"rope_theta", "rope_scaling", "max_position_embeddings", "initializer_range"}
HF_OVERRIDABLE_MOE = {"aux_loss_coef", "bias_update_rate", "capacity_factor"}


class ModelConfig(_Section):
    """Decoder architecture (Llama family, dense or MoE). Field names follow Hugging Face."""

    hf_path: Path | None = Field(
        None, description="HF model dir (config.json + safetensors); architecture read from it"
    )
    load_weights: bool = Field(True, description="with hf_path: load its weights (else random init)")
    arch: Literal[ARCHS] = Field("llama", description="HF model_type used for export")  # type: ignore[valid-type]
    vocab_size: int = Field(320, ge=2)
    hidden_size: int = Field(128, ge=1)
    intermediate_size: int = Field(384, ge=1)
    num_hidden_layers: int = Field(4, ge=1)
    num_attention_heads: int = Field(4, ge=1)
    num_key_value_heads: int | None = Field(None, ge=1, description="GQA; None = num_attention_heads")
    head_dim: int | None = Field(None, ge=1, description="None = hidden_size / num_attention_heads")
    rms_norm_eps: float = Field(1e-5, gt=0)
    rope_theta: float = Field(10000.0, gt=0)
    rope_scaling: RopeScalingConfig | None = None
    max_position_embeddings: int = Field(4096, ge=1)
    attention_bias: bool = Field(False, description="bias on q/k/v projections (Qwen2)")
    qk_norm: bool = Field(False, description="RMSNorm on q and k per head (Qwen3)")
    tie_word_embeddings: bool = False
    initializer_range: float = Field(0.02, gt=0)
    moe: MoEConfig | None = None
    lora: LoRAConfig | None = Field(None, description="low-rank adapters on a frozen base (None = full training)")

    @model_validator(mode="before")
    @classmethod
    def _from_hf(cls, data: Any, info: ValidationInfo) -> Any:
        """With ``hf_path``, the architecture comes from its config.json; explicit keys that
        disagree with it are an error (a silent mix would load weights into the wrong shapes)."""
        if not isinstance(data, dict) or data.get("hf_path") is None:
            return data
        origins = _origins(info)
        path = Path(data["hf_path"])
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            w = _written(origins, "model.hf_path", 0, path)
            raise ValueError(_path_problem(origins, "model.hf_path", None, path, directory=True) or
                             f"model.hf_path '{w.text}'{w.how}: config.json not found in it (want a Hugging Face "
                             "model directory)")
        try:
            fields = hf_config_to_fields(json.loads(cfg_file.read_text()))
        except (ValueError, KeyError, json.JSONDecodeError) as e:
            raise ValueError(f"model.hf_path: cannot use {cfg_file}: {e}") from None
        merged = {**data, **fields}
        clashes: list[tuple[str, str]] = []  # (key, "key=value (config.json: value)")
        for k, v in fields.items():
            if k not in data or data[k] == v:
                continue
            if k in HF_OVERRIDABLE:
                merged[k] = data[k]
            elif k == "moe" and isinstance(data[k], dict):
                moe = dict(v)
                for mk, mv in data[k].items():
                    if mk in HF_OVERRIDABLE_MOE or moe.get(mk) == mv:
                        moe[mk] = mv
                    else:
                        clashes.append((f"model.moe.{mk}", f"model.moe.{mk}={mv!r} (config.json: {moe.get(mk)!r})"))
                merged["moe"] = moe
            else:
                clashes.append((f"model.{k}", f"model.{k}={data[k]!r} (config.json: {v!r})"))
        if clashes:
            # say where each key came from, and the fix for that place
            fixes: dict[str, list[str]] = {}
            for key, _ in clashes:
                fixes.setdefault(origins.where(key) or "", []).append(key)
            where = []
            for src, keys in fixes.items():
                if src == CLI:
                    where.append("drop " + ", ".join(f"--{k}" for k in keys))
                elif src:
                    where.append(f"remove {', '.join(keys)} from {src} (or use a config without a model section)")
            raise ValueError(
                f"these keys disagree with model.hf_path's config.json ({cfg_file}): "
                + ", ".join(text for _, text in clashes)
                + "; " + ("; ".join(where) if where else "remove them from the YAML")
                + " (the checkpoint defines the architecture; only "
                + ", ".join(sorted(HF_OVERRIDABLE | {f"moe.{k}" for k in HF_OVERRIDABLE_MOE}))
                + " may be changed)"
            )
        return merged

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        if self.num_attention_heads % self.kv_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.kv_heads}: choose kv heads that divide the heads"
            )
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                f"{self.num_attention_heads}: set model.head_dim explicitly or change the sizes"
            )
        if self.dim_per_head % 2:
            raise ValueError(f"head dim {self.dim_per_head} must be even for RoPE")
        if self.arch in MOE_ARCHS and self.moe is None:
            raise ValueError(f"arch '{self.arch}' is a MoE architecture: add a model.moe section")
        if self.moe is not None and self.arch not in MOE_ARCHS:
            raise ValueError(
                f"model.moe is set but arch '{self.arch}' is dense: use one of {MOE_ARCHS}"
            )
        if self.moe is not None:
            bad = [i for i in self.moe.mlp_only_layers if not 0 <= i < self.num_hidden_layers]
            if bad:
                raise ValueError(f"moe.mlp_only_layers {bad} outside 0..{self.num_hidden_layers - 1}")
        # Checkpoints store weights in the Hugging Face layout of `arch`: make sure it can express
        # this model now rather than at the first save.
        try:
            fields_to_hf_config(self)
        except ValueError as e:
            raise ValueError(f"model.arch='{self.arch}' cannot represent this model: {e}") from None
        return self


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------
class PasskeyConfig(_Section):
    """Built-in synthetic long-context task: find a key planted in filler text."""

    key_digits: int = Field(5, ge=1, le=32, description="length of the random numeric key")
    loss_on: Literal["all", "answer"] = Field(
        "all", description="'answer' puts loss only on the key tokens after the question"
    )
    eval_samples: int = Field(64, ge=0, description="held-out samples scored at the end of a run")
    curriculum_samples: int = Field(
        0, ge=0, description="the first N training samples pack several shorter documents, their length "
        "growing linearly from curriculum_start_len to seq_len/2 (0 = off; needs data.shuffle false)"
    )
    curriculum_start_len: int = Field(128, ge=16, description="document length at the curriculum's start")


DEFAULT_CHAT_TEMPLATE = "<|{role}|>\n{content}\n"
# Jinja chat-template variables seqpar sets from each record: data.chat_template_kwargs may not name them.
CHAT_TEMPLATE_RESERVED = ("messages", "tools", "documents", "add_generation_prompt")


def _check_template_kwargs(kwargs: dict[str, Any]) -> None:
    """``data.chat_template_kwargs``: no variable seqpar sets, JSON values only (a YAML date is not)."""
    for key, value in kwargs.items():
        if key in CHAT_TEMPLATE_RESERVED:
            raise ValueError(f"data.chat_template_kwargs.{key}: seqpar sets '{key}' itself (from each record); "
                             f"remove it")
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError):
            raise ValueError(f"data.chat_template_kwargs.{key}: {value!r} is a {type(value).__name__}, not a JSON "
                             f"value: quote it in the YAML (e.g. {key}: '{value}')") from None


class DataConfig(_Section):
    """Where tokens come from and how they are packed into fixed-length sequences."""

    type: Literal["passkey", "text", "tokens", "sft"] = Field(
        "passkey", description="passkey: built-in synthetic; text: jsonl; tokens: .npy/.bin; sft: pairs"
    )
    seq_len: int = Field(1024, ge=8, description="tokens per packed sequence")
    seed: int = Field(1234, ge=0, description="data order and synthetic samples")
    shuffle: bool = Field(True, description="new permutation of the sequences every epoch")
    paths: list[Path] = Field(default_factory=list, description="input files (text/tokens/sft)")
    eval_paths: list[Path] = Field(
        default_factory=list, description="held-out files for train.eval_every (same format as paths)"
    )
    eval_per_file: bool = Field(
        False, description="each data.eval_paths file its own held-out set, logged as eval_loss/<file name "
        "minus its last suffix>; eval_loss covers them all; false = the files form one set"
    )
    weights: list[float] | None = Field(
        None, description="one per data.paths file: each file its own source, sampled in these proportions "
        "(sources above their natural share repeat); None = the files form one dataset"
    )
    tokenizer: Path | None = Field(None, description="tokenizer.json (text/sft); None = bytes")
    eos_token: str | None = Field(
        None, description="with tokenizer: token ending each document; None = <|endoftext|>, </s>, ... found in it"
    )
    text_field: str = Field("text", description="text: jsonl field holding the document")
    token_dtype: Literal["uint16", "uint32"] = Field("uint16", description="dtype of raw .bin files")
    eos_id: int | None = Field(None, ge=0, description="tokens: document separator id")
    prompt_field: str = Field("prompt", description="sft: prompt field (no loss)")
    response_field: str = Field("response", description="sft: response field (loss)")
    packing: Literal["greedy", "best_fit"] = Field(
        "greedy", description="sft: greedy = in file order, a new sequence when the next example does not fit; "
                              "best_fit = longest first, each into the fullest sequence it fits (less padding)")
    sft_separator: str = Field(
        "\n", description="sft: text between prompt and response (no loss); '' = joined as is"
    )
    messages_field: str = Field("messages", description="sft: chat list of {role, content}; loss on assistant")
    chat_template: str = Field(
        DEFAULT_CHAT_TEMPLATE,
        description="per-message format with {role} and {content}; 'hf' = the tokenizer's own Jinja template",
    )
    chat_template_file: Path | None = Field(
        None, description="with chat_template hf: a Jinja template file to use instead of the tokenizer's"
    )
    chat_template_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="with chat_template hf: extra template variables (enable_thinking: false)"
    )
    cache_dir: Path | None = Field(None, description="tokenized-text cache; None = <run_dir>/cache")
    passkey: PasskeyConfig = Field(default_factory=PasskeyConfig)
    num_samples: int = Field(
        100_000, ge=1, description="passkey: size of one epoch of generated samples"
    )

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> "DataConfig":
        if self.type in ("text", "tokens", "sft") and not self.paths:
            raise ValueError(f"data.type '{self.type}' reads files: set data.paths to a list of files")
        if self.type == "passkey" and self.paths:
            kinds = {p.suffix for p in self.paths}
            guess = "tokens" if kinds <= {".npy", ".bin"} else "text (or sft)" if kinds <= {".jsonl", ".json"} else None
            raise ValueError(
                "data.paths is set but data.type is 'passkey' (the built-in synthetic task reads no files): "
                + (f"set data.type {guess}" if guess else "set data.type text, tokens or sft")
                + ", or remove data.paths")
        if self.type == "passkey" and self.passkey.curriculum_samples:
            if self.shuffle:
                raise ValueError(
                    "data.passkey.curriculum_samples follows the sample index, which data.shuffle would "
                    "scramble: set data.shuffle false (passkey samples are independent random draws "
                    "already) or data.passkey.curriculum_samples 0")
            if self.passkey.curriculum_start_len > self.seq_len // 2:
                raise ValueError(
                    f"data.passkey.curriculum_start_len={self.passkey.curriculum_start_len} leaves no room "
                    f"for two documents in data.seq_len={self.seq_len}: set it to at most {self.seq_len // 2}")
        if self.eval_per_file:
            if self.type == "passkey":
                raise ValueError("data.eval_per_file names held-out files, but the passkey task has none (its "
                                 "held-out split is generated): remove data.eval_per_file")
            seen: dict[str, int] = {}
            for i, path in enumerate(self.eval_paths):
                if (j := seen.setdefault(eval_set_name(path), i)) != i:
                    raise ValueError(f"data.eval_per_file names each held-out set by its file: data.eval_paths[{j}] "
                                     f"and [{i}] are both '{eval_set_name(path)}': rename one of the files")
        if self.weights is not None:
            if self.type == "passkey":
                raise ValueError("data.weights mixes data.paths files, but data.type is 'passkey' (no files): "
                                 "remove data.weights")
            if len(self.weights) != len(self.paths):
                raise ValueError(f"data.weights has {len(self.weights)} "
                                 f"entr{'y' if len(self.weights) == 1 else 'ies'} for {len(self.paths)} data.paths "
                                 f"file{'' if len(self.paths) == 1 else 's'}: give one weight per file, in the same order")
            bad = [w for w in self.weights if not (math.isfinite(w) and w > 0)]
            if bad:
                raise ValueError(f"data.weights must all be positive numbers, got {bad[0]}: remove a file "
                                 f"from data.paths to leave it out")
                # Existence only (before any work, --print-config included): how a relative path was resolved
        # is part of each message. Contents are read by seqpar.data.
        origins = _origins(info)
        problems = [_path_problem(origins, key, i, p) for key, paths in
                    (("data.paths", self.paths), ("data.eval_paths", self.eval_paths)) for i, p in enumerate(paths)]
        if self.tokenizer is not None:
            problems.append(_path_problem(origins, "data.tokenizer", None, self.tokenizer))
        if self.chat_template_file is not None:
            problems.append(_path_problem(origins, "data.chat_template_file", None, self.chat_template_file))
        if any(problems):
            raise ValueError("\n".join(p for p in problems if p))  # one list item each (_format_errors)
        if self.eos_token is not None and self.tokenizer is None:
            raise ValueError(
                "data.eos_token needs data.tokenizer (the byte tokenizer's eos is fixed; token files "
                "use data.eos_id): set data.tokenizer or remove data.eos_token"
            )
        if self.chat_template == "hf":
            if self.type != "sft":
                raise ValueError(f"data.chat_template hf renders chat records, which data.type sft reads (this "
                                 f"is data.type '{self.type}'): set data.type: sft, or remove data.chat_template")
            _check_template_kwargs(self.chat_template_kwargs)
            if self.tokenizer is None:
                raise ValueError("data.chat_template hf renders with the Jinja template of a Hugging Face "
                                 "tokenizer: set data.tokenizer to its tokenizer.json")
            return self
        if self.chat_template_file is not None or self.chat_template_kwargs:
            key = "data.chat_template_file" if self.chat_template_file is not None else "data.chat_template_kwargs"
            raise ValueError(f"{key} is used with data.chat_template hf (the Jinja template): set "
                             f"data.chat_template: hf, or remove {key}")
        if "{role}" not in self.chat_template or "{content}" not in self.chat_template:
            raise ValueError("data.chat_template must contain '{role}' and '{content}' (a per-message "
                             "format), or be hf (the tokenizer's own Jinja template)")
        try:
            self.chat_template.format(role="user", content="")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(
                f"data.chat_template cannot be formatted ({e!r}): only {{role}} and {{content}} may "
                "appear in braces; write a literal brace as {{ or }}"
            ) from None
        return self


# ----------------------------------------------------------------------------------------------
# parallel / train / logging
# ----------------------------------------------------------------------------------------------
class ParallelConfig(_Section):
    """Layout: world = data-parallel x sequence-parallel (ulysses x ring)."""

    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage")
    ulysses_degree: int = Field(1, ge=1, description="ranks splitting attention heads (all-to-all)")
    ring_degree: int = Field(1, ge=1, description="ranks passing k/v blocks around a ring")
    backend: Literal["auto", "nccl", "gloo"] = Field("auto", description="auto: nccl on GPU, gloo on CPU")
    zero3_init: bool = Field(
        True, description="ZeRO-3: build the model already partitioned (deepspeed.zero.Init); false = whole, then split"
    )
    expert_degree: int = Field(
        1, ge=1, description="expert parallelism: MoE experts split over groups of this many consecutive ranks "
        "(tokens travel by all-to-all); any ranks of the DP x SP world (ZeRO 1-2)"
    )

    @property
    def sp_degree(self) -> int:
        return self.ulysses_degree * self.ring_degree


GALORE_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class GaLoreConfig(_Section):
    """GaLore and Q-GaLore (train.optimizer): AdamW moments in a low-rank projection of each gradient."""

    rank: int = Field(128, ge=1, description="projection rank (1/4 of hidden_size is common)")
    update_interval: int = Field(200, ge=1, description="steps between projector refreshes (SVD of the gradient)")
    scale: float = Field(0.25, gt=0, description="multiplies the projected-back update")
    targets: list[Literal[GALORE_TARGETS]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: list(GALORE_TARGETS), description="projections optimised by GaLore; the rest AdamW"
    )
    master_weights: bool = Field(
        False, description="bf16 only: keep DeepSpeed's fp32 master copy (+4 bytes/param in memory and checkpoints); "
        "false (GaLore paper): bf16 weights updated by stochastic rounding; qgalore needs false"
    )
    shard_state: bool = Field(
        True, description="galore without master weights: each data/sequence-parallel rank keeps the optimizer "
        "state of its share of the parameters and broadcasts their updates (ZeRO-1 by parameter; bitwise the "
        "same training); false: every rank keeps all of it"
    )
    quant_group: int = Field(256, ge=2, description="qgalore: values per INT8 weight / INT4 projector scale")
    adaptive_threshold: float = Field(
        0.4, ge=0, le=1, description="qgalore: mean absolute cosine of successive projectors' leading vectors at "
        "which a matrix's refresh interval doubles"
    )
    adaptive_window: int = Field(5, ge=0, description="qgalore: refreshes compared per decision (0: fixed interval)")


class TrainConfig(_Section):
    """Optimisation and the micro-batch loop."""

    max_steps: int = Field(100, ge=1, description="optimizer steps")
    epochs: float | None = Field(
        None, gt=0, description="passes over the training data: sets max_steps from the data's size at start-up "
                                "(then leave max_steps unset)")
    micro_batch_size: int = Field(1, ge=1, description="sequences per rank per micro-step")
    global_batch_size: int | None = Field(
        None, ge=1, description="sequences per optimizer step (sets grad_accum_steps)"
    )
    grad_accum_steps: int | None = Field(None, ge=1, description="alternative to global_batch_size")
    lr: float = Field(3e-4, gt=0, description="peak learning rate (AdamW)")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final lr = lr * min_lr_ratio")
    warmup_steps: int = Field(10, ge=0, description="linear warmup to lr over this many steps")
    decay: Literal["cosine", "linear", "constant", "wsd"] = Field(
        "cosine", description="after warmup, to lr*min_lr_ratio; wsd: constant, then a linear cooldown "
        "over the last train.cooldown_ratio of the steps"
    )
    cooldown_ratio: float = Field(
        0.2, gt=0, le=1, description="decay wsd: fraction of the steps after warmup spent cooling down"
    )
    weight_decay: float = Field(0.1, ge=0, description="AdamW decay on matrices (not on norms/biases)")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon")
    grad_clip: float = Field(1.0, ge=0, description="0 = off")
    max_skipped_steps: int = Field(
        5, ge=0, description="optimizer steps in a row whose gradients are not finite (NaN/inf) that are skipped "
        "(not applied: weights and optimizer state unchanged, the LR schedule moves on) before the run stops; "
        "0 = stop at the first"
    )
    optimizer: Literal["adamw", "galore", "qgalore"] = Field(
        "adamw", description="adamw (DeepSpeed, any ZeRO stage); galore: low-rank moments; qgalore: GaLore with "
        "INT8 weights, INT4 projectors, bf16 moments (seqpar.optim, ZeRO-0)"
    )
    galore: GaLoreConfig = Field(default_factory=GaLoreConfig)
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16 = bf16 weights/compute, fp32 master "
                                                     "(GaLore: train.galore.master_weights)")
    loss_chunk_size: int = Field(4096, ge=1, description="tokens per logits chunk in the loss")
    compile: bool = Field(
        False, description="torch.compile each decoder layer (attention and experts as custom ops); "
        "fuses norms, RoPE, SwiGLU; the first step compiles (ZeRO 0-2)"
    )
    fused_optimizer: Literal["auto", "on", "off"] = Field(
        "auto", description="torch's fused AdamW kernel (auto: on for CUDA, off on CPU)"
    )
    loss_impl: Literal["auto", "torch", "liger", "cce"] = Field(
        "auto", description="fused linear + cross-entropy: auto = Liger-Kernel, else cut-cross-entropy "
        "on CUDA when installed, else the chunked torch loss"
    )
    eval_every: int = Field(0, ge=0, description="held-out loss every N optimizer steps (0 = off)")
    eval_samples: int = Field(64, ge=1, description="held-out sequences scored at each evaluation (per set "
                              "with data.eval_per_file)")
    eval_by_position: list[int] = Field(
        default_factory=list, description="also the held-out loss by position in the document: bucket edges, "
        "e.g. [4096, 16384] = tokens at positions 0-4K, 4K-16K and 16K-seq_len (long-context use)"
    )
    attention: Literal["auto", "torch", "sdpa", "flash_attn"] = Field(
        "auto", description="auto/sdpa: the fastest correct fused kernel per shape, measured at start-up on CUDA "
        "(cuDNN, flash, efficient; flash-attn 2 / FA4 for packed documents when installed); "
        "flash_attn: flash-attn 2 only; torch: exact math"
    )
    seed: int = Field(0, description="model init and global RNGs (same on every rank)")
    deterministic: bool = Field(
        False, description="repeatable kernels: torch deterministic algorithms, no cuDNN attention"
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when available")

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in v):
            raise ValueError("each of train.betas must be in [0, 1)")
        return v

    @field_validator("eval_by_position")
    @classmethod
    def _edges(cls, v: list[int]) -> list[int]:
        if any(e < 1 for e in v) or any(b <= a for a, b in zip(v, v[1:])):
            raise ValueError(f"train.eval_by_position must be increasing positions >= 1, got {v} (e.g. [4096, 16384])")
        return v

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.warmup_steps > self.max_steps and self.epochs is None:  # epochs: checked once max_steps is known
            # (load_config lowers a warmup that comes from a lower layer than max_steps: _fit_warmup)
            raise ValueError(
                f"train.warmup_steps={self.warmup_steps} > train.max_steps={self.max_steps}: set "
                f"train.warmup_steps to at most {self.max_steps} (e.g. --train.warmup_steps {self.max_steps})"
            )
        return self


class MemoryConfig(_Section):
    """What trades recomputation, host memory or transfers for GPU memory (seqpar.engine.memory)."""

    activation_checkpointing: Literal["none", "full", "selective"] = Field(
        "none", description="full: keep each checkpointed layer's input only, recompute the layer in the "
        "backward; selective: keep the attention output and LSE (and q, k, v), recompute norms, "
        "projections, RoPE and the MLP; true/false = full/none"
    )
    checkpoint_every: int = Field(
        1, ge=1, description="checkpoint layers 0, N, 2N, ... (1 = every layer); the others keep their activations"
    )
    offload_activations: bool = Field(
        False, description="keep the checkpointed layers' inputs in pinned CPU memory until the backward "
        "(copies on a side CUDA stream); needs activation_checkpointing"
    )
    tiled_mlp: bool = Field(
        False, description="run each MLP over sequence tiles, recomputed tile by tile in the backward "
        "(MoE: the routed experts are recomputed, untiled)"
    )
    mlp_tile_tokens: int = Field(0, ge=0, description="tokens per MLP tile; 0 = model.hidden_size")
    offload_optimizer: bool = Field(
        False, description="ZeRO-Offload: fp32 master weights and AdamW moments in CPU memory, the step on "
        "the CPU (ZeRO 1-3)"
    )
    offload_params: bool = Field(False, description="ZeRO-3 only: parameters in CPU memory between uses")

    @field_validator("activation_checkpointing", mode="before")
    @classmethod
    def _bool_policy(cls, v: Any) -> Any:
        # the switch every other trainer has (gradient_checkpointing: true)
        return {True: "full", False: "none"}.get(v, v) if isinstance(v, bool) else v

    @model_validator(mode="after")
    def _consistent(self) -> "MemoryConfig":
        if self.offload_activations and self.activation_checkpointing == "none":
            raise ValueError("memory.offload_activations moves the checkpointed layers' inputs to the CPU: set "
                             "memory.activation_checkpointing to full or selective, or turn offload off")
        if self.mlp_tile_tokens and not self.tiled_mlp:
            raise ValueError("memory.mlp_tile_tokens is set but memory.tiled_mlp is false: set tiled_mlp true "
                             "or remove mlp_tile_tokens")
        return self


class CheckpointConfig(_Section):
    """When micro-batch checkpoints are written, where, and how a run resumes
    (docs/checkpoint-format.md)."""

    dir: Path | None = Field(None, description="None = <run_dir>/checkpoints")
    every_micro_batches: int = Field(0, ge=0, description="save after every N micro-batches (0 = off)")
    every_steps: int = Field(0, ge=0, description="save after every N optimizer steps (0 = off)")
    every_minutes: float = Field(0.0, ge=0, description=(
        "save after the first micro-batch that ends this many minutes after the last save or the start of "
        "training (any rank's clock; all ranks save together; 0 = off)"))
    at_end: bool = Field(True, description="save when training finishes")
    keep_last: int = Field(3, ge=1, description="complete checkpoints kept (plus the resumed-from one)")
    async_write: bool = Field(True, description="write in the background (one write in flight)")
    resume: str = Field("auto", description="auto (newest that verifies) | none | <checkpoint path>")
    allow_changes: list[str] = Field(
        default_factory=list, description="keys allowed to differ from the checkpoint's config on resume"
    )
    elastic: bool = Field(
        True, description="resume onto another layout (DP/SP sizes, ZeRO stage, same global batch), also mid-window"
    )
    on_write_error: Literal["stop", "warn"] = Field(
        "stop", description="a checkpoint write failing twice (disk full, I/O error): stop (exit 74) or warn and train on"
    )
    lock_wait_s: float = Field(
        120.0, ge=0, description="wait this long for another job's lock on the checkpoint dir before refusing"
    )
    file_mode: str = Field("0600", description="permissions of checkpoint files (octal; directories add x bits)")
    mirror: str | None = Field(
        None, description="also copy each committed checkpoint here (fsspec URL: s3://..., file://..., or a path)"
    )
    mirror_keep_last: int | None = Field(None, ge=1, description="checkpoints kept on the mirror (None = keep_last)")
    keep_best: bool = Field(
        False, description="with train.eval_every: also save at each evaluation and keep the lowest eval loss"
    )

    @field_validator("file_mode", mode="before")
    @classmethod
    def _quoted_mode(cls, v: Any) -> Any:
        if isinstance(v, int) and not isinstance(v, bool):  # YAML 1.1 reads 0640 as the octal number 416
            raise ValueError(f"got the number {v} (an unquoted 0{v:o} is read as an octal number): write the mode "
                             f"quoted, '0{v:o}' (on a command line: \"'0{v:o}'\")")
        return v

    @field_validator("file_mode")
    @classmethod
    def _octal_mode(cls, v: str) -> str:
        try:
            mode = int(str(v), 8)
        except ValueError:
            mode = -1
        if not 0o400 <= mode <= 0o777 or not mode & 0o600 == 0o600:
            raise ValueError(f"{v!r} is not an octal file mode the owner can read and write, e.g. '0600' or '0640'")
        return f"{mode:04o}"


class WandbConfig(_Section):
    """Weights & Biases: the metrics records also go to a W&B run (rank 0; ``pip install wandb``)."""

    project: str = Field(..., min_length=1, description="W&B project")
    entity: str | None = Field(None, description="team or user; None = your default")
    name: str | None = Field(None, description="run name; None = the run_dir's name")
    group: str | None = Field(None, description="groups runs in the W&B UI")
    tags: list[str] = Field(default_factory=list)
    mode: Literal["online", "offline", "disabled"] = Field(
        "online", description="offline: written under run_dir/wandb for a later `wandb sync`")


class ProfileConfig(_Section):
    """A torch.profiler trace of a few optimizer steps: where the time goes (engine/profiling.py)."""

    steps: list[int] = Field(..., min_length=2, max_length=2, description=(
        "[first, last] optimizer steps to trace, numbered as the log numbers them (1 = the first step); "
        "writes run_dir/profile/steps<first>-<last>/rank<r>.trace.json.gz and rank<r>.txt"))
    ranks: list[int] = Field([0], min_length=1, description="ranks that trace (each writes its own files)")
    memory: bool = Field(False, description=(
        "also record allocations (the table gains memory columns); on CUDA a rank<r>.memory.pickle "
        "snapshot for https://pytorch.org/memory_viz"))
    shapes: bool = Field(False, description="record operator input shapes (larger traces)")

    @field_validator("steps")
    @classmethod
    def _step_range(cls, v: list[int]) -> list[int]:
        if not 1 <= v[0] <= v[1]:
            raise ValueError(f"expected [first, last] with 1 <= first <= last, got {v}")
        return v

    @field_validator("ranks")
    @classmethod
    def _ranks(cls, v: list[int]) -> list[int]:
        if min(v) < 0:
            raise ValueError(f"ranks are 0 or more, got {v}")
        return sorted(set(v))


class LoggingConfig(_Section):
    """Where metrics go and how progress is shown (rank 0 only)."""

    run_dir: Path = Field(Path("runs/default"), description="metrics.jsonl, tensorboard, cache")
    log_every: int = Field(1, ge=1, description="optimizer steps between metric records")
    progress_bar: bool = Field(
        True, description="tqdm bar on rank 0 when stderr is a terminal; else (or false) a plain line per log_every steps"
    )
    tensorboard: Literal["auto", "on", "off"] = Field("auto", description="auto: when installed")
    wandb: WandbConfig | None = Field(
        None, description="a W&B run for the metrics (a resumed run continues the same W&B run); None = off")
    checkpoint_lines: Literal["auto", "every", "none"] | int = Field(  # an int >= 1: _lines_on_off
        "auto", description="a line per checkpoint save: every, none, N (every N-th save) or auto (every save "
        "when at most one per optimizer step, else the first; the progress line sums up the others); a stop's "
        "and the final save always print"
    )
    profile: ProfileConfig | None = Field(
        None, description="trace some steps with torch.profiler (e.g. {steps: [5, 6]}); None = off")

    @field_validator("tensorboard", mode="before")
    @classmethod
    def _on_off(cls, v: Any) -> Any:
        # YAML 1.1 reads a bare on/off as a boolean
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v

    @field_validator("checkpoint_lines", mode="before")
    @classmethod
    def _lines_on_off(cls, v: Any) -> Any:
        if isinstance(v, bool):
            return "every" if v else "none"
        if isinstance(v, str) and v.strip().isdigit():
            v = int(v)
        if v in ("auto", "every", "none") or (isinstance(v, int) and v >= 1):
            return v
        raise ValueError("expected auto, every, none or a number N >= 1 (a line every N-th save)")
    peak_tflops: float | None = Field(
        None, gt=0, description="per-device peak for MFU; None = known GPUs, else MFU not shown"
    )


# DeepSpeed keys seqpar derives itself: set them through our sections, not `deepspeed:`.
_DERIVED_DS_KEYS = {
    "train_batch_size": "train.global_batch_size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum_steps or train.global_batch_size",
    "gradient_clipping": "train.grad_clip",
    "bf16": "train.precision",
    "bfloat16": "train.precision",  # DeepSpeed's other spelling of bf16
    "fp16": "train.precision (fp16 is not supported; use bf16)",
    "scheduler": "train.lr / warmup_steps / decay (seqpar owns the LR schedule)",
}


@dataclass(frozen=True)
class Layout:
    """World-size-dependent numbers, computed once by ``Config.layout``."""

    world_size: int
    dp: int
    sp: int
    ulysses: int
    ring: int
    micro_batch_size: int
    grad_accum_steps: int
    global_batch_size: int  # sequences per optimizer step


class Config(_Section):
    """A whole run."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    memory: MemoryConfig = Field(default_factory=MemoryConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    deepspeed: dict[str, Any] = Field(
        default_factory=dict, description="passed through to DeepSpeed, merged over derived keys"
    )
    _notices: list[str] = PrivateAttr(default_factory=list)

    @property
    def notices(self) -> list[str]:
        """One-line notes on what ``load_config`` adjusted (printed to stderr by it, rank 0)."""
        return self._notices

    @model_validator(mode="after")
    def _cross(self) -> "Config":
        self._check_expert_parallel()
        self._check_galore()
        mem = self.memory
        if self.train.compile and (mem.activation_checkpointing == "selective" or mem.tiled_mlp):
            what = "memory.tiled_mlp" if mem.tiled_mlp else "memory.activation_checkpointing=selective"
            raise ValueError(f"train.compile compiles whole decoder layers; {what} splits them (not supported "
                             "together yet): use memory.activation_checkpointing full without tiled_mlp, or "
                             "train.compile false")
        if self.model.lora is not None and self.parallel.zero_stage == 3 and self.parallel.zero3_init:
            raise ValueError("model.lora with ZeRO-3 needs parallel.zero3_init false (adapters wrap the base after "
                             "it is built, so it is built whole and then partitioned): set parallel.zero3_init false")
        if self.model.lora is not None and "lm_head" in self.model.lora.trainable and self.model.tie_word_embeddings:
            raise ValueError("model.lora.trainable: lm_head is tied to the embeddings in this model "
                             "(tie_word_embeddings): train embed_tokens instead")
        if self.model.lora is not None and self.model.lora.quantize_base and self.parallel.zero_stage == 3:
            raise ValueError("model.lora.quantize_base with ZeRO-3 is not supported (the 4-bit base is a buffer "
                             "ZeRO-3 would not partition): use parallel.zero_stage 0, 1 or 2")
        if self.model.lora is not None and self.model.lora.experts and self.train.compile:
            raise ValueError("model.lora.experts with train.compile is not supported (the compiled experts op does "
                             "not see the adapters): set train.compile false or model.lora.experts false")
        if self.train.compile and self.model.moe is not None and self.model.moe.capacity_factor is not None:
            raise ValueError("train.compile with model.moe.capacity_factor is not supported (the kept pairs have a "
                             "data-dependent count): remove capacity_factor (dropless) or set train.compile false")
        if self.train.compile and self.parallel.zero_stage == 3:
            raise ValueError("train.compile does not support ZeRO-3 (its parameters are gathered around "
                             "each module's forward): set parallel.zero_stage 2 or train.compile false")
        for key, ours in _DERIVED_DS_KEYS.items():
            if key in self.deepspeed:
                raise ValueError(f"deepspeed.{key} is derived by seqpar: set {ours} instead")
        zo = self.deepspeed.get("zero_optimization", {})
        if not isinstance(zo, dict):
            raise ValueError("deepspeed.zero_optimization must be a mapping of ZeRO options (a plain value "
                             "would replace the stage seqpar derives): set parallel.zero_stage")
        if "stage" in zo:
            raise ValueError("deepspeed.zero_optimization.stage is derived: set parallel.zero_stage")
        # ZeRO-Offload is derived from memory.offload_* (the form whose partial gradients and CPU
        # state checkpoints capture: engine/deepspeed_state.py); raw DeepSpeed spellings could ask
        # for forms they do not (NVMe, partial ratios). The engine is checked again after start-up.
        for key, ours in (("offload_optimizer", "memory.offload_optimizer"), ("offload_param", "memory.offload_params"),
                          ("cpu_offload", "memory.offload_optimizer"), ("cpu_offload_param", "memory.offload_params")):
            off = zo.get(key)
            if off and (off.get("device", "none") if isinstance(off, dict) else off) != "none":
                raise ValueError(f"deepspeed.zero_optimization.{key} is derived by seqpar: remove it and set "
                                 f"{ours}: true (CPU offload; NVMe is not supported)")
        mem, stage = self.memory, self.parallel.zero_stage
        if mem.offload_optimizer and stage == 0:
            raise ValueError("memory.offload_optimizer needs a ZeRO optimizer (it offloads the fp32 master and "
                             "moments ZeRO partitions): set parallel.zero_stage 1, 2 or 3, or turn it off")
        if mem.offload_params and stage != 3:
            raise ValueError(f"memory.offload_params needs ZeRO-3 (only ZeRO-3 partitions the parameters), "
                             f"parallel.zero_stage is {stage}: set parallel.zero_stage 3, or turn it off")
        dt = self.deepspeed.get("data_types", {})
        fp32_names = ("fp32", "float32", "float", "torch.float32")
        if (isinstance(dt, dict) and str(dt.get("grad_accum_dtype", "")).lower() in fp32_names
                and self.train.precision == "bf16" and self.parallel.zero_stage == 2):
            raise ValueError("deepspeed.data_types.grad_accum_dtype=fp32 with bf16 at ZeRO-2 keeps partial gradients "
                             "in a compact buffer micro-batch checkpoints do not capture: remove it, or use "
                             "parallel.zero_stage 1 or 3 (both checkpoint fp32 accumulation)")
        m, p = self.model, self.parallel
        if m.num_attention_heads % p.ulysses_degree:
            raise ValueError(
                f"model.num_attention_heads={m.num_attention_heads} is not divisible by "
                f"parallel.ulysses_degree={p.ulysses_degree}: pick a degree that divides the heads"
            )
        kv, u = m.kv_heads, p.ulysses_degree
        if (kv >= u and kv % u) or (kv < u and u % kv):
            raise ValueError(
                f"model.num_key_value_heads={kv} and parallel.ulysses_degree={u}: one must be a "
                f"multiple of the other (kv heads are split, or repeated, across Ulysses ranks); "
                f"{'it is not a multiple of num_key_value_heads' if kv < u else 'kv heads are not a multiple of the degree'}"
            )
        if p.sp_degree > 1 and self.data.seq_len < 2 * p.ring_degree * p.ulysses_degree:
            raise ValueError(
                f"data.seq_len={self.data.seq_len} is shorter than 2 x ring_degree x ulysses_degree = "
                f"{2 * p.sp_degree}: every rank needs tokens of its own; lower the degrees"
            )
        if self.data.type == "passkey" and self.data.tokenizer is not None:
            raise ValueError("data.tokenizer is not used by the passkey task (byte-level): remove it")
        if self.train.eval_every and self.data.type != "passkey" and not self.data.eval_paths:
            raise ValueError(f"train.eval_every={self.train.eval_every} needs held-out data: set data.eval_paths "
                             "(files like data.paths, not trained on), or set train.eval_every to 0")
        if self.train.eval_by_position and self.train.eval_by_position[-1] >= self.data.seq_len:
            raise ValueError(f"train.eval_by_position={self.train.eval_by_position}: every edge must be below "
                             f"data.seq_len={self.data.seq_len} (the last bucket ends there): drop the edges "
                             f">= {self.data.seq_len} or raise data.seq_len")
        if self.checkpoint.keep_best and not self.train.eval_every:
            raise ValueError("checkpoint.keep_best keeps the checkpoint with the lowest held-out loss: it needs "
                             "train.eval_every > 0")
        if self.model.hf_path is None and self.data.type == "passkey":
            from seqpar.data.tokenizer import ByteTokenizer

            need = ByteTokenizer().vocab_size
            if self.model.vocab_size < need:
                raise ValueError(
                    f"model.vocab_size={self.model.vocab_size} < {need} needed by the passkey "
                    f"task's byte vocabulary: raise model.vocab_size"
                )
        return self

    @property
    def low_precision_weights(self) -> bool:
        """bf16 parameters without an fp32 master copy (GaLore / Q-GaLore, train.galore.master_weights false)."""
        t = self.train
        return t.optimizer in ("galore", "qgalore") and t.precision == "bf16" and not t.galore.master_weights

    def _check_galore(self) -> None:
        opt = self.train.optimizer
        if opt not in ("galore", "qgalore"):
            return
        if self.parallel.zero_stage != 0:
            raise ValueError(f"train.optimizer={opt} needs whole weight matrices, but ZeRO-{self.parallel.zero_stage} "
                             "flattens parameters into partitions: set parallel.zero_stage 0")
        if self.parallel.expert_degree > 1:
            raise ValueError(f"train.optimizer={opt} with parallel.expert_degree > 1 is not supported: set "
                             "parallel.expert_degree 1")
        if self.model.lora is not None:
            raise ValueError(f"train.optimizer={opt} and model.lora are alternatives (both shrink the training "
                             "state): choose one")
        if self.memory.offload_optimizer:
            raise ValueError(f"train.optimizer={opt} with memory.offload_optimizer is not supported (ZeRO-Offload "
                             "needs a ZeRO stage): turn offload off")
        if opt == "qgalore" and self.train.galore.master_weights:
            raise ValueError("train.galore.master_weights true with train.optimizer=qgalore: Q-GaLore keeps its "
                             "weights on an INT8 grid (an fp32 master copy would undo it): set it false")

    def _check_expert_parallel(self) -> None:
        ep, m = self.parallel.expert_degree, self.model
        if ep == 1:
            return
        if m.moe is None:
            raise ValueError(f"parallel.expert_degree={ep} splits MoE experts, but the model is dense: set "
                             "parallel.expert_degree 1 or use an MoE model")
        if m.moe.num_experts % ep:
            raise ValueError(f"model.moe.num_experts={m.moe.num_experts} is not divisible by parallel.expert_degree="
                             f"{ep}: choose a degree that divides the experts")
        stage = self.parallel.zero_stage
        if stage == 3:
            raise ValueError("parallel.expert_degree > 1 with ZeRO-3 is not supported: DeepSpeed 0.19.8 refuses "
                             "native MoE parameter groups at stage 3: set parallel.zero_stage 1 or 2")
        if self.train.compile:
            raise ValueError("parallel.expert_degree > 1 with train.compile is not supported (the token "
                             "all-to-all needs its split sizes on the host): set train.compile false")
        zo = self.deepspeed.get("zero_optimization", {})
        for key in ("reduce_scatter", "contiguous_gradients"):
            if isinstance(zo, dict) and zo.get(key) is False:
                raise ValueError(f"deepspeed.zero_optimization.{key}: false is refused by DeepSpeed's MoE "
                                 "gradient path (parallel.expert_degree > 1): remove it")

    # -- world-size-dependent checks ------------------------------------------------------------
    def layout(self, world_size: int) -> Layout:
        """Derive data-parallel degree and batch sizes; raise ``ConfigError`` when inconsistent."""
        p, t = self.parallel, self.train
        if world_size % p.sp_degree:
            raise ConfigError(
                f"world size {world_size} is not divisible by the sequence-parallel degree "
                f"parallel.ulysses_degree x parallel.ring_degree = {p.sp_degree}: launch a multiple "
                f"of {p.sp_degree} processes or lower the degrees"
            )
        dp = world_size // p.sp_degree
        if world_size % p.expert_degree:
            raise ConfigError(f"world size {world_size} is not divisible by parallel.expert_degree={p.expert_degree}: "
                              f"launch a multiple of {p.expert_degree} processes or lower the degree")
        prof = self.logging.profile
        if prof is not None and prof.ranks[-1] >= world_size:
            raise ConfigError(f"logging.profile.ranks: rank {prof.ranks[-1]} does not exist in a world of "
                              f"{world_size} processes: name ranks 0-{world_size - 1}")
        per_micro = t.micro_batch_size * dp
        if t.global_batch_size is not None and t.grad_accum_steps is not None:
            if t.global_batch_size != per_micro * t.grad_accum_steps:
                raise ConfigError(
                    f"train.global_batch_size={t.global_batch_size} != micro_batch_size "
                    f"{t.micro_batch_size} x data-parallel {dp} x grad_accum_steps "
                    f"{t.grad_accum_steps}: set only one of global_batch_size / grad_accum_steps"
                )
        if t.global_batch_size is not None:
            if t.global_batch_size % per_micro:
                raise ConfigError(
                    f"train.global_batch_size={t.global_batch_size} is not a multiple of "
                    f"micro_batch_size {t.micro_batch_size} x data-parallel degree {dp} = "
                    f"{per_micro}: change global_batch_size or micro_batch_size"
                )
            gas = t.global_batch_size // per_micro
        else:
            gas = t.grad_accum_steps or 1
        return Layout(
            world_size=world_size,
            dp=dp,
            sp=p.sp_degree,
            ulysses=p.ulysses_degree,
            ring=p.ring_degree,
            micro_batch_size=t.micro_batch_size,
            grad_accum_steps=gas,
            global_batch_size=per_micro * gas,
        )

    def deepspeed_config(self, layout: Layout, device_type: str = "cpu") -> dict[str, Any]:
        """The DeepSpeed config dict: derived keys, then the ``deepspeed:`` passthrough merged in."""
        t = self.train
        fused = t.fused_optimizer == "on" or (t.fused_optimizer == "auto" and device_type == "cuda")
        ds: dict[str, Any] = {
            "train_micro_batch_size_per_gpu": layout.micro_batch_size,
            "gradient_accumulation_steps": layout.grad_accum_steps,
            # DeepSpeed treats every rank as a data-parallel replica (parameters are replicated over
            # DP and SP; ZeRO partitions over all ranks), and checks micro x accum x world.
            "train_batch_size": layout.micro_batch_size * layout.grad_accum_steps * layout.world_size,
            "gradient_clipping": t.grad_clip,
            "steps_per_print": 10**9,  # seqpar prints its own progress
            "wall_clock_breakdown": False,
            "zero_optimization": {"stage": self.parallel.zero_stage},
            "optimizer": {
                "type": "AdamW",
                "params": {
                    "lr": t.lr,
                    "betas": list(t.betas),
                    "eps": t.eps,
                    "weight_decay": t.weight_decay,
                    # torch's AdamW: avoids JIT-building FusedAdam and is identical on CPU.
                    "torch_adam": True,
                    # its fused kernel (one launch for all tensors; CUDA and CPU), passed through
                    "fused": fused,
                },
            },
        }
        if t.precision == "bf16" and not self.low_precision_weights:
            ds["bf16"] = {"enabled": True}  # else the model is cast to bf16 by seqpar (no fp32 master)
        if t.optimizer in ("galore", "qgalore"):  # seqpar builds the optimizer and hands it to DeepSpeed
            del ds["optimizer"]
        if self.parallel.expert_degree > 1 and self.parallel.zero_stage == 0:
            # DeepSpeed's ZeRO-0 clipping leaves split experts out of the norm (bf16) or averages
            # per-rank norms (fp32): seqpar clips these runs itself (parallel.experts.clip_grad_norm_)
            ds["gradient_clipping"] = 0.0
        if t.optimizer == "qgalore":  # INT8 weights' gradients are not DeepSpeed's: seqpar clips all
            ds["gradient_clipping"] = 0.0
        mem, pin = self.memory, device_type == "cuda"  # pinning needs CUDA (fast async host copies)
        if mem.offload_optimizer:
            ds["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
            # the step runs on the CPU: "auto" means fused where the step runs on CUDA, so off here
            # ("on" stays on: torch's fused AdamW has a CPU kernel). torch_adam keeps torch's AdamW
            # (DeepSpeed would build DeepSpeedCPUAdam, a JIT-compiled op seqpar's checkpoints are
            # not tested with); DeepSpeed 0.19.8 refuses a non-DeepSpeed CPU optimizer only when it
            # is a client optimizer unless zero_force_ds_cpu_optimizer is false: say so explicitly.
            ds["optimizer"]["params"]["fused"] = t.fused_optimizer == "on"
            ds["zero_force_ds_cpu_optimizer"] = False
        if mem.offload_params:
            ds["zero_optimization"]["offload_param"] = {"device": "cpu", "pin_memory": pin}
        return _deep_merge(ds, self.deepspeed)

    def fingerprint(self) -> str:
        """Stable hash of the full config (for checkpoints and run records)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


# ----------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------
def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``["--train.lr", "1e-3", "--model.moe.top_k=2"]`` -> nested dict (values parsed as YAML)."""
    out: dict[str, Any] = {}
    i = 0
    last: tuple[str, str] | None = None  # the previous override's key and value
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            several = (f"; to give --{last[0]} several values write --{last[0]} '[{last[1]}, {arg}]'"
                       if last is not None and not arg.startswith("-") else "")
            raise ConfigError(
                f"unexpected argument '{arg}': overrides look like --section.key value "
                f"(e.g. --train.lr 1e-3){several}"
            )
        if "=" in arg:
            key, raw = arg[2:].split("=", 1)
            i += 1
        else:
            key = arg[2:]
            if i + 1 >= len(args):
                raise ConfigError(f"override --{key} has no value: write --{key} <value>")
            raw = args[i + 1]
            i += 2
        last = (key, raw)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override --{key} conflicts with another override of '{part}'")
        node[parts[-1]] = value
    return out


def _load_yaml(path: Path) -> dict[str, Any]:
    if path.is_dir():
        yamls = sorted(f.name for f in path.glob("*.y*ml"))
        raise ConfigError(f"config file '{path}' is a directory: pass a YAML file"
                          + (f" in it, e.g. --config {path / yamls[0]} ({len(yamls)} there)" if yamls else
                             " (it holds none)"))
    if not path.is_file():
        raise ConfigError(f"config file '{path}' not found: pass an existing --config path")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file '{path}' is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must be a mapping of sections, got {type(data).__name__}")
    return data


def _section_type(ann: Any) -> type[BaseModel] | None:
    """The section class of a field's annotation (``X``, ``X | None``), or None for a plain value."""
    for a in (ann, *get_args(ann)):
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a
    return None


def _section_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The section class that holds the key at ``loc`` (None: not inside a section)."""
    cls: type[BaseModel] | None = Config
    for part in loc[:-1]:
        if cls is None or part not in cls.model_fields:
            return None
        cls = _section_type(cls.model_fields[part].annotation)
    return cls


def _fields_of(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Valid keys at ``loc`` (for 'did you mean' hints)."""
    cls = _section_at(loc) if model is Config else None
    return list(cls.model_fields) if cls is not None else []


def _all_keys(cls: type[BaseModel] | None = None, prefix: str = "") -> dict[str, Any]:
    """Every dotted key of the schema (sections included) -> its FieldInfo."""
    out: dict[str, Any] = {}
    for name, f in (cls or Config).model_fields.items():
        out[prefix + name] = f
        sub = _section_type(f.annotation)
        if sub is not None:
            out.update(_all_keys(sub, f"{prefix}{name}."))
    return out


def _is_list_key(key: str) -> bool:
    sec = _section_at(tuple(key.split(".")))
    f = sec.model_fields.get(key.rsplit(".", 1)[-1]) if sec is not None else None
    return f is not None and any(get_origin(a) is list for a in (f.annotation, *get_args(f.annotation)))


def _accepts(f: Any, value: Any) -> bool:
    """Would ``value`` validate for field ``f`` (its type and range)? Bools only for bool keys."""
    ann = f.annotation
    if isinstance(value, dict):
        return _section_type(ann) is not None or dict in (ann, get_origin(ann))
    if value is None:
        return type(None) in get_args(ann)
    if _section_type(ann) is not None:
        return False
    if isinstance(value, bool) != (bool in (ann, *get_args(ann))):
        return False
    try:
        TypeAdapter(Annotated[(ann, *f.metadata)] if f.metadata else ann).validate_python(value)
    except (ValidationError, TypeError, ValueError):
        return False
    return True


# What users of other trainers (Hugging Face Trainer, torchtitan, Megatron-LM, nanoGPT, DeepSpeed,
# LLaMA-Factory) call our keys. An unknown key is matched here first, by meaning, wherever it was
# put; spelling is only the fallback. normalised name (or section.name) -> (keys, note)
_ALIASES: dict[str, tuple[tuple[str, ...], str]] = {}


def _alias(names: str, *keys: str, note: str = "") -> None:
    for n in names.split():
        _ALIASES[n] = (keys, note)


_alias("steps num_steps total_steps max_train_steps train_steps training_steps num_training_steps max_iters "
       "train_iters iters iterations max_iterations total_iters", "train.max_steps")
_alias("epoch num_epochs num_train_epochs max_epochs train_epochs", "train.epochs",
       note="or train.max_steps: optimizer steps")
_alias("learning_rate lr_max max_lr peak_lr base_lr init_lr", "train.lr")
_alias("min_lr lr_min final_lr min_learning_rate", "train.min_lr_ratio", note="a ratio: final lr = lr x min_lr_ratio")
_alias("warmup warmups lr_warmup lr_warmup_steps warmup_iters lr_warmup_iters num_warmup_steps warmup_step "
       "warmup_steps_count", "train.warmup_steps")
_alias("warmup_ratio lr_warmup_fraction warmup_fraction warmup_proportion", "train.warmup_steps",
       note="a number of steps, not a fraction")
_alias("lr_scheduler lr_scheduler_type lr_decay_style lr_schedule decay_style lr_decay schedule scheduler_type",
       "train.decay")
_alias("batch_size batch bs", "train.micro_batch_size", "train.global_batch_size")
_alias("micro_batch micro_bs mbs per_device_train_batch_size per_device_batch_size local_batch_size "
       "train_micro_batch_size_per_gpu micro_batch_size_per_gpu batch_size_per_device per_gpu_batch_size",
       "train.micro_batch_size")
_alias("global_batch gbs global_bs train_batch_size total_batch_size effective_batch_size", "train.global_batch_size")
_alias("gradient_accumulation_steps gradient_accumulation grad_accum grad_accumulation_steps grad_acc "
       "accumulate_grad_batches accumulation_steps gas", "train.grad_accum_steps")
_alias("max_grad_norm clip_grad gradient_clipping clip_grad_norm grad_norm_clip max_norm clip_norm",
       "train.grad_clip")
_alias("adam_epsilon adam_eps epsilon", "train.eps")
_alias("adam_beta1 adam_beta2 beta1 beta2 adam_betas", "train.betas", note="both betas as one list, e.g. [0.9, 0.95]")
_alias("wd adam_weight_decay", "train.weight_decay")
_alias("bf16 fp16 dtype torch_dtype mixed_precision mixed_precision_param param_dtype", "train.precision")
_alias("gradient_checkpointing activation_checkpoint checkpoint_activations recompute recompute_activations "
       "recompute_granularity", "memory.activation_checkpointing")
_alias("attn_implementation attention_implementation attn_impl use_flash_attention use_flash_attention_2 "
       "use_flash_attn flash_attn flash_attention", "train.attention")
_alias("seq_length max_seq_len max_seq_length sequence_length max_sequence_length context_length context_len "
       "ctx_len block_size max_length model_max_length cutoff_len n_ctx encoder_seq_length", "data.seq_len")
_alias("dataset dataset_path data_path data_paths train_file train_files data_files train_data training_data "
       "dataset_files files", "data.paths")
_alias("mixture_weights data_weights dataset_weights sampling_weights blend_weights data_mix mixture blend "
       "dataset_ratio", "data.weights")
_alias("eval_file eval_files eval_data validation_file validation_files validation_data valid_data val_data "
       "eval_dataset", "data.eval_paths")
_alias("eval_steps eval_interval eval_freq evaluation_steps", "train.eval_every")
_alias("tokenizer_name tokenizer_path tokenizer_name_or_path tokenizer_file", "data.tokenizer")
_alias("model_name_or_path pretrained_model_name_or_path model_path model_name model_dir hf_model hf_checkpoint "
       "hf_assets_path init_from pretrained pretrained_model", "model.hf_path")
_alias("model_type architecture model.type", "model.arch")
_alias("num_layers n_layers n_layer", "model.num_hidden_layers")
_alias("num_heads n_heads n_head", "model.num_attention_heads")
_alias("num_kv_heads n_kv_heads kv_heads num_query_groups", "model.num_key_value_heads")
_alias("dim d_model n_embd hidden_dim embed_dim model_dim", "model.hidden_size")
_alias("ffn_hidden_size ffn_dim mlp_dim intermediate_dim", "model.intermediate_size")
_alias("vocab padded_vocab_size", "model.vocab_size")
_alias("norm_eps layernorm_epsilon rms_norm_epsilon layer_norm_eps", "model.rms_norm_eps")
_alias("rope_base rotary_base rotary_emb_base rope_freq_base", "model.rope_theta")
_alias("num_local_experts n_routed_experts moe_num_experts num_moe_experts", "model.moe.num_experts")
_alias("num_experts_per_tok moe_top_k moe_router_topk router_topk topk experts_per_token", "model.moe.top_k")
_alias("router_aux_loss_coef moe_aux_loss_coeff aux_loss_alpha load_balance_coef", "model.moe.aux_loss_coef")
_alias("moe_intermediate_size expert_intermediate_size moe_ffn_hidden_size", "model.moe.intermediate_size")
_alias("output_dir out_dir log_dir logging_dir dump_folder", "logging.run_dir")
_alias("logging_steps log_interval log_freq log_steps", "logging.log_every")
_alias("save_steps save_interval checkpoint_interval save_every save_freq ckpt_interval", "checkpoint.every_steps")
_alias("save_total_limit keep_latest_k max_checkpoints keep_checkpoints", "checkpoint.keep_last")
_alias("resume_from_checkpoint resume_from load_checkpoint", "checkpoint.resume")
_alias("checkpoint_dir ckpt_dir save_dir save_folder", "checkpoint.dir")
_alias("zero zero_level", "parallel.zero_stage")
_alias("ulysses ulysses_size ulysses_sp_size ulysses_sequence_parallel_size", "parallel.ulysses_degree")
_alias("ring ring_size ring_attn_size context_parallel_degree context_parallel_size cp cp_size",
       "parallel.ring_degree")
_alias("sequence_parallel_size sequence_parallel_degree sp_size sp_degree sp", "parallel.ulysses_degree",
       "parallel.ring_degree")
_alias("dist_backend ddp_backend", "parallel.backend")
# a whole section under another trainer's name (only when the value is a mapping)
_SECTION_ALIASES = {
    **dict.fromkeys(("training", "trainer", "optim", "optimizer", "optimization", "scheduler", "lr_scheduler"), "train"),
    **dict.fromkeys(("dataset", "datasets", "dataloader"), "data"),
    **dict.fromkeys(("log", "logs", "logger", "metrics"), "logging"),
    **dict.fromkeys(("ckpt", "checkpointing", "checkpoints", "saving"), "checkpoint"),
    **dict.fromkeys(("parallelism", "distributed"), "parallel"),
    **dict.fromkeys(("ds", "ds_config", "deepspeed_config"), "deepspeed"),
}


def _norm(name: Any) -> str:
    return str(name).strip().lower().replace("-", "_")


def _likeness(typed: str, key: str) -> float:
    """Spelling similarity, also against the words of ``key`` (``stepz`` ~ ``max_steps``)."""
    whole = difflib.SequenceMatcher(None, typed, key).ratio()
    words = [w for w in key.split("_") if len(w) >= 3 and w != key]
    part = max((difflib.SequenceMatcher(None, typed, w).ratio() for w in words), default=0.0)
    return max(whole, 0.95 * part)


def _suggest(loc: tuple[Any, ...], value: Any) -> tuple[list[str], str]:
    """What the unknown key at ``loc`` (given ``value``) probably meant: (dotted keys, note).

    By meaning first: another trainer's name for a key, then the same name in another section
    (when ``value`` fits there); by spelling only among keys of the same section that accept
    ``value``, so ``steps`` never becomes AdamW's ``eps``."""
    keys = _all_keys()
    name, here = _norm(loc[-1]), ".".join(_norm(p) for p in loc)
    if len(loc) == 1 and isinstance(value, dict) and name in _SECTION_ALIASES:
        return [_SECTION_ALIASES[name]], ""
    for alias in (".".join(_norm(p) for p in loc[-2:]), name):
        if alias in _ALIASES:
            found, note = _ALIASES[alias]
            return list(found), note
    elsewhere = [k for k, f in keys.items() if k.rsplit(".", 1)[-1] == name and k != here and _accepts(f, value)]
    if elsewhere:
        return elsewhere[:3], ""
    section = _section_at(loc)
    # best likeness; among equals (stepz: max_steps, warmup_steps, ...), the closest whole name
    scored = sorted(((_likeness(name, n), difflib.SequenceMatcher(None, name, n).ratio(), n)
                     for n, f in (section.model_fields.items() if section else ()) if _accepts(f, value)),
                    reverse=True)
    if scored and scored[0][0] >= 0.75:
        return ["".join(f"{p}." for p in loc[:-1]) + scored[0][2]], ""
    # a misspelt alias (learnig_rate)
    near = difflib.get_close_matches(name, list(_ALIASES), n=1, cutoff=0.9) if len(name) >= 6 else []
    if near:
        found, note = _ALIASES[near[0]]
        return list(found), note
    return [], ""


def _unknown_key(loc: tuple[Any, ...], value: Any, origins: _Origins) -> str:
    """One clause for an unknown key: the likely key(s), with what they mean, and how to write them."""
    key = ".".join(map(str, loc))
    cli = key in origins.cli_keys
    found, note = _suggest(loc, value)
    if not found:
        section = ".".join(map(str, loc[:-1]))
        return f"valid keys in {section or 'the top level'}: {', '.join(_fields_of(Config, loc))}"
    keys = _all_keys()
    shown = []
    for k in found:
        f = keys[k]
        sub = _section_type(f.annotation)
        what = f.description
        if not what and sub is not None:  # a section: the first line of its docstring
            what = ((sub.__doc__ or "").strip().splitlines() or [""])[0].rstrip(".")
        if cli and sub is not None and isinstance(value, dict) and len(value) == 1:
            # --training.steps 10: complete the suggestion below the section too
            (inner, v), = value.items()
            if inner in sub.model_fields:
                k, what = f"{k}.{inner}", sub.model_fields[inner].description
            else:
                deeper, _ = _suggest((*k.split("."), inner), v)
                if deeper:
                    k, what = deeper[0], keys[deeper[0]].description
        shown.append(f"'{'--' if cli else ''}{k}'" + (f" ({what})" if what else ""))
    return (f"{note}: " if note else "") + "did you mean " + " or ".join(shown) + "?"


def _format_errors(err: ValidationError, source: str | _Origins) -> str:
    origins = source if isinstance(source, _Origins) else _Origins(source=source)
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        key = ".".join(str(p) for p in loc)
        shown = origins.shown(key) if key else "<top level>"
        if e["type"] == "extra_forbidden":
            below = sorted(k for k in origins.cli_keys if k.startswith(f"{key}.") and not any(
                o.startswith(f"{k}.") for o in origins.cli_keys))
            if len(below) == 1:  # --training.steps 10: show what was typed, not just 'training'
                shown = f"--{below[0]}"
            lines.append(f"{shown}: unknown key; {_unknown_key(loc, e.get('input'), origins)}")
            continue
        msg = e["msg"].removeprefix("Value error, ")
        got = e.get("input")
        extra = "" if isinstance(got, dict) or e["type"] == "value_error" else f" (got {got!r})"
        if e["type"] == "list_type" and not isinstance(got, (list, tuple, dict)):
            extra += f"; write a list: [{got}]"
        if e["type"] == "value_error" and (not key or msg.startswith((f"{key}.", f"{key} "))):
            # the message names its keys itself; say which of them the command line set. Several
            # problems of one check come as lines: one item each
            for part in msg.split("\n"):
                named = set(re.findall(r"\b([a-z_]+(?:\.[a-z_0-9]+)+)", part))
                flags = sorted(k for k in origins.cli_keys if any(k == n or k.startswith(f"{n}.") for n in named)
                               and not any(o.startswith(f"{k}.") for o in origins.cli_keys))
                by = " (set by " + ", ".join(f"--{k}" for k in flags) + " on the command line)" if flags else ""
                lines.append(f"{part}{extra}{by}")
        else:
            lines.append(f"{shown}: {msg}{extra}")
    head = f"invalid configuration ({origins.source})"
    if len(lines) == 1:  # one problem, one line (a command-line key needs no file name)
        return f"{'invalid configuration' if lines[0].startswith('--') else head}: {lines[0]}"
    return "\n".join([f"{head}:", *(f"  - {line}" for line in lines),
                      "Fix these keys in the YAML file or the matching --section.key override."])


def _dotted(tree: Any, prefix: str = "") -> set[str]:
    """Every dotted key in a nested dict, sections included."""
    out: set[str] = set()
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.add(f"{prefix}{k}")
            out |= _dotted(v, f"{prefix}{k}.")
    return out


def _lists_from_scalars(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``--data.paths a.jsonl`` = ``--data.paths '[a.jsonl]'``: a bare value for a list-typed key."""
    for k, v in tree.items():
        if isinstance(v, dict):
            _lists_from_scalars(v, f"{prefix}{k}.")
        elif isinstance(v, (str, int, float)) and _is_list_key(f"{prefix}{k}"):
            tree[k] = [v]
    return tree


def _resolve_inputs(tree: dict[str, Any], base: Path, in_file: bool) -> dict[str, list[_Written]]:
    """Resolve the relative input paths of one layer (a config file: against ``base``, rewritten in
    ``tree``; the command line: left as typed, relative to the current directory) and record how."""
    found: dict[str, list[_Written]] = {}
    for key in INPUT_PATH_KEYS:
        section, name = key.split(".")
        node = tree.get(section)
        if not isinstance(node, dict) or not isinstance(node.get(name), list if _is_list_key(key) else str):
            continue  # (a wrong type is left as written for validation to report)
        value = node[name]
        items = []
        for text in value if isinstance(value, list) else [value]:
            if not isinstance(text, str):
                items = []
                break
            p = Path(text).expanduser()
            if p.is_absolute():
                items.append((str(p), _Written(text)))
            else:
                items.append((str(base / p) if in_file else str(p), _Written(text, base, in_file)))
        if not items:
            continue
        node[name] = [t for t, _ in items] if isinstance(value, list) else items[0][0]
        found[key] = [w for _, w in items]
    return found


def _fit_warmup(file_data: dict[str, Any], overrides: dict[str, Any], merged: dict[str, Any],
                origins: _Origins) -> None:
    """A shorter run than the file plans (``--train.max_steps 10``) keeps working: a warmup that
    comes from a lower layer than max_steps (seqpar's default < the config file < the command line)
    is lowered to max_steps, with a notice. Both set in the same place is an error (validation)."""
    train = merged.get("train")
    if not isinstance(train, dict):
        return
    def layer(key: str) -> int:  # 2: the command line, 1: the config file, 0: seqpar's default
        for rank, tree in ((2, overrides), (1, file_data)):
            sec = tree.get("train")
            if isinstance(sec, dict) and sec.get(key) is not None:
                return rank
        return 0

    le, lm = layer("epochs"), layer("max_steps")
    if le and lm:  # the higher layer wins (--train.epochs over a file's max_steps); one layer: ambiguous
        if le == lm:
            where = "the command line" if le == 2 else origins.source
            raise ConfigError(f"invalid configuration ({origins.source}): both train.epochs and train.max_steps are "
                              f"set in {where}: train.epochs sets max_steps from the data's size; remove one of them")
        loser, winner = ("max_steps", "epochs") if le > lm else ("epochs", "max_steps")
        origins.notices.append(f"--train.{winner} replaces train.{loser}={train[loser]!r} of {origins.source}")
        del train[loser]
    if train.get("epochs") is not None:
        return  # max_steps (and a warmup longer than it) is settled at start-up, from the data
    fields = TrainConfig.model_fields
    warm = train.get("warmup_steps", fields["warmup_steps"].default)
    steps = train.get("max_steps", fields["max_steps"].default)
    if not (type(warm) is int and type(steps) is int and 1 <= steps < warm):
        return

    def layer(key: str) -> int:
        sec = overrides.get("train")
        if isinstance(sec, dict) and key in sec:
            return 2
        sec = file_data.get("train")
        return 1 if isinstance(sec, dict) and key in sec else 0

    lw, ls = layer("warmup_steps"), layer("max_steps")
    if lw >= ls:
        return
    train["warmup_steps"] = steps
    came = "seqpar's default" if lw == 0 else origins.source
    set_by = f"--train.max_steps {steps}" if ls == 2 else f"train.max_steps={steps} in {origins.source}"
    origins.notices.append(
        f"train.warmup_steps={warm} (from {came}) is more than {set_by}: warming up over all {steps} steps "
        f"instead; set --train.warmup_steps to choose"
    )


# keys that moved to another section: (old, new), read in their new place with a notice
_MOVED_KEYS = (("train.activation_checkpointing", "memory.activation_checkpointing"),)


def _move_keys(merged: dict[str, Any], origins: _Origins) -> None:
    for old, new in _MOVED_KEYS:
        (os_, ok), (ns, nk) = old.split("."), new.split(".")
        sec = merged.get(os_)
        if not isinstance(sec, dict) or ok not in sec:
            continue
        value = sec.pop(ok)
        dest = merged.setdefault(ns, {})
        if not isinstance(dest, dict):
            continue  # the section's own error reports it
        if nk in dest:
            raise ConfigError(f"invalid configuration ({origins.source}): both {old} and {new} are set: "
                              f"{old} moved to {new}; remove {old}")
        dest[nk] = value
        origins.notices.append(f"{old} is now {new}: read as {new}={value!r} (the {ns} section also has "
                               f"the other memory settings); update the config to silence this note")


def _check_hf_weights(cfg: Config, origins: _Origins) -> None:
    """With model.load_weights, the safetensors weights must be there now, not at model build."""
    m = cfg.model
    if m.hf_path is None or not m.load_weights:
        return
    from seqpar.hf_files import checkpoint_files

    try:
        checkpoint_files(m.hf_path)
    except (OSError, ValueError) as e:
        w = _written(origins, "model.hf_path", 0, m.hf_path)
        raise ConfigError(
            f"invalid configuration ({origins.source}): model.hf_path '{w.text}'{w.how}: {e}; or set "
            f"model.load_weights false to start from random weights"
        ) from None


def _check_positions(cfg: Config, origins: _Origins) -> None:
    """A sequence longer than the context the model declares is context extension: a note on what
    usually goes with it (training on, and exporting, positions the config does not claim)."""
    m, n = cfg.model, cfg.data.seq_len
    given = origins.file_keys | origins.cli_keys
    if (m.rope_scaling is not None and m.rope_scaling.rope_type in ("llama3", "yarn") and "model.rope_scaling" in given
            and "model.rope_scaling.original_max_position_embeddings" not in given):
        origins.notices.append(
            f"model.rope_scaling ({m.rope_scaling.rope_type}) without original_max_position_embeddings: seqpar uses "
            f"{m.rope_scaling.original_max_position_embeddings} (transformers would read max_position_embeddings); "
            f"set it to the context the model was trained at, e.g. --model.rope_scaling "
            f"'{{rope_type: {m.rope_scaling.rope_type}, factor: {m.rope_scaling.factor:g}, "
            f"original_max_position_embeddings: 32768}}'")
    if n <= m.max_position_embeddings:
        return
    scaled = m.rope_scaling is not None
    origins.notices.append(
        f"data.seq_len={n} is longer than model.max_position_embeddings={m.max_position_embeddings} (the context "
        f"the model declares): for context extension " + ("" if scaled else "raise model.rope_theta or set "
        "model.rope_scaling (e.g. YaRN), and ") + f"set model.max_position_embeddings to at least {n}, which an "
        f"exported config.json then declares (setting it alone silences this note)")


def _announce(notices: list[str]) -> None:
    if os.environ.get("RANK", "0") == "0":  # one copy per job, not per rank
        for n in notices:
            print(f"seqpar: note: {n}", file=sys.stderr, flush=True)


def load_config(path: str | Path | None, overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """Read YAML (``None`` = embedded default), apply overrides, validate. Raises ``ConfigError``.

    Relative input paths in the file (``INPUT_PATH_KEYS``) are resolved against its directory;
    what was adjusted on the way is in ``Config.notices`` (and printed to stderr)."""
    embedded = path is None
    if path is None:
        path = default_config_path()
    path = Path(path)
    data = _load_yaml(path)
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    overrides = _lists_from_scalars(copy.deepcopy(overrides or {}))
    origins = _Origins(source=f"the embedded default config {path.name}" if embedded else str(path))
    hf = overrides.get("model", {}).get("hf_path") if isinstance(overrides.get("model"), dict) else None
    if embedded and hf is not None and isinstance(data.get("model"), dict):
        # The default's model section describes its tiny test model; with a model given on the
        # command line it would only clash with (or silently override) the model's config.json.
        del data["model"]
        origins.notices.append(
            f"--model.hf_path without --config: the architecture comes from {hf}/config.json; the embedded "
            f"default's model section (its tiny test model) is not used"
        )
    base = path.absolute().parent
    tidy = Path(os.path.normpath(base))  # configs/../x -> x, unless a symlink makes them differ
    base = tidy if tidy.is_dir() and os.path.samefile(tidy, base) else base
    origins.paths = {**_resolve_inputs(data, base, in_file=True),
                     **_resolve_inputs(overrides, Path.cwd(), in_file=False)}
    origins.file_keys, origins.cli_keys = _dotted(data), _dotted(overrides)
    merged = _deep_merge(data, overrides)
    _fit_warmup(data, overrides, merged, origins)
    _move_keys(merged, origins)
    cfg = validate_config(merged, _origins=origins)
    _check_hf_weights(cfg, origins)
    _check_positions(cfg, origins)
    cfg._notices = list(origins.notices)
    _announce(cfg.notices)
    return cfg


def validate_config(data: dict[str, Any], source: str = "<dict>", *, _origins: _Origins | None = None) -> Config:
    origins = _origins or _Origins(source=source)
    try:
        return Config.model_validate(data, context={"seqpar": origins})
    except ValidationError as e:
        raise ConfigError(_format_errors(e, origins)) from None


def default_config_path() -> Path:
    """The embedded CPU default, ``configs/tiny-cpu.yaml`` of the source tree."""
    path = Path(__file__).resolve().parent.parent / "configs" / f"{DEFAULT_CONFIG_NAME}.yaml"
    if not path.is_file():
        raise ConfigError(f"default config {path} not found: pass --config <file.yaml>")
    return path


def flops_per_token(m: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (fwd+bwd) of one document filling ``seq_len`` tokens.

    6 * N_active (every matmul weight a token passes through, lm_head included, embedding lookup
    excluded) + 6 * L * H * d * S (causal attention scores and values: 12 * L * H * d * S halved).
    The trainer's MFU counts attention per packed document instead: ``seqpar.flops.step_flops``.
    """
    # imported here: seqpar.flops imports this module
    from seqpar.flops import matmul_flops_per_token

    return matmul_flops_per_token(m) + 6.0 * m.num_hidden_layers * m.num_attention_heads * m.dim_per_head * seq_len


def _is_moe_layer(m: ModelConfig, i: int) -> bool:
    e = m.moe
    return e is not None and i not in e.mlp_only_layers and (i + 1) % e.sparse_step == 0


is_moe_layer = _is_moe_layer
__all__ = [
    "Config",
    "ConfigError",
    "Layout",
    "load_config",
    "validate_config",
    "parse_overrides",
    "flops_per_token",
    "is_moe_layer",
]
