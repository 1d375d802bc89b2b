"""DeepSpeed engine state seqpar saves and restores itself (pinned: deepspeed==0.19.8).

DeepSpeed's own ``save_checkpoint`` drops the gradients accumulated inside an accumulation window
and ``micro_steps``, saves no RNG and writes pickles; so seqpar captures the state directly:

* optimizer: ``engine.optimizer.state_dict()`` (this rank's ZeRO partition: fp32 master, Adam
  moments, loss scaler) and the matching ``load_state_dict`` calls DeepSpeed's loader makes;
* module weights only where the optimizer holds no fp32 master (stage 0, fp32);
* partial gradients of the open window, where each ZeRO stage keeps them (below);
* engine counters (``global_steps``, ``global_samples``, ``skipped_steps``, ``micro_steps``).

Where partial gradients live (verified bitwise on CPU, 2 ranks; docs/checkpoint-format.md):
stage 0/1: the local, not yet reduced ``param.grad`` (stage 1 may use ``param.grad_accum``), or for
``BF16_Optimizer`` its fp32 gradient buffers; stage 2: the per-micro-step *reduced* accumulator
``optimizer.averaged_gradients`` (built from ``all_grad_tensors``); stage 3: the flat
``grad_partitions_flat_buffer`` plus ``micro_step_id`` and the epilogue flag.
With ZeRO-Offload (``memory.offload_optimizer``; docs/zero-offload.md) the fp32 master and the
moments are CPU tensors inside the same state dicts, and the partial gradients are: stage 1, still
the local ``param.grad`` (reduced only at the boundary); stage 2, the per-parameter CPU buffers
``accumulated_grads_in_cpu`` (reduced every micro-step; only this rank's slice of each is used)
plus ``micro_step_id``, which decides whether the next micro-step adds to them or overwrites them;
stage 3, ``grad_partitions_flat_buffer`` as without offload, allocated in CPU memory.
Everything returned is a CPU copy (the live tensors keep changing).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

DEEPSPEED_VERSION = "0.19.8"


def _clone(tree: Any, copy: bool = True) -> Any:
    """``tree`` with CPU copies of its tensors; ``copy=False``: the live tensors, detached (the
    checkpoint snapshot copies them itself, once, before training touches them again)."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().to("cpu", copy=True) if copy else tree.detach()
    if isinstance(tree, dict):
        return {k: _clone(v, copy) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_clone(v, copy) for v in tree]
    if isinstance(tree, tuple) and not hasattr(tree, "_fields"):
        return tuple(_clone(v, copy) for v in tree)
    return tree


def _device(off) -> str:
    """``cpu`` | ``nvme`` | ``none`` of a DeepSpeed offload config (None: none)."""
    return "none" if off is None else str(getattr(off.device, "value", off.device))


def offload_problems(engine, offload: tuple[bool, bool] | None = None) -> list[str]:
    """Why this engine's ZeRO-Offload is not the form seqpar's checkpoints capture (CPU, whole,
    torch's AdamW, offload_param at ZeRO-3 only); ``offload``: what memory.offload_optimizer /
    memory.offload_params asked for (None: not known, only the form is checked)."""
    why = []
    raw = (getattr(getattr(engine, "_config", None), "_param_dict", None) or {}).get("zero_optimization") or {}
    for key, ours in (("cpu_offload", "memory.offload_optimizer"), ("cpu_offload_param", "memory.offload_params")):
        if isinstance(raw, dict) and raw.get(key):
            why.append(f"deepspeed.zero_optimization.{key} (DeepSpeed's legacy offload_optimizer / offload_param "
                       f"spelling): remove it and set {ours}: true")
    stage = int(engine.zero_optimization_stage())
    opt_cfg, param_cfg = engine.zero_offload_optimizer(), engine.zero_offload_param()
    on_opt, on_param = _device(opt_cfg) != "none", _device(param_cfg) != "none"
    for key, cfg, ours in (("offload_optimizer", opt_cfg, "memory.offload_optimizer"),
                           ("offload_param", param_cfg, "memory.offload_params")):
        if _device(cfg) == "nvme":
            why.append(f"deepspeed.zero_optimization.{key}.device nvme: ZeRO-Infinity's swap files are outside "
                       f"seqpar's checkpoints; use {ours} (CPU memory)")
    if on_opt and (float(getattr(opt_cfg, "ratio", 1.0)) < 1.0 or getattr(opt_cfg, "super_offload", False)):
        why.append("deepspeed.zero_optimization.offload_optimizer ratio < 1 / super_offload (a second, partial "
                   "optimizer) is not captured by seqpar's checkpoints; remove them and use memory.offload_optimizer")
    if on_opt and stage == 0:
        why.append("optimizer offload at ZeRO-0 (DeepSpeed ignores it): set parallel.zero_stage 1, 2 or 3, or turn "
                   "memory.offload_optimizer off")
    if on_param and stage != 3:
        why.append(f"parameter offload at ZeRO-{stage} (only ZeRO-3 partitions parameters): set parallel.zero_stage "
                   "3, or turn memory.offload_params off")
    inner = getattr(engine.optimizer, "optimizer", None)
    if on_opt and stage > 0 and not isinstance(inner, (torch.optim.AdamW, torch.optim.Adam)):
        why.append(f"optimizer offload with {type(inner).__name__} (deepspeed.optimizer.params.torch_adam false "
                   "builds DeepSpeedCPUAdam): seqpar checkpoints torch's AdamW state; keep torch_adam true")
    if offload is not None:
        for key, runs, wanted, ours in (("offload_optimizer", on_opt, offload[0], "memory.offload_optimizer"),
                                        ("offload_param", on_param, offload[1], "memory.offload_params")):
            if runs != wanted:
                why.append(f"DeepSpeed runs {'with' if runs else 'without'} zero_optimization.{key} but {ours} is "
                           f"{str(wanted).lower()}: set offload with {ours} only (no deepspeed.zero_optimization keys)")
    return why


def unsupported_settings(engine, precision: str, offload: tuple[bool, bool] | None = None,
                         master: bool = True) -> list[str]:
    """Why this engine's setup would make seqpar's checkpoints lose or misplace state (each reason
    names the ``deepspeed:`` key and the fix); empty when supported. Checked after start-up,
    whatever spelling the config used. ``offload``: (memory.offload_optimizer,
    memory.offload_params) when the caller knows them (see ``offload_problems``). ``master``
    false: bf16 weights without an fp32 master copy (GaLore's low-precision weights), which
    DeepSpeed must run without its bf16 wrapper."""
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer

    why = offload_problems(engine, offload)
    if not master and engine.bfloat16_enabled():
        why.append("DeepSpeed runs bf16 (an fp32 master copy) but train.galore.master_weights is false: remove "
                   "deepspeed.bf16/bfloat16 (train.precision sets it) or set train.galore.master_weights true")
    elif master and engine.bfloat16_enabled() != (precision == "bf16"):
        why.append(f"DeepSpeed runs {'bf16' if engine.bfloat16_enabled() else 'without bf16'} but train.precision "
                   f"is {precision}: set the precision with train.precision only (no deepspeed.bf16/bfloat16)")
    opt = engine.optimizer
    if isinstance(opt, DeepSpeedZeroOptimizer) and any(
            opt._use_compact_grad_partition_buffer(i) for i in range(len(opt.bit16_groups))):
        why.append("deepspeed.data_types.grad_accum_dtype fp32 with bf16 at ZeRO-2 keeps partial gradients in a "
                   "compact buffer micro-batch checkpoints do not capture; remove it or use ZeRO-1/3")
    if isinstance(opt, FP16_Optimizer):
        why.append("deepspeed.optimizer.params.torch_adam false at ZeRO-0 bf16 (FusedAdam under FP16_Optimizer) "
                   "is not supported by seqpar's checkpoints; set torch_adam true or use ZeRO-1/2/3")
    if engine.zero_elastic_checkpoint():
        why.append("deepspeed.zero_optimization.elastic_checkpoint makes the optimizer state unloadable by "
                   "seqpar's resume; remove it (seqpar's elastic resume is checkpoint.elastic)")
    if engine.torch_autocast_enabled():
        why.append("deepspeed.torch_autocast: its gradient scaler state is not checkpointed and seqpar owns "
                   "precision; remove it and set train.precision")
    if engine.zero_optimization_stage() in (1, 2) and not engine.zero_compute_grad_norm():
        why.append("deepspeed.zero_optimization.compute_grad_norm false: ZeRO-1/2 then cannot tell a step whose "
                   "gradients are not finite (NaN/inf would reach the weights); remove it")
    if not engine.managed_gradient_accumulation():
        why.append("deepspeed.managed_gradient_accumulation false: seqpar drives accumulation windows itself; "
                   "remove it")
    return why


def optimizer_kind(engine) -> str:
    opt = engine.optimizer
    if isinstance(opt, DeepSpeedZeroOptimizer_Stage3):
        return "zero3"
    if isinstance(opt, BF16_Optimizer):
        return "bf16"
    if isinstance(opt, DeepSpeedZeroOptimizer):
        return "zero12"
    if isinstance(opt, FP16_UnfusedOptimizer):
        return "unfused16"
    return "torch"


def needs_module_weights(engine) -> bool:
    """Only plain stage-0 fp32 keeps no fp32 master copy in the optimizer."""
    return optimizer_kind(engine) == "torch"


def optimizer_is_replicated(engine) -> bool:
    """Stage 0 optimizer state is identical on every rank (one copy is enough), unless seqpar's
    own optimizer shards it by parameter (GaLore's ``shard``)."""
    return optimizer_kind(engine) in ("torch", "unfused16") and getattr(engine.optimizer, "owner", None) is None


def weight_replica_group(engine):
    """The ranks holding the same weights, over which DeepSpeed averages gradients (data x sequence
    parallel; expert parallelism aside)."""
    return engine.seq_data_parallel_group


# -- steps whose gradients are not finite (engine/nonfinite.py) --------------------------------------
def skips_nonfinite_steps(engine) -> bool:
    """DeepSpeed's ZeRO, bf16 and unfused 16-bit optimizers skip a step whose global gradient norm is
    NaN or inf themselves (no update, ``skipped_steps`` + 1, the LR scheduler not stepped); the
    plain optimizer DeepSpeed runs at stage 0 in fp32 applies it."""
    return optimizer_kind(engine) != "torch"


def skipped_steps(engine) -> int:
    return int(engine.skipped_steps)


@contextmanager
def step_skipped(engine):
    """``engine.step()`` inside makes no update with the plain stage-0 optimizer and DeepSpeed
    counts the step as skipped, as it does for its own optimizers: ``_take_model_step`` reads
    ``optimizer.overflow`` after ``optimizer.step()``. Clipping and zeroing the gradients still run."""
    opt = engine.optimizer
    if optimizer_kind(engine) != "torch":
        raise RuntimeError("step_skipped is for the plain stage-0 optimizer; DeepSpeed's own skip such steps")
    # an instance attribute hides the class's step; torch's LR scheduler may have put its own
    # wrapper there, which comes back afterwards
    wrapped = opt.__dict__.get("step")
    opt.step = lambda *args, **kwargs: None
    opt.overflow = True
    try:
        yield
    finally:
        del opt.overflow
        if wrapped is None:
            del opt.step
        else:
            opt.step = wrapped


def advance_schedule(engine) -> None:
    """Step the LR scheduler DeepSpeed left where it was for a skipped step."""
    if engine.lr_scheduler is not None:
        engine.lr_scheduler.step()


# -- optimizer + scheduler -------------------------------------------------------------------------
def capture_optimizer(engine, copy: bool = True) -> dict[str, Any]:
    """Optimizer + LR-scheduler state (CPU copies; ``copy=False``: live tensors, see ``_clone``)."""
    return {
        "optimizer": _clone(engine.optimizer.state_dict(), copy),
        "scheduler": _clone(engine.lr_scheduler.state_dict(), copy) if engine.lr_scheduler is not None else None,
    }


def restore_optimizer(engine, state: dict[str, Any]) -> None:
    """On a fresh engine, every rank (collectives inside). For plain stage-0 fp32 the caller first
    loads the module weights (``needs_module_weights``); elsewhere they come from the fp32 master."""
    opt, kind, sd = engine.optimizer, optimizer_kind(engine), state["optimizer"]
    if kind in ("zero12", "bf16", "zero3"):
        group = opt.dp_process_group
        sd_list: list[Any] = [None] * dist.get_world_size(group=group)
        sd_list[dist.get_rank(group=group)] = sd
        if kind == "zero3":
            opt.checkpoint_event_prologue()
        opt.load_state_dict(state_dict_list=sd_list, load_optimizer_states=True, load_from_fp32_weights=True)
        if kind == "zero3":
            opt.checkpoint_event_epilogue()
        else:
            opt.update_lp_params()  # bit16 params from the fp32 master
    elif kind == "unfused16":
        opt.load_state_dict(sd, load_optimizer_states=True)
        with torch.no_grad():
            for low, high in zip(opt.fp16_groups, opt.fp32_groups):
                for lp, hp in zip(low, high):
                    lp.copy_(hp)
    else:
        opt.load_state_dict(sd)
    if state["scheduler"] is not None:
        engine.lr_scheduler.load_state_dict(state["scheduler"])


# -- counters --------------------------------------------------------------------------------------
def capture_counters(engine) -> dict[str, int]:
    return {
        "global_steps": int(engine.global_steps),
        "global_samples": int(engine.global_samples),
        "skipped_steps": int(engine.skipped_steps),
        "micro_steps": int(engine.micro_steps),
    }


def restore_counters(engine, counters: dict[str, int]) -> None:
    for k, v in counters.items():
        setattr(engine, k, v)


# -- partial gradients of the open accumulation window ---------------------------------------------
def capture_partial_grads(engine, copy: bool = True) -> dict[str, Any]:
    """The open window's partial gradients (a CPU copy; ``copy=False``: live tensors). Raises
    rather than save none."""
    _settle_offload(engine)
    tree = _capture_partial_grads(engine, copy)
    if not _has_tensor(tree):
        raise RuntimeError("no partial gradients found inside an accumulation window: this DeepSpeed setup keeps "
                           "them where seqpar does not look (deepspeed_state.unsupported_settings should have "
                           "refused it); the checkpoint would lose them")
    return tree


def _settle_offload(engine) -> None:
    """Offloaded gradients reach their (pinned) CPU buffers by non-blocking device-to-host copies:
    wait for them before the snapshot reads the buffers on the host (no-op on CPU)."""
    opt = engine.optimizer
    if getattr(opt, "cpu_offload", False) or getattr(opt, "offload_optimizer", False):
        from deepspeed.accelerator import get_accelerator

        if hasattr(opt, "_wait_for_offload_copies"):
            opt._wait_for_offload_copies()
        get_accelerator().synchronize()


def _has_tensor(tree: Any) -> bool:
    if isinstance(tree, torch.Tensor):
        return True
    if isinstance(tree, dict):
        return any(_has_tensor(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return any(_has_tensor(v) for v in tree)
    return False


def _capture_partial_grads(engine, copy: bool) -> dict[str, Any]:
    opt, kind = engine.optimizer, optimizer_kind(engine)
    if kind == "zero3":
        return {
            "flat": _clone(opt.grad_partitions_flat_buffer, copy),
            "micro_step_id": int(opt.micro_step_id),
            "epilogue_ran": bool(getattr(opt, "_epilogue_ran_this_backward", False)),
            "index": zero3_grad_index(engine),  # for an elastic resume (engine/reshard.py)
            # offload: the parameters reduced in this window (DeepSpeed's record; by name)
            "offload_reduced": _names_of_ds_ids(engine, getattr(opt, "_offload_boundary_param_ids", ())),
        }
    if kind == "zero12" and opt.partition_gradients and getattr(opt, "cpu_offload", False):
        return _capture_offload12(engine, copy)
    if kind == "zero12" and opt.partition_gradients:  # stage 2: reduced every micro-step
        names = {id(p): n for n, p in engine.module.named_parameters()}
        out, where = {}, {}
        for i in range(len(opt.bit16_groups)):
            if opt.averaged_gradients.get(i) is None and opt.all_grad_tensors.get(i) is not None:
                out[str(i)] = [_clone(t, copy) if t is not None else None for t in opt.all_grad_tensors[i]]
                # full-shape tensors, valid on this rank's partition only: which elements, per tensor
                where[str(i)] = [[names[id(p)], *_lp_range(p)] for p in opt.params_in_partition[i]]
        return {"all_grad_tensors": out, "slices": where}
    if kind == "bf16":
        return {
            "flat": [_clone(t, copy) for t in opt.fp32_groups_gradients_flat],
            "has": _clone(opt.fp32_groups_has_gradients, copy),
        }
    # stage 0 / 1: local, unreduced gradients on the parameters
    grads, accum = {}, {}
    for name, p in engine.module.named_parameters():
        if p.grad is not None:
            grads[name] = _clone(p.grad, copy)
        if getattr(p, "grad_accum", None) is not None:
            accum[name] = _clone(p.grad_accum, copy)
    tree: dict[str, Any] = {"grad": grads, "grad_accum": accum}
    if kind == "zero12":  # stage 1 offload reads it at the boundary (see _micro_step_state)
        tree["micro_step"] = _micro_step_state(opt)
    return tree


def _micro_step_state(opt) -> list[int]:
    """ZeRO-1/2 ``[micro_step_id, ready_for_gradients]``. The next backward increments the id
    only when buckets are not set up (ready false): stage 2 releases them after every backward,
    stage 1 only at the boundary, so a restore must subtract the increment the fresh engine adds."""
    return [int(opt.micro_step_id), int(bool(getattr(opt, "ready_for_gradients", False)))]


def _restore_micro_step(opt, saved: list[int]) -> None:
    micro_step_id, ready = saved
    opt.micro_step_id = micro_step_id - ready  # a fresh engine is not ready: its next backward adds 1


def _names_of_ds_ids(engine, ids: Any) -> list[str]:
    by_id = {getattr(p, "ds_id", None): n for n, p in engine.module.named_parameters()}
    return sorted(by_id[i] for i in ids if i in by_id)


def offload12_slots(engine) -> dict[str, tuple[int, int, int]]:
    """ZeRO-2 offload: ``{name: (param id, first element, count)}`` of the parameters this rank's
    partition holds, as DeepSpeed's ``grad_position`` places them in ``accumulated_grads_in_cpu``
    (full-size per-parameter buffers of which only those elements are ever read)."""
    opt = engine.optimizer
    names = {id(p): n for n, p in engine.module.named_parameters()}
    out = {}
    for params in opt.params_in_partition:
        for p in params:
            pid = opt.get_param_id(p)
            _, first, _, count = opt.grad_position[pid]
            if count > 0:
                out[names[id(p)]] = (pid, int(first), int(count))
    return out


def _capture_offload12(engine, copy: bool) -> dict[str, Any]:
    """ZeRO-2 offload: this rank's slice of every CPU accumulation buffer (its partition of the
    window's reduced gradient), the slice map, the parameters reduced in this window, and the
    micro-step id."""
    opt, slots = engine.optimizer, offload12_slots(engine)
    grads, where = {}, {}
    for name, (pid, first, count) in slots.items():
        buf = opt.accumulated_grads_in_cpu.get(pid)
        if buf is not None:  # created at a parameter's first reduction, reused by later windows
            grads[name] = _clone(buf.view(-1).narrow(0, first, count), copy)
            where[name] = [first, count]
    by_pid = {pid: n for n, (pid, _, _) in slots.items()}
    return {"cpu_grads": grads, "cpu_slices": where, "micro_step": _micro_step_state(opt),
            "offload_reduced": sorted(by_pid[i] for i in opt._offload_accumulated_param_ids if i in by_pid)}


def fill_offload12(engine, vals: dict[str, Any], reduced: list[str], micro_step: list[int]) -> None:
    """ZeRO-2 offload: put this rank's slices (``{name: 1-D values}``) into fresh CPU accumulation
    buffers (zero elsewhere: DeepSpeed never reads outside the slice), as DeepSpeed allocates them."""
    from deepspeed.accelerator import get_accelerator

    opt, slots = engine.optimizer, offload12_slots(engine)
    params = {n: p for n, p in engine.module.named_parameters()}
    for name, t in vals.items():
        pid, first, count = slots[name]
        buf = torch.zeros(params[name].numel(), dtype=params[name].dtype, device=opt.device)
        if opt.cpu_offload_pin_memory:
            buf = get_accelerator().pin_memory(buf)
        buf.narrow(0, first, count).copy_(t.reshape(-1))
        opt.accumulated_grads_in_cpu[pid] = buf
    opt._offload_accumulated_param_ids = {slots[n][0] for n in reduced}
    _restore_micro_step(opt, micro_step)


def _lp_range(p) -> list[int]:
    """[first element, count] of a ZeRO-1/2 parameter that this rank's partition holds."""
    m = p._hp_mapping
    return [int(m.lp_fragment_address.start), int(m.lp_fragment_address.numel)]


def zero3_grad_partitions(engine) -> dict[str, tuple[Any, int, int]]:
    """ZeRO-3: ``{name: (view into the flat gradient buffer, first element, count)}`` of the
    parameters whose partition on this rank holds real elements (the last one is padded)."""
    opt = engine.optimizer
    by_id = opt._DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition
    rank = dist.get_rank(group=opt.dp_process_group)
    out = {}
    for name, p in engine.module.named_parameters():
        if not p.requires_grad or p.ds_id not in by_id:
            continue
        start = rank * p.partition_numel()
        valid = min(p.partition_numel(), p.ds_numel - start)
        if valid > 0:
            out[name] = (by_id[p.ds_id].narrow(0, 0, valid), start, valid)
    return out


def zero3_grad_index(engine) -> dict[str, list[int]]:
    """``{name: [offset in the flat buffer, first element, count]}`` (saved with the buffer)."""
    base = engine.optimizer.grad_partitions_flat_buffer.storage_offset()
    return {n: [v.storage_offset() - base, start, count] for n, (v, start, count) in zero3_grad_partitions(engine).items()}


def restore_partial_grads(engine, state: dict[str, Any]) -> None:
    opt, kind = engine.optimizer, optimizer_kind(engine)
    if kind == "zero3":
        opt.grad_partitions_flat_buffer.copy_(state["flat"])
        opt.micro_step_id = state["micro_step_id"]
        opt._epilogue_ran_this_backward = state["epilogue_ran"]
        if hasattr(opt, "_offload_boundary_param_ids"):
            ids = {n: getattr(p, "ds_id", None) for n, p in engine.module.named_parameters()}
            opt._offload_boundary_param_ids = {ids[n] for n in state.get("offload_reduced", [])}
        return
    if kind == "zero12" and getattr(opt, "cpu_offload", False) and opt.partition_gradients:
        if "cpu_grads" not in state:
            raise RuntimeError("these partial gradients were saved without ZeRO-Offload, this run offloads: "
                               "resume with the saved memory.offload_optimizer")
        fill_offload12(engine, state["cpu_grads"], state["offload_reduced"], state["micro_step"])
        return
    if "cpu_grads" in state:
        raise RuntimeError("these partial gradients were saved with ZeRO-2 offload, this run does not offload: "
                           "resume with memory.offload_optimizer true")
    if kind == "zero12" and opt.partition_gradients:
        device = next(engine.module.parameters()).device
        for i, tensors in state["all_grad_tensors"].items():
            opt.all_grad_tensors[int(i)] = [t.to(device) if t is not None else None for t in tensors]
        return
    if kind == "bf16":
        for dst, src in zip(opt.fp32_groups_gradients_flat, state["flat"]):
            dst.copy_(src)
        for i, has in enumerate(state["has"]):
            opt.fp32_groups_has_gradients[i] = list(has)
        return
    params = dict(engine.module.named_parameters())
    for name, g in state["grad"].items():
        params[name].grad = g.to(params[name].device)
    for name, g in state["grad_accum"].items():
        params[name].grad_accum = g.to(params[name].device)
    if kind == "zero12" and "micro_step" in state:
        _restore_micro_step(opt, state["micro_step"])


# -- expert parallelism: DeepSpeed's native MoE gradient paths, without its MoE layers ---------------
# (research with file:line evidence: shared notes ep-deepspeed.md). DeepSpeed 0.19.8 partitions a
# parameter group marked ``moe`` over the ranks holding the same experts, reduces its gradients
# there divided by the world size (the same divisor as dense gradients, so seqpar's loss scaling
# holds) and all-reduces the expert norm over the world at ZeRO-1/2 (exact clipping). Its code
# paths switch on when the module tree contains a ``deepspeed.moe.layer.MoE``.
def expert_group_name(degree: int) -> str:
    return f"ep_size_{degree}"


def expert_parallel_groups(degree: int):
    """(EP group, expert-data-parallel group) of this rank, created by DeepSpeed (collective) so
    its optimizer and seqpar's all-to-all use the same communicators; checked against
    ``seqpar.parallel.experts.ep_groups`` (consecutive EP groups)."""
    import deepspeed
    import deepspeed.comm as ds_dist
    from deepspeed.utils import groups

    from seqpar.parallel.experts import ep_groups

    if not ds_dist.is_initialized():  # torch.distributed is; DeepSpeed's wrapper of it not yet
        deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
    name, world, rank = expert_group_name(degree), dist.get_world_size(), dist.get_rank()
    groups._create_expert_and_data_parallel(degree)
    ep, edp = ep_groups(world, degree)
    got = (list(groups._get_expert_parallel_group_ranks(name)), list(groups._get_expert_data_parallel_group_ranks(name)))
    if got != (ep[rank // degree], edp[rank % degree]):
        raise RuntimeError(f"DeepSpeed's expert groups {got} differ from seqpar's {ep[rank // degree]}, "
                           f"{edp[rank % degree]} (DeepSpeed version?)")
    return groups._get_expert_parallel_group(name), groups._get_expert_data_parallel_group(name)


def _marker_class():
    from deepspeed.moe.layer import MoE as DeepSpeedMoE

    class DeepSpeedMoEMarker(DeepSpeedMoE):
        """Turns DeepSpeed's expert-parallel gradient paths on; holds nothing and never runs."""

        def __init__(self, num_experts: int, degree: int):
            torch.nn.Module.__init__(self)  # not DeepSpeedMoE.__init__ (it builds its own gate and experts)
            self.num_experts, self.ep_size = num_experts, degree
            self.expert_group_name = expert_group_name(degree)

        def set_deepspeed_parallelism(self, *args, **kwargs):  # the engine calls it on every module that has it
            pass

        def forward(self, *args, **kwargs):
            raise RuntimeError("DeepSpeedMoEMarker is a marker, not a layer")

    return DeepSpeedMoEMarker


def mark_expert_params(model: torch.nn.Module, degree: int) -> str:
    """Mark the split experts as DeepSpeed expert parameters and attach the marker module (no
    parameters or buffers: state dicts and exports are unchanged). Returns the group name.
    Frozen ones too (LoRA's base experts): DeepSpeed broadcasts an unmarked parameter from rank 0
    at start-up, which would overwrite every rank's own experts with rank 0's."""
    name = expert_group_name(degree)
    n_experts = 0
    for pname, p in model.named_parameters():
        if ".mlp.experts." in pname:
            p.allreduce, p.group_name = False, name
            n_experts = max(n_experts, p.shape[0] * degree)
    model.ds_moe_marker = _marker_class()(n_experts, degree)
    return name
