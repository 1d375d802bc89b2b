"""LoRA: low-rank adapters on a frozen base model (``model.lora``), PEFT-compatible.

A targeted projection ``W`` [out, in] computes ``W x + (alpha / r) B A dropout(x)`` with A [r, in]
(Kaiming-uniform, as PEFT) and B [out, r] (zeros: training starts from the base model exactly).
The adapted module keeps its base parameter under its own name (``...q_proj.weight``), so Hugging
Face import/export of the base is unchanged; the adapters are ``...q_proj.lora_A`` / ``lora_B``.
Routed experts (stacked [E, out, in]) get per-expert adapters A [E, r, in], B [E, out, r], folded
into the weight each forward (``W + s B @ A``: exact, no dropout there).

Everything except the adapters and ``lora.trainable`` modules has ``requires_grad=False``: no
gradient, no optimizer state. ``merged_state_dict`` folds the adapters into the base weights (an
ordinary full checkpoint for ``save_hf_checkpoint``); ``save_peft_adapter`` writes the adapter alone
in PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``), which
``peft.PeftModel.from_pretrained`` loads onto the Hugging Face base model.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqpar.config import LoRAConfig

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class LoRALinear(nn.Linear):
    """``nn.Linear`` with a frozen ``weight`` (and bias) plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float, generator: torch.Generator):
        # nn.Linear's own __init__ would allocate and randomly initialise a weight only to discard
        # it (and draw from the global RNG): take the base's tensors instead
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = nn.Parameter(base.weight.detach(), requires_grad=False)
        self.bias = nn.Parameter(base.bias.detach(), requires_grad=False) if base.bias is not None else None
        self.rank, self.scaling = rank, alpha / rank
        self.lora_A = nn.Parameter(_kaiming_uniform((rank, self.in_features), generator).to(self.weight))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, dtype=self.weight.dtype,
                                               device=self.weight.device))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = F.linear(x, self.weight, self.bias)
        return out + F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scaling

    def merged_weight(self) -> Tensor:
        return self.weight + (self.lora_B @ self.lora_A) * self.scaling


class _Linear4bit(torch.autograd.Function):
    """``x @ W.t()`` with W dequantized from 4 bits in the forward and again in the backward:
    autograd would otherwise keep every layer's dequantized weight until the backward (the base
    is frozen: no weight gradient)."""

    @staticmethod
    def forward(ctx, x: Tensor, layer: "QLoRALinear") -> Tensor:  # type: ignore[override]
        ctx.layer = layer
        return F.linear(x, layer.base_weight(x.dtype))

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return grad @ ctx.layer.base_weight(grad.dtype), None


class QLoRALinear(nn.Module):
    """QLoRA: the frozen base weight stored as 4-bit NF4 (bitsandbytes, blocks of 64 with their
    absmax), dequantized for each matmul; the adapters as in ``LoRALinear``. The packed weight is a
    non-persistent buffer (no optimizer state, nothing for DeepSpeed to cast, not in state dicts:
    checkpoints hold adapters only, exports dequantize it)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float, generator: torch.Generator):
        import bitsandbytes.functional as bnbf

        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        w = base.weight.detach()
        packed, self.quant_state = bnbf.quantize_4bit(w, quant_type="nf4", blocksize=64)
        self.register_buffer("qweight", packed, persistent=False)
        self.bias = nn.Parameter(base.bias.detach().clone(), requires_grad=False) if base.bias is not None else None
        self.rank, self.scaling = rank, alpha / rank
        self.lora_A = nn.Parameter(_kaiming_uniform((rank, self.in_features), generator).to(w))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, dtype=w.dtype, device=w.device))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def base_weight(self, dtype: torch.dtype) -> Tensor:
        import bitsandbytes.functional as bnbf

        if self.quant_state.absmax.device != self.qweight.device:  # the buffer moved with the module
            self.quant_state.to(self.qweight.device)
        self.quant_state.dtype = dtype  # dequantize straight to the compute dtype (no fp32 temporary)
        return bnbf.dequantize_4bit(self.qweight, self.quant_state)

    def forward(self, x: Tensor) -> Tensor:
        out = _Linear4bit.apply(x, self)
        if self.bias is not None:
            out = out + self.bias
        return out + F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scaling

    def merged_weight(self) -> Tensor:
        w = self.base_weight(self.lora_A.dtype)
        return w + (self.lora_B @ self.lora_A) * self.scaling


def quantization_problem() -> str | None:
    """Why 4-bit bases cannot be used here, or None (bitsandbytes must import and quantize)."""
    try:
        import bitsandbytes.functional as bnbf

        bnbf.quantize_4bit(torch.ones(64, 64), quant_type="nf4", blocksize=64)
    except Exception as e:  # ImportError, or a build without this device's backend
        return (f"model.lora.quantize_base=nf4 needs bitsandbytes with a 4-bit backend for this machine "
                f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else 'not installed'}): "
                "pip install 'seqpar[qlora]', or remove quantize_base")
    return None


class LoRAExperts(nn.Module):
    """Per-expert adapters for a stacked ``Experts`` module: its forward adds ``s (x A^T) B^T`` to
    each projection (the same function as ``W + s B @ A``, without building that sum)."""

    def __init__(self, experts: nn.Module, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.rank, self.scaling = rank, alpha / rank
        for name in ("gate_proj", "up_proj", "down_proj"):
            w = getattr(experts, name)
            w.requires_grad_(False)
            e, out, inp = w.shape
            a = torch.stack([_kaiming_uniform((rank, inp), generator) for _ in range(e)]).to(w)
            self.register_parameter(f"{name}_lora_A", nn.Parameter(a))
            self.register_parameter(f"{name}_lora_B", nn.Parameter(torch.zeros(e, out, rank, dtype=w.dtype,
                                                                                device=w.device)))

    def delta(self, name: str) -> Tensor:
        """The full-size update s B @ A of one projection's experts (for merged exports)."""
        return torch.bmm(getattr(self, f"{name}_lora_B"), getattr(self, f"{name}_lora_A")) * self.scaling

    def factors(self) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor], tuple[Tensor, Tensor], float]:
        """((A, B) of gate, up, down, scaling): what the experts' forward applies beside W."""
        ab = [(getattr(self, f"{n}_lora_A"), getattr(self, f"{n}_lora_B")) for n in ("gate_proj", "up_proj", "down_proj")]
        return ab[0], ab[1], ab[2], self.scaling


def _kaiming_uniform(shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    # PEFT's default A init: kaiming_uniform_(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    bound = 1.0 / math.sqrt(shape[-1])
    return (torch.rand(shape, generator=generator) * 2 - 1) * bound


def apply_lora(model: nn.Module, cfg: LoRAConfig, seed: int = 0) -> None:
    """Wrap the targeted projections of every layer, then freeze all but adapters and
    ``cfg.trainable``. Deterministic from ``seed`` (same adapters on every rank)."""
    from seqpar.models.moe import Experts

    g = torch.Generator().manual_seed(seed + 0x10A)
    targets = set(cfg.targets)
    if cfg.quantize_base is not None and (problem := quantization_problem()):
        raise ValueError(problem)
    wrap = QLoRALinear if cfg.quantize_base == "nf4" else LoRALinear
    for module_name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and type(child) is nn.Linear:
                setattr(module, child_name, wrap(child, cfg.rank, cfg.alpha, cfg.dropout, g))
            elif cfg.experts and isinstance(child, Experts):
                child.lora = LoRAExperts(child, cfg.rank, cfg.alpha, g)
    for name, p in model.named_parameters():
        p.requires_grad_(is_adapter(name) or _trainable(name, cfg))
    model.lora_config = cfg


def is_adapter(name: str) -> bool:
    return ".lora_A" in name or ".lora_B" in name or "_lora_A" in name or "_lora_B" in name


def _trainable(name: str, cfg: LoRAConfig) -> bool:
    if "norms" in cfg.trainable and ("layernorm" in name or name.endswith("norm.weight") or "_norm." in name):
        return True
    if "embed_tokens" in cfg.trainable and name.startswith("model.embed_tokens."):
        return True
    return "lm_head" in cfg.trainable and name.startswith("lm_head.")


def merged_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's state dict with every adapter folded into its base weight, adapter keys gone:
    what ``save_hf_checkpoint`` exports (a full model equal to the adapted one)."""
    sd = {k: v for k, v in model.state_dict().items() if not is_adapter(k)}
    for name, m in model.named_modules():
        if isinstance(m, (LoRALinear, QLoRALinear)):
            sd[f"{name}.weight"] = m.merged_weight().detach()
        elif isinstance(m, LoRAExperts):
            experts = name.rsplit(".", 1)[0]
            for proj in ("gate_proj", "up_proj", "down_proj"):
                sd[f"{experts}.{proj}"] = (sd[f"{experts}.{proj}"] + m.delta(proj)).detach()
    return sd


def save_peft_adapter(model: nn.Module, out_dir: str | Path, base_model: str | None = None) -> Path:
    """The adapter alone in PEFT's LoRA format. Refused (one line, with the reason) for what PEFT
    cannot load onto the Hugging Face model: routed-expert adapters (HF stores experts as one fused
    parameter in transformers 5) and fully trained modules (use the merged export instead)."""
    from safetensors.torch import save_file

    cfg: LoRAConfig | None = getattr(model, "lora_config", None)
    if cfg is None:
        raise ValueError("the model has no LoRA adapters (model.lora is not set)")
    if cfg.experts:
        raise ValueError("model.lora.experts: PEFT cannot load adapters of the routed experts onto the Hugging "
                         "Face model (stacked expert parameters); export the merged model instead")
    if cfg.trainable:
        raise ValueError(f"model.lora.trainable={cfg.trainable}: modules trained in full are not part of a PEFT "
                         "LoRA adapter here; export the merged model instead")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"adapter directory '{out_dir}' exists and is not empty: choose a new path")
    tensors = {}
    for name, m in model.named_modules():
        if isinstance(m, (LoRALinear, QLoRALinear)):
            tensors[f"base_model.model.{name}.lora_A.weight"] = m.lora_A.detach().contiguous()
            tensors[f"base_model.model.{name}.lora_B.weight"] = m.lora_B.detach().contiguous()
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.rank, "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout, "target_modules": sorted(cfg.targets), "bias": "none",
        "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "base_model_name_or_path": base_model, "use_rslora": False, "use_dora": False,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(tensors, str(out_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        with open(out_dir / f, "rb") as fh:
            os.fsync(fh.fileno())
    return out_dir


# -- checkpoints: the trainable tensors and the identity of the frozen base ------------------------
ADAPTER_DIR = "adapter"
ADAPTER_FILE = "trainable.safetensors"
BASE_FILE = "base.json"


def trainable_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """What an adapter checkpoint holds of the model: every parameter that trains (adapters and
    ``lora.trainable`` modules), under the model's own names."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state_dict(model: nn.Module, tensors: dict[str, Tensor], where: str) -> None:
    """Strict: exactly the trainable parameters, with their shapes (``where`` names the file)."""
    want = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
    wrong = [n for n in want if n in tensors and tuple(tensors[n].shape) != tuple(want[n].shape)]
    if missing or unexpected or wrong:
        raise ValueError(f"{where} does not fit this model's adapters: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}, shape mismatch {wrong[:5]} (was model.lora changed?)")
    with torch.no_grad():
        for n, p in want.items():
            p.copy_(tensors[n])


def base_identity(cfg, seed: int) -> dict:
    """What the frozen base is: the Hub directory and a sha256 over its weight files' contents, or
    the random init (config fingerprint of the architecture and seed). A resume refuses another."""
    import hashlib

    if cfg.hf_path is not None and cfg.load_weights:
        from seqpar.hf_files import checkpoint_files

        files, _ = checkpoint_files(Path(cfg.hf_path))
        h = hashlib.sha256()
        for f in sorted(files, key=lambda p: p.name):
            h.update(f.name.encode() + b"\0")
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 24):
                    h.update(chunk)
        return {"hf_path": str(cfg.hf_path), "sha256": h.hexdigest()}
    arch = cfg.model_dump(mode="json", exclude={"lora", "hf_path", "load_weights"})
    blob = json.dumps({"arch": arch, "seed": seed}, sort_keys=True).encode()
    return {"random_init": hashlib.sha256(blob).hexdigest()[:16], "seed": seed}


def check_base_identity(saved: dict, current: dict, where: str) -> None:
    if saved != current:
        raise ValueError(f"{where}: the adapters were trained on another base model ({saved}); this run's base is "
                         f"{current}: set model.hf_path (and train.seed) to the checkpoint's base")
