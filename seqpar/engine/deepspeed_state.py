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
Everything returned is a CPU copy (the live tensors keep changing).
"""

from __future__ import annotations

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


def unsupported_settings(engine, precision: str) -> list[str]:
    """Why this engine's setup would make seqpar's checkpoints lose or misplace state (each reason
    names the ``deepspeed:`` key and the fix); empty when supported. Checked after start-up,
    whatever spelling the config used."""
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer

    why = []
    for key, off in (("offload_optimizer", engine.zero_offload_optimizer()),
                     ("offload_param", engine.zero_offload_param())):
        if off is not None and str(getattr(off.device, "value", off.device)) != "none":
            why.append(f"deepspeed.zero_optimization.{key} (or cpu_offload*): partial gradients live in offload "
                       "buffers that micro-batch checkpoints do not capture; remove it")
    if engine.bfloat16_enabled() != (precision == "bf16"):
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
    """Stage 0 optimizer state is identical on every rank (one copy is enough)."""
    return optimizer_kind(engine) in ("torch", "unfused16")


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
    tree = _capture_partial_grads(engine, copy)
    if not _has_tensor(tree):
        raise RuntimeError("no partial gradients found inside an accumulation window: this DeepSpeed setup keeps "
                           "them where seqpar does not look (deepspeed_state.unsupported_settings should have "
                           "refused it); the checkpoint would lose them")
    return tree


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
        }
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
    return {"grad": grads, "grad_accum": accum}


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
        return
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
