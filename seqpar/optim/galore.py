"""GaLore (Zhao et al., 2024): AdamW whose moments live in a low-rank projection of each weight
matrix's gradient, the projection refreshed from the gradient's SVD every ``update_interval``
steps.

For a matrix gradient G [m, n] and rank r the projector is the top-r left singular vectors U [m, r]
when m < n (the moments are [r, n]), else the top-r right ones V [r, n] (moments [m, r]): always
the smaller side. Each step: R = projection of G, Adam moments and the normalised step on R, then
back to [m, n] times ``scale``, plus decoupled weight decay on the full weight. Parameters of a
group without ``galore`` (norms, biases, embeddings) take plain AdamW steps.

Low-precision weights: when the parameters themselves are bf16 (``train.galore.master_weights:
false``, the GaLore paper's setting: no fp32 copy in memory or in checkpoints) each update is
computed in fp32 and written back by stochastic rounding (seqpar.optim.quant), so updates smaller
than a bf16 step are not lost. With ``master_weights: true`` DeepSpeed hands this optimizer its
fp32 master copies and nothing is rounded here.

Why not the ``galore-torch`` package: its per-parameter state holds a Python projector object, so
an optimizer ``state_dict`` cannot go through seqpar's no-pickle checkpoint codec; here every piece
of state is a tensor (projector, low-rank moments, step), and the refresh schedule follows the
saved step, so a resume that crosses a refresh is bitwise. The SVD runs in fp32 on the gradient's
device (deterministic on CPU; on CUDA torch's default driver, gesvdj with a gesvd fallback).

Sharded state (``shard``, ``train.galore.shard_state``): ZeRO-1 for GaLore. ZeRO stages partition
flat buffers, which would cut matrices apart (GaLore projects whole ones), so this shards by
parameter instead: every rank that holds the same weights owns a share of the parameters (balanced
by state size), keeps their state, runs their step (and their SVDs), and broadcasts their new values;
the gradients are still all-reduced whole (ZeRO-0). A parameter stepped by plain AdamW whose state
is over half an even share (an embedding, an untied head) is split by rows over all the ranks
instead: AdamW is elementwise, so each rank steps its rows. The result is bitwise that of the
replicated optimizer: the same arithmetic runs on one rank instead of all, and its stochastic
rounding is keyed by parameter and step, not by rank (a split parameter's rows take their rows of
the whole parameter's random bits).
"""

from __future__ import annotations

import itertools

import torch
import torch.distributed as dist
from torch import Tensor
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from seqpar.optim.quant import generator, round_to


class GaLoreAdamW(torch.optim.Optimizer):
    """``param_groups`` as for AdamW; a group with ``galore=True`` (2-D parameters only) also takes
    ``rank``, ``update_interval`` and ``scale``. ``seed`` keys the stochastic rounding of bf16
    parameters (the same bits on a resumed run)."""

    moment_dtype = torch.float32
    host_state: tuple[str, ...] = ()  # state kept on the CPU (counters read every step: no device sync)

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, rank: int = 128, update_interval: int = 200, scale: float = 0.25,
                 seed: int = 0):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, galore=False, rank=rank,
                        update_interval=update_interval, scale=scale)
        super().__init__(params, defaults)
        self.seed = seed
        # a parameter's place in the groups: part of its rounding key (stable from run to run)
        self.index = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        self.owner: list[int] | None = None  # shard(): the group rank owning each parameter's state (SPLIT: all)
        self.rows: dict[int, list[tuple[int, int]]] = {}  # split parameters: each rank's rows
        self.shard_rank, self.shard_group = 0, None
        for group in self.param_groups:
            if group["galore"]:
                bad = [tuple(p.shape) for p in group["params"] if p.dim() != 2]
                if bad:
                    raise ValueError(f"GaLore projects matrices; this group has parameters of shapes {bad[:3]}")

    # -- the step ----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if not self.owns(p):
                    continue
                grad = self._grad(p)
                if grad is None:
                    continue
                mine = self._my_rows(p)  # a split parameter: this rank's rows
                if mine is not None:
                    grad = grad[mine[0]:mine[1]]
                grad = grad.float()
                state = self.state[p]
                if "step" not in state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                galore = group["galore"]
                step = int(state["step"])
                shape = self._shape(p)
                left = shape[0] < shape[1] if galore else False  # the smaller side (a shape fact)
                if galore:
                    if self._refresh_due(state, group, step):  # a new subspace from this step's gradient
                        self._refresh(p, state, group, grad, left, step)
                    low = _project(grad, self._projector(p, state, group, left), left)
                else:
                    low = grad
                if "exp_avg" not in state:  # the moments carry over a refresh, as in GaLore
                    state["exp_avg"] = torch.zeros_like(low, dtype=self.moment_dtype)
                    state["exp_avg_sq"] = torch.zeros_like(low, dtype=self.moment_dtype)
                state["step"] += 1
                t = step + 1
                m, v = state["exp_avg"].float(), state["exp_avg_sq"].float()  # fp32 moments: in place
                m.lerp_(low, 1 - beta1)
                v.mul_(beta2).addcmul_(low, low, value=1 - beta2)
                self._keep_moments(p, state, m, v, t)
                denom = (v / (1 - beta2 ** t)).sqrt_().add_(group["eps"])
                update = (m / (1 - beta1 ** t)) / denom
                if galore:
                    update = _project_back(update, self._projector(p, state, group, left), left) * group["scale"]
                new = self._value(p) if mine is None else p[mine[0]:mine[1]].float()  # fp32: in place
                if group["weight_decay"]:
                    new.mul_(1 - group["lr"] * group["weight_decay"])
                new.add_(update, alpha=-group["lr"])
                if mine is None:
                    self._write(p, state, group, new, t)
                elif p.dtype != torch.float32:  # this rank's rows of the whole parameter's random bits
                    p[mine[0]:mine[1]].copy_(round_to(new, p.dtype, self._generator(p, t, "weight"),
                                                      rows=(mine[0], p.shape[0])))
        if self.owner is not None:
            self._share_updates()
        return loss

    # -- sharded state ---------------------------------------------------------------------------------
    def shard(self, group=None) -> None:
        """Owns the state of a share of the parameters among ``group``'s ranks (the ranks holding
        the same weights: DeepSpeed's data x sequence parallel group), before the first step or a
        resume. Owners: largest state first, each to the rank with the least so far (a function of
        the shapes and the group size alone, so every rank computes the same)."""
        pairs = [(p, g) for g in self.param_groups for p in g["params"]]
        self.owner, self.rows = plan_shards([self.state_numel(p, g) for p, g in pairs],
                                            [self.split_rows(p, g) for p, g in pairs], dist.get_world_size(group))
        self.shard_rank, self.shard_group = dist.get_rank(group), group
        # state loaded before (a resume into an optimizer built replicated): keep this rank's share
        for p in list(self.state):
            i = self.index[p]
            if not self.owns_index(i):
                del self.state[p]
            elif i in self.rows:  # split: this rank's rows of the whole moments
                lo, hi = self.rows[i][self.shard_rank]
                for k in _ROW_STATE:
                    if k in self.state[p]:
                        self.state[p][k] = self.state[p][k][lo:hi].clone()

    def owns(self, p: Tensor) -> bool:
        """This rank steps ``p`` (or, split, its rows of it). Unsharded: every parameter, also
        ones the optimizer was not built with (DeepSpeed's fp32 master copies with master_weights)."""
        return self.owner is None or self.owns_index(self.index[p])

    def owns_index(self, i: int) -> bool:
        """By position in the groups, as in ``state_dict()['state']`` keys."""
        return self.owner is None or self.owner[i] in (self.shard_rank, SPLIT)

    def _my_rows(self, p: Tensor) -> tuple[int, int] | None:
        rows = self.rows.get(self.index[p]) if self.owner is not None else None
        return rows[self.shard_rank] if rows is not None else None

    @staticmethod
    def split_rows(p: Tensor, group: dict) -> int | None:
        """Rows ``p`` could be split into (``plan_shards``): a plain AdamW step is elementwise; None
        for a GaLore matrix, a scalar, or a tensor whose rows are not contiguous (broadcast in place)."""
        return None if group.get("galore") or p.dim() == 0 or not p.is_contiguous() else p.shape[0]

    @staticmethod
    def state_numel(p: Tensor, group: dict) -> int:
        """Elements of ``p``'s state (the balance of the shards)."""
        if group.get("galore") and p.dim() == 2:
            return galore_state_bytes(tuple(p.shape), group["rank"]) // 4
        return 2 * p.numel()

    SHARE_BUCKET = 1 << 26  # elements per broadcast copy (256 MiB of fp32): bounds the flat copies

    def _share_updates(self) -> None:
        """Every owner's new values to the other ranks: a parameter of a bucket's size or more
        alone and in place, smaller ones in flat buckets of one dtype (fewer collectives)."""
        params = [p for g in self.param_groups for p in g["params"]]
        world = dist.get_world_size(self.shard_group)
        for i, rows in sorted(self.rows.items()):  # split parameters: each rank's rows, in place
            p = params[i]
            for k, (lo, hi) in enumerate(rows):
                if hi > lo:
                    dist.broadcast(p.data[lo:hi], src=self._global(k), group=self.shard_group)
        for k in range(world):
            src = self._global(k)
            mine = [p for p in params if self.owner[self.index[p]] == k]
            for dtype in sorted({p.dtype for p in mine}, key=str):
                bucket: list[Tensor] = []
                size = 0
                for p in (q for q in mine if q.dtype == dtype):
                    if p.numel() >= self.SHARE_BUCKET and p.is_contiguous():
                        dist.broadcast(p.data, src=src, group=self.shard_group)
                        continue
                    if bucket and size + p.numel() > self.SHARE_BUCKET:
                        self._broadcast(bucket, k, src)
                        bucket, size = [], 0
                    bucket.append(p)
                    size += p.numel()
                if bucket:
                    self._broadcast(bucket, k, src)

    def _global(self, k: int) -> int:
        """Global rank of the shard group's rank ``k`` (broadcast sources are global ranks)."""
        return dist.get_global_rank(self.shard_group, k) if self.shard_group is not None else k

    def _broadcast(self, bucket: list[Tensor], owner: int, src: int) -> None:
        if owner == self.shard_rank:
            flat = _flatten_dense_tensors([p.data for p in bucket])
        else:
            flat = torch.empty(sum(p.numel() for p in bucket), dtype=bucket[0].dtype, device=bucket[0].device)
        dist.broadcast(flat, src=src, group=self.shard_group)
        if owner != self.shard_rank:
            for p, value in zip(bucket, _unflatten_dense_tensors(flat, [p.data for p in bucket])):
                p.data.copy_(value)

    def state_dict(self) -> dict:
        """torch's, plus ``owner`` when sharded: which rank held each parameter's state (a resume
        on the same layout reads its own share only when today's owners are the same)."""
        sd = super().state_dict()
        if self.owner is not None:
            sd["owner"] = torch.tensor(self.owner, dtype=torch.int32)
            for i, rows in self.rows.items():  # a split parameter's entry: which rows it holds
                if i in sd["state"]:
                    lo, hi = rows[self.shard_rank]
                    sd["state"][i] = {**sd["state"][i], "rows": torch.tensor([lo, hi], dtype=torch.int64)}
        return sd

    def same_owners(self, saved: dict) -> bool:
        """Whether ``saved`` (a ``state_dict``) was written by a rank of this sharding, with these owners."""
        own = saved.get("owner")
        return self.owner is not None and own is not None and [int(k) for k in own] == self.owner

    def shard_of(self, trees: list[dict]) -> dict:
        """One state dict for this rank from saved ranks' ``state_dict()``s (sharded: each holds
        its parameters' entries and its rows of split ones; replicated: each holds all): their
        union, this rank's share kept; a split parameter's moments assembled from the saved
        pieces that hold this rank's rows. Tensors read lazily from a checkpoint (``flat``) are
        read here, and of a split parameter's moments only the rows this rank keeps."""
        pieces: dict = {}
        for tree in trees:
            for i, entry in tree["state"].items():
                if self.owns_index(int(i)):
                    pieces.setdefault(i, []).append(entry)
        params = [p for g in self.param_groups for p in g["params"]]
        state: dict = {}
        for i, entries in pieces.items():
            split_now = self.owner is not None and int(i) in self.rows
            whole = [e for e in entries if "rows" not in e]
            if not split_now and whole:  # saved whole, needed whole
                state[i] = {k: _read(v) for k, v in whole[0].items()}
                continue
            total = params[int(i)].shape[0]
            lo, hi = self.rows[int(i)][self.shard_rank] if split_now else (0, total)
            spans = sorted(((0, total, e) if "rows" not in e else (*(int(r) for r in _read(e["rows"])), e)
                            for e in (whole[:1] or entries)), key=lambda s: s[0])
            entry = {}
            for k, v in spans[0][2].items():
                if k == "rows":
                    continue
                if k not in _ROW_STATE:
                    entry[k] = _read(v)
                    continue
                parts = [_read_rows(e[k], max(a, lo) - a, min(b, hi) - a) for a, b, e in spans if min(b, hi) > max(a, lo)]
                if sum(part.shape[0] for part in parts) != hi - lo:
                    raise ValueError(f"optimizer state of parameter {i}: the saved rows do not cover rows {lo}..{hi}")
                entry[k] = torch.cat(parts) if len(parts) > 1 else parts[0]
            if split_now:
                entry["rows"] = torch.tensor([lo, hi], dtype=torch.int64)
            state[i] = entry
        return {"state": state, "param_groups": trees[0]["param_groups"]}

    # -- what a subclass changes (Q-GaLore: quantized projector, weights, moments) -------------------
    def _grad(self, p: Tensor) -> Tensor | None:
        return p.grad

    def _shape(self, p: Tensor) -> tuple[int, ...]:
        return tuple(p.shape)

    def _value(self, p: Tensor) -> Tensor:
        """The parameter's value in fp32 (the parameter itself when it is fp32: updated in place)."""
        return p.float()

    def _refresh_due(self, state: dict, group: dict, step: int) -> bool:
        return step % group["update_interval"] == 0

    def _refresh(self, p: Tensor, state: dict, group: dict, grad: Tensor, left: bool, step: int) -> None:
        state["projector"] = _projector(grad, group["rank"])

    def _projector(self, p: Tensor, state: dict, group: dict, left: bool) -> Tensor:
        return state["projector"]

    def _keep_moments(self, p: Tensor, state: dict, m: Tensor, v: Tensor, t: int) -> None:
        """fp32 moments were updated in place; nothing to store."""

    def _write(self, p: Tensor, state: dict, group: dict, new: Tensor, t: int) -> None:
        """The updated fp32 value into the parameter: bf16 by stochastic rounding."""
        if p.dtype != torch.float32:
            p.copy_(round_to(new, p.dtype, self._generator(p, t, "weight")))

    def _generator(self, p: Tensor, t: int, purpose: str) -> torch.Generator:
        return generator(p.device, self.seed, self.index[p], t, purpose)

    # -- state: dtypes kept exactly ------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but every state tensor keeps its saved dtype (torch casts them all to the
        parameter's dtype: bf16 parameters would round fp32 moments, INT codes, scales) and is a
        copy (torch keeps ``step`` shared with the given dict)."""
        saved = {i: {k: v for k, v in e.items() if k != "rows"} for i, e in state_dict["state"].items()}
        super().load_state_dict({**state_dict, "state": saved})
        ids = itertools.chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = itertools.chain.from_iterable(g["params"] for g in self.param_groups)
        for pid, p in zip(ids, params):
            for key, value in saved.get(pid, {}).items():
                if isinstance(value, Tensor):  # copies: a live state dict's tensors are not shared
                    where = "cpu" if key == "step" or key in self.host_state else p.device
                    self.state[p][key] = value.to(device=where, copy=True)


def _read(v):
    """A state value; one read lazily from a checkpoint (it has ``read``) is read whole."""
    return v if isinstance(v, Tensor) or not hasattr(v, "read") else v.read()


def _read_rows(v, a: int, b: int) -> Tensor:
    """Rows ``a..b`` of a state tensor; of a lazily read one, only those rows are read."""
    return v[a:b] if isinstance(v, Tensor) else v.read_rows(a, b)


SPLIT = -1  # owner of a parameter split by rows over every rank
_ROW_STATE = ("exp_avg", "exp_avg_sq")  # a split parameter's state cut by rows (its step is whole)


def plan_shards(sizes: list[int], rows: list[int | None],
                world: int) -> tuple[list[int], dict[int, list[tuple[int, int]]]]:
    """Owners of each parameter's state among ``world`` ranks, and the row ranges of split ones.
    ``rows[i]``: the row count of a parameter whose step is elementwise (plain AdamW), None for a
    GaLore matrix (whole only). One of the former whose state is over half an even share is split
    (``SPLIT``) into ``world`` row ranges; the rest are balanced whole (``balance_owners``)."""
    fair = sum(sizes) / world
    split = {i for i, n in enumerate(sizes) if rows[i] is not None and rows[i] >= world and 2 * n > fair}
    owner = balance_owners([0 if i in split else n for i, n in enumerate(sizes)], world)
    ranges = {}
    for i in sorted(split):
        owner[i] = SPLIT
        ranges[i] = [(k * rows[i] // world, (k + 1) * rows[i] // world) for k in range(world)]
    return owner, ranges


def balance_owners(sizes: list[int], world: int) -> list[int]:
    """An owner in ``range(world)`` for each size: largest first, each to the least loaded (ties:
    lowest index, lowest rank). Deterministic: every rank computes the same."""
    owner, load = [0] * len(sizes), [0] * world
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        k = min(range(world), key=lambda k: (load[k], k))
        owner[i], load[k] = k, load[k] + sizes[i]
    return owner


def _projector(grad: Tensor, rank: int) -> Tensor:
    """For a gradient [m, n]: U[:, :r] [m, r] if m < n (left side), else V[:r] [r, n]."""
    m, n = grad.shape
    r = min(rank, m, n)
    u, _, vh = torch.linalg.svd(grad, full_matrices=False)
    return u[:, :r].contiguous() if m < n else vh[:r].contiguous()


def _project(grad: Tensor, proj: Tensor, left: bool) -> Tensor:
    return proj.t() @ grad if left else grad @ proj.t()


def _project_back(low: Tensor, proj: Tensor, left: bool) -> Tensor:
    return proj @ low if left else low @ proj


def galore_state_bytes(shape: tuple[int, int], rank: int, bytes_per: int = 4) -> int:
    """Optimizer state of one GaLore matrix: projector + two low-rank moments (+ step)."""
    m, n = shape
    r = min(rank, m, n)
    proj = m * r if m < n else r * n
    moments = 2 * (r * n if m < n else m * r)
    return (proj + moments) * bytes_per + 4


def galore_groups(model: torch.nn.Module, train) -> list[dict]:
    """The targeted projections of every decoder layer in a GaLore group (with weight decay), other
    matrices AdamW with decay, vectors without."""
    cfg = train.galore
    low, decay, no_decay = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if is_galore_target(name, p, cfg.targets):
            low.append(p)
        else:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": low, "weight_decay": train.weight_decay, "galore": True, "rank": cfg.rank,
         "update_interval": cfg.update_interval, "scale": cfg.scale},
        {"params": decay, "weight_decay": train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def is_galore_target(name: str, p: Tensor, targets) -> bool:
    """A decoder layer's projection matrix named in ``train.galore.targets``."""
    return p.dim() == 2 and ".layers." in name and name.endswith(tuple(f".{t}.weight" for t in targets))


def build_galore(model: torch.nn.Module, train) -> GaLoreAdamW:
    """The optimizer for ``train.optimizer: galore``."""
    return GaLoreAdamW(galore_groups(model, train), lr=train.lr, betas=tuple(train.betas), eps=train.eps,
                       seed=train.seed)


__all__ = ["SPLIT", "GaLoreAdamW", "balance_owners", "plan_shards", "build_galore", "galore_groups", "galore_state_bytes", "is_galore_target"]
