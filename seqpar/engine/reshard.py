"""Elastic resume: move optimizer state saved under one layout onto another (pinned deepspeed==0.19.8).

A ZeRO rank's optimizer state is a few flat fp32 buffers (master weights, Adam moments) whose
layout depends on the DP size, the ZeRO stage and alignment padding. At every save each rank also
writes its *fragment map*: for every parameter (by name), which flat buffer holds its slice, where
in that buffer (``hp_start``), which elements of the flattened parameter it is (``lp_start``) and
how many (``numel``). That makes any saved layout readable as per-parameter slices, and a new
layout is filled by copying the overlap of each saved slice with each slice the new rank owns.

Supported optimizer kinds (``deepspeed_state.optimizer_kind``): ``torch`` (ZeRO-0 fp32: the
master weights are the module's, read from the HF weights), ``unfused16`` (ZeRO-0 bf16),
``zero12`` (ZeRO-1/2, fp32 or bf16), ``zero3``; each with or without ZeRO-Offload (offloaded
state dicts have the same layout, in CPU memory). Every element of every new slice must be
covered, or the resume is refused. Saved files are read lazily: a new rank reads only the parts
that overlap its own slices (safetensors slices of memory-mapped files).

Expert parallelism (EP, ZeRO-0/1/2): rank r of a layout with EP degree P holds rows
[(r % P) E/P, (r % P + 1) E/P) of every expert parameter, under the whole parameter's name. Maps are
saved in these local coordinates; the overlap arithmetic shifts them to whole-parameter ones
(``ExpertSplit``), so state moves between EP degrees as between DP sizes. At ZeRO-0 the saved
ranks 0..P-1 each hold one expert slice's optimizer copy (and, fp32, the export its master rows).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from seqpar.checkpoint.codec import LazyTensor
from seqpar.engine.deepspeed_state import (
    capture_optimizer,
    fill_offload12,
    offload12_slots,
    optimizer_kind,
    restore_optimizer,
    zero3_grad_partitions,
)

ELASTIC_KINDS = ("torch", "unfused16", "zero12", "zero3")


class ReshardError(RuntimeError):
    pass


class _LazyRange:
    """Elements ``[offset, offset + numel)`` of a file tensor; slicing reads just that part."""

    def __init__(self, t: LazyTensor, offset: int, numel: int):
        self.t, self.offset, self.numel = t, offset, numel

    def __getitem__(self, s: slice) -> Tensor:
        lo, hi, _ = s.indices(self.numel)
        return self.t.flat(self.offset + lo, self.offset + hi)


def _flat(t: Tensor | LazyTensor, offset: int, numel: int) -> Tensor | _LazyRange:
    """A 1-D range of a tensor's flattened values: a view, or a lazy range of a file tensor."""
    if isinstance(t, LazyTensor):
        return _LazyRange(t, offset, numel)
    return t.reshape(-1).narrow(0, offset, numel)


@dataclass
class Slice:
    """Elements ``[lp_start, lp_start + numel)`` of one flattened parameter, as 1-D views per state
    key (``fp32`` for the master weights, then the optimizer's: ``exp_avg``, ``exp_avg_sq``)."""

    lp_start: int
    numel: int
    tensors: dict[str, Tensor | _LazyRange]


EXPERT_MARK = ".mlp.experts."  # names of the split expert parameters (as deepspeed_state.mark_expert_params)


@dataclass(frozen=True)
class ExpertSplit:
    """How the saved (``old``) and this run's (``new``) layouts split the expert parameters over
    EP groups of consecutive ranks; ``whole``: element count of each expert parameter with all E
    experts. Without EP both degrees are 1 and every shift is 0."""

    whole: dict[str, int]
    old: int = 1
    new: int = 1

    def is_expert(self, name: str) -> bool:
        return name in self.whole

    def shift(self, name: str, rank: int, degree: int) -> int:
        """Whole-parameter index of element 0 of ``name``'s slice on ``rank`` (0 for dense names)."""
        n = self.whole.get(name)
        return 0 if n is None else (rank % degree) * (n // degree)

    def old_shift(self, name: str, old_rank: int) -> int:
        return self.shift(name, old_rank, self.old)

    def new_shift(self, name: str) -> int:
        return self.shift(name, dist.get_rank(), self.new)


def expert_split(engine, old_degree: int = 1, new_degree: int = 1) -> ExpertSplit:
    """``ExpertSplit`` of this engine's model (split ``new_degree`` ways) and a saved layout."""
    if old_degree == new_degree == 1:
        return ExpertSplit({})
    whole = {n: int(getattr(p, "ds_numel", p.numel())) * new_degree
             for n, p in engine.module.named_parameters() if EXPERT_MARK in n}
    return ExpertSplit(whole, old_degree, new_degree)


def _names(engine) -> dict[int, str]:
    return {id(p): n for n, p in engine.module.named_parameters()}


def _ordered_params(engine) -> list[tuple[str, Any]]:
    """ZeRO-0 trainable parameters in optimizer order (its state is indexed by this position)."""
    names, opt = _names(engine), engine.optimizer
    # FP16_UnfusedOptimizer swapped fp32 copies into its optimizer's groups; the originals are here
    groups = opt.fp16_groups if optimizer_kind(engine) == "unfused16" else [g["params"] for g in opt.param_groups]
    return [(names[id(p)], p) for group in groups for p in group]


def fragment_map(engine) -> dict[str, list[int]]:
    """``{param name: [flat buffer, hp_start, lp_start, numel]}`` of this rank's optimizer state."""
    opt, kind = engine.optimizer, optimizer_kind(engine)
    if kind not in ELASTIC_KINDS:
        return {}
    out: dict[str, list[int]] = {}
    if kind in ("torch", "unfused16"):
        for i, (name, p) in enumerate(_ordered_params(engine)):
            out[name] = [i, 0, 0, p.numel()]
    elif kind == "zero12":
        names = _names(engine)
        for g, params in enumerate(opt.bit16_groups):
            for p in params:
                m = getattr(p, "_hp_mapping", None)
                if m is not None:
                    out[names[id(p)]] = [g, m.hp_fragment_address.start, m.lp_fragment_address.start,
                                         m.lp_fragment_address.numel]
    else:  # zero3: rank r holds elements [r * partition, (r + 1) * partition) of the padded param
        rank = dist.get_rank(group=opt.dp_process_group)
        for name, p in engine.module.named_parameters():
            if not p.requires_grad:
                continue
            g, offset, numel = opt.grad_position[opt.get_param_id(p)]
            start = rank * p.ds_tensor.ds_numel
            valid = max(0, min(int(numel), p.ds_numel - start))  # the last partition is padded
            if valid:
                out[name] = [int(g), int(offset), start, valid]
    return out


def _flat_state(kind: str, sd: dict[str, Any], weights: list[Tensor] | None) -> tuple[list[Tensor], dict]:
    """(flat fp32 master buffers, optimizer ``state`` keyed by buffer index) of a saved state."""
    if kind == "zero12":
        return sd["single_partition_of_fp32_groups"], sd["base_optimizer_state"]["state"]
    if kind == "zero3":
        return sd["fp32_flat_groups"], sd["optimizer_state_dict"]["state"]
    if kind == "unfused16":
        return [t for group in sd["fp32_groups"] for t in group], sd["optimizer_state_dict"]["state"]
    assert weights is not None, "ZeRO-0 fp32 keeps its master weights in the module"
    return weights, sd["state"]


def slices(kind: str, sd: dict[str, Any], fmap: dict[str, list[int]], weights: list[Tensor] | None = None,
           ) -> dict[str, Slice]:
    """Per-parameter views into a saved (or template) optimizer state dict."""
    flats, state = _flat_state(kind, sd, weights)
    out = {}
    for name, (g, hp, lp, n) in fmap.items():
        flat = flats[g]
        views = {"fp32": _flat(flat, hp, n)}
        for key, t in state.get(g, {}).items():
            if isinstance(t, (Tensor, LazyTensor)) and t.numel() == flat.numel():
                views[key] = _flat(t, hp, n)
        out[name] = Slice(lp, n, views)
    return out


def _copy_step(step: Any) -> Any:
    """torch's Adam keeps the step count as a tensor, DeepSpeed's FusedAdam as an int."""
    return step.clone() if isinstance(step, Tensor) else step


def _step_and_keys(kind: str, sd: dict[str, Any]) -> tuple[Any, list[str]]:
    flats, state = _flat_state(kind, sd, [] if kind == "torch" else None)
    if not state:
        raise ReshardError("the checkpoint's optimizer has no state (saved before the first step?)")
    first = state[min(state)]
    keys = [k for k, v in first.items() if isinstance(v, (Tensor, LazyTensor)) and k != "step"]
    return _copy_step(first["step"]), keys


def _template(engine, step: Any, keys: list[str]) -> tuple[dict[str, Any], list[Tensor] | None]:
    """This rank's fresh optimizer state dict with zeroed per-buffer state entries to fill in."""
    kind = optimizer_kind(engine)
    sd = capture_optimizer(engine)["optimizer"]
    weights = None
    if kind == "torch":  # the master weights are the module's own parameters: fill them in place
        weights = [p.data for _, p in _ordered_params(engine)]
    flats, state = _flat_state(kind, sd, weights)
    for g, flat in enumerate(flats):
        state[g] = {"step": _copy_step(step), **{k: torch.zeros(flat.shape, dtype=torch.float32) for k in keys}}
    return sd, weights


def _param_groups(kind: str, sd: dict[str, Any]) -> list[dict[str, Any]]:
    base = {"zero12": "base_optimizer_state", "zero3": "optimizer_state_dict",
            "unfused16": "optimizer_state_dict"}.get(kind)
    return (sd[base] if base else sd)["param_groups"]


def match_groups(new: list[dict[str, Any]], old: list[dict[str, Any]]) -> list[int]:
    """For each new param group, the saved group whose hyperparameters it takes, by role: dense
    groups in order; the expert group (``moe``, present only with EP > 1) takes the saved expert
    group, or the decay group (index 0) where the experts were without EP."""
    old_dense = [i for i, g in enumerate(old) if not g.get("moe")]
    old_moe = next((i for i, g in enumerate(old) if g.get("moe")), 0)
    new_dense = [i for i, g in enumerate(new) if not g.get("moe")]
    if len(new_dense) != len(old_dense) or len(new) - len(new_dense) > 1:
        raise ReshardError(f"the checkpoint's optimizer has {len(old)} parameter groups ({len(old_dense)} dense), "
                           f"this run's {len(new)} ({len(new_dense)} dense): they cannot be matched")
    dense = iter(old_dense)
    return [old_moe if g.get("moe") else next(dense) for g in new]


def _remap_scheduler(scheduler: dict[str, Any] | None, groups: list[int], n_old: int) -> dict[str, Any] | None:
    """The scheduler's per-group lists (``base_lrs``, ``_last_lr``) for the new param groups."""
    if scheduler is None:
        return None
    out = dict(scheduler)
    for key in ("base_lrs", "_last_lr"):
        if isinstance(out.get(key), list) and len(out[key]) == n_old:
            out[key] = [out[key][i] for i in groups]
    return out


def _covered_to(start: int, ranges: list[tuple[int, int]]) -> int:
    """End of the gap-free run of ``ranges`` from ``start`` (``start`` if nothing covers it)."""
    end = start
    for lo, hi in sorted(ranges):
        if lo > end:
            break
        end = max(end, hi)
    return end


def all_ranks_ok(device: torch.device, ok: bool, error: Exception | None = None) -> None:
    """Collective: raise on every rank if any rank failed (so none waits in a later collective)."""
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    if error is not None:
        raise error
    if not flag.item():
        raise ReshardError("another rank could not reshard the checkpoint (its error is in its log)")


Source = tuple[int, dict[str, Any], dict[str, list[int]]]  # (saved rank, optimizer state dict, fragment map)


def reshard_optimizer(engine, old_kind: str, sources: Iterable[Source], scheduler: dict[str, Any] | None,
                      old_weights: Callable[[], dict[str, Tensor]] | None = None,
                      experts: ExpertSplit | None = None) -> None:
    """Fill this rank's optimizer from every saved rank's ``(rank, optimizer state dict, fragment map)``.

    ``old_weights`` gives the saved module weights by name, experts whole (needed when
    ``old_kind == "torch"``);
    ``experts`` places expert slices when either layout splits them (EP > 1).
    Collective (DeepSpeed's loader all-gathers the new weights); every rank calls it, and an error
    on any rank is raised on all of them before that collective.
    """
    try:
        sd, groups, n_old = _fill_optimizer(engine, old_kind, sources, old_weights, experts or ExpertSplit({}))
    except Exception as e:  # noqa: BLE001  (re-raised here, after telling the other ranks)
        all_ranks_ok(engine.device, False, e)
    all_ranks_ok(engine.device, True)
    restore_optimizer(engine, {"optimizer": sd, "scheduler": _remap_scheduler(scheduler, groups, n_old)})


def _fill_optimizer(engine, old_kind: str, sources: Iterable[Source],
                    old_weights: Callable[[], dict[str, Tensor]] | None,
                    experts: ExpertSplit) -> tuple[dict[str, Any], list[int], int]:
    """This rank's new optimizer state dict, filled from the saved ranks' slices, with which saved
    param group each new one follows and how many there were (no collectives)."""
    new_kind = optimizer_kind(engine)
    for k in (old_kind, new_kind):
        if k not in ELASTIC_KINDS:
            raise ReshardError(f"optimizer kind {k!r} cannot be resharded (supported: {ELASTIC_KINDS})")
    target_map = fragment_map(engine)
    sd = None
    covered: dict[str, list[tuple[int, int]]] = {name: [] for name in target_map}
    weights_by_name = old_weights() if old_kind == "torch" else None
    for old_rank, old_sd, old_map in sources:
        if sd is None:  # the first source fixes the step count, the state keys and the param groups
            step, keys = _step_and_keys(old_kind, old_sd)
            sd, weights = _template(engine, step, keys)
            targets = slices(new_kind, sd, target_map, weights)
            new_pgs, old_pgs = _param_groups(new_kind, sd), _param_groups(old_kind, old_sd)
            groups = match_groups(new_pgs, old_pgs)
            for new_pg, i in zip(new_pgs, groups):
                new_pg.update({k: v for k, v in old_pgs[i].items() if k not in ("params", "name", "moe")})
        old_w = None
        if weights_by_name is not None:  # the export holds every expert: this saved rank's rows of each
            old_w = [weights_by_name[n].reshape(-1).narrow(0, experts.old_shift(n, old_rank), old_map[n][3])
                     for n in sorted(old_map, key=lambda n: old_map[n][0])]
        for name, src in slices(old_kind, old_sd, old_map, old_w).items():
            dst = targets.get(name)
            if dst is None:
                continue
            # whole-parameter coordinates (expert slices sit at their rows); views stay local
            d0, s0 = dst.lp_start + experts.new_shift(name), src.lp_start + experts.old_shift(name, old_rank)
            lo, hi = max(d0, s0), min(d0 + dst.numel, s0 + src.numel)
            if lo >= hi:
                continue
            for key, view in dst.tensors.items():
                if key not in src.tensors:
                    raise ReshardError(f"saved optimizer state has no {key!r} for {name}")
                view[lo - d0 : hi - d0].copy_(src.tensors[key][lo - s0 : hi - s0])
            covered[name].append((lo, hi))
    if sd is None:
        raise ReshardError("the checkpoint holds no optimizer state")
    for name, (_, _, lp, n) in target_map.items():
        d0 = lp + experts.new_shift(name)
        end = _covered_to(d0, covered[name])
        if end < d0 + n:
            raise ReshardError(f"the checkpoint does not cover elements [{end}, {d0 + n}) of {name}"
                               + (" (whole-parameter indices: all experts)" if experts.is_expert(name) else ""))
    return sd, groups, len(old_pgs)


# -- partial gradients of an open accumulation window ----------------------------------------------
# Saved per rank in one of two forms (deepspeed_state.capture_partial_grads):
#   ``sum``:  stages 0/1, each rank's own unreduced gradient of every parameter;
#   ``copy``: stages 2/3, reduced at every micro-step: the rank's partition of A, with a slice map
#             (ZeRO-2 offload: slices of its CPU accumulation buffers, ``cpu_grads``).
# DeepSpeed averages over the (old) world when it reduces, so the layout-free quantity is
# A = (sum of all ranks' local gradients) / world.


def partial_grads_form(tree_keys: Iterable[str]) -> str | None:
    """``sum`` | ``copy`` for a saved ``grads`` tree (its top-level keys); None if it cannot move
    (BF16_Optimizer buffers, or written before mid-window elastic resume existed)."""
    keys = set(tree_keys)
    if "grad" in keys:
        return "sum"
    if {"all_grad_tensors", "slices"} <= keys or {"flat", "index"} <= keys or {"cpu_grads", "cpu_slices"} <= keys:
        return "copy"
    return None


def _grad_sources(tree: dict[str, Any]) -> dict[str, tuple[int, int, Tensor]]:
    """``{name: (first element, count, 1-D values)}`` of one saved rank's partial gradients."""
    if "grad" in tree:
        grads = {**tree["grad"], **tree["grad_accum"]}  # grad_accum, where used, is the accumulator
        return {n: (0, g.numel(), _flat(g, 0, g.numel())) for n, g in grads.items()}
    if "cpu_grads" in tree:  # ZeRO-2 offload: buffers not reduced in this window hold older windows' sums
        fresh = set(tree["offload_reduced"])
        return {n: (lp, k, _flat(tree["cpu_grads"][n], 0, k)) for n, (lp, k) in tree["cpu_slices"].items()
                if n in fresh}
    if "all_grad_tensors" in tree:
        out = {}
        for i, tensors in tree["all_grad_tensors"].items():
            for t, (name, lp, n) in zip(tensors, tree["slices"][i], strict=True):
                if t is not None and n > 0:
                    out[name] = (lp, n, _flat(t, lp, n))
        return out
    return {n: (lp, k, _flat(tree["flat"], off, k)) for n, (off, lp, k) in tree["index"].items()}


def _grad_targets(engine) -> tuple[str, dict[str, tuple[int, int]], Callable[[dict[str, Tensor]], None]]:
    """This rank's gradient accumulator in the new layout: (``local`` | ``partition``, the slices
    to fill ``{name: (first element, count)}``, and a function writing the filled fp32 slices)."""
    opt, kind = engine.optimizer, optimizer_kind(engine)
    if kind == "zero3":
        parts = zero3_grad_partitions(engine)

        def write3(vals: dict[str, Tensor]) -> None:
            opt.grad_partitions_flat_buffer.zero_()
            for name, (view, _, _) in parts.items():
                view.copy_(vals[name])
            # as after a completed backward: the next forward counts it, the next reduction adds
            opt.micro_step_id, opt._epilogue_ran_this_backward = 0, True
            if hasattr(opt, "_offload_boundary_param_ids"):  # offload's record of reduced parameters
                ids = {n: p.ds_id for n, p in engine.module.named_parameters() if n in parts}
                opt._offload_boundary_param_ids = set(ids.values())

        return "partition", {n: (s, k) for n, (_, s, k) in parts.items()}, write3
    if kind == "zero12" and opt.partition_gradients and getattr(opt, "cpu_offload", False):
        cpu_slots = offload12_slots(engine)

        def write2_offload(vals: dict[str, Tensor]) -> None:
            # as after one reduced micro-step ([micro_step_id 0, not ready]): the next one adds
            fill_offload12(engine, vals, list(vals), [0, 0])

        return "partition", {n: (first, count) for n, (_, first, count) in cpu_slots.items()}, write2_offload
    if kind == "zero12" and opt.partition_gradients:
        names = _names(engine)  # (a compact fp32 gradient buffer is refused at start-up)
        slots: dict[str, tuple[int, Tensor]] = {}
        for i, params in enumerate(opt.params_in_partition):
            full = [torch.zeros_like(p, dtype=opt.gradient_accumulation_dtype) for p in params]
            opt.all_grad_tensors[i] = full
            for p, t in zip(params, full):
                m = p._hp_mapping
                slots[names[id(p)]] = (m.lp_fragment_address.start, t.reshape(-1).narrow(
                    0, m.lp_fragment_address.start, m.lp_fragment_address.numel))

        def write2(vals: dict[str, Tensor]) -> None:
            for name, (_, view) in slots.items():
                view.copy_(vals[name])

        return "partition", {n: (s, v.numel()) for n, (s, v) in slots.items()}, write2
    if kind not in ("torch", "unfused16", "zero12"):
        raise ReshardError(f"partial gradients of optimizer kind {kind!r} cannot be resharded")
    params = {n: p for n, p in engine.module.named_parameters() if p.requires_grad}
    attr = "grad_accum" if getattr(opt, "use_grad_accum_attribute", False) else "grad"
    dtype = getattr(opt, "gradient_accumulation_dtype", None) if attr == "grad_accum" else None

    def write_local(vals: dict[str, Tensor]) -> None:
        for name, p in params.items():
            setattr(p, attr, vals[name].view(p.shape).to(p.device, dtype or p.dtype))

    return "local", {n: (0, p.numel()) for n, p in params.items()}, write_local


def reshard_partial_grads(engine, read: Callable[[int], dict[str, Any]], old_world: int, form: str,
                          experts: ExpertSplit | None = None) -> None:
    """Fill this rank's gradient accumulator from the saved ranks' partial gradients (``read(r)``
    gives saved rank r's tree; ``form`` is ``partial_grads_form`` of them; ``experts`` places
    expert slices when either layout splits them). Collective only to agree that every rank
    succeeded.

    New stages 2/3 receive their partition of A. New stages 0/1 hold shares that DeepSpeed sums
    over the element's holders and divides by the world at the boundary: all ranks for dense
    parameters, the N = world / P ranks holding the same experts (expert-data-parallel group) for
    expert ones. From ``copy`` trees every holder gets world / holders x A (A for dense). From
    ``sum`` trees new rank r gets new world / old world x the gradients of old ranks r, r + new
    world, ... (dense), or of the old holders whose index in their expert-data-parallel group is
    r's modulo N (experts; the same rule without EP), so gradients keep their usual size per rank
    (it matters in bf16) and each old slice is read by one new rank. A parameter with no saved
    gradient counts as zero in ``sum`` trees, as DeepSpeed treats a missing gradient.
    """
    try:
        _fill_partial_grads(engine, read, old_world, form, experts or ExpertSplit({}))
    except Exception as e:  # noqa: BLE001  (re-raised here, after telling the other ranks)
        all_ranks_ok(engine.device, False, e)
    all_ranks_ok(engine.device, True)


def _fill_partial_grads(engine, read: Callable[[int], dict[str, Any]], old_world: int, form: str,
                        experts: ExpertSplit) -> None:
    mode, targets, write = _grad_targets(engine)
    if form not in ("sum", "copy"):
        raise ReshardError("the checkpoint's partial gradients cannot move to another layout")
    rank, world = dist.get_rank(), dist.get_world_size()
    shares = (mode, form) == ("local", "sum")
    edp = world // experts.new  # new holders of each expert element (expert-data-parallel group size)

    def takes(name: str, old_rank: int) -> bool:
        """Whether this rank adds saved rank ``old_rank``'s ``sum`` gradient of ``name``."""
        if not shares:
            return True
        if experts.is_expert(name):  # overlapping rows only: checked below
            return (old_rank // experts.old) % edp == rank // experts.new
        return old_rank % world == rank

    old_ranks = [r for r in range(old_world) if not shares or r % world == rank
                 or (experts.whole and (r // experts.old) % edp == rank // experts.new)]
    scale = world / old_world if shares else 1.0 / old_world if form == "sum" else 1.0
    vals = {name: torch.zeros(n, dtype=torch.float32) for name, (_, n) in targets.items()}
    covered: dict[str, list[tuple[int, int]]] = {name: [] for name in targets}
    for r in old_ranks:
        for name, (lp_s, n_s, t) in _grad_sources(read(r)).items():
            if name not in targets or not takes(name, r):
                continue
            # whole-parameter coordinates (expert slices sit at their rows); views stay local
            lp_t, n_t = targets[name]
            d0, s0 = lp_t + experts.new_shift(name), lp_s + experts.old_shift(name, r)
            lo, hi = max(d0, s0), min(d0 + n_t, s0 + n_s)
            if lo >= hi:
                continue
            piece, dst = t[lo - s0 : hi - s0].float(), vals[name][lo - d0 : hi - d0]
            if form == "sum":
                dst.add_(piece, alpha=scale)
            elif mode == "local" and experts.is_expert(name):
                dst.copy_(piece).mul_(experts.new)  # world / edp holders: DeepSpeed sums edp of them over world
            else:
                dst.copy_(piece)
            covered[name].append((lo, hi))
    if form == "copy":  # stage 2/3 partitions tile every parameter: a gap is a broken checkpoint
        for name, (lp, n) in targets.items():
            d0 = lp + experts.new_shift(name)
            end = _covered_to(d0, covered[name])
            if end < d0 + n:
                raise ReshardError(f"the checkpoint's partial gradients miss elements [{end}, {d0 + n}) of {name}")
    write(vals)
