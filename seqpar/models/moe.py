"""Mixture-of-experts feed-forward: top-k router, dropless dispatch, shared expert, expert bias.

Routing state lives in the router: ``expert_bias`` (DeepSeek-V3 aux-loss-free balancing; affects
which experts are *selected*, never the gate weights) and ``tokens_per_expert`` (counts of the
current optimizer step's micro-batches). Counts are returned by ``forward`` and accumulated by the
model outside any activation-checkpointed region, so recomputation never double counts.
``expert_bias`` is a persistent buffer (it changes what the model computes); the counts are not
model weights, so the checkpoint code reaches both through ``Transformer.router_state_dict``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqpar.config import MoEConfig


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


class Experts(nn.Module):
    """E SwiGLU experts stored as stacked weights (one parameter each: ZeRO-friendly)."""

    def __init__(self, hidden: int, cfg: MoEConfig):
        super().__init__()
        e, i = cfg.num_experts, cfg.intermediate_size
        self.gate_proj = nn.Parameter(torch.empty(e, i, hidden))
        self.up_proj = nn.Parameter(torch.empty(e, i, hidden))
        self.down_proj = nn.Parameter(torch.empty(e, hidden, i))

    def forward(self, x_sorted: Tensor, counts: list[int]) -> Tensor:
        """Run each expert on its contiguous slice of expert-sorted tokens."""
        outs, lo = [], 0
        for e, n in enumerate(counts):
            if n:
                xe = x_sorted[lo : lo + n]
                h = F.silu(xe @ self.gate_proj[e].t()) * (xe @ self.up_proj[e].t())
                outs.append(h @ self.down_proj[e].t())
                lo += n
        return torch.cat(outs) if outs else x_sorted[:0]


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

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
        t, h = x.shape
        k, e = self.cfg.top_k, self.cfg.num_experts
        scores, idx, weights = self.gate(x)
        flat = idx.reshape(-1)
        order = flat.argsort(stable=True)  # (token, slot) pairs grouped by expert
        counts = torch.bincount(flat, minlength=e)
        y_sorted = self.experts(x[order // k], counts.tolist())
        y_slots = torch.empty_like(y_sorted)
        y_slots[order] = y_sorted  # unique indices: deterministic, unlike index_add_ on CUDA
        y = (y_slots.view(t, k, h) * weights.unsqueeze(-1).to(x.dtype)).sum(1)
        if self.shared_expert is not None:
            s = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                s = torch.sigmoid(self.shared_expert_gate(x)) * s
            y = y + s
        aux = self._aux_loss(scores, counts) if self.cfg.aux_loss_coef > 0 else scores.new_zeros(())
        slots = torch.arange(1, flat.numel() + 1, device=flat.device)
        digest = ((flat.long() + 1) * slots).sum() % (2**61 - 1)
        return y, aux, (counts.detach().float(), digest.detach())

    def _aux_loss(self, scores: Tensor, counts: Tensor) -> Tensor:
        """Switch/DeepSeek load-balancing loss: sum_i f_i * P_i, equal to 1.0 when balanced.

        f_i = E / (k T) * tokens routed to i, P_i = mean over tokens of the (normalised) score.
        """
        k, e = self.cfg.top_k, self.cfg.num_experts
        probs = scores if self.cfg.score_func == "softmax" else scores / scores.sum(-1, keepdim=True)
        prob_sum, counts = probs.sum(0), counts.float()
        t = torch.tensor(float(scores.shape[0]), device=scores.device)
        if self.stats_group is not None:
            import torch.distributed as dist
            from torch.distributed.nn.functional import all_reduce

            stats = torch.cat([counts, t[None]])
            dist.all_reduce(stats, group=self.stats_group)
            counts, t = stats[:-1], stats[-1]
            prob_sum = all_reduce(prob_sum, group=self.stats_group)  # gradient flows to every shard
        f = counts * (e / (k * t))
        return self.cfg.aux_loss_coef * (f * prob_sum / t).sum()
