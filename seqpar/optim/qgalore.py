"""Q-GaLore (Zhang et al., 2024): GaLore with INT8 weights, INT4 projectors and layer-adaptive
projector refreshes, on top of seqpar's GaLoreAdamW.

* Weights: every GaLore-targeted projection becomes an ``Int8Linear``: the weight is held as INT8
  codes (a frozen int8 ``weight_int8`` parameter, 1 byte per weight) with one fp32 scale per group
  of ``group`` values (``train.galore.quant_group``), in GPU memory and in checkpoints
  (``qweights/``). Its forward dequantizes the weight into the compute dtype for the matmul and
  drops it; the backward dequantizes again and adds the weight's gradient to the module's
  ``weight_grad`` (bf16, like the other gradients). The optimizer step dequantizes, takes the GaLore step
  in fp32 and quantizes again with stochastic rounding (SR), writing codes and scales in place.
* The trainer all-reduces those gradients over the data-parallel world (DeepSpeed does not see
  them: they belong to no trainable parameter) and clips every gradient, these included, by the
  global norm (``Int8Weights.finish``).
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
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn import functional as F

from seqpar.optim.clip import clip_to_norm_, squared_norm
from seqpar.optim.galore import GaLoreAdamW, _projector, galore_groups, is_galore_target
from seqpar.optim.quant import (
    dequantize_int4,
    dequantize_int8,
    quantize_int4,
    quantize_int8,
    round_to,
)

CODES, SCALES = "_int8", "_int8_scale"  # a quantized weight's two state-dict entries: <name>_int8, <name>_int8_scale


# -- the INT8 linear layer --------------------------------------------------------------------------
class _Int8LinearFn(torch.autograd.Function):
    """y = x W^T with W dequantized from its codes in forward and again in backward (never kept);
    the weight's gradient goes to ``owner.weight_grad``, x's to autograd."""

    @staticmethod
    def forward(ctx, x: Tensor, codes: Tensor, scale: Tensor, owner: Int8Linear) -> Tensor:  # type: ignore[override]
        ctx.owner = owner
        ctx.save_for_backward(x, codes, scale)
        return F.linear(x, owner.dequantized(x.dtype))

    @staticmethod
    def backward(ctx, gy: Tensor):  # type: ignore[override]
        x, codes, scale = ctx.saved_tensors  # saved: an in-place change before the backward would be caught
        owner = ctx.owner
        gx = gy @ dequantize_int8(codes, scale, owner.shape, gy.dtype) if ctx.needs_input_grad[0] else None
        gw = gy.reshape(-1, gy.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
        owner.accumulate(gw)
        return gx, None, None, None


class Int8Linear(nn.Module):
    """A bias-free linear whose weight lives as INT8 codes [groups, group] and fp32 scales
    [groups] (symmetric per group). ``weight_int8`` is a frozen parameter (DeepSpeed moves and
    broadcasts it like any other; it gets no gradient of its own), the scales a buffer."""

    # train.compile: runs as an opaque op in a compiled layer (its backward writes weight_grad)
    compile_opaque = True

    def __init__(self, linear: nn.Linear, group: int):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("Int8Linear: the projections Q-GaLore quantizes have no bias")
        self.shape, self.group, self.dtype = tuple(linear.weight.shape), group, linear.weight.dtype
        q, scale = quantize_int8(linear.weight.detach(), group, None)  # the start: to nearest
        self.weight_int8 = nn.Parameter(q, requires_grad=False)
        self.register_buffer("weight_int8_scale", scale)
        self.weight_grad: Tensor | None = None  # the weight's gradient (compute dtype), summed over micro-batches

    @property
    def out_features(self) -> int:
        return self.shape[0]

    def dequantized(self, dtype: torch.dtype | None = None) -> Tensor:
        return dequantize_int8(self.weight_int8, self.weight_int8_scale, self.shape, dtype or self.dtype)

    def accumulate(self, gw: Tensor) -> None:
        gw = gw.to(self.dtype)
        if self.weight_grad is None:
            self.weight_grad = gw
        else:
            self.weight_grad.add_(gw)

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and not x.requires_grad:
            x = x.detach().requires_grad_()  # the weight trains even when nothing before it does
        return _Int8LinearFn.apply(x, self.weight_int8, self.weight_int8_scale, self)

    def extra_repr(self) -> str:
        return f"out={self.shape[0]}, in={self.shape[1]}, int8 groups of {self.group}"


def quantize_linears(model: nn.Module, targets, group: int) -> dict[str, Int8Linear]:
    """Replace the targeted projections of every decoder layer by ``Int8Linear``; {weight name:
    module} (the name the Hugging Face export gives the dequantized weight)."""
    out = {}
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}.weight" if name else f"{child_name}.weight"
            if type(child) is nn.Linear and is_galore_target(full, child.weight, targets):
                q = Int8Linear(child, group).to(child.weight.device)
                setattr(module, child_name, q)
                out[full] = q
    return out


BUCKET_ELEMENTS = 1 << 27  # gradients all-reduced together (a flat copy of this many elements at a time)


def _buckets(tensors: list[Tensor], limit: int) -> list[list[Tensor]]:
    """Consecutive groups of ``tensors`` of at most ``limit`` elements (a larger tensor alone)."""
    out: list[list[Tensor]] = []
    size = limit
    for t in tensors:
        if size + t.numel() > limit:
            out.append([])
            size = 0
        out[-1].append(t)
        size += t.numel()
    return out


class Int8Weights:
    """The quantized layers of a model as the trainer handles them: gradients reduced and clipped
    at the window's end, and checkpointed mid-window (per rank: not yet reduced)."""

    def __init__(self, layers: dict[str, Int8Linear]):
        self.layers = layers

    def finish(self, dense: list[nn.Parameter], max_norm: float, world_size: int) -> Tensor:
        """All-reduce (average over the world, as DeepSpeed does for the parameters), then clip
        every gradient by the global norm (DeepSpeed's rule: max_norm / (norm + 1e-6) when below
        1). ``dense``: the trainable parameters, already reduced by DeepSpeed. Returns the norm."""
        grads = [q.weight_grad for q in self.layers.values() if q.weight_grad is not None]
        if world_size > 1:
            for bucket in _buckets(grads, BUCKET_ELEMENTS):  # few large collectives, not one per layer
                flat = torch._utils._flatten_dense_tensors(bucket)
                dist.all_reduce(flat)
                flat.div_(world_size)
                for g, reduced in zip(bucket, torch._utils._unflatten_dense_tensors(flat, bucket)):
                    g.copy_(reduced)
        grads += [p.grad for p in dense if p.grad is not None]
        norm = squared_norm(grads, grads[0].device).sqrt()
        clip_to_norm_(grads, norm, max_norm)
        return norm

    def discard(self) -> None:
        """Drop the window's gradients: its step was skipped (they were not finite)."""
        for q in self.layers.values():
            q.weight_grad = None

    def state_dict(self) -> dict[str, Tensor]:
        """The gradients of the open window (this rank's, unreduced)."""
        return {name: q.weight_grad.detach() for name, q in self.layers.items() if q.weight_grad is not None}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for name, q in self.layers.items():
            q.weight_grad = state[name].to(q.weight_int8.device, q.dtype).clone() if name in state else None

    def reshard(self, read, old_world: int, rank: int, world: int) -> None:
        """An open window's gradients saved on ``old_world`` ranks (``read(r)``: saved rank r's
        ``state_dict``) onto this layout, by the rule DeepSpeed's ZeRO-0 gradients follow in
        ``engine/reshard.py``: new rank r takes world / old_world x the sum of saved ranks r,
        r + world, ... (each is divided by the world at the window's end)."""
        sums: dict[str, Tensor] = {}
        for r in range(rank, old_world, world):
            for name, g in read(r).items():
                acc = sums.setdefault(name, torch.zeros(g.shape, dtype=torch.float32))
                acc.add_(g.float(), alpha=world / old_world)
        self.load_state_dict(sums)


# -- the optimizer ----------------------------------------------------------------------------------
class QGaLoreAdamW(GaLoreAdamW):
    """GaLoreAdamW whose ``galore`` group holds the ``weight_int8`` parameters of ``Int8Linear``
    layers (``layers``: parameter -> its layer). Extra arguments: ``adaptive_threshold`` and
    ``adaptive_window`` (0: fixed refresh interval)."""

    moment_dtype = torch.bfloat16
    host_state = ("interval", "refreshed_at", "similarity", "compared", "lead")

    def __init__(self, params, layers: dict[Tensor, Int8Linear], adaptive_threshold: float = 0.4,
                 adaptive_window: int = 5, **kwargs):
        self.layers = layers
        super().__init__(params, **kwargs)
        self.adaptive_threshold = adaptive_threshold
        self.adaptive_window = adaptive_window

    def _grad(self, p: Tensor) -> Tensor | None:
        layer = self.layers.get(p)
        return p.grad if layer is None else layer.weight_grad

    def _shape(self, p: Tensor) -> tuple[int, ...]:
        layer = self.layers.get(p)
        return tuple(p.shape) if layer is None else layer.shape

    def _value(self, p: Tensor) -> Tensor:
        layer = self.layers.get(p)
        return p.float() if layer is None else layer.dequantized(torch.float32)

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        for layer in self.layers.values():
            layer.weight_grad = None  # consumed (the parameters' own are DeepSpeed's to zero)
        return loss

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
        state["projector"], state["projector_scale"], state["projector_zero"] = quantize_int4(proj, self.layers[p].group)

    def _projector(self, p: Tensor, state: dict, group: dict, left: bool) -> Tensor:
        m, n = self._shape(p)
        r = min(group["rank"], m, n)
        return dequantize_int4(state["projector"], state["projector_scale"], state["projector_zero"],
                               (m, r) if left else (r, n), self.layers[p].group)

    def _keep_moments(self, p: Tensor, state: dict, m: Tensor, v: Tensor, t: int) -> None:
        state["exp_avg"] = round_to(m, self.moment_dtype, self._generator(p, t, "exp_avg"))
        state["exp_avg_sq"] = round_to(v, self.moment_dtype, self._generator(p, t, "exp_avg_sq"))

    def _write(self, p: Tensor, state: dict, group: dict, new: Tensor, t: int) -> None:
        layer = self.layers.get(p)
        if layer is None:
            return super()._write(p, state, group, new, t)
        q, scale = quantize_int8(new, layer.group, self._generator(p, t, "weight"))
        p.copy_(q)
        layer.weight_int8_scale.copy_(scale)


def qgalore_state_bytes(shape: tuple[int, int], rank: int, group: int, window: int = 5) -> int:
    """Optimizer state of one Q-GaLore matrix: INT4 projector (two codes per byte, a scale and a
    zero per group), bf16 low-rank moments, the adaptive-refresh record (step, interval, last
    refresh, count, ``window`` similarities, leading vector)."""
    m, n = shape
    r = min(rank, m, n)
    proj_groups = -(-(m * r if m < n else r * n) // group)
    projector = -(-(proj_groups * group) // 2) + 8 * proj_groups
    moments = 2 * (r * n if m < n else m * r) * 2
    lead = 4 * min(m, n)
    return projector + moments + lead + 4 * 4 + 4 * max(window, 1)


def build_qgalore(model: nn.Module, train) -> tuple[QGaLoreAdamW, Int8Weights]:
    """The optimizer for ``train.optimizer: qgalore``: the targeted projections become
    ``Int8Linear`` layers first (their codes are the GaLore group's parameters)."""
    cfg = train.galore
    layers = quantize_linears(model, cfg.targets, cfg.quant_group)
    by_param = {q.weight_int8: q for q in layers.values()}
    groups = galore_groups(model, train)
    groups.insert(0, {"params": list(by_param), "weight_decay": train.weight_decay, "galore": True, "rank": cfg.rank,
                      "update_interval": cfg.update_interval, "scale": cfg.scale})
    opt = QGaLoreAdamW([g for g in groups if g["params"]], layers=by_param, adaptive_threshold=cfg.adaptive_threshold,
                       adaptive_window=cfg.adaptive_window, lr=train.lr, betas=tuple(train.betas), eps=train.eps,
                       seed=train.seed)
    return opt, Int8Weights(layers)


# -- the checkpoint's weights: qweights/weights.safetensors ------------------------------------------
QWEIGHTS_DIR = "qweights"
QWEIGHTS_FILE = "weights.safetensors"


def expand_state_dict(tensors: dict[str, Tensor], like: dict[str, Tensor]) -> dict[str, Tensor]:
    """A Q-GaLore model's state dict (INT8 codes and scales of the quantized weights, the rest as
    is) as a plain model's, each weight dequantized to the shape and dtype of ``like`` (a plain
    model's state dict, on any device, meta included): the very values the run computed with."""
    out = {}
    for name, ref in like.items():
        if name in tensors:
            out[name] = tensors[name]
        elif name + CODES in tensors and name + SCALES in tensors:
            out[name] = dequantize_int8(tensors[name + CODES], tensors[name + SCALES], ref.shape, ref.dtype)
        else:
            raise KeyError(f"{name} is missing from the checkpoint's {QWEIGHTS_DIR}/{QWEIGHTS_FILE}")
    return out


__all__ = ["CODES", "QWEIGHTS_DIR", "QWEIGHTS_FILE", "SCALES", "Int8Linear", "Int8Weights", "QGaLoreAdamW",
           "build_qgalore", "expand_state_dict", "qgalore_state_bytes", "quantize_linears"]
