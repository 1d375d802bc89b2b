"""Q-GaLore (Zhang et al., 2024): GaLore with INT4 projectors, INT8 weights and layer-adaptive
projector refreshes, on top of seqpar's GaLoreAdamW.

* Weights: every GaLore-targeted matrix lives on an INT8 grid, symmetric per group of
  ``group`` values (``train.galore.quant_group``): after each step the fp32 result is quantized
  again with stochastic rounding (SR), its scale kept in the optimizer state. The checkpoint holds
  the INT8 codes and scales (``qweights/``), 1 byte per weight; the dequantized value is the same
  bits on every load. In GPU memory the weights are the dequantized values in the compute dtype
  (the matmuls read bf16; storing the INT8 codes in memory too is not done yet: the saving here is
  the checkpoint's and the master copy's).
* Projectors: INT4, asymmetric per group (scale and zero point), two codes per byte; the SVD runs in
  fp32, the projection uses the dequantized projector.
* Adaptive refresh: at each refresh the new projector's leading singular vector is compared with
  the previous one (|cosine|: an SVD's signs are arbitrary); when the mean of the last
  ``adaptive_window`` comparisons reaches ``adaptive_threshold`` the matrix's refresh interval
  doubles (and the window starts over). Fewer SVDs once a layer's subspace has settled.
* Moments (low-rank and the AdamW ones of embeddings and norms) are bf16, written by SR.

Every piece of state is a tensor; the SR bits are keyed by (seed, parameter, step, purpose), so a
resume, mid-window or across a refresh, is bitwise. Why not ``q-galore-torch``: it keeps its state
in Python projector objects (no pickle-free ``state_dict``) and needs bitsandbytes' CUDA 8-bit
optimizer; these formats run and are tested on CPU.
"""

from __future__ import annotations

import torch
from torch import Tensor

from seqpar.optim.galore import GaLoreAdamW, _projector, galore_groups, is_galore_target
from seqpar.optim.quant import (
    dequantize_int4,
    dequantize_int8,
    quantize_int4,
    quantize_int8,
    requantize_int8,
    round_to,
)


class QGaLoreAdamW(GaLoreAdamW):
    """GaLoreAdamW whose ``galore`` groups hold INT8-grid weights and INT4 projectors. Extra
    arguments: ``group`` (quantization group size), ``adaptive_threshold`` and ``adaptive_window``
    (0: fixed refresh interval)."""

    moment_dtype = torch.bfloat16
    host_state = ("interval", "refreshed_at", "similarity", "compared", "lead")

    def __init__(self, params, group: int = 256, adaptive_threshold: float = 0.4, adaptive_window: int = 5,
                 **kwargs):
        super().__init__(params, **kwargs)
        self.group = group
        self.adaptive_threshold = adaptive_threshold
        self.adaptive_window = adaptive_window
        with torch.no_grad():  # the starting weights onto the grid (to nearest: no random bits)
            for p in self.quantized_params():
                q, scale = quantize_int8(p, group, None)
                p.copy_(dequantize_int8(q, scale, p.shape, p.dtype))
                self.state[p]["weight_scale"] = scale

    def quantized_params(self) -> list[Tensor]:
        return [p for g in self.param_groups if g["galore"] for p in g["params"]]

    def int8_weights(self) -> dict[Tensor, tuple[Tensor, Tensor]]:
        """{parameter: (INT8 codes [groups, group], fp32 scales [groups])}: what a checkpoint stores."""
        return {p: (requantize_int8(p.detach(), self.state[p]["weight_scale"], self.group),
                    self.state[p]["weight_scale"]) for p in self.quantized_params()}

    # -- GaLoreAdamW's hooks ----------------------------------------------------------------------
    def _refresh_due(self, state: dict, group: dict, step: int) -> bool:
        if "projector" not in state:
            return True
        return step - int(state["refreshed_at"]) >= int(state["interval"])

    def _refresh(self, p: Tensor, state: dict, group: dict, grad: Tensor, left: bool, step: int) -> None:
        proj = _projector(grad, group["rank"])
        lead = (proj[:, 0] if left else proj[0]).float().cpu().contiguous().clone()  # compact, as reloaded
        if "projector" not in state:
            state["interval"] = torch.tensor(float(group["update_interval"]))
            state["similarity"] = torch.zeros(max(self.adaptive_window, 1))
            state["compared"] = torch.zeros(())
        elif self.adaptive_window:
            cos = torch.nn.functional.cosine_similarity(state["lead"], lead, dim=0).abs()
            n = int(state["compared"])
            state["similarity"][n % self.adaptive_window] = cos
            state["compared"] += 1
            if n + 1 >= self.adaptive_window and float(state["similarity"].mean()) >= self.adaptive_threshold:
                state["interval"] *= 2
                state["compared"].zero_()
        state["lead"] = lead
        state["refreshed_at"] = torch.tensor(float(step))
        state["projector"], state["projector_scale"], state["projector_zero"] = quantize_int4(proj, self.group)

    def _projector(self, p: Tensor, state: dict, group: dict, left: bool) -> Tensor:
        m, n = p.shape
        r = min(group["rank"], m, n)
        return dequantize_int4(state["projector"], state["projector_scale"], state["projector_zero"],
                               (m, r) if left else (r, n), self.group)

    def _keep_moments(self, p: Tensor, state: dict, m: Tensor, v: Tensor, t: int) -> None:
        state["exp_avg"] = round_to(m, self.moment_dtype, self._generator(p, t, "exp_avg"))
        state["exp_avg_sq"] = round_to(v, self.moment_dtype, self._generator(p, t, "exp_avg_sq"))

    def _write(self, p: Tensor, state: dict, group: dict, new: Tensor, t: int) -> None:
        if not group["galore"]:
            return super()._write(p, state, group, new, t)
        q, scale = quantize_int8(new, self.group, self._generator(p, t, "weight"))
        p.copy_(dequantize_int8(q, scale, p.shape, p.dtype))
        state["weight_scale"] = scale


def qgalore_state_bytes(shape: tuple[int, int], rank: int, group: int, window: int = 5) -> int:
    """Optimizer state of one Q-GaLore matrix: INT4 projector (two codes per byte, a scale and a
    zero per group), bf16 low-rank moments, the weight's INT8 scales, the adaptive-refresh record
    (step, interval, last refresh, count, ``window`` similarities, leading vector)."""
    m, n = shape
    r = min(rank, m, n)
    proj_groups = -(-(m * r if m < n else r * n) // group)
    projector = -(-(proj_groups * group) // 2) + 8 * proj_groups
    moments = 2 * (r * n if m < n else m * r) * 2
    lead = 4 * (min(n, m))
    weight_scales = 4 * -(-(m * n) // group)
    return projector + moments + lead + weight_scales + 4 * 4 + 4 * max(window, 1)


def build_qgalore(model: torch.nn.Module, train) -> QGaLoreAdamW:
    """The optimizer for ``train.optimizer: qgalore`` (puts the targeted weights on the INT8 grid)."""
    cfg = train.galore
    return QGaLoreAdamW(galore_groups(model, train), group=cfg.quant_group, adaptive_threshold=cfg.adaptive_threshold,
                        adaptive_window=cfg.adaptive_window, lr=train.lr, betas=tuple(train.betas), eps=train.eps,
                        seed=train.seed)


def quantized_weight_names(model: torch.nn.Module, targets) -> list[str]:
    """Names of the parameters Q-GaLore keeps on the INT8 grid (the checkpoint stores them as codes)."""
    return [n for n, p in model.named_parameters() if p.requires_grad and is_galore_target(n, p, targets)]


# -- the checkpoint's weights: qweights/weights.safetensors ------------------------------------------
QWEIGHTS_DIR = "qweights"
QWEIGHTS_FILE = "weights.safetensors"
CODES, SCALES = ".int8", ".int8_scale"  # suffixes of a quantized weight's two tensors


def compact_state_dict(model: torch.nn.Module, optimizer: QGaLoreAdamW) -> dict[str, Tensor]:
    """The model's state dict with each INT8-grid weight as its codes and scales (1 byte per
    weight instead of 2 or 4); everything else as is (seqpar's names)."""
    names = {p: n for n, p in model.named_parameters()}
    out = {k: v.detach() for k, v in model.state_dict().items()}
    for p, (codes, scales) in optimizer.int8_weights().items():
        name = names[p]
        del out[name]
        out[name + CODES], out[name + SCALES] = codes, scales
    return out


def expand_state_dict(tensors: dict[str, Tensor], like: dict[str, Tensor]) -> dict[str, Tensor]:
    """``compact_state_dict``'s output back to a full state dict, each weight dequantized to the
    shape and dtype of ``like`` (a model's state dict, on any device, meta included): the very
    bits the training run held."""
    out = {}
    for name, ref in like.items():
        if name in tensors:
            out[name] = tensors[name]
        elif name + CODES in tensors and name + SCALES in tensors:
            out[name] = dequantize_int8(tensors[name + CODES], tensors[name + SCALES], ref.shape, ref.dtype)
        else:
            raise KeyError(f"{name} is missing from the checkpoint's {QWEIGHTS_DIR}/{QWEIGHTS_FILE}")
    return out


__all__ = [
    "CODES",
    "QWEIGHTS_DIR",
    "QWEIGHTS_FILE",
    "SCALES",
    "QGaLoreAdamW",
    "build_qgalore",
    "compact_state_dict",
    "expand_state_dict",
    "qgalore_state_bytes",
    "quantized_weight_names",
]
