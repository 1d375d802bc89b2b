"""Resuming a run: which checkpoint (agreed by all ranks), whether this run may use it, and putting
every component's state back, on the saved layout (exactly) or another one (elastic).

The trainer calls ``Resume(trainer).run(spec)`` once, before training; everything here reads the
trainer's components and the checkpoint manager, and sets the trainer's loop state.
"""

from __future__ import annotations

import fnmatch
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from seqpar.checkpoint.codec import LazyTensor
from seqpar.checkpoint.manager import SAFE_CHANGES, TRAINER_STATE, check_resume_config
from seqpar.checkpoint.writer import rank_dir
from seqpar.config import Config, ConfigError, TrainConfig, validate_config
from seqpar.engine import deepspeed_state as dss
from seqpar.engine.reshard import (
    ELASTIC_KINDS,
    expert_split,
    partial_grads_form,
    reshard_optimizer,
    reshard_partial_grads,
)
from seqpar.models import build_model
from seqpar.models.lora import ADAPTER_DIR, ADAPTER_FILE, BASE_FILE, check_base_identity, load_trainable_state_dict
from seqpar.optim.qgalore import QWEIGHTS_DIR, QWEIGHTS_FILE
from seqpar.rng import load_rng_state_dict
from seqpar.schedule import lr_at

if TYPE_CHECKING:
    from seqpar.engine.trainer import Trainer


def _layout(t: dict[str, Any]) -> str:
    ep = f", experts split over {t['ep']} ranks" if t.get("ep", 1) > 1 else ""
    return (f"world {t['world_size']} = dp {t['dp']} x ulysses {t['ulysses']} x ring {t['ring']}{ep}, "
            f"ZeRO-{t['zero_stage']}, {t['grad_accum_steps']} micro-batches per step")


def _loaded(tree: Any) -> Any:
    """``tree`` with its lazily read tensors (``LazyTensor``) read whole."""
    if isinstance(tree, LazyTensor):
        return tree.read()
    if isinstance(tree, dict):
        return {k: _loaded(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_loaded(v) for v in tree]
    return tree


def _window_done(state: dict[str, Any], saved_cfg: dict[str, Any]) -> int:
    """Sequences of the open window a checkpoint had done (all DP ranks; 0 at a step boundary)."""
    return state["micro_step"] * int(saved_cfg["train"]["micro_batch_size"]) * state["topology"]["dp"]


def _with_defaults(saved: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's config through today's schema: keys added since it was written take their
    defaults instead of counting as changes. As saved when it no longer validates."""
    try:
        return validate_config(saved).model_dump(mode="json")
    except (ConfigError, ValueError, OSError):
        return saved


DATA_CONTENT = "data.content"  # the checkpoint.allow_changes entry that accepts changed data files


def check_data_unchanged(saved: dict[str, str] | None, now: dict[str, str], allowed: list[str]) -> None:
    """Refuse a resume on data whose content changed since the checkpoint (same paths, other
    bytes: the same sample positions would now hold other tokens), unless ``allowed`` names
    ``data.content``. Checkpoints from before fingerprints were recorded are not checked."""
    if saved is None or saved == now or any(fnmatch.fnmatch(DATA_CONTENT, pat) for pat in allowed):
        return
    changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    names = {"tokenizer": "the tokenizer file", "chat_template": "the chat template"}
    what = ", ".join(names.get(k, f"'{k}'") for k in changed)
    raise ConfigError(
        f"the data changed since the checkpoint ({what}: other content under the same names): restore it, "
        f"or continue on the changed data with --checkpoint.allow_changes '[{DATA_CONTENT}]' (training goes "
        f"on from the same sample position; if the number of sequences changed, the sample order cannot "
        f"continue and the resume is refused anyway), or start a new run")


def lr_jump(saved: dict[str, Any], cfg: Config, step: int) -> str | None:
    """What a resume with a changed schedule (an extended run) does to the learning rate, when it
    raises it above the last one used: a cooled-down run warmed up again is rarely what was meant."""
    try:
        old = TrainConfig.model_validate(saved.get("train", {}))
    except ValueError:
        return None
    if step <= old.warmup_steps or old.decay == "constant":  # still warming up: rising is the plan
        return None
    last, nxt = lr_at(step - 1, old), lr_at(step, cfg.train)
    if nxt <= last * (1 + 1e-6) or last >= old.lr * (1 - 1e-6):
        return None
    hint = ""
    if old.decay == "wsd":
        span = max(old.max_steps - old.warmup_steps, 1)
        cooldown_at = old.max_steps - max(math.ceil(old.cooldown_ratio * span), 1)
        hint = (f"; to continue from the stable phase instead, resume a checkpoint from step {cooldown_at} or "
                f"before (python -m seqpar.ckpt list {cfg.checkpoint.dir or Path(cfg.logging.run_dir) / 'checkpoints'}; "
                f"--resume <it>)")
    return (f"the changed schedule raises the learning rate from {last:.2e} (step {step}, the last one used) to "
            f"{nxt:.2e}: the run had already decayed" + hint)


class Resume:
    """One resume of one trainer (its engine, model, sampler, loop state and checkpoint manager)."""

    def __init__(self, trainer: "Trainer"):
        self.tr = trainer

    def _log(self, msg: str) -> None:
        if self.tr.topo.is_main:
            self.tr.logger.print(msg)

    def run(self, spec: str) -> None:
        """Restore everything from a checkpoint (``auto`` | ``none`` | path); every rank."""
        self.tr.ckpt.lock(self.tr.logger.print)  # one job per checkpoint directory
        log = self.tr.logger.print if self.tr.topo.is_main else (lambda msg: None)
        path = self.tr.ckpt.find_resume(spec, self._cannot_resume, self._files_read, log)
        if path is None:
            return
        state, saved_cfg = self.tr.ckpt.read_shared(path)
        elastic = state["topology"] != self.tr._meta()["topology"]
        accepted = check_resume_config(_with_defaults(saved_cfg), self.tr.cfg.model_dump(mode="json"),
                                       self.tr.cfg.checkpoint.allow_changes, saved_step=state["step"])
        check_data_unchanged(state.get("data_fingerprint"), self.tr.data_fingerprint,
                             self.tr.cfg.checkpoint.allow_changes)
        if self.tr.cfg.model.lora is not None:  # before anything is moved aside
            saved_base = json.loads((path / ADAPTER_DIR / BASE_FILE).read_text())
            try:
                check_base_identity(saved_base, self.tr.base_identity, str(path))
            except ValueError as e:
                raise ConfigError(str(e)) from None
        self._set_aside_newer(path)
        if elastic:
            self._restore_elastic(path, state, saved_cfg)
        else:
            self._restore_exact(path, state)
        self.tr.ckpt.resumed_from = path.name
        self.tr._resumed_path, self.tr._resumed_world = path, state["topology"]["world_size"]
        self.tr._resumed_wandb_id = state.get("wandb_run_id")
        self.tr._last_tag = path.name
        if self.tr.topo.is_main:
            how = (f" onto a new layout ({_layout(state['topology'])} -> {_layout(self.tr._meta()['topology'])}; "
                   "state restored exactly, the trajectory now differs by reduction order)") if elastic else ""
            print(f"resumed from {path} (step {self.tr.state.step}, micro-step {self.tr.state.micro_step}){how}"
                  + (f"; allowed config changes: {accepted}" if accepted else ""), flush=True)
            schedule = [a for a in accepted if any(a.startswith(f"{k}:") for k in SAFE_CHANGES)]
            if schedule and (warning := lr_jump(_with_defaults(saved_cfg), self.tr.cfg, state["step"])):
                print(f"seqpar: warning: {warning}", file=sys.stderr, flush=True)

    def _files_read(self, path: Path) -> Callable[[str], bool]:
        """Which files of checkpoint ``path`` this rank reads when resuming it (it verifies those):
        the shared ones and its own rank's, or every rank's for an elastic resume."""
        try:
            saved = json.loads((path / TRAINER_STATE).read_text())["topology"]
        except (OSError, ValueError, KeyError, TypeError):
            return lambda rel: True
        if saved != self.tr._meta()["topology"]:
            return lambda rel: True
        mine = rank_dir(self.tr.topo.rank) + "/"
        # stage 0: rank 0 saved the optimizer for all (with split experts, rank r % P for rank r)
        replicated = dss.optimizer_is_replicated(self.tr.engine)
        source = rank_dir(self.tr.topo.rank % self.tr.cfg.parallel.expert_degree) + "/"
        return lambda rel: (not rel.startswith("rank") or rel.startswith(mine)
                            or (replicated and rel.startswith(source)))

    def _cannot_resume(self, path: Path) -> str | None:
        """Why this run cannot resume the (verified) checkpoint ``path``, or None."""
        state, saved_cfg = self.tr.ckpt.read_shared(path)
        old, new = state["topology"], self.tr._meta()["topology"]
        if old == new:
            return None
        where = f"saved on layout {_layout(old)}, this run is {_layout(new)}"
        if not self.tr.cfg.checkpoint.elastic:
            return f"{where} and checkpoint.elastic is off"
        copies = old.get("ep", 1) if state.get("optimizer_kind") in ("torch", "unfused16") else 1
        if any(not (path / rank_dir(r) / "fragments.json").is_file() for r in range(1, copies)):
            # ZeRO-0 with split experts: ranks 0..P-1 each hold one expert slice's optimizer copy
            return (f"{where}; it was saved at ZeRO-0 with experts split over ranks by an older seqpar, which kept "
                    "rank 0's optimizer state only (its experts alone): resume on the saved layout")
        old_batch = saved_cfg["train"]["micro_batch_size"] * old["grad_accum_steps"] * old["dp"]
        lay = self.tr.layout
        new_batch = lay.micro_batch_size * lay.grad_accum_steps * lay.dp
        if old_batch != new_batch:
            return (f"{where}: the global batch would change from {old_batch} to {new_batch} sequences per "
                    f"optimizer step; keep it with --train.global_batch_size {old_batch}")
        if not (path / rank_dir(0) / "fragments.json").is_file():
            return f"{where}; it was written before elastic resume existed (no fragments.json)"
        kinds = (state.get("optimizer_kind"), dss.optimizer_kind(self.tr.engine))
        if not all(k in ELASTIC_KINDS for k in kinds):
            return f"{where}; optimizer state {kinds[0]!r} -> {kinds[1]!r} cannot be resharded"
        if state["micro_step"]:
            done = _window_done(state, saved_cfg)
            unit = lay.micro_batch_size * lay.dp
            if done % unit:
                return (f"{where}; it was taken {done} sequences into an accumulation window, which is not a "
                        f"whole number of this layout's micro-steps ({unit} sequences = micro_batch_size x dp): "
                        f"choose --train.micro_batch_size so that micro_batch_size x dp divides {done}, or "
                        "resume a step-boundary checkpoint (tag ending in seq000000)")
            skeleton = json.loads((path / rank_dir(0) / "grads.json").read_text())
            if partial_grads_form(skeleton) is None:
                return (f"{where}; its partial gradients (micro-step {state['micro_step']}) were saved without "
                        "the slice map an elastic resume needs (an older seqpar, or BF16_Optimizer buffers): "
                        "resume on the saved layout or a step-boundary checkpoint")
        return None

    def _set_aside_newer(self, path: Path) -> None:
        """Checkpoints newer than the resumed one (corrupt or refused) move to ``superseded/``."""
        if Path(path).resolve().parent != self.tr.ckpt.store.root.resolve():
            return
        dist.barrier()  # every rank has chosen its checkpoint before rank 0 moves any
        if self.tr.topo.is_main:
            for moved in self.tr.ckpt.store.set_aside_newer(path.name):
                print(f"checkpoint newer than {path.name} moved aside (not resumed): {moved}", flush=True)
        dist.barrier()

    def _restore_exact(self, path: Path, state: dict[str, Any]) -> None:
        """Same layout: every rank reads back exactly what it saved."""
        eng, r = self.tr.engine, self.tr.topo.rank
        if dss.needs_module_weights(eng):
            self._load_weights(self.tr.model, path, self.tr.expert_parallel)
        ep = self.tr.cfg.parallel.expert_degree  # ZeRO-0: ranks 0..P-1 saved the copies (one per expert slice)
        opt_rank = r if not dss.optimizer_is_replicated(eng) else r % ep
        if self._galore_by_parameter():
            dss.restore_optimizer(eng, self._galore_tree(path, state["topology"]["world_size"], own=True))
        else:
            dss.restore_optimizer(eng, self.tr.ckpt.read_tree(path, "optimizer", opt_rank))
        engine_state = self.tr.ckpt.read_tree(path, "engine", r)
        dss.restore_counters(eng, engine_state["counters"])
        if self.tr.cfg.model.moe is not None:
            self.tr.model.load_router_state_dict(self.tr.ckpt.read_tree(path, "router", r))
        self.tr.state.load_state_dict({**{k: state[k] for k in self.tr.state.state_dict() if k in state},
                                    **engine_state["history"]})
        self.tr.sampler.load_state_dict(state["sampler"])
        if self.tr.state.micro_step > 0:
            dss.restore_partial_grads(eng, self.tr.ckpt.read_tree(path, "grads", r))
            if self.tr.int8_weights is not None:
                self.tr.int8_weights.load_state_dict(self.tr.ckpt.read_tree(path, "qgrads", r))
            self.tr._resumed_acc = engine_state["window"]
        load_rng_state_dict(self.tr.ckpt.read_tree(path, "rng", r))
        self.tr.extensions.load(lambda stem: self.tr.ckpt.read_tree(path, stem, r), self._log)

    def _galore_by_parameter(self) -> bool:
        """GaLore is the engine's optimizer itself (plain ZeRO-0): its state is per parameter,
        sharded (``shard``) or not, and read through ``GaLoreAdamW.shard_of``."""
        return self.tr.cfg.train.optimizer == "galore" and dss.optimizer_kind(self.tr.engine) == "torch"

    def _galore_tree(self, path: Path, old_world: int, own: bool) -> dict[str, Any]:
        """This rank's optimizer tree: with ``own`` (same layout), the share this rank saved when
        it was saved with today's owners; otherwise the union of every saved rank's state (a
        replicated save: rank 0's alone), this rank's share kept. Saved trees are read lazily and
        only this rank's entries are loaded (a rank never holds the whole state on the way)."""
        opt, read = self.tr.small_state_optimizer, self.tr.ckpt.read_tree
        if own and opt.owner is not None:
            mine = read(path, "optimizer", self.tr.topo.rank)
            if mine is not None and opt.same_owners(mine["optimizer"]):
                return {**mine, "optimizer": opt.shard_of([mine["optimizer"]])}
        trees = [t for r in range(old_world) if (t := read(path, "optimizer", r, lazy=True)) is not None]
        return _loaded({**trees[0], "optimizer": opt.shard_of([t["optimizer"] for t in trees])})

    def _load_weights(self, model, path: Path, ep=None) -> None:
        """The module weights a checkpoint holds: the whole model (``model/``, Hugging Face
        layout), or with LoRA the trainable tensors (``adapter/``) over the rebuilt base. With
        split experts (``ep``) the export holds every expert: loaded whole, this rank's rows kept."""
        if ep is not None and not (path / ADAPTER_DIR).is_dir():
            # each parameter assembled whole on the CPU, one at a time, and this rank's expert rows
            # kept (not a whole model per rank: a large MoE's experts would not fit every rank's memory)
            from seqpar.models.hf import load_hf_checkpoint

            local = model.state_dict(keep_vars=True)
            full = {n: (ep.num_experts, *t.shape[1:]) for n, t in local.items() if ".mlp.experts." in n}

            def write(name: str, value: torch.Tensor) -> None:
                with torch.no_grad():
                    local[name].copy_(value[ep.first:ep.first + ep.local] if name in full else value)

            load_hf_checkpoint(model, path / "model", write=write, shapes=full)
            return
        if (path / QWEIGHTS_DIR).is_dir():  # Q-GaLore's model: INT8 codes and scales as they were
            from safetensors.torch import load_file

            with torch.no_grad():
                model.load_state_dict(load_file(str(path / QWEIGHTS_DIR / QWEIGHTS_FILE)))
            return
        if (path / ADAPTER_DIR).is_dir():
            from safetensors.torch import load_file

            where = path / ADAPTER_DIR / ADAPTER_FILE
            tensors = load_file(str(where))
            if ep is not None:  # the file holds every expert's adapters: this rank's rows
                tensors = {k: v[ep.first:ep.first + ep.local] if ".mlp.experts." in k else v for k, v in tensors.items()}
            load_trainable_state_dict(model, tensors, str(where))
            return
        from seqpar.models.hf import load_hf_checkpoint

        load_hf_checkpoint(model, path / "model")

    def _restore_elastic(self, path: Path, state: dict[str, Any], saved_cfg: dict[str, Any]) -> None:
        """Another layout (``_cannot_resume`` checked): the optimizer state is resharded from every
        saved rank; what was the same on every rank (counters, expert bias, RNG, history) comes
        from saved rank 0. Inside a window, the partial gradients are resharded too, the window
        goes on at the micro-step of the new layout that starts at the same sample, and the
        per-rank sums of the window (loss, MoE token counts) are carried by the new rank 0."""
        old, kind = state["topology"], state["optimizer_kind"]
        # ZeRO-0 state is replicated, except over expert slices: saved ranks 0..P-1 hold one each
        ranks = list(range(old.get("ep", 1) if kind in ("torch", "unfused16") else old["world_size"]))
        # lazily: each new rank reads only the parts of the saved files that overlap its slices
        trees = {0: self.tr.ckpt.read_tree(path, "optimizer", 0, lazy=True)}
        scheduler = trees[0]["scheduler"]

        def sources():  # one saved rank's optimizer state in memory at a time
            for r in ranks:
                tree = trees.pop(r, None) or self.tr.ckpt.read_tree(path, "optimizer", r, lazy=True)
                yield r, tree["optimizer"], self.tr.ckpt.read_tree(path, "fragments", r)

        def old_weights() -> dict[str, torch.Tensor]:  # ZeRO-0 fp32 keeps its master in the module
            saved = build_model(self.tr.cfg.model, seed=self.tr.cfg.train.seed)
            self._load_weights(saved, path)
            return {n: p.detach() for n, p in saved.named_parameters()}

        # expert slices: saved rank r held rows (r % old ep) of the experts, this rank (rank % new ep)
        experts = expert_split(self.tr.engine, old.get("ep", 1), self.tr.cfg.parallel.expert_degree)
        if self.tr.cfg.train.optimizer in ("galore", "qgalore"):
            # ZeRO-0 (EP refused): whole parameters, in an order no layout changes; projectors and
            # low-rank moments need no slicing: saved rank 0's state is everyone's, or with GaLore's
            # state sharded by parameter (saved, now, or both) the union of the saved shares
            if dss.needs_module_weights(self.tr.engine):
                self._load_weights(self.tr.model, path)
            if self._galore_by_parameter():
                dss.restore_optimizer(self.tr.engine, self._galore_tree(path, old["world_size"], own=False))
            else:
                dss.restore_optimizer(self.tr.engine, self.tr.ckpt.read_tree(path, "optimizer", 0))
        elif state["step"] > 0:
            reshard_optimizer(self.tr.engine, kind, sources(), scheduler, old_weights, experts)
        # else inside the first window: no optimizer step yet, so the saved optimizer holds just the
        # initial weights, which this run has built from the same config and seed; nothing to move
        lay, old_ranks = self.tr.layout, range(old["world_size"])
        old_micro = state["micro_step"]
        new_micro = _window_done(state, saved_cfg) // (lay.micro_batch_size * lay.dp)
        counters = self.tr.ckpt.read_tree(path, "engine", 0)["counters"]
        counters["micro_steps"] = counters["micro_steps"] // old["grad_accum_steps"] * lay.grad_accum_steps + new_micro
        dss.restore_counters(self.tr.engine, counters)
        if self.tr.cfg.model.moe is not None:
            routers = [self.tr.ckpt.read_tree(path, "router", r) for r in (old_ranks if old_micro else [0])]
            self.tr.model.load_router_state_dict(self._window_sums(routers, ("tokens_per_expert", "dropped_tokens")))
        self.tr.state.load_state_dict({**{k: state[k] for k in self.tr.state.state_dict() if k in state},
                                    **self.tr.ckpt.read_tree(path, "engine", 0)["history"]})
        self.tr.state.micro_step = new_micro
        if old_micro:
            form = partial_grads_form(json.loads((path / rank_dir(0) / "grads.json").read_text()))
            reshard_partial_grads(self.tr.engine, lambda r: self.tr.ckpt.read_tree(path, "grads", r, lazy=True),
                                  old["world_size"], str(form), experts)
            if self.tr.int8_weights is not None:  # Q-GaLore's INT8 layers: DeepSpeed's ZeRO-0 rule, by hand
                self.tr.int8_weights.reshard(lambda r: self.tr.ckpt.read_tree(path, "qgrads", r), old["world_size"],
                                             self.tr.topo.rank, self.tr.topo.world_size)
            window = self._window_sums([self.tr.ckpt.read_tree(path, "engine", r)["window"] for r in old_ranks],
                                       ("ce", "aux"))
            # each micro-step's aux loss counts 1 / (accumulation steps x world) of the window
            window["aux"] *= (lay.grad_accum_steps * lay.world_size) / (old["grad_accum_steps"] * old["world_size"])
            self.tr._resumed_acc = window
        self.tr.sampler.load_state_dict(state["sampler"])
        load_rng_state_dict(self.tr.ckpt.read_tree(path, "rng", 0))
        self.tr.extensions.load(lambda stem: self.tr.ckpt.read_tree(path, stem, 0), self._log)  # as RNG: rank 0's

    def _window_sums(self, trees: list[dict[str, Any]], summed: tuple[str, ...]) -> dict[str, Any]:
        """Saved rank 0's tree, with the entries whose key ends in one of ``summed`` replaced by
        their sum over all saved ranks on the new rank 0 and by zero on the others (what is
        summed over ranks at the end of the window: loss sums, MoE token counts)."""
        out = dict(trees[0])
        for key in out:
            if key.endswith(summed):
                total = sum(t[key] for t in trees)
                out[key] = total if self.tr.topo.is_main else total * 0
        return out
