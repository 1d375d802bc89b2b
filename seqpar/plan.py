"""Memory planner: per-GPU peak memory of a training step, predicted from the config alone.

    python -m seqpar.plan --config X.yaml [--world N] [--gpu-memory GIB] [--section.key value ...]

``predict(cfg, world_size)`` adds up, with formulas (no tracing, no tensors):

* model state per rank, as DeepSpeed 0.19.8 lays it out for the ZeRO stage, precision and
  ``memory.offload_*`` switches: parameters, gradients, fp32 master + AdamW moments, the
  gradient reduce bucket and (ZeRO-3) the gathered parameters;
* activations, by walking one micro-batch's forward and backward as a *tape* of the tensors each
  op of ``seqpar.models`` saves for the backward and of the temporaries its backward allocates
  (per-token byte formulas, in autograd's order), under the ``memory`` policy of every layer and
  the rank's share of the tokens under sequence parallelism; the peak is the largest total the
  tape reaches (usually the backward of the last layer, or the loss tile);
* the optimizer step (no activations, the step's temporaries), and a fixed ``reserve`` for what
  the allocator does not see (CUDA context, NCCL and cuBLAS workspaces, fragmentation).

Validated against the meta device's measured peaks of the real model (tests/test_plan.py) and
written up in docs/memory-planner.md, with its assumptions.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from seqpar.config import Config, ConfigError, is_moe_layer, load_config, validate_config

GiB = 1024**3
# CUDA context (~0.5 GiB), NCCL communicators and cuBLAS workspaces (a few hundred MiB) and the
# caching allocator's rounding and fragmentation: none of it is in a tensor, all of it is on the GPU.
DEFAULT_RESERVE_BYTES = int(1.5 * GiB)

# DeepSpeed 0.19.8 defaults (deepspeed/runtime/zero/config.py; tests/test_plan.py checks them
# against the installed DeepSpeed). Read here so that the planner never imports DeepSpeed.
DS_REDUCE_BUCKET_SIZE = 500_000_000  # elements
DS_ALLGATHER_BUCKET_SIZE = 500_000_000  # elements; stage 1/2 gather into the flat buffer in place
DS_PREFETCH_BUCKET_SIZE = 50_000_000  # ZeRO-3 parameters fetched ahead of use
DS_PARAM_PERSISTENCE_THRESHOLD = 100_000  # ZeRO-3 keeps smaller parameters whole on every rank
DS_SUB_GROUP_SIZE = 1_000_000_000  # ZeRO-3 optimizer step granularity
DS_ALLREDUCE_BUCKET_SIZE = 500_000_000  # stage 0 all-reduce (engine.py MEMORY_OPT_ALLREDUCE_SIZE)

# Breakdown keys, in the order ``describe`` shows them.
COMPONENTS = ("params", "grads", "optimizer", "buffers", "activations", "working", "loss", "reserve")
_ACT, _WORK, _LOSS = "activations", "working", "loss"


@dataclass
class MemoryPlan:
    """A predicted per-GPU peak and what it is made of (bytes)."""

    peak_bytes: int
    breakdown: dict[str, int]  # COMPONENTS -> bytes at the peak; sums to peak_bytes
    phase: str = ""  # where in the step the peak is
    tokens_per_rank: int = 0  # tokens of one micro-batch on one rank
    settings: str = ""  # the memory policy, in words
    cfg: Config | None = field(default=None, repr=False, compare=False)
    world_size: int = 1

    def describe(self) -> str:
        """One line for the trainer's start-up summary."""
        parts = ", ".join(f"{k} {_gib(self.breakdown.get(k, 0))}" for k in COMPONENTS
                          if self.breakdown.get(k, 0) or k in ("params", "activations", "reserve"))
        return f"predicted peak {self.peak_bytes / GiB:.1f} GiB/GPU ({parts})"


# ----------------------------------------------------------------------------------------------
# parameters and model state
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParamCount:
    total: int
    largest_module: int  # the most parameters one module gathers at once under ZeRO-3 (not persistent)
    largest_param: int  # the largest single parameter tensor, routed experts' excluded
    persistent: int  # in tensors small enough that ZeRO-3 keeps them whole on every rank
    experts: int = 0  # in routed experts (split over ranks by expert parallelism)
    expert_tensor: int = 0  # one layer's stacked gate (or up, or down) weight of all experts


def count_params(cfg: Config, persistence: int = DS_PARAM_PERSISTENCE_THRESHOLD) -> ParamCount:
    """Parameter counts of ``seqpar.models`` for ``cfg.model`` (equal to ``count_parameters``);
    ``persistence``: ZeRO-3's threshold for keeping a parameter whole."""
    m = cfg.model
    h, d, v = m.hidden_size, m.dim_per_head, m.vocab_size
    q, kv = m.num_attention_heads * d, m.kv_heads * d
    bias = m.attention_bias
    # modules, each a list of its parameter tensors' sizes (ZeRO-3 gathers a module at a time)
    mods: list[list[int]] = [[v * h], [h]] + ([] if m.tie_word_embeddings else [[v * h]])
    for i in range(m.num_hidden_layers):
        mods += [[h], [h], [h * q] + ([q] if bias else []), [h * kv] + ([kv] if bias else []),
                 [h * kv] + ([kv] if bias else []), [q * h]] + ([[d], [d]] if m.qk_norm else [])
        if m.moe is not None and is_moe_layer(m, i):
            e = m.moe
            mods += [[e.num_experts * h], [e.num_experts * e.intermediate_size * h] * 3]
            if e.shared_expert_intermediate_size:
                mods += [[h * e.shared_expert_intermediate_size]] * 3
            if e.shared_expert_gate:
                mods.append([h])
        else:
            mods += [[h * m.intermediate_size]] * 3
    tensors = [n for mod in mods for n in mod]
    persistent = sum(n for n in tensors if n <= persistence)
    fetched = [sum(n for n in mod if n > persistence) for mod in mods]
    expert = m.moe.num_experts * m.moe.intermediate_size * h if m.moe is not None else 0  # one stacked weight
    layers = sum(is_moe_layer(m, i) for i in range(m.num_hidden_layers)) if m.moe is not None else 0
    dense = [n for n in tensors if n != expert] or [0]
    return ParamCount(sum(tensors), max(fetched), max(dense), persistent, 3 * layers * expert, expert)


def _dtype_bytes(name: Any, default: int) -> int:
    s = str(name).lower().removeprefix("torch.")
    if s in ("fp32", "float32", "float"):
        return 4
    if s in ("bf16", "bfloat16", "fp16", "float16", "half"):
        return 2
    return default


def _small_state(cfg: Config, p: int, w: int, flat: int, largest: int,
                 n: int) -> tuple[dict[str, int], dict[str, int], str]:
    """GaLore / Q-GaLore at ZeRO-0: the weights and the optimizer state are what the checkpoint
    holds (seqpar.optim.sizes; with master_weights DeepSpeed's fp32 copy too), GaLore's state
    sharded by parameter over the ``n`` ranks (train.galore.shard_state: the most loaded rank's
    share, plus a broadcast bucket at the step); the step works on one parameter at a time: its
    gradient in fp32 and about three fp32 temporaries of its size (the largest parameter counted;
    the SVD of a refresh is smaller than that)."""
    from seqpar.optim.galore import GaLoreAdamW
    from seqpar.optim.sizes import checkpoint_bytes, galore_largest_share, galore_sharded

    sizes = checkpoint_bytes(cfg)  # resident = checkpointed here (Q-GaLore: INT8 codes and scales)
    sharded = galore_sharded(cfg, n)
    opt = galore_largest_share(cfg, n) if sharded else sizes["optimizer"]
    run = {"params": sizes["weights"], "grads": w * p, "optimizer": opt, "buffers": 0}
    name = {"galore": "seqpar GaLore-AdamW", "qgalore": "seqpar Q-GaLore-AdamW"}[cfg.train.optimizer]
    weights = ("fp32" if w == 4 else "bf16 weights, fp32 master (DeepSpeed FP16_UnfusedOptimizer)"
               if not cfg.low_precision_weights else "bf16 weights, no master")
    share = w * min(p, GaLoreAdamW.SHARE_BUCKET) if sharded else 0  # the owners' broadcasts, one bucket at a time
    return (run, {**run, "buffers": max(flat, 16 * largest, share)},
            f"{name}, {weights}" + (f", state sharded over {n} ranks" if sharded else ""))


def lora_counts(cfg: Config) -> tuple[int, int, int]:
    """(trainable, frozen, frozen NF4-quantized) parameter counts per rank with ``model.lora`` (a
    meta model with the adapters applied: exact for any shape; routed experts split by EP)."""
    import torch

    from seqpar.models.lora import apply_lora
    from seqpar.models.transformer import Transformer

    lora = cfg.model.lora
    with torch.device("meta"):
        model = Transformer(cfg.model.model_copy(update={"lora": None}))
        apply_lora(model, lora.model_copy(update={"quantize_base": None}))  # NF4 needs bitsandbytes: counted below
    ep = cfg.parallel.expert_degree  # a rank holds 1/ep of the routed experts (and of their adapters)

    def held(name: str, q) -> int:
        return q.numel() // ep if ".mlp.experts." in name else q.numel()

    trainable = sum(held(n, q) for n, q in model.named_parameters() if q.requires_grad)
    frozen = sum(held(n, q) for n, q in model.named_parameters() if not q.requires_grad)
    nf4 = 0
    if lora.quantize_base == "nf4":  # the targeted projections' base weights (routed experts stay bf16)
        ends = tuple(f".{target}.weight" for target in lora.targets)
        nf4 = sum(q.numel() for name, q in model.named_parameters()
                  if not q.requires_grad and ".layers." in name and name.endswith(ends))
    return trainable, frozen, nf4


def _lora_state(cfg: Config, n: int, w: int, g: int, stage: int, pc: ParamCount, bucket_elems: int,
                overlap: bool) -> tuple[dict[str, int], dict[str, int], str]:
    """LoRA / QLoRA: the frozen base has no gradient and no optimizer state (DeepSpeed leaves
    parameters without ``requires_grad`` out of its optimizer), the adapters and ``trainable``
    modules have both; ZeRO partitions what it holds as for full training (ZeRO-3: the base too).
    NF4 weights take half a byte plus an fp32 absmax per 64."""
    t, frozen, nf4 = lora_counts(cfg)
    base = w * (frozen - nf4) + nf4 // 2 + 4 * (nf4 // 64)
    off_opt = cfg.memory.offload_optimizer and stage >= 1
    opt = 0 if off_opt else (8 if stage == 0 and w == 4 else 12) * t // (n if stage >= 1 else 1)
    grads = g * t // (n if stage >= 2 else 1)
    name = ("QLoRA (NF4 base)" if nf4 else "LoRA") + f", {t:,} trainable"
    if stage == 0:
        run = {"params": base + w * t, "grads": w * t, "optimizer": opt, "buffers": 0}
        return run, {**run, "buffers": 4 * t}, name + ", ZeRO-0"
    bucket = min(bucket_elems, t) * g * (2 if overlap and stage < 3 else 1)
    if stage in (1, 2):
        run = {"params": base + w * t, "grads": grads, "optimizer": opt, "buffers": bucket}
        return run, {**run, "buffers": bucket + (w + 4) * t // n}, name + f", ZeRO-{stage}"
    gathered = w * pc.largest_module + w * pc.persistent
    run = {"params": (base + w * t) // n, "grads": grads, "optimizer": opt, "buffers": gathered + bucket}
    return run, {**run, "buffers": w * pc.persistent + (w + 4) * t // n}, name + ", ZeRO-3"


def model_state(cfg: Config, world_size: int) -> tuple[dict[str, int], dict[str, int], str]:
    """Bytes per rank of parameters, gradients, optimizer state and DeepSpeed buffers:
    (while the forward and backward run, at the optimizer step, what the step runs as).

    ZeRO partitions over all ``world_size`` ranks (DeepSpeed sees every rank as data-parallel).
    Gradients are counted whole from the start of the backward: inside an accumulation window
    they are (a conservative bound for the window's first micro-batch)."""
    w = 2 if cfg.train.precision == "bf16" else 4
    zo = cfg.deepspeed.get("zero_optimization", {}) or {}
    keep = zo.get("stage3_param_persistence_threshold", zo.get("param_persistence_threshold"))
    pc, n = count_params(cfg, int(float(keep)) if keep is not None else DS_PARAM_PERSISTENCE_THRESHOLD), world_size
    p = pc.total
    dt = cfg.deepspeed.get("data_types", {}) or {}
    g = _dtype_bytes(dt.get("grad_accum_dtype"), w) if isinstance(dt, dict) else w  # gradient dtype
    stage, mem = cfg.parallel.zero_stage, cfg.memory
    off_opt = mem.offload_optimizer and stage >= 1
    off_par = mem.offload_params and stage == 3
    overlap = bool(zo.get("overlap_comm", stage == 3))
    contiguous = bool(zo.get("contiguous_gradients", True))
    reduce_bucket = int(float(zo.get("reduce_bucket_size", DS_REDUCE_BUCKET_SIZE)))
    opt = 0 if off_opt else 12 * p // n  # fp32 master partition + exp_avg + exp_avg_sq
    run: dict[str, int]
    step: dict[str, int]
    if getattr(cfg.model, "lora", None) is not None:
        return _lora_state(cfg, n, w, g, stage, pc, bucket_elems=reduce_bucket, overlap=overlap)
    if stage == 0:
        # at the window's end the engine all-reduces the gradients through flat copies of up to
        # 5e8 elements (MEMORY_OPT_ALLREDUCE_SIZE); the step itself then runs
        flat = w * min(p, DS_ALLREDUCE_BUCKET_SIZE)
        if cfg.train.optimizer in ("galore", "qgalore"):
            return _small_state(cfg, p, w, flat, pc.largest_param, n)
        if w == 4:  # plain torch AdamW: the weights are the master copy; fused kernel, no temporaries
            run = {"params": 4 * p, "grads": 4 * p, "optimizer": 8 * p, "buffers": 0}
            return run, {**run, "buffers": flat}, "torch AdamW (fused on CUDA), fp32"
        # FP16_UnfusedOptimizer: fp32 master + moments; every gradient cast to fp32 for the step
        run = {"params": 2 * p, "grads": 2 * p, "optimizer": 12 * p, "buffers": 0}
        return run, {**run, "buffers": max(flat, 4 * p)}, "DeepSpeed FP16_UnfusedOptimizer (bf16 weights, fp32 master)"
    # the gradient reduce bucket (ZeRO-1/2: two with overlap_comm, allocated at the backward's
    # first gradient; ZeRO-3: one, allocated at start-up)
    bucket = reduce_bucket * g * (2 if overlap and stage < 3 else 1)
    if stage in (1, 2):
        # expert parallelism: a rank holds 1/ep of the routed experts, whose gradients and optimizer
        # state ZeRO partitions over the ep-fold smaller expert-data-parallel group: the same 1/N
        ep = cfg.parallel.expert_degree
        local = p - pc.experts + pc.experts // ep
        bf16_opt = stage == 1 and w == 2 and g == 4 and not off_opt  # BF16_Optimizer: fp32 grads, no bucket
        if stage == 1:
            grads = local * g  # each rank accumulates whole local gradients until the window ends
        else:
            grads = 0 if off_opt else p * g // n  # the reduced partition (on the CPU when offloaded)
        buffers = 0 if bf16_opt or not contiguous else bucket
        if off_opt:  # staging buffer for the largest gradient on its way to the CPU
            buffers += w * max(pc.largest_param, pc.expert_tensor // ep)
        run = {"params": w * local, "grads": grads, "optimizer": opt, "buffers": buffers}
        # the step: this rank's gradient partition (ZeRO-1: gathered from the whole gradients first)
        # flattened and cast to fp32; with the optimizer offloaded all of that is on the CPU
        step_tmp = 0 if off_opt else (w + 4) * p // n + (w * p // n if stage == 1 else 0)
        name = "BF16_Optimizer" if bf16_opt else f"DeepSpeed ZeRO-{stage}"
        return run, {**run, "buffers": run["buffers"] + step_tmp}, name + (" + CPU optimizer" if off_opt else "")
    # ZeRO-3: partitions, plus whole copies of the parameters in use (gathered module by module,
    # the next ones prefetched) and of the small persistent ones
    prefetch = int(float(zo.get("stage3_prefetch_bucket_size", zo.get("prefetch_bucket_size", DS_PREFETCH_BUCKET_SIZE))))
    gathered = w * (pc.largest_module + min(prefetch, p - pc.persistent)) + w * pc.persistent
    params = 0 if off_par else w * p // n
    grads = 0 if off_opt else g * p // n
    run = {"params": params, "grads": grads, "optimizer": opt, "buffers": gathered + (bucket if contiguous else 0)}
    sub_group = int(float(zo.get("sub_group_size", DS_SUB_GROUP_SIZE)))
    step_tmp = 0 if off_opt else (w + 4) * min(p // n, sub_group)  # a sub-group's gradients, flat and fp32
    step = {**run, "buffers": w * pc.persistent + step_tmp}  # nothing gathered during the step
    return run, step, "DeepSpeed ZeRO-3" + (" + CPU optimizer" if off_opt else "") + (" + CPU params" if off_par else "")


# ----------------------------------------------------------------------------------------------
# the activation tape
# ----------------------------------------------------------------------------------------------
class _Tape:
    """Bytes alive on the rank, tensor by tensor (named, reference-counted: a tensor saved by
    several ops is counted once), with the peak and what it was made of."""

    def __init__(self, base: int):
        self.base = base
        self.live: dict[str, list] = {}  # name -> [category, bytes, references]
        self.now: Counter[str] = Counter()
        self.total = base
        self.cat = _ACT  # category of what ``hold`` adds (forward: activations; backward: working)
        self.where = ""
        self.peak, self.peak_where, self.peak_parts = base, "start", {}

    def _check(self, extra: int = 0, cat: str = _WORK) -> None:
        if self.total + extra > self.peak:
            self.peak, self.peak_where = self.total + extra, self.where
            self.peak_parts = dict(self.now)
            if extra:
                self.peak_parts[cat] = self.peak_parts.get(cat, 0) + extra

    def hold(self, name: str, nbytes: float, cat: str | None = None) -> None:
        """A tensor is created, or one more op keeps ``name``."""
        e = self.live.get(name)
        if e is not None:
            e[2] += 1
            return
        nb = int(nbytes)
        c = cat or self.cat
        self.live[name] = [c, nb, 1]
        self.now[c] += nb
        self.total += nb
        self._check()

    def drop(self, name: str, all_refs: bool = False) -> None:
        e = self.live.get(name)
        if e is None:
            return
        e[2] = 0 if all_refs else e[2] - 1
        if e[2] <= 0:
            del self.live[name]
            self.now[e[0]] -= e[1]
            self.total -= e[1]

    def spike(self, nbytes: float, cat: str | None = None) -> None:
        """Temporaries that live for the duration of one op."""
        self._check(int(nbytes), cat or (_LOSS if self.cat == _LOSS else _WORK))

    def rename(self, old: str, new: str) -> None:
        """A gradient that becomes the accumulated gradient of another tensor (no copy)."""
        if new in self.live:  # accumulated in place into the existing buffer
            self.drop(old, all_refs=True)
        else:
            self.live[new] = self.live.pop(old)


@dataclass(frozen=True)
class _Layout:
    """What one rank computes: tokens, heads after Ulysses, and the memory policy per layer."""

    tokens: int  # local tokens of a micro-batch
    ulysses: int
    ring: int
    w: int  # compute dtype bytes
    scratch: bool  # count kernel workspaces a GPU allocates inside ops (the meta device has none)


class _Sim:
    """Walks one micro-batch of ``seqpar.models.Transformer`` on the tape. Each method mirrors
    one piece of the model code: what its forward saves, and its backward in autograd's order."""

    def __init__(self, cfg: Config, lay: _Layout, base: int):
        m = cfg.model
        self.cfg, self.m, self.lay = cfg, m, lay
        self.t = _Tape(base)
        self.w, self.n = lay.w, lay.tokens
        self.h, self.d, self.v = m.hidden_size, m.dim_per_head, m.vocab_size
        self.nh, self.nkv = m.num_attention_heads, m.kv_heads
        self.q, self.kv = self.nh * self.d, self.nkv * self.d
        u = lay.ulysses
        # kv heads a rank's kernel sees after the all-to-all (repeated up to the degree when fewer)
        self.kv_kernel = (max(self.nkv, u) if u > 1 else self.nkv) * self.d
        mem = cfg.memory
        self.tile = (mem.mlp_tile_tokens or m.hidden_size) if mem.tiled_mlp else 0
        self.recompute_experts = mem.tiled_mlp
        L = m.num_hidden_layers
        policy = mem.activation_checkpointing
        self.ckpt = [policy != "none" and i % mem.checkpoint_every == 0 for i in range(L)]
        last = max((i for i, c in enumerate(self.ckpt) if c), default=-1)
        self.offloaded = [c and mem.offload_activations and i != last for i, c in enumerate(self.ckpt)]
        self.policy = policy
        self.ep = cfg.parallel.expert_degree
        self.recomputing = False  # inside a checkpoint's recomputation (it stops early)
        self.inner = False  # ... of the routed experts' own checkpoint
        self.moe = [m.moe is not None and is_moe_layer(m, i) for i in range(L)]
        # LoRA: frozen linears keep no input for a weight gradient; adapters keep theirs and [n, r]
        lora = getattr(m, "lora", None)
        self.lora = lora
        trained = set(lora.trainable) if lora is not None else set()
        self.norms_train = lora is None or "norms" in trained
        self.embed_train = lora is None or "embed_tokens" in trained
        self.head_train = lora is None or ("embed_tokens" if m.tie_word_embeddings else "lm_head") in trained
        # MoE under LoRA: the router is frozen (its fp32 input is not kept, no weight gradient); the
        # routed experts are frozen (keep neither their tokens nor their products) or adapted
        # (x A^T B^T beside each projection: the tokens, the products and three [tokens, r] middles)
        self.router_train = lora is None
        self.expert_rank = 0 if lora is None or not lora.experts else lora.rank
        self.experts_frozen = lora is not None and not lora.experts

    # -- pieces ------------------------------------------------------------------------------------
    def norm_fwd(self, p: str, x: str, n: int, width: int, rows: int = 1) -> None:
        """RMSNorm (``models/transformer._RMSNormFn``) saves its input (the tensor itself) and
        rsqrt per row; fp32 temporaries while it computes; its output is saved by its consumers."""
        t, w, a = self.t, self.w, width * n
        t.hold(x, w * a)
        t.hold(f"{p}.r", 4 * rows * n)
        t.spike(8 * a if w != 4 else 4 * a)  # x in fp32 and its square (fp32: the square only)

    def norm_bwd(self, p: str, x: str, gy: str, n: int, width: int) -> str:
        """Returns the gradient of the input (a new tensor): the normalised value recomputed in
        fp32, the weight's gradient, the output gradient times the weight in fp32, row dot
        products, in place from there."""
        t, w, a = self.t, self.w, width * n
        t.hold(f"{p}.xn", 4 * a)
        if self.norms_train:
            t.spike(2 * w * a if w != 4 else w * a)  # xn in the compute dtype, times gy: the weight's gradient
        t.hold(f"{p}.g", 4 * a)
        if w != 4:
            t.spike(w * a)  # gy * weight before its fp32 copy
        t.spike(4 * a)  # g * xn, for the row means
        t.drop(f"{p}.xn")
        t.drop(gy)
        t.drop(x)
        t.drop(f"{p}.r")
        if w == 4:
            return f"{p}.g"
        t.hold(f"{p}.gx", w * a)
        t.drop(f"{p}.g")
        return f"{p}.gx"

    def adapted(self, kind: str) -> bool:
        return self.lora is not None and kind in self.lora.targets

    def inputs_fwd(self, p: str, x: str, kinds: tuple[str, ...], width: int, n: int, counted: bool) -> None:
        """What the linears ``kinds`` (all reading ``x``, ``width`` wide) keep of it: full
        training, the input itself (one reference each; ``counted``: its bytes belong to an owner
        already); LoRA, nothing for a frozen linear, and for an adapted one its input (or, with
        dropout, its dropped copy and the mask) and the adapter's [n, r] middle."""
        t, w = self.t, self.w
        first = not counted
        for kind in kinds:
            if self.lora is None or (self.adapted(kind) and not self.lora.dropout):
                t.hold(x, w * width * n if first else 0)
                first = False
            if self.adapted(kind):
                if self.lora.dropout:
                    t.hold(f"{p}.{kind}.drop", w * width * n)
                    # CUDA's fused dropout keeps a bool mask; the CPU / meta path a mask in the input's dtype
                    t.hold(f"{p}.{kind}.mask", (1 if self.lay.scratch else w) * width * n)
                t.hold(f"{p}.{kind}.mid", w * self.lora.rank * n)
        if first and not counted:
            t.spike(w * width * n)  # made and consumed, kept by none

    def linear_bwd(self, x: str, gout: str | None, gin: str, fan_in: int, fan_out: int, n: int,
                   kind: str = "", p: str = "") -> None:
        """Gradient of the input (accumulated into ``gin``) and of the weight (handed to the
        optimizer's hook, then freed); the saved input is released. LoRA: no weight gradient for
        the frozen base; an adapter's [n, r] and input-gradient terms (``kind`` in ``p``)."""
        t, w = self.t, self.w
        if gin in t.live:
            t.spike(w * fan_in * n)  # then added into the existing gradient
        else:
            t.hold(gin, w * fan_in * n)
        if self.lora is None:
            t.spike(w * fan_in * fan_out)
            t.drop(x)
        elif self.adapted(kind):
            t.spike(w * self.lora.rank * n + w * fan_in * n)  # the middle's gradient, then the input's term
            t.drop(f"{p}.{kind}.mid")
            if self.lora.dropout:
                t.drop(f"{p}.{kind}.drop")
                t.drop(f"{p}.{kind}.mask")
            else:
                t.drop(x)
        if gout is not None:
            t.drop(gout)

    def mlp_fwd(self, p: str, x: str, n: int, inter: int) -> None:
        """SwiGLU: silu saves gate, the product saves silu(gate) and up, down_proj its input."""
        t, w = self.t, self.w
        # gate_proj and up_proj save the input (already counted by its owner)
        self.inputs_fwd(p, x, ("gate_proj", "up_proj"), self.h, n, counted=True)
        for k in ("g", "s", "u"):
            t.hold(f"{p}.{k}", w * inter * n)
        self.inputs_fwd(p, f"{p}.p", ("down_proj",), inter, n, counted=False)

    def mlp_bwd(self, p: str, x: str, gout: str, gx: str, n: int, inter: int, drop_gout: bool) -> None:
        t, w, h = self.t, self.w, self.h
        self.linear_bwd(f"{p}.p", None, f"{p}.gp", inter, h, n, "down_proj", p)
        if drop_gout:
            t.drop(gout)
        t.hold(f"{p}.gs", w * inter * n)
        t.hold(f"{p}.gu", w * inter * n)
        for k in ("gp", "s", "u"):
            t.drop(f"{p}.{k}")
        t.hold(f"{p}.gg", w * inter * n)
        t.drop(f"{p}.gs")
        t.drop(f"{p}.g")
        self.linear_bwd(x, f"{p}.gg", gx, h, inter, n, "gate_proj", p)
        self.linear_bwd(x, f"{p}.gu", gx, h, inter, n, "up_proj", p)

    def attn_fwd(self, p: str, x: str, n: int) -> None:
        """Norm, q/k/v projections (saving the norm's output), qk-norm, RoPE (saves only cos/sin),
        the kernel (q, k, v, out, lse) and o_proj (its input)."""
        u = self.lay.ulysses
        self.norm_fwd(f"{p}.n1", x, n, self.h)
        self.inputs_fwd(p, f"{p}.y1", ("q_proj", "k_proj", "v_proj"), self.h, n, counted=False)
        self.qk_fwd(p, n)
        self.kernel_fwd(p, n)
        if u > 1:
            self.inputs_fwd(p, f"{p}.ol", ("o_proj",), self.q, n, counted=False)
        else:  # the kernel keeps o: a second reference
            self.inputs_fwd(p, f"{p}.o", ("o_proj",), self.q, n, counted=True)

    def qk_fwd(self, p: str, n: int) -> None:
        if not self.m.qk_norm:
            return
        for s, width, heads in (("q", self.q, self.nh), ("k", self.kv, self.nkv)):
            # the projection's output is the norm's input; RoPE after it saves nothing
            self.t.hold(f"{p}.{s}pre", self.w * width * n)
            self.norm_fwd(f"{p}.{s}n", f"{p}.{s}pre", n, width, heads)
            self.t.drop(f"{p}.{s}pre")

    def kernel_fwd(self, p: str, n: int) -> None:
        t, w = self.t, self.w
        if self.lay.ring > 1:  # fp32 output and LSE accumulators, the next k/v block in flight
            t.spike(4 * self.q * n + 4 * self.nh * n + 2 * w * self.kv_kernel * n)
        if self.lay.ulysses > 1:  # the all-to-all's send copy and receive buffer
            t.spike(2 * w * self.q * n)
        t.hold(f"{p}.q", w * self.q * n)
        t.hold(f"{p}.k", w * self.kv_kernel * n)
        t.hold(f"{p}.v", w * self.kv_kernel * n)
        t.hold(f"{p}.o", w * self.q * n)
        t.hold(f"{p}.lse", 4 * self.nh * n)

    def kernel_bwd(self, p: str, gout: str, n: int) -> tuple[str, str, str]:
        t, w, u = self.t, self.w, self.lay.ulysses
        q, kvk = self.q, self.kv_kernel
        if u > 1:
            t.hold(f"{p}.gog", w * q * n)
            t.spike(w * q * n)
            t.drop(gout)
            gout = f"{p}.gog"
        for s, size in (("dq", q), ("dk", kvk), ("dv", kvk)):
            t.hold(f"{p}.{s}", w * size * n)
        extra = 0
        if self.lay.scratch:  # flash backward: fp32 dq accumulator and softmax(dO * O) row sums
            extra += 4 * q * n + 4 * self.nh * n
        if self.lay.ring > 1:  # fp32 dq/dk/dv, the dk/dv travelling the ring and the next k/v block
            extra += 4 * q * n + 3 * 8 * kvk * n + 2 * w * kvk * n
        t.spike(extra)
        for s in ("q", "k", "v", "o", "lse"):
            t.drop(f"{p}.{s}")
        t.drop(gout)
        names = (f"{p}.dq", f"{p}.dk", f"{p}.dv")
        if u > 1:  # back through the all-to-all to this rank's tokens, all heads (repeats summed)
            out = []
            for s, size, local in zip(("q", "k", "v"), (q, kvk, kvk), (q, self.kv, self.kv), strict=True):
                t.hold(f"{p}.l{s}", w * local * n)
                t.spike(w * size * n)
                t.drop(f"{p}.d{s}")
                out.append(f"{p}.l{s}")
            names = tuple(out)  # type: ignore[assignment]
        return names

    def rope_bwd(self, g: str, out: str, size: int) -> None:
        """grad*cos and grad*sin, then rotate_half's backward (a negated half and a cat)."""
        t = self.t
        t.hold(out, size)
        t.spike(size)
        t.drop(g)
        t.spike(2.5 * size)

    def attn_bwd(self, p: str, x: str, gres: str, n: int, recompute_qkv: bool = False) -> str:
        """Backward from o_proj to the input norm; returns the input norm's gradient."""
        w, u, h = self.w, self.lay.ulysses, self.h
        self.linear_bwd(f"{p}.ol" if u > 1 else f"{p}.o", None, f"{p}.go", self.q, h, n, "o_proj", p)
        dq, dk, dv = self.kernel_bwd(p, f"{p}.go", n)
        if recompute_qkv:  # selective: the first half's checkpoint recomputes norm, projections
            self.attn_first_half(p, x, n)
        # autograd runs the ready node created last first: RoPE of k, of q, the qk-norms (k, q),
        # then the projections v, k, q
        grads = {"q": dq, "k": dk}
        for proj, size in (("k", self.kv), ("q", self.q)):
            self.rope_bwd(grads[proj], f"{p}.{proj}pre.g", w * size * n)
            grads[proj] = f"{p}.{proj}pre.g"
        if self.m.qk_norm:
            for proj, width in (("k", self.kv), ("q", self.q)):
                self.t.hold(f"{p}.{proj}pre", 0)
                grads[proj] = self.norm_bwd(f"{p}.{proj}n", f"{p}.{proj}pre", grads[proj], n, width)
                self.t.drop(f"{p}.{proj}pre", all_refs=True)
        self.linear_bwd(f"{p}.y1", dv, f"{p}.gy1", h, self.kv, n, "v_proj", p)
        self.linear_bwd(f"{p}.y1", grads["k"], f"{p}.gy1", h, self.kv, n, "k_proj", p)
        self.linear_bwd(f"{p}.y1", grads["q"], f"{p}.gy1", h, self.q, n, "q_proj", p)
        return self.norm_bwd(f"{p}.n1", x, f"{p}.gy1", n, h)

    def attn_first_half(self, p: str, x: str, n: int) -> None:
        self.norm_fwd(f"{p}.n1", x, n, self.h)
        self.inputs_fwd(p, f"{p}.y1", ("q_proj", "k_proj", "v_proj"), self.h, n, counted=False)
        self.qk_fwd(p, n)

    def tiles(self, one_tile, gout: str, gin: str, n: int, weights: int) -> None:
        """``seqpar.models.tiling.tiled`` backward, two tiles of the ``n // tile`` (the rest repeat
        the second): each recomputes its tile and runs its backward; its input slice's gradient is
        a zero-filled [n, H] tensor, added into ``gin`` out of place (the old sum, the slice and the
        new sum alive at once); the first addition leaves the output's gradient (``gout``, whose
        slices the tiles read) alive beside the new sum until the last tile is done. The weights'
        gradients (``weights`` bytes) wait, summed, until the last tile has added its share."""
        t, w, h, nt = self.t, self.w, self.h, self.tile
        prev, t.cat = t.cat, _WORK
        for k in range(2):
            g = one_tile(nt, f"{gout}.tile")
            t.hold(f"{gin}.wsum", weights)
            t.hold(f"{gin}.slice", w * h * n)
            t.drop(g)
            if k == 0 and gin == gout:  # out of place: gout is still read by the other tiles
                t.hold(f"{gin}.acc", w * h * n)
                t.drop(f"{gin}.slice")
            elif gin not in t.live:  # the first gradient becomes the buffer
                t.rename(f"{gin}.slice", gin)
            else:  # added out of place (as measured): old sum, slice and new sum alive at once
                t.spike(w * h * n)
                t.drop(f"{gin}.slice")
        if gin == gout:  # the last tile is done with gout: the new buffer is the gradient now
            t.drop(gout, all_refs=True)
            t.rename(f"{gin}.acc", gin)
        t.drop(f"{gin}.wsum", all_refs=True)
        t.cat = prev

    # -- feed-forward --------------------------------------------------------------------------------
    def ffn_fwd(self, i: int, p: str, x2: str, n: int) -> None:
        """post_attention_layernorm + MLP (tiled: the tiles keep only their input) or MoE."""
        t, w, h = self.t, self.w, self.h
        if self.moe[i]:
            self.norm_fwd(f"{p}.n2", x2, n, h)
            t.hold(f"{p}.y2", w * h * n)
            self.moe_fwd(p, f"{p}.y2", n)
            t.drop(f"{p}.y2")  # its consumers hold it
        elif self.tile and n > self.tile:
            t.hold(x2, w * h * n)
        else:
            self.norm_fwd(f"{p}.n2", x2, n, h)
            t.hold(f"{p}.y2", w * h * n)
            self.mlp_fwd(p + ".mlp", f"{p}.y2", n, self.m.intermediate_size)
            t.drop(f"{p}.y2")

    def ffn_bwd(self, i: int, p: str, x2: str, gres: str, n: int) -> None:
        """Accumulates the feed-forward's input gradient into ``gres`` (the residual's)."""
        t, w, h = self.t, self.w, self.h
        if not self.moe[i] and self.tile and n > self.tile:
            def one_tile(nt: int, g: str) -> str:  # recompute norm + MLP of one tile, backward
                t.hold(x2, 0)
                self.norm_fwd(f"{p}.n2", x2, nt, h)
                t.hold(f"{p}.y2", w * h * nt)
                self.mlp_fwd(p + ".mlp", f"{p}.y2", nt, self.m.intermediate_size)
                t.drop(f"{p}.y2")
                self.mlp_bwd(p + ".mlp", f"{p}.y2", g, f"{p}.gy2", nt, self.m.intermediate_size, False)
                return self.norm_bwd(f"{p}.n2", x2, f"{p}.gy2", nt, h)

            self.tiles(one_tile, gres, gres, n, 3 * w * h * self.m.intermediate_size)
            t.drop(x2, all_refs=True)
            return
        if self.moe[i]:
            self.moe_bwd(p, f"{p}.y2", gres, f"{p}.gy2", n)
        else:
            self.mlp_bwd(p + ".mlp", f"{p}.y2", gres, f"{p}.gy2", n, self.m.intermediate_size, False)
        gx = self.norm_bwd(f"{p}.n2", x2, f"{p}.gy2", n, h)
        t.drop(gx)  # added into the residual's gradient in place

    def moe_fwd(self, p: str, x: str, n: int) -> None:
        """Router (fp32), sort by expert, experts on their slices, weighted sum, shared expert."""
        t, w, h, e = self.t, self.w, self.h, self.m.moe
        assert e is not None
        k = e.top_k
        if self.router_train:
            t.hold(x if w == 4 else f"{p}.rx32", 4 * h * n)  # router input in fp32
        else:
            t.spike(0 if w == 4 else 4 * h * n)  # the fp32 copy, kept by none
        t.hold(f"{p}.sc", 4 * e.num_experts * n)  # scores (softmax/sigmoid output)
        t.hold(f"{p}.idx", 8 * k * n)  # top-k ids, saved by gather
        t.hold(f"{p}.wg", 4 * k * n)  # gathered weights
        if e.norm_topk_prob:
            t.hold(f"{p}.den", 4 * n)
        if self.recompute_experts:  # checkpoint(_routed): its inputs only
            t.hold(x, 0)
            t.hold(f"{p}.ord", 8 * k * n)
            t.hold(f"{p}.wn", 4 * k * n)
        else:
            self.routed_fwd(p, x, n)
        self.shared_fwd(p, x, n)

    def expert_blocks(self) -> list[int]:
        """Experts in backward order as blocks: the first and last alone, the ones between as one
        block (inside it memory changes linearly, so its extremes are at the blocks' edges)."""
        e = self.m.moe
        assert e is not None
        ne = e.num_experts // self.ep  # this rank's experts
        return [1] * ne if ne <= 3 else [1, ne - 2, 1]

    def routed_fwd(self, p: str, x: str, n: int) -> None:
        """Gather tokens by expert, each expert's SwiGLU on its slice (an even split assumed),
        scatter back, weight by the gates."""
        t, w, h, e = self.t, self.w, self.h, self.m.moe
        assert e is not None
        k, ie, ne = e.top_k, e.intermediate_size, e.num_experts // self.ep
        t.hold(f"{p}.oi", 8 * k * n)  # order // k, saved by the gather of tokens
        if self.ep > 1:  # the gathered tokens go out, the expert-major received ones are saved
            t.spike(2 * w * k * h * n)
            t.hold(f"{p}.perm", 8 * k * n)
        t.hold(f"{p}.xs", w * k * h * n)  # expert-sorted tokens, saved by the expert matmuls
        for j, count in enumerate(self.expert_blocks()):
            # silu keeps g, the product s and u, down_proj (unless frozen) its input p
            for s in ("g", "s", "u") + (() if self.experts_frozen else ("p",)):
                t.hold(f"{p}.e{j}.{s}", w * ie * k * n * count / ne)
            if self.expert_rank:  # the adapters' [tokens, r] middles of gate, up and down
                t.hold(f"{p}.e{j}.mid", 3 * w * self.expert_rank * k * n * count / ne)
        t.hold(f"{p}.ysorted", w * k * h * n)  # the experts' outputs concatenated (kept by the frame)
        t.spike(w * k * h * n * (2 if self.ep > 1 else 1))  # ... the pieces (EP: and their way back)
        if self.experts_frozen:  # no matmul saved the tokens: gone when the experts return
            t.drop(f"{p}.xs", all_refs=True)
        t.hold(f"{p}.ord", 8 * k * n)  # order, saved by the scatter back
        t.hold(f"{p}.ys", w * k * h * n)  # tokens' expert outputs, saved by the weighting
        # the weighted outputs, then their sum over k (a recomputation stops at its last saved
        # tensor: before them, unless the shared expert or the aux loss saves more afterwards)
        later = (e.shared_expert_intermediate_size or e.aux_loss_coef > 0) and not self.inner
        if not self.recomputing or later:
            t.spike(w * k * h * n + w * h * n)
        t.drop(f"{p}.ysorted")
        t.hold(f"{p}.wc", w * k * n)  # the gate weights in the compute dtype, saved by the weighting

    def shared_fwd(self, p: str, x: str, n: int) -> None:
        e = self.m.moe
        assert e is not None
        if not e.shared_expert_intermediate_size:
            return
        t, w, h = self.t, self.w, self.h
        if self.tile and n > self.tile:  # tiles keep their input only
            t.hold(x, 0)
            return
        self.mlp_fwd(f"{p}.sh", x, n, e.shared_expert_intermediate_size)
        if e.shared_expert_gate:
            if self.lora is None:  # the gate's linear keeps its input (frozen under LoRA: none)
                t.hold(x, 0)
            t.hold(f"{p}.sg", w * n)
            t.hold(f"{p}.so", w * h * n)

    def moe_bwd(self, p: str, x: str, gout: str, gx: str, n: int) -> None:
        t, w, h, e = self.t, self.w, self.h, self.m.moe
        assert e is not None
        k, ne, ie = e.top_k, e.num_experts // self.ep, e.intermediate_size
        if e.shared_expert_intermediate_size:  # created last: its backward runs first
            self.shared_bwd(p, x, gout, gx, n)
        if self.recompute_experts:  # the checkpoint recomputes the routed part first
            prev, t.cat, again = t.cat, _WORK, self.recomputing
            self.recomputing = self.inner = True
            self.routed_fwd(p, x, n)
            self.recomputing, self.inner = again, False
            t.drop(f"{p}.ord")  # held twice now (checkpoint input and the scatter)
            t.cat = prev
        # weighting: d(y_slots) and grad * y_slots summed into the weights' gradient
        t.hold(f"{p}.gys", w * k * h * n)
        t.spike(w * k * h * n)
        t.drop(f"{p}.ys")
        t.drop(f"{p}.wc")
        t.hold(f"{p}.gxsort", w * k * h * n)  # gradient of the expert outputs, by expert
        if self.ep > 1:  # through the all-to-all back to the experts' ranks, expert-major
            t.spike(2 * w * k * h * n)
        t.drop(f"{p}.gys")
        t.drop(f"{p}.ord")
        # experts one after the other (autograd's order): their saved tensors go, the gradients of
        # their token slices and weight slices stay until every expert is done
        blocks = self.expert_blocks()
        m1 = k * n / ne  # tokens per expert
        # a weight gradient per projection: the base's (full training) or the adapters' (r wide)
        gw1 = w * h * ie if self.lora is None else w * self.expert_rank * (h + ie)
        for j in reversed(range(len(blocks))):
            count = blocks[j]
            # one expert's backward (the block's first): down, product, silu, gate and up
            t.spike(w * ie * m1 + gw1)
            t.spike(3 * w * ie * m1 - w * ie * m1)
            t.spike(w * h * m1 + gw1 - 2 * w * ie * m1)  # its saved ones gone by now
            for s in ("g", "s", "u", "p", "mid"):
                t.drop(f"{p}.e{j}.{s}")
            t.hold(f"{p}.e{j}.gx", w * h * m1 * count)
            t.hold(f"{p}.e{j}.gw", 3 * gw1 * count)
        t.drop(f"{p}.gxsort")
        t.spike(3 * gw1 * ne)  # the experts' weight gradients stacked
        for j in range(len(blocks)):
            t.drop(f"{p}.e{j}.gw")
        t.hold(f"{p}.gxs", w * k * h * n)  # the token slices' gradients concatenated
        for j in range(len(blocks)):
            t.drop(f"{p}.e{j}.gx")
        t.drop(f"{p}.xs", all_refs=True)
        if self.ep > 1:  # back to source order and through the all-to-all to this rank's pairs
            t.spike(2 * w * k * h * n)
            t.drop(f"{p}.perm")
        t.hold(f"{p}.gxr", w * h * n)  # scattered back to token order
        t.drop(f"{p}.gxs")
        t.drop(f"{p}.oi")
        t.rename(f"{p}.gxr", gx)
        if self.recompute_experts:
            t.drop(x)
            t.drop(f"{p}.wn")
        # router: gather and softmax backward, the fp32 linear
        t.hold(f"{p}.gsc", 8 * ne * n)
        t.drop(f"{p}.wg")
        t.drop(f"{p}.den")
        t.drop(f"{p}.idx")
        t.hold(f"{p}.grx", 4 * h * n)
        if self.router_train:
            t.spike(4 * ne * h)
        t.drop(f"{p}.gsc")
        t.drop(f"{p}.sc")
        if self.router_train:
            t.drop(x if w == 4 else f"{p}.rx32")
        if w != 4:
            t.spike(w * h * n)
        t.drop(f"{p}.grx")
        t.spike(w * h * n)  # added into the input's gradient

    def shared_bwd(self, p: str, x: str, gout: str, gx: str, n: int) -> None:
        t, w, h, e = self.t, self.w, self.h, self.m.moe
        assert e is not None
        inter = e.shared_expert_intermediate_size
        if self.tile and n > self.tile:
            def one_tile(nt: int, g: str) -> str:
                self.mlp_fwd(f"{p}.sh", x, nt, inter)
                if e.shared_expert_gate:
                    if self.lora is None:
                        t.hold(x, 0)
                    t.hold(f"{p}.sg", w * nt)
                    t.hold(f"{p}.so", w * h * nt)
                self._shared_bwd(p, x, g, f"{p}.gsh", nt, inter)
                return f"{p}.gsh"

            self.tiles(one_tile, gout, gx, n, 3 * w * h * inter + (w * h if e.shared_expert_gate else 0))
            t.drop(x)  # the tiles' input
            return
        self._shared_bwd(p, x, gout, gx, n, inter)

    def _shared_bwd(self, p: str, x: str, gout: str, gx: str, n: int, inter: int) -> None:
        t, w, h, e = self.t, self.w, self.h, self.m.moe
        assert e is not None
        g = gout
        if e.shared_expert_gate:
            t.hold(f"{p}.gso", w * h * n)
            t.spike(w * h * n)
            t.drop(f"{p}.so")
            t.drop(f"{p}.sg")
            self.linear_bwd(x, None, gx, h, 1, n)
            g = f"{p}.gso"
        self.mlp_bwd(f"{p}.sh", x, g, gx, n, inter, drop_gout=g != gout)

    # -- layers --------------------------------------------------------------------------------------
    def layer_fwd(self, i: int, x: str, out: str) -> None:
        t, w, h, n = self.t, self.w, self.h, self.n
        p = f"L{i}"
        if not self.ckpt[i]:
            self.attn_fwd(p, x, n)
            x2 = f"{p}.x2"
            t.hold(x2, w * h * n)  # the residual after attention (kept while the MLP runs)
            self.ffn_fwd(i, p, x2, n)
            t.hold(out, w * h * n)
            t.drop(x2)
            return
        if not self.offloaded[i]:
            t.hold(x, w * h * n)  # the checkpoint keeps its input
        if self.policy == "selective":
            # the first checkpoint's forward: norm (fp32 input), its output, q/k/v projections
            t.spike(4 * h * n + w * (2 * h + self.q + 2 * self.kv) * n)
            self.kernel_fwd(p, n)
            if self.lay.ulysses > 1:
                t.hold(f"{p}.ol", w * self.q * n)  # the second checkpoint's input
            else:
                t.hold(f"{p}.o", 0)
        t.hold(out, w * h * n)

    def layer_bwd(self, i: int, x: str, gres: str) -> None:
        """``gres``: gradient of the layer's output, becomes that of its input (in place)."""
        t, w, h, n = self.t, self.w, self.h, self.n
        p = f"L{i}"
        t.where = f"backward of layer {i}" + (" (recomputed)" if self.ckpt[i] else "")
        if not self.ckpt[i]:
            x2 = f"{p}.x2"
            self.ffn_bwd(i, p, x2, gres, n)
            t.drop(x2, all_refs=True)
            t.drop(self.attn_bwd(p, x, gres, n))
            t.drop(x, all_refs=True)
            return
        prev = max((j for j in range(i) if self.offloaded[j]), default=None)
        if self.offloaded[i]:
            if x not in t.live:  # copied back from the host (unless prefetched already)
                t.hold(x, w * h * n, cat=_ACT)
        if prev is not None and (self.offloaded[i] or i == max(j for j, c in enumerate(self.ckpt) if c)):
            # the previous offloaded input is prefetched meanwhile (also by the last checkpointed
            # layer, whose own input stayed on the device)
            t.hold(f"x{prev}", w * h * n, cat=_ACT)
        x2 = f"{p}.x2"
        self.recomputing = True
        if self.policy == "full":
            self.attn_fwd(p, x, n)
        else:
            if self.lay.ulysses == 1:
                t.drop(f"{p}.o")  # the checkpoint's reference, recomputed below
        t.hold(x2, w * h * n)
        self.ffn_fwd(i, p, x2, n)
        if self.offloaded[i] and self.policy == "full":
            t.drop(x)  # the restored copy is referenced by the recomputation only
        t.drop(x2)  # the recomputation stops at the last saved tensor: the residual add is not redone
        self.recomputing = False
        if self.tile and n > self.tile:
            # ... which is the last tile's input: every tile's forward runs (its output kept until
            # the recomputation stops), the tile's intermediates alive one tile at a time
            inter = self.m.moe.shared_expert_intermediate_size if self.moe[i] and self.m.moe else self.m.intermediate_size
            if inter:
                t.spike(w * h * n + ((4 + 2 * w) * h + 3 * w * inter) * self.tile)
        if self.policy == "selective" and self.lay.ulysses == 1:
            t.hold(f"{p}.o", 0)  # o_proj saves the kernel output again
        self.ffn_bwd(i, p, x2, gres, n)
        t.drop(x2, all_refs=True)
        t.drop(self.attn_bwd(p, x, gres, n, recompute_qkv=self.policy == "selective"))
        t.drop(x, all_refs=True)

    # -- the step ------------------------------------------------------------------------------------
    def run(self) -> _Tape:
        t, w, h, n, v = self.t, self.w, self.h, self.n, self.v
        L = self.m.num_hidden_layers
        t.where = "forward"
        t.hold("batch", 24 * n)  # input ids, positions, labels (int64)
        t.hold("cos", w * self.d * n)
        t.hold("sin", w * self.d * n)
        t.hold("x0", w * h * n)  # the embedding's output
        for i in range(L):
            t.where = f"forward of layer {i}"
            self.layer_fwd(i, f"x{i}", f"x{i + 1}")
            t.drop(f"x{i}")  # the residual stream's reference
        xl = f"x{L}"
        self.norm_fwd("fn", xl, n, h)
        t.hold("hidden", w * h * n)
        t.drop(xl)
        # the loss, one tile of logits at a time: compute-dtype logits, their fp32 copy
        c = min(self.cfg.train.loss_chunk_size, n)
        t.where = "loss forward"
        t.cat = _LOSS
        t.hold("lse", 4 * n)
        lse_tmp = 8 * c * v if self.lay.scratch else 0  # logsumexp's (x - max) and exp temporaries
        t.spike(max((w + 4) * c * v if w != 4 else 4 * c * v, 4 * c * v + lse_tmp))
        t.where = "loss backward"
        t.hold("dhidden", w * h * n)
        tile = (w + 4) * c * v if w != 4 else 4 * c * v
        if self.head_train:
            t.hold("dweight", 4 * v * h)  # fp32 accumulator of the head's gradient
            t.spike(max(tile, w * c * v + w * v * h, 4 * c * v if w == 4 else 0))
            if self.m.tie_word_embeddings:  # the shared weight's gradient waits for the embedding's share
                t.hold("dtied", w * v * h)
            elif w != 4:
                t.spike(w * v * h)  # cast of the accumulator to the weight's dtype
            t.drop("dweight")
        else:  # a frozen head (LoRA): no weight gradient
            t.spike(max(tile, w * c * v))
        t.drop("lse")
        t.cat = _WORK
        t.where = "backward of the final norm"
        t.drop("hidden")
        gres = "g"
        gx = self.norm_bwd("fn", xl, "dhidden", n, h)
        t.rename(gx, gres)
        for i in reversed(range(L)):
            self.layer_bwd(i, f"x{i}", gres)
        t.where = "backward of the embedding"
        if self.embed_train:
            t.spike(w * v * h)  # the embedding's dense gradient
        t.drop("dtied")
        return t


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------
def tokens_per_rank(cfg: Config) -> int:
    """Tokens of one micro-batch on one rank (the sequence padded as sequence parallelism needs)."""
    p = cfg.parallel
    total = cfg.train.micro_batch_size * cfg.data.seq_len
    multiple = 2 * p.ring_degree * p.ulysses_degree if p.ring_degree > 1 else p.ulysses_degree
    return -(-total // multiple) * multiple // p.sp_degree


def describe_settings(cfg: Config) -> str:
    mem = cfg.memory
    parts = [f"checkpointing {mem.activation_checkpointing}"
             + (f" every {mem.checkpoint_every} layers" if mem.checkpoint_every > 1 and
                mem.activation_checkpointing != "none" else "")]
    if mem.tiled_mlp:
        parts.append(f"tiled MLP ({mem.mlp_tile_tokens or cfg.model.hidden_size} tokens)")
    for key, words in (("offload_activations", "activations offloaded"), ("offload_optimizer", "optimizer offloaded"),
                       ("offload_params", "params offloaded")):
        if getattr(mem, key):
            parts.append(words)
    if cfg.parallel.expert_degree > 1:
        parts.append(f"experts over {cfg.parallel.expert_degree} ranks")
    if getattr(cfg.model, "lora", None) is not None:
        parts.append("LoRA")
    return ", ".join(parts) + f", ZeRO-{cfg.parallel.zero_stage}"


def activation_tape(cfg: Config, world_size: int = 1, base: int = 0, scratch: bool = True) -> _Tape:
    """The activation walk alone (``base``: bytes alive throughout); tests compare it with the
    meta device, which allocates op outputs only (``scratch=False``: no kernel workspaces)."""
    p = cfg.parallel
    lay = _Layout(tokens_per_rank(cfg), p.ulysses_degree, p.ring_degree,
                  2 if cfg.train.precision == "bf16" else 4, scratch)
    return _Sim(cfg, lay, base).run()


def predict(cfg: Config, world_size: int, reserve_bytes: int = DEFAULT_RESERVE_BYTES) -> MemoryPlan:
    """Predicted per-GPU peak of a training step of ``cfg`` on ``world_size`` ranks."""
    cfg.layout(world_size)  # the layout must be valid (raises ConfigError)
    run, step, _ = model_state(cfg, world_size)
    base = sum(run.values())
    tape = activation_tape(cfg, world_size, base)
    step_total = sum(step.values())
    parts = {k: 0 for k in COMPONENTS}
    if step_total > tape.peak:
        parts.update(step)
        phase = "optimizer step"
    else:
        parts.update(run)
        for k, b in tape.peak_parts.items():
            parts[k] += b
        phase = tape.peak_where
    parts["reserve"] = reserve_bytes
    parts = {k: int(v) for k, v in parts.items()}
    return MemoryPlan(sum(parts.values()), parts, phase, tokens_per_rank(cfg), describe_settings(cfg), cfg, world_size)


def _with(cfg: Config, seq_len: int | None = None, memory: dict[str, Any] | None = None,
          zero_stage: int | None = None) -> Config:
    """A copy of ``cfg`` with some values changed (not revalidated: only what the planner reads)."""
    up: dict[str, Any] = {}
    if seq_len is not None:
        up["data"] = cfg.data.model_copy(update={"seq_len": seq_len})
    if memory:
        up["memory"] = cfg.memory.model_copy(update=memory)
    if zero_stage is not None:
        up["parallel"] = cfg.parallel.model_copy(update={"zero_stage": zero_stage})
    return cfg.model_copy(update=up)


def seq_len_unit(cfg: Config) -> int:
    """Sequence lengths the layout takes without padding come in multiples of this: 2 x ring x
    ulysses with a ring (two zigzag chunks per ring rank), else the Ulysses degree."""
    p = cfg.parallel
    return 2 * p.ring_degree * p.ulysses_degree if p.ring_degree > 1 else p.ulysses_degree


def longest_sequence(cfg: Config, world_size: int, gpu_bytes: int,
                     reserve_bytes: int = DEFAULT_RESERVE_BYTES) -> int:
    """The longest ``data.seq_len`` (a multiple of ``seq_len_unit``) whose predicted peak fits
    ``gpu_bytes`` with ``cfg``'s settings; 0 when not even one unit does. Bisection: the
    prediction grows with the length."""
    unit = seq_len_unit(cfg)

    def fits(k: int) -> bool:
        return predict(_with(cfg, seq_len=k * unit), world_size, reserve_bytes).peak_bytes <= gpu_bytes

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while fits(hi):
        lo, hi = hi, hi * 2
        if hi * unit > 2**36:
            return lo * unit
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo * unit


# The settings ladder, cheapest first (see ``cheapest_fit``): (name, memory fields, least ZeRO stage).
_ACTIVATION_RUNGS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("no checkpointing", {"activation_checkpointing": "none", "tiled_mlp": False}),
    ("selective checkpointing", {"activation_checkpointing": "selective", "tiled_mlp": False}),
    ("full checkpointing", {"activation_checkpointing": "full", "tiled_mlp": False}),
    ("full checkpointing + tiled MLP", {"activation_checkpointing": "full", "tiled_mlp": True}),
    ("full checkpointing + tiled MLP + offloaded activations",
     {"activation_checkpointing": "full", "tiled_mlp": True, "offload_activations": True}),
)
_STATE_RUNGS: tuple[tuple[str, dict[str, Any], int], ...] = (
    ("", {}, 0),
    (" + offloaded optimizer", {"offload_optimizer": True}, 1),
    (" + offloaded optimizer and params", {"offload_optimizer": True, "offload_params": True}, 3),
)
LADDER: tuple[tuple[str, dict[str, Any], int], ...] = tuple(
    (act + state, {**fields, **more}, stage) for state, more, stage in _STATE_RUNGS for act, fields in _ACTIVATION_RUNGS)


def ladder_config(cfg: Config, fields: dict[str, Any], least_stage: int) -> Config:
    """``cfg`` on one rung: the rung's memory fields (others off, every layer checkpointed) and at
    least the ZeRO stage the rung needs."""
    mem = {"checkpoint_every": 1, "offload_activations": False, "offload_optimizer": False,
           "offload_params": False, **fields}
    if not mem.get("tiled_mlp"):
        mem["mlp_tile_tokens"] = 0
    stage = max(cfg.parallel.zero_stage, least_stage)
    return _with(cfg, memory=mem, zero_stage=stage if stage != cfg.parallel.zero_stage else None)


def rung_flags(cfg: Config, rung: Config) -> str:
    """The command-line overrides that turn ``cfg`` into ``rung``."""
    out = []
    for key in ("activation_checkpointing", "checkpoint_every", "tiled_mlp", "offload_activations",
                "offload_optimizer", "offload_params"):
        a, b = getattr(cfg.memory, key), getattr(rung.memory, key)
        if a != b:
            out.append(f"--memory.{key} {str(b).lower()}")
    if rung.parallel.zero_stage != cfg.parallel.zero_stage:
        out.append(f"--parallel.zero_stage {rung.parallel.zero_stage}")
    return " ".join(out) or "(as configured)"


def cheapest_fit(cfg: Config, world_size: int, gpu_bytes: int,
                 reserve_bytes: int = DEFAULT_RESERVE_BYTES) -> list[tuple[str, MemoryPlan]]:
    """The rungs of ``LADDER`` whose predicted peak fits ``gpu_bytes``, cheapest first (rungs the
    config cannot take, e.g. ZeRO-3 with expert parallelism, are left out).

    The order is by expected throughput cost. Activation settings, each paying for more than the
    one before: no checkpointing recomputes nothing; selective recomputes norms, projections, RoPE
    and the MLP but not attention (most of the FLOPs at long sequences); full recomputes the whole
    layer, attention included (about one more forward); a tiled MLP recomputes the same in smaller
    matmuls; offloaded activations add host copies (overlapped, but PCIe bandwidth). Model-state
    offload costs more than any of them, so it comes after all five: an offloaded optimizer runs
    the AdamW step on the CPU every step (and needs ZeRO-1 at least), offloaded parameters cross
    PCIe for every layer of every micro-batch (ZeRO-3); each is tried with the five in order."""
    out = []
    for name, fields, stage in LADDER:
        rung = ladder_config(cfg, fields, stage)
        try:  # a rung the config cannot take (e.g. ZeRO-3 with expert parallelism) is no option
            validate_config(rung.model_dump())
        except ConfigError:
            continue
        plan = predict(rung, world_size, reserve_bytes)
        if plan.peak_bytes <= gpu_bytes:
            out.append((name, plan))
    return out


def pareto(fits: list[tuple[str, MemoryPlan]], saving: float = 0.01) -> list[tuple[str, MemoryPlan]]:
    """The rungs worth their cost: each predicted at least ``saving`` (a fraction) below every
    cheaper rung kept before it (a costlier setting that saves no memory is left out)."""
    out: list[tuple[str, MemoryPlan]] = []
    for name, plan in fits:
        if not out or plan.peak_bytes < (1 - saving) * out[-1][1].peak_bytes:
            out.append((name, plan))
    return out


def warn_if_oom(plan: MemoryPlan, gpu_bytes: int) -> str | None:
    """One line when ``plan`` does not fit ``gpu_bytes``: by how much, and the cheapest settings
    that fit (if any); None when it fits."""
    if plan.peak_bytes <= gpu_bytes:
        return None
    line = (f"predicted peak {plan.peak_bytes / GiB:.1f} GiB/GPU exceeds the device's {gpu_bytes / GiB:.1f} GiB "
            f"({plan.settings}): expect an out-of-memory error")
    if plan.cfg is None:
        return line
    fits = cheapest_fit(plan.cfg, plan.world_size, gpu_bytes, plan.breakdown.get("reserve", DEFAULT_RESERVE_BYTES))
    if not fits:
        return line + "; no memory setting fits: lower data.seq_len or add GPUs (sequence parallelism)"
    name, best = fits[0]
    return line + f"; the cheapest setting that fits is {name} ({best.peak_bytes / GiB:.1f} GiB: " \
                  f"{rung_flags(plan.cfg, best.cfg) if best.cfg is not None else ''})"


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------
def _gib(b: float) -> str:
    return f"{b / GiB:.1f} GiB" if b >= GiB / 10 or b == 0 else f"{b / 2**20:.1f} MiB"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m seqpar.plan", allow_abbrev=False,
        description="Predict per-GPU peak memory of a seqpar config, the longest sequence that fits and the "
                    "cheapest memory settings that fit. Other arguments are --section.key value overrides.")
    ap.add_argument("--config", help="config YAML (default: the embedded tiny-cpu config)")
    ap.add_argument("--world", type=int, default=1, help="number of GPUs (ranks); default 1")
    ap.add_argument("--gpu-memory", type=float, help="GiB per GPU; default: the current CUDA device's total")
    ap.add_argument("--reserve", type=float, default=DEFAULT_RESERVE_BYTES / GiB,
                    help="GiB for the CUDA context, communication workspaces and fragmentation (default 1.5)")
    args, rest = ap.parse_known_args(argv)
    try:
        cfg = load_config(args.config, rest)
        if args.world < 1:
            raise ConfigError("--world must be at least 1")
        lay = cfg.layout(args.world)
    except ConfigError as e:
        print(f"seqpar.plan: {e}", file=sys.stderr)
        return 2
    if args.gpu_memory is None:
        try:
            import torch

            gpu = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory \
                if torch.cuda.is_available() else None
        except Exception:  # noqa: BLE001 - no usable CUDA: same as none
            gpu = None
        if gpu is None:
            print("seqpar.plan: no CUDA device here to read the memory from: pass --gpu-memory GIB "
                  "(e.g. 80 for an H100, 141 for an H200)", file=sys.stderr)
            return 2
    else:
        gpu = int(args.gpu_memory * GiB)
    reserve = int(args.reserve * GiB)
    m = cfg.model
    plan = predict(cfg, args.world, reserve)
    _, _, engine = model_state(cfg, args.world)
    pc = count_params(cfg)
    print(f"config  {args.config or 'the embedded default'}: {m.arch}, {m.num_hidden_layers} layers, hidden "
          f"{m.hidden_size}, heads {m.num_attention_heads}/{m.kv_heads} kv, vocab {m.vocab_size}: "
          + (f"{pc.total / 1e9:.2f}B params" if pc.total >= 1e9 else f"{pc.total / 1e6:.2f}M params"))
    print(f"layout  world {args.world} = dp {lay.dp} x sp {lay.sp} (ulysses {lay.ulysses} x ring {lay.ring}), "
          f"{cfg.train.precision}, {engine}")
    print(f"batch   micro {cfg.train.micro_batch_size} x {cfg.data.seq_len:,} tokens: {plan.tokens_per_rank:,} "
          f"per rank; loss tiles of {min(cfg.train.loss_chunk_size, plan.tokens_per_rank):,}")
    print(f"memory  {plan.settings}")
    print(f"peak    at {plan.phase}:")
    for k in COMPONENTS:
        print(f"  {k:<12}{_gib(plan.breakdown.get(k, 0)):>12}")
    print(f"  {'total':<12}{_gib(plan.peak_bytes):>12}")
    longest = longest_sequence(cfg, args.world, gpu, reserve)
    print(f"longest data.seq_len that fits {_gib(gpu)} with these settings: "
          + (f"{longest:,} tokens" if longest else "none"))
    fits = pareto(cheapest_fit(cfg, args.world, gpu, reserve))
    if fits:
        print(f"settings that fit at data.seq_len {cfg.data.seq_len:,}, cheapest first (each needing at least 1% "
              "less memory than the ones before it):")
        for name, p in fits:
            print(f"  {_gib(p.peak_bytes):>10}  {name}: {rung_flags(cfg, p.cfg) if p.cfg is not None else ''}")
    else:
        print(f"no memory setting fits at data.seq_len {cfg.data.seq_len:,}: lower it or add GPUs")
    verdict = "fits" if plan.peak_bytes <= gpu else "does not fit"
    print(f"{verdict}: predicted peak {_gib(plan.peak_bytes)}/GPU, {'within' if verdict == 'fits' else 'over'} "
          f"{_gib(gpu)} per GPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
