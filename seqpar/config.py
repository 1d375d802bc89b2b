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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from seqpar.errors import UserError

# Default config: tiny model on the built-in passkey task; runs on a laptop CPU in minutes.
DEFAULT_CONFIG_NAME = "tiny-cpu"


class ConfigError(UserError, ValueError):
    """A configuration problem, with the key(s) involved and how to fix it."""


class _Section(BaseModel):
    # extra="forbid": a misspelt key is an error, never silently ignored.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


# ----------------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------------
ARCHS = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe")
MOE_ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe")


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
    """Mixture-of-experts feed-forward (dropless, top-k)."""

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


# Training choices that may differ from a loaded checkpoint's config.json (context extension,
# balancing); everything else defines weight shapes or the function computed and must match.
HF_OVERRIDABLE = {"rope_theta", "rope_scaling", "max_position_embeddings", "initializer_range"}
HF_OVERRIDABLE_MOE = {"aux_loss_coef", "bias_update_rate"}


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

    @model_validator(mode="before")
    @classmethod
    def _from_hf(cls, data: Any) -> Any:
        """With ``hf_path``, the architecture comes from its config.json; explicit keys that
        disagree with it are an error (a silent mix would load weights into the wrong shapes)."""
        if not isinstance(data, dict) or data.get("hf_path") is None:
            return data
        path = Path(data["hf_path"])
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise ValueError(f"model.hf_path: '{cfg_file}' not found (want a HF model directory)")
        from seqpar.models.hf import hf_config_to_fields

        try:
            fields = hf_config_to_fields(json.loads(cfg_file.read_text()))
        except (ValueError, KeyError, json.JSONDecodeError) as e:
            raise ValueError(f"model.hf_path: cannot use {cfg_file}: {e}") from None
        merged = {**data, **fields}
        clashes = []
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
                        clashes.append(f"model.moe.{mk}={mv!r} (config.json: {moe.get(mk)!r})")
                merged["moe"] = moe
            else:
                clashes.append(f"model.{k}={data[k]!r} (config.json: {v!r})")
        if clashes:
            raise ValueError(
                "these keys disagree with model.hf_path's config.json: "
                + ", ".join(clashes)
                + "; remove them from the YAML (the checkpoint defines the architecture; only "
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
        from seqpar.models.hf import fields_to_hf_config

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


DEFAULT_CHAT_TEMPLATE = "<|{role}|>\n{content}\n"


class DataConfig(_Section):
    """Where tokens come from and how they are packed into fixed-length sequences."""

    type: Literal["passkey", "text", "tokens", "sft"] = Field(
        "passkey", description="passkey: built-in synthetic; text: jsonl; tokens: .npy/.bin; sft: pairs"
    )
    seq_len: int = Field(1024, ge=8, description="tokens per packed sequence")
    seed: int = Field(1234, ge=0, description="data order and synthetic samples")
    shuffle: bool = Field(True, description="new permutation of the sequences every epoch")
    paths: list[Path] = Field(default_factory=list, description="input files (text/tokens/sft)")
    tokenizer: Path | None = Field(None, description="tokenizer.json (text/sft); None = bytes")
    text_field: str = Field("text", description="text: jsonl field holding the document")
    token_dtype: Literal["uint16", "uint32"] = Field("uint16", description="dtype of raw .bin files")
    eos_id: int | None = Field(None, ge=0, description="tokens: document separator id")
    prompt_field: str = Field("prompt", description="sft: prompt field (no loss)")
    response_field: str = Field("response", description="sft: response field (loss)")
    messages_field: str = Field("messages", description="sft: chat list of {role, content}; loss on assistant")
    chat_template: str = Field(
        DEFAULT_CHAT_TEMPLATE, description="per-message format with {role} and {content}"
    )
    cache_dir: Path | None = Field(None, description="tokenized-text cache; None = <run_dir>/cache")
    passkey: PasskeyConfig = Field(default_factory=PasskeyConfig)
    num_samples: int = Field(
        100_000, ge=1, description="passkey: size of one epoch of generated samples"
    )

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        if self.type in ("text", "tokens", "sft") and not self.paths:
            raise ValueError(f"data.type '{self.type}' reads files: set data.paths to a list of files")
        for p in self.paths:
            if not p.exists():
                raise ValueError(f"data.paths: file '{p}' does not exist")
        if self.tokenizer is not None and not self.tokenizer.is_file():
            raise ValueError(f"data.tokenizer: '{self.tokenizer}' is not a file (want tokenizer.json)")
        if "{role}" not in self.chat_template or "{content}" not in self.chat_template:
            raise ValueError("data.chat_template must contain '{role}' and '{content}'")
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

    @property
    def sp_degree(self) -> int:
        return self.ulysses_degree * self.ring_degree


class TrainConfig(_Section):
    """Optimisation and the micro-batch loop."""

    max_steps: int = Field(100, ge=1, description="optimizer steps")
    micro_batch_size: int = Field(1, ge=1, description="sequences per rank per micro-step")
    global_batch_size: int | None = Field(
        None, ge=1, description="sequences per optimizer step (sets grad_accum_steps)"
    )
    grad_accum_steps: int | None = Field(None, ge=1, description="alternative to global_batch_size")
    lr: float = Field(3e-4, gt=0, description="peak learning rate (AdamW)")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final lr = lr * min_lr_ratio")
    warmup_steps: int = Field(10, ge=0, description="linear warmup to lr over this many steps")
    decay: Literal["cosine", "linear", "constant"] = Field("cosine", description="after warmup, to lr*min_lr_ratio")
    weight_decay: float = Field(0.1, ge=0, description="AdamW decay on matrices (not on norms/biases)")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon")
    grad_clip: float = Field(1.0, ge=0, description="0 = off")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16 = bf16 weights/compute, fp32 master")
    activation_checkpointing: bool = Field(False, description="recompute each layer in the backward")
    loss_chunk_size: int = Field(4096, ge=1, description="tokens per logits chunk in the loss")
    attention: Literal["auto", "torch", "sdpa", "flash_attn"] = Field(
        "auto", description="auto: flash_attn if installed on CUDA, else sdpa; torch = exact math"
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

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.warmup_steps > self.max_steps:
            raise ValueError(
                f"warmup_steps={self.warmup_steps} > max_steps={self.max_steps}: lower warmup"
            )
        return self


class CheckpointConfig(_Section):
    """When micro-batch checkpoints are written, where, and how a run resumes
    (docs/checkpoint-format.md)."""

    dir: Path | None = Field(None, description="None = <run_dir>/checkpoints")
    every_micro_batches: int = Field(0, ge=0, description="save after every N micro-batches (0 = off)")
    every_steps: int = Field(0, ge=0, description="save after every N optimizer steps (0 = off)")
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


class LoggingConfig(_Section):
    """Where metrics go and how progress is shown (rank 0 only)."""

    run_dir: Path = Field(Path("runs/default"), description="metrics.jsonl, tensorboard, cache")
    log_every: int = Field(1, ge=1, description="optimizer steps between metric records")
    progress_bar: bool = Field(True, description="tqdm bar on rank 0 (else plain lines)")
    tensorboard: Literal["auto", "on", "off"] = Field("auto", description="auto: when installed")

    @field_validator("tensorboard", mode="before")
    @classmethod
    def _on_off(cls, v: Any) -> Any:
        # YAML 1.1 reads a bare on/off as a boolean
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v
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
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    deepspeed: dict[str, Any] = Field(
        default_factory=dict, description="passed through to DeepSpeed, merged over derived keys"
    )

    @model_validator(mode="after")
    def _cross(self) -> "Config":
        for key, ours in _DERIVED_DS_KEYS.items():
            if key in self.deepspeed:
                raise ValueError(f"deepspeed.{key} is derived by seqpar: set {ours} instead")
        zo = self.deepspeed.get("zero_optimization", {})
        if not isinstance(zo, dict):
            raise ValueError("deepspeed.zero_optimization must be a mapping of ZeRO options (a plain value "
                             "would replace the stage seqpar derives): set parallel.zero_stage")
        if "stage" in zo:
            raise ValueError("deepspeed.zero_optimization.stage is derived: set parallel.zero_stage")
        # Micro-batch checkpoints read partial gradients where DeepSpeed keeps them on the device
        # (engine/deepspeed_state.py); these settings keep them elsewhere, so a save would lose them.
        # (The engine is checked again after start-up: deepspeed_state.unsupported_settings.)
        for key in ("offload_optimizer", "offload_param", "cpu_offload", "cpu_offload_param"):
            off = zo.get(key)
            if off and (off.get("device", "none") if isinstance(off, dict) else off) != "none":
                raise ValueError(f"deepspeed.zero_optimization.{key} is not supported: micro-batch checkpoints "
                                 "cannot capture partial gradients held in offload buffers; remove it")
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
        if self.model.hf_path is None and self.data.type == "passkey":
            from seqpar.data.tokenizer import ByteTokenizer

            need = ByteTokenizer().vocab_size
            if self.model.vocab_size < need:
                raise ValueError(
                    f"model.vocab_size={self.model.vocab_size} < {need} needed by the passkey "
                    f"task's byte vocabulary: raise model.vocab_size"
                )
        return self

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

    def deepspeed_config(self, layout: Layout) -> dict[str, Any]:
        """The DeepSpeed config dict: derived keys, then the ``deepspeed:`` passthrough merged in."""
        t = self.train
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
                },
            },
        }
        if t.precision == "bf16":
            ds["bf16"] = {"enabled": True}
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
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(
                f"unexpected argument '{arg}': overrides look like --section.key value "
                f"(e.g. --train.lr 1e-3)"
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


def _fields_of(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Valid keys at ``loc`` (for 'did you mean' hints)."""
    cls: Any = model
    for part in loc[:-1]:
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)) or part not in cls.model_fields:
            return []
        ann = cls.model_fields[part].annotation
        args = [a for a in getattr(ann, "__args__", ()) if isinstance(a, type)]
        cls = ann if isinstance(ann, type) else next((a for a in args if issubclass(a, BaseModel)), None)
    if isinstance(cls, type) and issubclass(cls, BaseModel):
        return list(cls.model_fields)
    return []


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        key = ".".join(str(p) for p in loc) or "<top level>"
        if e["type"] == "extra_forbidden":
            valid = _fields_of(Config, loc)
            hint = difflib.get_close_matches(str(loc[-1]), valid, n=1)
            fix = f"did you mean '{'.'.join(map(str, loc[:-1] + (hint[0],)))}'?" if hint else ""
            lines.append(f"  - {key}: unknown key. {fix} Valid keys here: {', '.join(valid)}")
            continue
        msg = e["msg"].removeprefix("Value error, ")
        got = e.get("input")
        shown = "" if isinstance(got, dict) or e["type"] == "value_error" else f" (got {got!r})"
        lines.append(f"  - {key}: {msg}{shown}")
    lines.append("Fix these keys in the YAML file or the matching --section.key override.")
    return "\n".join(lines)


def load_config(path: str | Path | None, overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """Read YAML (``None`` = embedded default), apply overrides, validate. Raises ``ConfigError``."""
    if path is None:
        path = default_config_path()
    path = Path(path)
    data = _load_yaml(path)
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    if overrides:
        data = _deep_merge(data, overrides)
    return validate_config(data, source=str(path))


def validate_config(data: dict[str, Any], source: str = "<dict>") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None


def default_config_path() -> Path:
    """The embedded CPU default, ``configs/tiny-cpu.yaml`` of the source tree."""
    path = Path(__file__).resolve().parent.parent / "configs" / f"{DEFAULT_CONFIG_NAME}.yaml"
    if not path.is_file():
        raise ConfigError(f"default config {path} not found: pass --config <file.yaml>")
    return path


def flops_per_token(m: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (fwd+bwd) used for MFU; formula documented in docs/configuration.md.

    6 * N_active (every matmul weight a token passes through, lm_head included, embedding lookup
    excluded) + 6 * L * H * d * S (causal attention scores and values: 12 * L * H * d * S halved).
    """
    h, d, L = m.hidden_size, m.dim_per_head, m.num_hidden_layers
    attn = h * d * (m.num_attention_heads + 2 * m.kv_heads) + m.num_attention_heads * d * h
    dense_mlp = 3 * h * m.intermediate_size
    n = 0
    for i in range(L):
        n += attn
        if m.moe is not None and _is_moe_layer(m, i):
            e = m.moe
            n += e.top_k * 3 * h * e.intermediate_size + h * e.num_experts
            n += 3 * h * e.shared_expert_intermediate_size + (h if e.shared_expert_gate else 0)
        else:
            n += dense_mlp
    n += h * m.vocab_size  # lm_head
    return 6.0 * n + 6.0 * L * m.num_attention_heads * d * seq_len


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
