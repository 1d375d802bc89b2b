"""Llama-family decoder (Llama, Mistral, Qwen2/3, Mixtral, Qwen2/3-MoE) on packed token streams.

Parameter names equal Hugging Face's (``model.layers.3.self_attn.q_proj.weight``) so safetensors
checkpoints map one to one; only MoE experts differ (stacked per layer, see ``seqpar.models.hf``).

The model works on a flat stream of T tokens: a micro-batch [B, S] is flattened and documents are
told apart by ``position_ids`` restarting at 0, so attention (``AttnMeta``) never crosses a document
and padding costs nothing special. Attention itself is injected (``set_attention``): a local kernel,
or a sequence-parallel wrapper that exchanges q/k/v with other ranks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from seqpar.config import ModelConfig, RopeScalingConfig, is_moe_layer
from seqpar.kernels import AttnMeta, LocalAttention, TorchAttention, attn_meta_from_positions
from seqpar.loss import chunked_cross_entropy, token_cross_entropy
from seqpar.models.moe import MoE, Router, SwiGLU
from seqpar.models.tiling import tiled

# attention(q [T,H,D], k [T,Hkv,D], v, meta, scale) -> out [T,H,D]
AttentionFn = Callable[[Tensor, Tensor, Tensor, AttnMeta, float], Tensor]


class _RMSNormFn(torch.autograd.Function):
    """RMSNorm as Llama computes it (fp32 statistics, the normalised value cast to the input's
    dtype, then the weight), saving only its input and the per-row rsqrt: eager autograd also keeps
    an fp32 copy of the input and the normalised value (6 bytes per element in bf16, per norm),
    and its backward has four fp32 copies alive at once; this one recomputes the normalised value
    and peaks at three. Same forward values; gradients equal up to fp32 rounding."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:  # type: ignore[override]
        rstd = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (x * rstd).to(x.dtype)  # x * rstd: promoted to fp32, as x.float() * rstd

    @staticmethod
    def backward(ctx, gy: Tensor):  # type: ignore[override]
        x, weight, rstd = ctx.saved_tensors
        xn = x * rstd  # fp32
        gw = None
        if ctx.needs_input_grad[1]:
            gw = (gy * xn.to(x.dtype)).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        g = (gy * weight).float()  # the compute-dtype product, as autograd rounds it
        dot = (g * xn).mean(-1, keepdim=True)
        g.sub_(xn.mul_(dot)).mul_(rstd)  # rstd * (g - xn * mean(g * xn))
        del xn
        return g.to(x.dtype), gw, None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return _RMSNormFn.apply(x, self.weight, self.eps)


def rope_inv_freq(dim: int, theta: float, scaling: RopeScalingConfig | None) -> Tensor:
    """Inverse frequencies (fp32), with linear, Llama-3.1 or YaRN scaling (as transformers)."""
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if scaling is None:
        return inv
    if scaling.rope_type == "linear":
        return inv / scaling.factor
    if scaling.rope_type == "yarn":
        return _yarn_inv_freq(dim, theta, scaling)
    lo_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    hi_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > lo_wavelen, inv / scaling.factor, inv)
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= hi_wavelen) & (wavelen <= lo_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn_inv_freq(dim: int, theta: float, s: RopeScalingConfig) -> Tensor:
    """YaRN: high-frequency dimensions keep their frequency (extrapolate), low-frequency ones are
    divided by ``factor`` (interpolate), with a linear ramp between the dimensions that turn
    ``beta_fast`` and ``beta_slow`` times over the original context."""

    def dim_for(rotations: float) -> float:
        return dim * math.log(s.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_for(s.beta_fast), dim_for(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2).float() / dim)
    keep = 1 - ramp  # 1 = extrapolate (keep the frequency)
    return (1.0 / (s.factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep


def rope_attention_scaling(scaling: RopeScalingConfig | None) -> float:
    """Factor on cos/sin: 1 except for YaRN (0.1 ln(factor) + 1 by default)."""
    if scaling is None or scaling.rope_type != "yarn":
        return 1.0
    if scaling.attention_factor is not None:
        return scaling.attention_factor

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if scaling.mscale and scaling.mscale_all_dim:
        return mscale(scaling.factor, scaling.mscale) / mscale(scaling.factor, scaling.mscale_all_dim)
    return mscale(scaling.factor)


class Rotary:
    """cos/sin tables for given positions. Not a module: bf16 casts of the model must not touch
    the fp32 frequencies."""

    def __init__(self, cfg: ModelConfig):
        self.inv_freq = rope_inv_freq(cfg.dim_per_head, cfg.rope_theta, cfg.rope_scaling)
        self.scale = rope_attention_scaling(cfg.rope_scaling)

    def __call__(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        inv = self.inv_freq.to(positions.device)
        freqs = positions.float()[:, None] * inv[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if self.scale != 1.0:
            cos, sin = cos * self.scale, sin * self.scale
        return cos.to(dtype), sin.to(dtype)


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [T, H, D], cos/sin [T, D]."""
    return x * cos[:, None, :] + _rotate_half(x) * sin[:, None, :]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, d = cfg.hidden_size, cfg.dim_per_head
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.kv_heads, d
        self.q_proj = nn.Linear(h, self.n_heads * d, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(h, self.n_kv * d, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(h, self.n_kv * d, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * d, h, bias=False)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.scale = 1.0 / math.sqrt(d)

    def qkv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Projections, qk-norm and RoPE: q [T, H, D], k/v [T, Hkv, D]."""
        t = x.shape[0]
        q = self.q_proj(x).view(t, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(t, self.n_kv, self.head_dim)
        v = self.v_proj(x).view(t, self.n_kv, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def project(self, out: Tensor) -> Tensor:
        return self.o_proj(out.reshape(out.shape[0], self.n_heads * self.head_dim))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, meta: AttnMeta, attn: AttentionFn) -> Tensor:
        q, k, v = self.qkv(x, cos, sin)
        return self.project(attn(q, k, v, meta, self.scale))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.is_moe = is_moe_layer(cfg, index)
        self.mlp: nn.Module = (
            MoE(cfg.hidden_size, cfg.moe) if self.is_moe else SwiGLU(cfg.hidden_size, cfg.intermediate_size)
        )
        # tokens per tile of the feed-forward (0 = untiled); set by seqpar.engine.memory
        self.mlp_tile = 0

    def forward(self, x, cos, sin, meta: AttnMeta, attn: AttentionFn):
        """Returns (hidden, aux loss, (tokens per expert, routing digest) or None)."""
        q, k, v = self.attention_inputs(x, cos, sin)
        return self.after_attention(x, attn(q, k, v, meta, self.self_attn.scale))

    # The two halves around the attention kernel, so that a memory policy can keep the kernel's
    # output and recompute the rest (seqpar.engine.memory, "selective").
    def attention_inputs(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.self_attn.qkv(self.input_layernorm(x), cos, sin)

    def after_attention(self, x: Tensor, out: Tensor):
        x = x + self.self_attn.project(out)
        if self.is_moe:
            y, aux, counts = self.mlp(self.post_attention_layernorm(x))
            return x + y, aux, counts
        return x + tiled(self._norm_mlp, x, self.mlp_tile), x.new_zeros((), dtype=torch.float32), None

    def _norm_mlp(self, x: Tensor) -> Tensor:
        # per token: the norm joins the tiles, so its fp32 copies exist for one tile at a time too
        return self.mlp(self.post_attention_layernorm(x))


class LMHead(nn.Linear):
    """Output projection; with labels, returns the chunked cross-entropy sum instead of logits.

    Computing the loss inside this module's forward matters under ZeRO-3: parameters are
    gathered only while their module runs.
    """

    loss_fn = staticmethod(chunked_cross_entropy)  # Transformer.set_loss swaps in a fused kernel

    def forward(self, x: Tensor, labels: Tensor | None = None, chunk: int = 4096,  # type: ignore[override]
                per_token: bool = False) -> Tensor:
        return _head(self, x, labels, chunk, per_token)


class TiedLMHead(nn.Module):
    """LM head sharing the embedding matrix. Under ZeRO-3 the engine registers that matrix as an
    external parameter of this module so it is gathered here too."""

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        self._embedding = [embedding]  # a list hides it from the module tree (no duplicate param)

    @property
    def weight(self) -> Tensor:
        return self._embedding[0].weight

    loss_fn = staticmethod(chunked_cross_entropy)

    def forward(self, x: Tensor, labels: Tensor | None = None, chunk: int = 4096, per_token: bool = False) -> Tensor:
        return _head(self, x, labels, chunk, per_token)


def _head(head: LMHead | TiedLMHead, x: Tensor, labels: Tensor | None, chunk: int, per_token: bool) -> Tensor:
    """Logits without labels; with them the summed CE, or each token's CE [T] (``per_token``, no
    gradients: evaluation by position)."""
    if labels is None:
        return F.linear(x, head.weight)
    if per_token:
        return token_cross_entropy(x, head.weight, labels, chunk)
    return head.loss_fn(x, head.weight, labels, chunk)


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


@dataclass
class ModelOutput:
    loss_sum: Tensor | None  # summed CE over labelled tokens (caller normalises)
    aux_loss: Tensor  # MoE load-balancing loss (0 for dense)
    logits: Tensor | None = None  # [B, S, V] when no labels are given
    token_losses: Tensor | None = None  # [B * S] each token's CE (0 = no label), with per_token


class Transformer(nn.Module):
    """Causal LM. ``forward(input_ids, position_ids, labels)``; all of shape [B, S]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Backbone(cfg)
        self.lm_head: nn.Module = (
            TiedLMHead(self.model.embed_tokens)
            if cfg.tie_word_embeddings
            else LMHead(cfg.hidden_size, cfg.vocab_size, bias=False)
        )
        self.rotary = Rotary(cfg)
        self.attention: AttentionFn = LocalAttention(TorchAttention())
        self.activation_checkpointing = False  # whole-layer checkpointing without a memory policy
        # per-layer activation policy (seqpar.engine.memory.LayerMemory): run_layer(i, layer, ...)
        self.memory = None
        self.loss_chunk_size = 4096

    # -- setup ------------------------------------------------------------------------------------
    def set_attention(self, fn: AttentionFn) -> None:
        self.attention = fn

    def set_loss(self, fn: Callable[[Tensor, Tensor, Tensor, int], Tensor]) -> None:
        """The head's ``(hidden, weight, labels, chunk) -> summed CE`` (``seqpar.loss.select_loss``)."""
        self.lm_head.loss_fn = fn

    def set_sequence_parallel_group(self, group) -> None:
        """MoE aux losses then use routing statistics summed over the group's shards."""
        for m in self.modules():
            if isinstance(m, MoE):
                m.stats_group = group

    def set_expert_parallel(self, ep) -> None:
        """Split every MoE layer's experts over the EP group (seqpar.parallel.experts)."""
        for m in self.modules():
            if isinstance(m, MoE):
                m.set_expert_parallel(ep)

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None,
                     write: Callable[[str, Tensor], None] | None = None,
                     shapes: dict[str, torch.Size] | None = None) -> None:
        """Normal(0, initializer_range) for matrices, ones for norms, zeros for biases.

        One parameter at a time, in a fixed order, from ``generator``: the values do not depend on
        where the parameters live. ``write(name, value)`` stores a full fp32 value instead of the
        default in-place copy (ZeRO-3 partitioned parameters keep only their slice of it), and
        ``shapes`` gives the full shapes (a partitioned parameter has none of its own).
        """
        std = self.cfg.initializer_range
        for name, p in self.named_parameters():
            shape = shapes[name] if shapes is not None else p.shape
            if name.endswith("norm.weight"):
                value = torch.ones(shape)
            elif name.endswith(".bias"):
                value = torch.zeros(shape)
            else:
                value = torch.randn(shape, generator=generator, dtype=torch.float32).mul_(std)  # no 2nd copy
            if write is None:
                p.copy_(value)
            else:
                write(name, value)

    def routers(self) -> list[tuple[str, Router]]:
        return [(n, m) for n, m in self.named_modules() if isinstance(m, Router)]

    # -- forward ----------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor,
        labels: Tensor | None = None,
        meta: AttnMeta | None = None,
        per_token: bool = False,
    ) -> ModelOutput:
        """``per_token`` (with labels, no gradients): also each token's CE, for evaluation."""
        ids = input_ids.reshape(-1)
        pos = position_ids.reshape(-1)
        if meta is None:
            meta = attn_meta_from_positions(pos)
        x = self.model.embed_tokens(ids)
        cos, sin = self.rotary(pos, x.dtype)
        aux = x.new_zeros((), dtype=torch.float32)
        for i, layer in enumerate(self.model.layers):
            if self.memory is not None and self.training and torch.is_grad_enabled():
                x, a, counts = self.memory.run_layer(i, layer, x, cos, sin, meta, self.attention)
            elif self.activation_checkpointing and self.training:
                x, a, counts = checkpoint(layer, x, cos, sin, meta, self.attention, use_reentrant=False)
            else:
                x, a, counts = layer(x, cos, sin, meta, self.attention)
            aux = aux + a
            if counts is not None and self.training:
                # outside the checkpointed region: recomputation must not count twice
                gate = layer.mlp.gate
                gate.tokens_per_expert += counts[0]
                gate.routing_digest += counts[1]
                if gate.dropped_tokens is not None:
                    gate.dropped_tokens += counts[2]
        x = self.model.norm(x)
        if labels is None:
            return ModelOutput(None, aux, self.lm_head(x).view(*input_ids.shape, -1))
        if per_token:
            losses = self.lm_head(x, labels.reshape(-1), self.loss_chunk_size, per_token=True)
            return ModelOutput(losses.sum(), aux, token_losses=losses)
        return ModelOutput(self.lm_head(x, labels.reshape(-1), self.loss_chunk_size), aux)

    # -- router state -----------------------------------------------------------------------------
    def router_state_dict(self) -> dict[str, Tensor]:
        """Expert bias and the open window's token counts of every MoE layer (fp32, CPU)."""
        out = {}
        for name, r in self.routers():
            out[f"{name}.tokens_per_expert"] = r.tokens_per_expert.detach().cpu().clone()
            out[f"{name}.routing_digest"] = r.routing_digest.detach().cpu().clone()
            if r.expert_bias is not None:
                out[f"{name}.expert_bias"] = r.expert_bias.detach().cpu().clone()
            if r.dropped_tokens is not None:
                out[f"{name}.dropped_tokens"] = r.dropped_tokens.detach().cpu().clone()
        return out

    def load_router_state_dict(self, state: dict[str, Tensor]) -> None:
        expected = set(self.router_state_dict())
        if set(state) != expected:
            raise ValueError(
                f"router state mismatch: missing {sorted(expected - set(state))}, "
                f"unexpected {sorted(set(state) - expected)}"
            )
        for name, r in self.routers():
            r.tokens_per_expert.copy_(state[f"{name}.tokens_per_expert"])
            r.routing_digest.copy_(state[f"{name}.routing_digest"])
            if r.expert_bias is not None:
                r.expert_bias.copy_(state[f"{name}.expert_bias"])
            if r.dropped_tokens is not None:
                r.dropped_tokens.copy_(state[f"{name}.dropped_tokens"])

    @torch.no_grad()
    def routing_digest(self) -> int:
        """Combined assignment fingerprint of all MoE layers (0 for dense models)."""
        return combine_routing_digest([int(r.routing_digest) for _, r in self.routers()])

    @torch.no_grad()
    def routing_digest_parts(self) -> Tensor:
        """Each MoE layer's digest, a copy left on the device (``combine_routing_digest`` later):
        reading it now would stall the GPU every micro-batch."""
        return torch.stack([r.routing_digest.detach().reshape(()) for _, r in self.routers()]).clone()

    def update_routers(self, group=None, step_bias: bool = True) -> dict[str, float]:
        """End of an optimizer step: sum token counts over all ranks, step the expert bias, reset.

        One all-reduce for all layers. Returns load statistics for logging. ``step_bias`` false:
        the step was skipped (gradients not finite), so the bias stays, like the weights.
        """
        routers = [r for _, r in self.routers()]
        if not routers:
            return {}
        zero = routers[0].tokens_per_expert.new_zeros(())
        # [L, E + 1]: tokens per expert, then (token, slot) pairs dropped over capacity
        table = torch.stack([torch.cat([r.tokens_per_expert, (r.dropped_tokens if r.dropped_tokens is not None
                                                               else zero).reshape(1)]) for r in routers])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(table, group=group)
        counts, dropped = table[:, :-1], table[:, -1]
        mean = counts.mean(dim=1, keepdim=True)
        for r, c, m in zip(routers, counts, mean):
            if r.expert_bias is not None and step_bias:
                # DeepSeek-V3: raise under-loaded experts' bias, lower over-loaded ones'.
                r.expert_bias += r.cfg.bias_update_rate * torch.sign(m - c)
            r.tokens_per_expert.zero_()
            if r.dropped_tokens is not None:
                r.dropped_tokens.zero_()
        imbalance = counts.max(1).values / mean.squeeze(1).clamp_min(1)  # per layer, 1.0 = balanced
        stats = {"moe_max_load": float(imbalance.max()), "moe_mean_load": float(imbalance.mean())}
        biases = [r.expert_bias for r in routers if r.expert_bias is not None]
        if biases:  # after this step's update: how far balancing has pushed the selection
            stats["moe_bias_norm"] = float(torch.stack([b.norm() for b in biases]).max())
        if any(r.dropped_tokens is not None for r in routers):
            stats["moe_dropped"] = float(dropped.sum() / counts.sum().clamp_min(1))  # fraction of all pairs
        return stats


def combine_routing_digest(parts: list[int]) -> int:
    """One fingerprint from the per-layer routing digests (layer order matters)."""
    return int(sum(int(d) * (i + 1) for i, d in enumerate(parts)) % (2**61 - 1))


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, active per token) parameter counts; works under ZeRO-3 (``ds_numel``)."""
    total = active = 0
    for name, p in model.named_parameters():
        n = getattr(p, "ds_numel", p.numel())
        total += n
        if ".experts." in name:
            moe_cfg = model.cfg.moe  # type: ignore[union-attr]
            active += n * moe_cfg.top_k // moe_cfg.num_experts
        else:
            active += n
    return total, active
