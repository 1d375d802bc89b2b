"""Mixture-of-experts feed-forward: top-k router, dropless dispatch, shared expert, expert bias.

Routing state lives in the router: ``expert_bias`` (DeepSeek-V3 aux-loss-free balancing; affects
which experts are *selected*, never the gate weights) and ``tokens_per_expert`` (counts of the
current optimizer step's micro-batches). Counts are returned by ``forward`` and accumulated by the
model outside any activation-checkpointed region, so recomputation never double counts.
``expert_bias`` is a persistent buffer (it changes what the model computes); the counts are not
model weights, so the checkpoint code reaches both through ``Transformer.router_state_dict``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from seqpar.config import MoEConfig
from seqpar.models.tiling import tiled


class Router(nn.Module):
    """Scores tokens against experts; picks top-k (optionally biased), returns gate weights."""

    def __init__(self, hidden: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, hidden))
        self.register_buffer(
            "tokens_per_expert", torch.zeros(cfg.num_experts, dtype=torch.float32), persistent=False
        )
        # Fingerprint of every (token, slot) -> expert assignment since the last reset: lets tests
        # prove that routing after a resume equals routing without a stop.
        self.register_buffer("routing_digest", torch.zeros((), dtype=torch.int64), persistent=False)
        if cfg.bias_update_rate > 0:
            self.register_buffer("expert_bias", torch.zeros(cfg.num_experts, dtype=torch.float32))
        else:
            self.expert_bias = None
        # (token, slot) pairs over capacity in the current optimizer step (capacity_factor only)
        if cfg.capacity_factor is not None:
            self.register_buffer("dropped_tokens", torch.zeros((), dtype=torch.float32), persistent=False)
        else:
            self.dropped_tokens = None

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        # Keep routing state fp32 when the model is cast (DeepSpeed bf16 casts every buffer):
        # bias steps of 1e-3 and token counts above 256 vanish in bf16.
        dtypes = {n: b.dtype for n, b in self._buffers.items() if b is not None}
        super()._apply(fn, recurse)
        for n, dt in dtypes.items():
            if self._buffers[n] is not None and self._buffers[n].dtype != dt:
                self._buffers[n] = self._buffers[n].to(dt)
        return self

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [T, H] -> (scores [T, E] fp32, top-k expert ids [T, k], gate weights [T, k] fp32)."""
        logits = F.linear(x.float(), self.weight.float())  # routing in fp32 for stable top-k
        scores = logits.softmax(-1) if self.cfg.score_func == "softmax" else logits.sigmoid()
        select = scores if self.expert_bias is None else scores + self.expert_bias
        idx = select.topk(self.cfg.top_k, dim=-1).indices
        weights = scores.gather(1, idx)
        if self.cfg.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return scores, idx, weights


# torch._grouped_mm runs its CUTLASS kernels (no host sync) only on these CUDA majors, in bf16; on
# anything else it falls back to a loop that copies the offsets to the host. At most 1023 groups.
_GROUPED_MM_MAJORS = (9, 10)
# On sm100 the grouped kernel has given non-zero weight gradients to groups of zero rows
# (pytorch/pytorch#172439, open); there the empty experts' gradients are zeroed explicitly.
_ZERO_EMPTY_EXPERT_GRAD_MAJORS = (10,)


def grouped_mm_major(device: torch.device) -> int | None:
    """The CUDA major of ``device`` when torch._grouped_mm has its fast kernel there, else None.

    Host-side metadata only (device type, build, cached device properties): never a sync.
    """
    if device.type != "cuda" or torch.version.hip is not None or not hasattr(torch, "_grouped_mm"):
        return None
    major = torch.cuda.get_device_capability(device)[0]
    return major if major in _GROUPED_MM_MAJORS else None


def grouped_mm_layout_ok(x: Tensor, *weights: Tensor) -> bool:
    """Whether x [N, H] and the stacked weights [E, out, in] meet the fast kernel's layout rules:
    bf16, row-major, every row stride a multiple of 16 bytes, 16-byte aligned data, E < 1024."""
    def aligned(t: Tensor) -> bool:
        return t.dtype == torch.bfloat16 and t.is_contiguous() and t.data_ptr() % 16 == 0

    if x.dim() != 2 or x.shape[0] == 0 or not aligned(x) or x.shape[1] % 8:
        return False
    return all(w.dim() == 3 and 0 < w.shape[0] < 1024 and aligned(w) and w.shape[1] % 8 == 0
               and w.shape[2] % 8 == 0 for w in weights)


class _ZeroGradOfEmptyExperts(torch.autograd.Function):
    """Identity on a stacked [E, ...] weight whose backward zeroes the rows of experts without
    tokens (counts stay on the device: a masked select, no sync)."""

    @staticmethod
    def forward(ctx, w: Tensor, counts: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(counts)
        return w.view_as(w)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        (counts,) = ctx.saved_tensors
        keep = (counts > 0).view(-1, *([1] * (g.dim() - 1)))
        return torch.where(keep, g, torch.zeros((), dtype=g.dtype, device=g.device)), None


# per-expert LoRA factors of gate, up and down ((A [E, r, in], B [E, out, r]) each) and the scaling
Adapters = tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor], tuple[Tensor, Tensor], float] | None


def grouped_swiglu(x_sorted: Tensor, gate: Tensor, up: Tensor, down: Tensor, counts: Tensor,
                   zero_empty_grads: bool = False, lora: Adapters = None) -> Tensor:
    """All experts at once: one torch._grouped_mm per projection over expert-sorted tokens.

    ``counts`` [E] (int, on the tokens' device) give each expert's contiguous rows; the group ends
    are their running sum, so no count ever reaches the host. The weight gradients come out of one
    grouped GEMM each, straight into an [E, ...] tensor. ``lora``: per-expert adapters ((A, B) of
    gate, up, down, and the scaling), applied as two thin grouped GEMMs beside each projection.
    """
    offs = counts.cumsum(0, dtype=torch.int32)
    zero = (lambda w: _ZeroGradOfEmptyExperts.apply(w, counts)) if zero_empty_grads else (lambda w: w)  # noqa: E731

    def mm(x: Tensor, w: Tensor) -> Tensor:
        return torch._grouped_mm(x, zero(w).transpose(-2, -1), offs=offs)

    def proj(x: Tensor, w: Tensor, i: int) -> Tensor:
        y = mm(x, w)
        if lora is not None:
            a, b = lora[i]
            y = y + mm(mm(x, a), b) * lora[3]
        return y

    h = F.silu(proj(x_sorted, gate, 0)) * proj(x_sorted, up, 1)
    return proj(h, down, 2)


def looped_swiglu(x_sorted: Tensor, gate: Tensor, up: Tensor, down: Tensor,
                  counts: list[int], lora: Adapters = None) -> Tensor:
    """One expert at a time on contiguous views, with the same matmuls as the historical loop.

    The tokens are ``split`` and the weights ``unbind``-ed once: the backward of each is a single
    cat/stack into one full-size tensor. (Indexing ``w[e]`` per expert made every expert's
    gradient a full-size [E, ...] zero tensor that autograd then summed: E x weight size.) Experts
    without tokens get exact zeros from unbind's backward. ``lora`` as for ``grouped_swiglu``.
    """
    xs = x_sorted.split(counts)
    ws = [w.unbind(0) for w in (gate, up, down)]
    ab = [(a.unbind(0), b.unbind(0)) for a, b in lora[:3]] if lora is not None else None

    def proj(x: Tensor, i: int, e: int) -> Tensor:
        y = x @ ws[i][e].t()
        if ab is not None:
            y = y + (x @ ab[i][0][e].t()) @ ab[i][1][e].t() * lora[3]
        return y

    outs = []
    for e, n in enumerate(counts):
        if n:
            xe = xs[e]
            outs.append(proj(F.silu(proj(xe, 0, e)) * proj(xe, 1, e), 2, e))
    return torch.cat(outs) if outs else x_sorted[:0]


class Experts(nn.Module):
    """E SwiGLU experts stored as stacked weights (one parameter each: ZeRO-friendly).

    ``forward(x_sorted, counts)``: tokens sorted by expert, ``counts`` [E] tokens per expert. On a
    CUDA device with torch._grouped_mm's kernel (sm90/sm100, bf16, aligned layout) all experts run
    as one grouped GEMM per projection with the counts left on the device; elsewhere a loop over
    per-expert views (counts read on the host: free on CPU, one sync on a GPU). Either way the
    backward costs one full-size write per weight, however many experts there are.
    """

    def __init__(self, hidden: int, cfg: MoEConfig):
        super().__init__()
        e, i = cfg.num_experts, cfg.intermediate_size
        self.gate_proj = nn.Parameter(torch.empty(e, i, hidden))
        self.up_proj = nn.Parameter(torch.empty(e, i, hidden))
        self.down_proj = nn.Parameter(torch.empty(e, hidden, i))

    def use_grouped_mm(self, x_sorted: Tensor) -> bool:
        """Path choice from metadata alone (device, dtype, shapes, alignment): never a sync."""
        lora = getattr(self, "lora", None)
        extra = [p for p in lora.parameters()] if lora is not None else []
        return grouped_mm_major(x_sorted.device) is not None and grouped_mm_layout_ok(
            x_sorted, self.gate_proj, self.up_proj, self.down_proj, *extra)

    def forward(self, x_sorted: Tensor, counts: Tensor | list[int]) -> Tensor:
        """Run each expert on its contiguous slice of expert-sorted tokens."""
        w = (self.gate_proj, self.up_proj, self.down_proj)
        lora = getattr(self, "lora", None)
        # per-expert LoRA adapters (seqpar.models.lora) run beside the frozen weights: x A^T B^T is
        # [tokens, rank] wide; folding B @ A into W would build (and keep for the backward) a
        # full-size copy of every expert weight in every layer
        ab = lora.factors() if lora is not None else None
        if isinstance(counts, Tensor) and self.use_grouped_mm(x_sorted):
            zero = grouped_mm_major(x_sorted.device) in _ZERO_EMPTY_EXPERT_GRAD_MAJORS
            return grouped_swiglu(x_sorted, *w, counts, zero_empty_grads=zero, lora=ab)
        if isinstance(counts, Tensor):
            counts = counts.tolist()  # a host read: no sync on CPU
        return looped_swiglu(x_sorted, *w, counts, lora=ab)


def tokens_per_expert(sorted_ids: Tensor, num_experts: int) -> Tensor:
    """``bincount`` of ascending expert ids, int64 [E], without a host sync (CUDA's bincount reads
    the ids' min and max on the host): each expert's end is a binary search in the sorted ids."""
    bounds = torch.arange(1, num_experts + 1, device=sorted_ids.device, dtype=sorted_ids.dtype)
    ends = torch.searchsorted(sorted_ids, bounds)
    return torch.diff(ends, prepend=ends.new_zeros(1))


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    """Dropless top-k MoE block. ``forward`` returns (output, aux_loss, (tokens per expert,
    assignment digest))."""

    def __init__(self, hidden: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = Router(hidden, cfg)
        self.experts = Experts(hidden, cfg)
        self.shared_expert = (
            SwiGLU(hidden, cfg.shared_expert_intermediate_size)
            if cfg.shared_expert_intermediate_size
            else None
        )
        self.shared_expert_gate = nn.Linear(hidden, 1, bias=False) if cfg.shared_expert_gate else None
        # Under sequence parallelism the aux loss must see the whole sequence's routing statistics,
        # not this rank's shard: set by Transformer.set_sequence_parallel_group.
        self.stats_group = None
        # recompute the routed experts in the backward instead of keeping their intermediates and
        # the expert-sorted token copies (seqpar.engine.memory, memory.tiled_mlp); the shared
        # expert is tiled over tokens (per token, unlike the routed part's statistics)
        self.recompute_experts = False
        self.shared_tile = 0
        # expert parallelism (seqpar.parallel.experts.ExpertParallel): this rank holds E/P experts
        self.expert_parallel = None

    def set_expert_parallel(self, ep) -> None:
        """Keep only this rank's slice of the experts (the same values a full model built from the
        same seed has there) and dispatch tokens to their owners from now on."""
        if ep is None or ep.degree == 1:
            return
        if self.expert_parallel is not None:
            raise RuntimeError("experts are already split for expert parallelism")
        keep = slice(ep.first, ep.first + ep.local)
        lora = getattr(self.experts, "lora", None)
        for owner, names in ((self.experts, ("gate_proj", "up_proj", "down_proj")),
                             (lora, [n for n, _ in lora.named_parameters()] if lora is not None else [])):
            for name in names:
                w = getattr(owner, name)
                setattr(owner, name, nn.Parameter(w.detach()[keep].clone(), requires_grad=w.requires_grad))
        self.expert_parallel = ep

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
        e = self.cfg.num_experts
        scores, idx, weights = self.gate(x)
        flat = idx.reshape(-1)
        sorted_ids, order = flat.sort(stable=True)  # (token, slot) pairs grouped by expert
        counts = tokens_per_expert(sorted_ids, e)  # = bincount(flat, minlength=e), sync-free
        kept_order, kept, dropped = order, counts, counts.new_zeros(())
        if self.cfg.capacity_factor is not None:
            kept_order, kept, dropped = self._capacity(sorted_ids, order, counts)
        if self.recompute_experts and torch.is_grad_enabled():
            y = checkpoint(self._routed, x, kept_order, kept, weights, use_reentrant=False)
        else:
            y = self._routed(x, kept_order, kept, weights)
        if self.shared_expert is not None:
            y = y + tiled(self._shared, x, self.shared_tile)
        aux = self._aux_loss(scores, counts) if self.cfg.aux_loss_coef > 0 else scores.new_zeros(())
        slots = torch.arange(1, flat.numel() + 1, device=flat.device)
        digest = ((flat.long() + 1) * slots).sum() % (2**61 - 1)
        return y, aux, (counts.detach().float(), digest.detach(), dropped.detach().float())

    def _capacity(self, sorted_ids: Tensor, order: Tensor, counts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Keep each expert's first ``capacity`` (token, slot) pairs in token order (the stable sort
        keeps it): (kept pairs' order, kept counts, number dropped). Selecting the kept pairs has a
        data-dependent size, read on the host: capacity mode costs one sync per layer on CUDA."""
        n, e, k = order.numel(), self.cfg.num_experts, self.cfg.top_k
        capacity = math.ceil(self.cfg.capacity_factor * (n // k) * k / e)
        starts = torch.cumsum(counts, 0) - counts
        within = torch.arange(n, device=order.device) - starts[sorted_ids]  # rank inside its expert
        keep = within < capacity
        kept = counts.clamp(max=capacity)
        return order[keep], kept, n - kept.sum()

    def _routed(self, x: Tensor, order: Tensor, counts: Tensor, weights: Tensor) -> Tensor:
        """Weighted sum of each token's top-k experts' outputs (of the pairs in ``order``)."""
        t, h = x.shape
        k = self.cfg.top_k
        if self.expert_parallel is not None:
            y_sorted = self.expert_parallel.run(self.experts, x[order // k], counts)
        else:
            y_sorted = self.experts(x[order // k], counts)
        # dropped pairs (capacity_factor) contribute zero; dropless fills every slot
        full = order.numel() == t * k
        y_slots = torch.empty_like(y_sorted) if full else y_sorted.new_zeros(t * k, h)
        y_slots[order] = y_sorted  # unique indices: deterministic, unlike index_add_ on CUDA
        return (y_slots.view(t, k, h) * weights.unsqueeze(-1).to(x.dtype)).sum(1)

    def _shared(self, x: Tensor) -> Tensor:
        s = self.shared_expert(x)
        if self.shared_expert_gate is not None:
            s = torch.sigmoid(self.shared_expert_gate(x)) * s
        return s

    def _aux_loss(self, scores: Tensor, counts: Tensor) -> Tensor:
        """Switch/DeepSeek load-balancing loss: sum_i f_i * P_i, equal to 1.0 when balanced.

        f_i = E / (k T) * tokens routed to i, P_i = mean over tokens of the (normalised) score.
        """
        k, e = self.cfg.top_k, self.cfg.num_experts
        probs = scores if self.cfg.score_func == "softmax" else scores / scores.sum(-1, keepdim=True)
        prob_sum, counts = probs.sum(0), counts.float()
        t = scores.new_full((), float(scores.shape[0]))  # no host-to-device copy per layer
        if self.stats_group is not None:
            import torch.distributed as dist
            from torch.distributed.nn.functional import all_reduce

            stats = torch.cat([counts, t[None]])
            dist.all_reduce(stats, group=self.stats_group)
            counts, t = stats[:-1], stats[-1]
            prob_sum = all_reduce(prob_sum, group=self.stats_group)  # gradient flows to every shard
        f = counts * (e / (k * t))
        return self.cfg.aux_loss_coef * (f * prob_sum / t).sum()
