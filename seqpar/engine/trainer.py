"""The training loop: one micro-batch at a time, on a DeepSpeed engine.

With ``deepspeed_state`` the only code that talks to DeepSpeed. Flow: config -> topology -> data -> model ->
``deepspeed.initialize`` -> ``Trainer.train()``. The loop position is explicit: ``step`` (optimizer
steps done) and ``micro_step`` (micro-batches done inside the open accumulation window), so a
checkpoint can be taken after any micro-batch.

Loss normalisation: the loss of an optimizer step is the sum of token cross-entropies over the whole
global batch divided by the number of labelled tokens in it (counted on every DP rank for its share
of the window and all-reduced once per step). DeepSpeed averages gradients over all ranks (DP and
SP replicas), so each rank back-propagates ``ce_sum * world / tokens`` (``scale_wrt_gas=False``):
the result is independent of how the global batch is split into ranks and micro-batches.

Checkpoints: after any micro-batch the trainer hands the checkpoint manager named state trees
(every component's ``state_dict``) and restores them by name on resume.
"""

from __future__ import annotations

import copy
import math
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from seqpar import __version__
from seqpar.checkpoint.manager import CheckpointManager, from_rank0
from seqpar.checkpoint.runstate import write_run_state
from seqpar.checkpoint.signals import EXIT_PREEMPTED, StopSignal
from seqpar.checkpoint.store import FORMAT_VERSION, Position
from seqpar.checkpoint.writer import WriteFailed
from seqpar.config import Config, ConfigError, Layout
from seqpar.engine import deepspeed_state as dss
from seqpar.engine.evaluation import eval_identity, held_out_loss
from seqpar.engine.extensions import Extensions
from seqpar.engine.memory import apply_memory_policy
from seqpar.engine.profiling import StepProfiler
from seqpar.engine.nonfinite import Diverged, NonFiniteGuard, diverged_message, skipped_message
from seqpar.engine.resume import Resume
from seqpar.engine.snapshot import Snapshot, tokenizer_files
from seqpar.engine.zero3_init import build_partitioned_model
from seqpar.data.loader import to_device
from seqpar.data import Batch, GlobalSampler, MicroBatchLoader, PasskeyDataset, build_tokenizer
from seqpar.data.cache import Stopped
from seqpar.data.prepare import prepare_data, progress_printer
from seqpar.errors import DataError, UserError
from seqpar.evaluate import passkey_results
from seqpar.flops import step_flops
from seqpar.kernels import AttnMeta, LocalAttention, attn_meta_from_positions, select_attention, select_block_kernel
from seqpar.loss import select_loss
from seqpar.metrics import RunLogger, memory_gib, peak_tflops
from seqpar.models import Transformer, build_model, count_parameters
from seqpar.models.compile import compile_layers
from seqpar.models.lora import base_identity
from seqpar.models.transformer import combine_routing_digest
from seqpar.parallel import Topology
from seqpar.parallel.attention import build_attention, prepare_local_kernel, shard_for
from seqpar.optim import build_small_state_optimizer, describe_optimizer
from seqpar.optim.sizes import checkpoint_bytes, galore_sharded
from seqpar.parallel.experts import ExpertParallel, clip_grad_norm_
from seqpar.parallel.sharding import owner_of
from seqpar.rng import seed_everything
from seqpar.schedule import WarmupDecay


# What each recorded outcome means to a restart loop (the process's own exit status).
RUN_STATE_EXIT = {"running": 1, "preempted": EXIT_PREEMPTED, "finished": 0}


class CheckpointIOError(RuntimeError):
    """A checkpoint could not be written and checkpoint.on_write_error is stop (exit ``EXIT_IO``)."""


STOPPED = "\x00stopped"  # rank 0 tells the others that a stop ended its tokenizing


def _size(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"








def param_groups(model: torch.nn.Module, weight_decay: float, expert_group: str | None = None) -> list[dict[str, Any]]:
    """No weight decay on vectors (norms, biases, router bias) — the usual Llama recipe. With
    expert parallelism (``expert_group`` = DeepSpeed's group name) the split experts form a third
    group that DeepSpeed partitions and reduces over the ranks holding the same experts."""
    decay, no_decay, experts = [], [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            shape = getattr(p, "ds_shape", p.shape)  # a ZeRO-3 partitioned parameter is 1-D locally
            if expert_group is not None and getattr(p, "group_name", None) == expert_group:
                experts.append(p)
            else:
                (decay if len(shape) >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if expert_group is not None:
        groups.append({"params": experts, "weight_decay": weight_decay, "name": expert_group, "moe": True})
    return groups


ADDED_LATER = ("skipped_steps", "skips_in_a_row")  # TrainState fields older checkpoints lack


@dataclass
class TrainState:
    """Loop position and what the trainer itself needs to resume. Saved with every checkpoint, so
    it stays small: the open window's per-micro-batch records and running aggregates only (the
    per-step history is in metrics.jsonl)."""

    step: int = 0  # optimizer steps completed
    micro_step: int = 0  # micro-batches done in the open window (0 = at a step boundary)
    consumed_samples: int = 0
    consumed_tokens: int = 0  # labelled tokens of completed steps
    first_loss: float | None = None  # of step 1 (the "done" line compares against it)
    last_loss: float | None = None
    window_micro_losses: list[float] = field(default_factory=list)  # rank 0's CE sum per micro-batch
    window_routing: list[int] = field(default_factory=list)  # MoE assignment digest per micro-batch
    skipped_steps: int = 0  # steps whose gradients were not finite: not applied (engine/nonfinite.py)
    skips_in_a_row: int = 0
    # This process's records (not saved): what tests compare, bitwise, with an uninterrupted run.
    losses: list[float] = field(default_factory=list, metadata={"session": True})
    micro_losses: list[float] = field(default_factory=list, metadata={"session": True})
    routing: list[int] = field(default_factory=list, metadata={"session": True})

    def state_dict(self) -> dict[str, Any]:
        return {f.name: copy.copy(getattr(self, f.name)) for f in fields(self) if not f.metadata.get("session")}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        for k in self.state_dict():
            if k in sd or k not in ADDED_LATER:  # a checkpoint from before a field existed: its default
                setattr(self, k, copy.copy(sd[k]))

    def record_micro_batch(self, loss_sum: torch.Tensor | float, digest: torch.Tensor | int | None) -> None:
        """Device tensors are kept as they are (reading them would stall the GPU every micro-batch)
        until ``materialize``: at the step's close, a save, or the end."""
        self.micro_losses.append(loss_sum)
        self.window_micro_losses.append(loss_sum)
        if digest is not None:
            self.routing.append(digest)
            self.window_routing.append(digest)

    def materialize(self) -> None:
        """Turn the recorded device tensors into numbers (one host read for all of them)."""
        lists = (self.micro_losses, self.window_micro_losses, self.routing, self.window_routing)
        pending = {id(x): x for lst in lists for x in lst if isinstance(x, torch.Tensor)}
        if not pending:
            return
        losses = [x for x in pending.values() if x.dim() == 0]
        digests = [x for x in pending.values() if x.dim() == 1]  # per-layer parts of a routing digest
        value: dict[int, float | int] = {}
        if losses:
            value.update(zip((id(x) for x in losses), torch.stack(losses).tolist()))
        if digests:
            value.update(zip((id(x) for x in digests),
                             (combine_routing_digest(d) for d in torch.stack(digests).tolist())))
        for lst in lists:
            lst[:] = [value[id(x)] if isinstance(x, torch.Tensor) else x for x in lst]

    def record_step(self, loss: float) -> None:
        self.losses.append(loss)
        self.first_loss = loss if self.first_loss is None else self.first_loss
        self.last_loss = loss
        self.window_micro_losses, self.window_routing = [], []


class Trainer:
    def __init__(self, cfg: Config, topo: Topology, config_path: str | None = None,
                 extra_state: dict[str, Any] | None = None):
        """``extra_state``: your own stateful objects, checkpointed and restored with the run
        (``engine/extensions.py``)."""
        import deepspeed

        self.cfg, self.topo = cfg, topo
        self.layout: Layout = cfg.layout(topo.world_size)
        self.device = topo.device
        self.state = TrainState()
        self.extensions = Extensions(extra_state)
        self.run_dir = Path(cfg.logging.run_dir)
        # start-up progress the first rank prints before the logger exists (tokenizing the data)
        # (another rank only speaks when it has to tokenize too: rank 0's entry is not in its cache)
        self.data_say: Callable[[str], None] = progress_printer(topo.rank)
        seed_everything(cfg.train.seed)

        # data: rank 0 tokenizes into the cache first (a mistake it finds stops every rank with its
        # one line, instead of leaving the others at the barrier), the others then read it. Every
        # wait is on the gloo start-up group, whose timeout allows hours of tokenizing (NCCL's
        # does not), and all ranks leave together, however long a node that cannot see rank 0's
        # cache (node-local data.cache_dir) tokenizes again (one rank per node: data/cache.py).
        if topo.is_main:
            try:
                self._build_data()
            except (UserError, Stopped) as e:
                from_rank0(STOPPED if isinstance(e, Stopped) else str(e), group=topo.startup_group)
                raise
            from_rank0(None, group=topo.startup_group)
        else:
            if (error := from_rank0(None, group=topo.startup_group)) is not None:
                raise Stopped() if error == STOPPED else DataError(error)
            self._build_data()
        if dist.is_initialized():
            dist.barrier(group=topo.startup_group)
        if cfg.train.epochs is not None:
            self._steps_from_epochs()
        self._last_eval: tuple[int, float] | None = None
        self.sampler = GlobalSampler(len(self.dataset), cfg.data.seed, cfg.data.shuffle)
        self.loader = MicroBatchLoader(
            self.dataset, self.sampler, self.layout.micro_batch_size, topo.dp_rank, self.layout.dp,
            self.layout.grad_accum_steps,
        )

        # model: under ZeRO-3 built partitioned, so no rank ever holds all of it
        self.ds_config = cfg.deepspeed_config(self.layout, self.device.type)
        partitioned = cfg.parallel.zero_stage == 3 and cfg.parallel.zero3_init
        if partitioned:
            model = build_partitioned_model(cfg.model, self.ds_config, cfg.train.seed, self.device)
        else:
            model = build_model(cfg.model, seed=cfg.train.seed)
        self.memory = apply_memory_policy(model, cfg.memory, cfg.model, self.device)
        model.loss_chunk_size = cfg.train.loss_chunk_size
        det = cfg.train.deterministic
        self.loss = select_loss(cfg.train.loss_impl, self.device, det)
        model.set_loss(self.loss)
        self.kernel = select_attention(cfg.train.attention, self.device, det)
        if topo.sp > 1:
            model.set_attention(build_attention(topo, self.kernel, select_block_kernel(self.device, det)))
            model.set_sequence_parallel_group(topo.sp_group)
        else:
            model.set_attention(LocalAttention(self.kernel))
        m, dtype = cfg.model, torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
        prepare_local_kernel(self.kernel, topo, m.num_attention_heads, m.kv_heads, m.dim_per_head,
                             self.layout.micro_batch_size * cfg.data.seq_len, dtype, self.device)
        self.attention_name = model.attention.describe()
        if cfg.train.compile:  # before DeepSpeed wraps the model; parameter names do not change
            compile_layers(model, mode="default", dynamic=None)
        self.n_params, self.n_active = count_parameters(model)  # the whole model, before EP splits it
        self.n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.expert_parallel, expert_group = None, None
        if cfg.parallel.expert_degree > 1:  # this rank keeps E / P experts; DeepSpeed learns which
            ep = cfg.parallel.expert_degree
            ep_group, edp_group = dss.expert_parallel_groups(ep)
            self.expert_parallel = ExpertParallel(ep_group, ep, topo.rank % ep, cfg.model.moe.num_experts, edp_group)
            model.set_expert_parallel(self.expert_parallel)
            expert_group = dss.mark_expert_params(model, ep)
        self.base_identity = None
        if cfg.model.lora is not None:  # hashed once (rank 0 reads the base files), shared
            ident = [base_identity(cfg.model, cfg.train.seed) if topo.is_main else None]
            # over the gloo start-up group: hashing a large base can outlast NCCL's timeout
            dist.broadcast_object_list(ident, src=0, group=topo.startup_group)
            self.base_identity = ident[0]
        if cfg.parallel.zero_stage == 3 and cfg.model.tie_word_embeddings:
            # the tied head reads the embedding matrix outside the embedding's forward
            deepspeed.zero.register_external_parameter(model.lm_head, model.model.embed_tokens.weight)

        model = model if partitioned else model.to(self.device)
        if cfg.low_precision_weights:  # bf16 parameters, no fp32 master (DeepSpeed casts them otherwise)
            for p in model.parameters():
                if p.is_floating_point():
                    p.data = p.data.to(torch.bfloat16)
        # Q-GaLore: the targeted projections become INT8 layers, whose gradients seqpar reduces
        client_optimizer, self.int8_weights = build_small_state_optimizer(model, cfg.train)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            optimizer=client_optimizer,
            model_parameters=None if client_optimizer else param_groups(model, cfg.train.weight_decay, expert_group),
            config=self.ds_config,
            lr_scheduler=lambda opt: WarmupDecay(opt, cfg.train),
            dist_init_required=False,
        )
        self.model: Transformer = self.engine.module
        self.small_state_optimizer = client_optimizer
        if self.galore_sharded:  # plain ZeRO-0 (no master copy wrapped around it): shard it by parameter
            client_optimizer.shard(dss.weight_replica_group(self.engine))
        # ZeRO-0 with split experts: seqpar clips (DeepSpeed's ZeRO-0 norm misses or averages them)
        self._own_clipping: tuple[list, list] | None = None
        self._grad_norm = None
        self._trainable = [p for p in self.model.parameters() if p.requires_grad]
        if self.expert_parallel is not None and cfg.parallel.zero_stage == 0:
            trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
            self._own_clipping = ([p for n, p in trainable if getattr(p, "group_name", None) != expert_group],
                                  [p for n, p in trainable if getattr(p, "group_name", None) == expert_group])
        refused = dss.unsupported_settings(self.engine, cfg.train.precision,
                                           (cfg.memory.offload_optimizer, cfg.memory.offload_params),
                                           master=not cfg.low_precision_weights)
        if refused:
            raise ConfigError("this DeepSpeed setup is not supported:\n  - " + "\n  - ".join(refused))
        self.nonfinite = NonFiniteGuard(self.engine, self._trainable, topo.control_group)

        self.logger = RunLogger(
            self.run_dir, topo.is_main, cfg.train.max_steps, cfg.logging.progress_bar, cfg.logging.tensorboard,
            checkpoint_lines=cfg.logging.checkpoint_lines, save_every_micro_batches=cfg.checkpoint.every_micro_batches,
            grad_accum_steps=self.layout.grad_accum_steps,
        )
        say = self.logger.print if topo.is_main else (lambda text: print(f"rank {topo.rank}: {text}", flush=True))
        self.profiler = StepProfiler(cfg.logging.profile, self.run_dir, topo.rank, self.device, say)
        self.peak = peak_tflops(self.device, cfg.logging.peak_tflops)
        self._step_flops = 0.0  # training FLOPs of the open window's global batch (for MFU)
        self.config_path = config_path
        self._window: list | None = None
        self._acc: dict[str, Any] = {}
        self._resumed_acc: dict[str, float] | None = None
        self.ckpt = CheckpointManager(cfg.checkpoint, self.run_dir, topo.rank, topo.world_size,
                                      pin=self.device.type == "cuda")
        self.ckpt.store.eval_set = eval_identity(cfg) if cfg.train.eval_every else None
        self.stop = StopSignal.install()  # train.main() installed it first; kept start-up signals
        self.stop.arm()
        self.exit_code = 0
        self._last_tag: str | None = None
        self._resumed_path: Path | None = None
        self._resumed_world = 0
        self._resumed_wandb_id: str | None = None  # the W&B run the resumed checkpoint recorded
        self.resume(cfg.checkpoint.resume)
        # after the resume: a run resumed from its newest checkpoint continues the W&B run that
        # checkpoint recorded; anything else opens a new one (RunLogger.open_wandb)
        self.logger.open_wandb(cfg.logging.wandb, self.run_dir, saved_id=self._resumed_wandb_id,
                               newest=cfg.checkpoint.resume == "auto", config=cfg.model_dump(mode="json"))

    def _steps_from_epochs(self) -> None:
        """``train.epochs`` -> ``train.max_steps``, now that the data's size is known (the same on
        every rank: a pure function of the data and the layout's global batch)."""
        t = self.cfg.train
        steps = max(1, math.ceil(t.epochs * len(self.dataset) / self.layout.global_batch_size))
        if t.warmup_steps > steps:
            if self.topo.is_main:
                print(f"seqpar: note: train.warmup_steps={t.warmup_steps} is more than the {steps} steps of "
                      f"train.epochs={t.epochs:g}: warming up over all {steps} steps instead", file=sys.stderr, flush=True)
            t.warmup_steps = steps
        t.max_steps = steps

    def _build_data(self) -> None:
        """Training and held-out datasets, and the tokenizer the checkpoints carry for export.
        A preemption while tokenizing ends it (``Stopped``; train.py exits 75, nothing to save)."""
        signals = StopSignal.install()
        self.tokenizer = build_tokenizer(self.cfg.data) if self.cfg.data.type != "tokens" else None
        self.dataset, self.eval_sets = prepare_data(self.cfg, self.data_say, lambda: signals.received is not None,
                                                   tokenizer=self.tokenizer)
        self.data_fingerprint = self.dataset.content_fingerprint()
        self.tokenizer_files = tokenizer_files(self.cfg.data, self.tokenizer)  # what checkpoints carry

    # -- summary ----------------------------------------------------------------------------------
    def _fused_optimizer(self) -> bool:
        """Whether the torch optimizer DeepSpeed built (inside its ZeRO wrapper) runs fused."""
        inner = getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)
        return bool(getattr(inner, "defaults", {}).get("fused"))

    def summary(self) -> str:
        c, lay, m = self.cfg, self.layout, self.cfg.model
        tokens = lay.global_batch_size * c.data.seq_len
        kv = f"{m.num_attention_heads}/{m.kv_heads} kv"
        moe = f", MoE {m.moe.num_experts} experts top-{m.moe.top_k}" if m.moe else ""
        if self.expert_parallel is not None:
            moe += f" ({self.expert_parallel.local} per rank, expert-parallel over {self.expert_parallel.degree})"
        return "\n".join(
            [
                f"seqpar {__version__} | config {self.config_path or '<dict>'} (hash {c.fingerprint()})",
                f"layout  {self.topo.describe()}, backend {dist.get_backend()}",
                f"engine  DeepSpeed ZeRO-{c.parallel.zero_stage}, {c.train.precision}, attention "
                f"{self.attention_name}, loss {self.loss.describe()}, "
                f"{'compiled layers, ' if c.train.compile else ''}{self.memory.describe()}"
                + (f", MLP in tiles of {self.model.model.layers[0].mlp_tile} tokens" if c.memory.tiled_mlp else ""),
                f"model   {m.arch}: {m.num_hidden_layers} layers, hidden {m.hidden_size}, heads {kv}, "
                f"vocab {m.vocab_size}{moe}: {self.n_params / 1e6:,.2f}M params "
                f"({self.n_active / 1e6:,.2f}M active)"
                + ((f", from {m.hf_path}" if m.load_weights else
                    f", architecture of {m.hf_path} (random weights: model.load_weights false)") if m.hf_path else "")
                + (f"; {'QLoRA (NF4 base)' if m.lora.quantize_base else 'LoRA'} r{m.lora.rank} on {','.join(m.lora.targets)}{' + experts' if m.lora.experts else ''}"
                   f"{' + ' + ','.join(m.lora.trainable) if m.lora.trainable else ''}: "
                   f"{self.n_trainable / 1e6:,.3f}M trainable" if m.lora else ""),
                f"data    {self.dataset.describe()}",
                f"batch   micro {lay.micro_batch_size} x dp {lay.dp} x grad-accum {lay.grad_accum_steps} "
                f"= {lay.global_batch_size} sequences x {c.data.seq_len} = {tokens:,} tokens per step",
                f"optim   {c.train.max_steps} steps ({self._epochs()}), "
                + (describe_optimizer(c.train, self.topo.world_size if self.galore_sharded else 1)
                   or f"AdamW{' (fused)' if self._fused_optimizer() else ''} ") +
                f"lr {c.train.lr:g}, warmup {c.train.warmup_steps}, "
                + (f"stable, then the last {c.train.cooldown_ratio:.0%} of steps linear" if c.train.decay == "wsd"
                   else c.train.decay) + f" to {c.train.lr * c.train.min_lr_ratio:g}, clip {c.train.grad_clip:g}",
                f"memory  {self._memory_line()}",
                f"output  {self.run_dir}" + ("" if self.run_dir.is_absolute() else f" (in {Path.cwd()})")
                + self.profiler.describe(c.train.max_steps),
                f"ckpt    {self._disk_line()}",
            ]
        )

    def _epochs(self) -> str:
        """How many passes over the training data max_steps makes (seqpar counts steps; a fine-tuning
        run is usually planned in epochs)."""
        n = len(self.dataset)
        epochs = self.cfg.train.max_steps * self.layout.global_batch_size / max(n, 1)
        shown = f"{epochs:.2f}" if epochs < 10 else f"{epochs:,.0f}"
        return f"{shown} epoch{'' if shown == '1.00' else 's'} of {n:,} sequences"

    def _memory_line(self) -> str:
        """The planner's prediction (seqpar.plan) for this config and world; on CUDA, a warning when
        it does not fit the device (printed before training, not after an out-of-memory)."""
        from seqpar.plan import predict, warn_if_oom

        plan = predict(self.cfg, self.topo.world_size)
        line = plan.describe()
        if self.device.type != "cuda":  # DeepSpeed's buckets are reserved on a GPU, untouched pages on a CPU
            line += " if it ran on a GPU (this CPU run: mem in the step lines)"
        if self.device.type == "cuda":
            total = torch.cuda.get_device_properties(self.device).total_memory
            warning = warn_if_oom(plan, total)
            if warning:
                line += f"\n        WARNING: {warning}"
        return line

    def _disk_line(self) -> str:
        """What the checkpoint directory needs: retention deletes old checkpoints only after a new
        one is committed, so keep_last + 1 of them must fit. Measured on the resumed checkpoint,
        else estimated (``seqpar.optim.sizes``: weights + optimizer state by training mode), +
        gradients inside a window (ZeRO 0/1: every rank saves its full local gradients)."""
        c, root = self.cfg.checkpoint, self.ckpt.store.root
        sizes = checkpoint_bytes(self.cfg)  # by training mode (LoRA, GaLore) and ZeRO stage
        per, how = sizes["total"], "estimated"
        if self._resumed_path is not None and self.layout.world_size == self._resumed_world:
            files = self.ckpt.store.manifest(self._resumed_path)["files"].values()
            per, how = sum(f["size"] for f in files), f"as {self._resumed_path.name}"
        # (counted on a meta model: at ZeRO-3 this rank's parameters are partitioned already)
        grads = sizes["trainable"] * 4 * (self.layout.world_size if self.cfg.parallel.zero_stage < 2 else 1)
        need = (c.keep_last + 1) * (per + grads)
        try:
            free = f", {_size(shutil.disk_usage(root).free)} free"
        except OSError:
            free = ""
        return (f"{root}: {_size(per)} per checkpoint ({how}; up to {_size(grads)} more inside a window), "
                f"keep_last {c.keep_last} + 1 being written: needs up to {_size(need)}{free}")

    # -- loop -------------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        """Run until ``train.max_steps``; returns final metrics (rank 0's view, same everywhere)."""
        if self.ckpt.resumed_from and self.state.step >= self.cfg.train.max_steps and not self.state.micro_step:
            # the same command again after the run finished: nothing to train, evaluate or log
            self.logger.print(f"already complete at step {self.state.step} ({self.ckpt.resumed_from}); use "
                              "--resume none or a new logging.run_dir to start over")
            self.logger.close()
            return {"step": self.state.step, "complete": True}
        self.logger.print(self.summary())
        self.logger.start_at(self.state.step)
        self.engine.train()
        self._record_run_state("running")
        self.ckpt.restart_clock()  # checkpoint.every_minutes counts training time, not start-up or the resume load
        try:
            if self.stop.agree(group=self.topo.control_group)[0]:  # signalled while starting up: nothing to save
                return self._preempted(None)
            while self.state.step < self.cfg.train.max_steps:
                self.profiler.before(self.state.step, self.state.micro_step)
                self.train_micro_batch()
                evaluated = self._evaluate_if_due()  # before any save here: its loss goes with it
                self.stop.tick()
                stop, failed, timed = self.stop.agree(self.ckpt.writer.failed(), self.ckpt.interval_elapsed(),
                                                      group=self.topo.control_group)
                if failed:  # a background write failed on some rank: every rank learns it here
                    self._write_failed(self.ckpt.agreed_failure() or "a checkpoint write failed")
                if stop:
                    return self._preempted(self.save_checkpoint())
                st = self.state
                if timed or self.ckpt.due(st.step, st.micro_step, st.step * self.layout.grad_accum_steps
                                          + st.micro_step) or (evaluated and self.cfg.checkpoint.keep_best):
                    self.save_checkpoint()
                self.profiler.after(self.state.step)
            if self.cfg.checkpoint.at_end and not self._saved_at(self._position()):
                self.save_checkpoint()
            self._settle()
        finally:
            # never exit with a write in flight; an upload to the mirror may not hold up a stop. A
            # second Ctrl-C (KeyboardInterrupt) aborts at once: a write it cuts stays a .partial-
            # folder, which never counts as a checkpoint
            if not isinstance(sys.exc_info()[1], KeyboardInterrupt):
                # a stop or an error ends the trace with what it has; a completed run says a range it never reached
                self.profiler.finish(self.state.step if self.state.step >= self.cfg.train.max_steps else None)
                self.ckpt.finish(mirror_wait_s=0 if self.exit_code == EXIT_PREEMPTED else None)
        result: dict[str, Any] = {"step": self.state.step, "final_loss": self.state.last_loss}
        if isinstance(self.dataset, PasskeyDataset) and self.cfg.data.passkey.eval_samples:
            result.update(self.evaluate_passkey())
            self.logger.log(self.state.step, {k: v for k, v in result.items() if k.startswith("passkey")})
        self.logger.close()
        self._record_run_state("finished", self.ckpt.writer.last_committed)
        if self.topo.is_main and self.state.first_loss is not None:
            from seqpar.evaluate import passkey_summary, percent  # accuracy with its chance level

            pk = self.cfg.data.passkey
            last = self.ckpt.writer.last_committed
            if last is not None and not self.cfg.checkpoint.keep_best:
                print(f"saved {last} (a Hugging Face model from it: python -m seqpar.ckpt export {last} <dir>)",
                      flush=True)
            print(
                f"done: {self.state.step} steps, loss {self.state.first_loss:.4f} -> {result['final_loss']:.4f}"
                + (f", held-out loss {self._last_eval[1]:.4f} at step {self._last_eval[0]}" if self._last_eval else "")
                + (f", {self.state.skipped_steps} skipped (gradients not finite)" if self.state.skipped_steps else "")
                + (f", {passkey_summary(result['passkey_accuracy'], pk.eval_samples, pk.key_digits)}"
                   if "passkey_accuracy" in result else "")
                + (f", {percent(result['passkey_accuracy_other_shard'])} with the key in another rank's shard"
                   if "passkey_accuracy_other_shard" in result else ""),
                flush=True,
            )
            if self.cfg.checkpoint.keep_best and (best := self.ckpt.store.best()):
                print(f"best held-out loss {best[1]:.4f}: {self.ckpt.store.root / best[0]} "
                      "(python -m seqpar.ckpt export <it> <dir> for a Hugging Face model)", flush=True)
        return result

    def _evaluate_if_due(self) -> bool:
        """Held-out loss every ``train.eval_every`` steps (collective); True when it ran."""
        st, every = self.state, self.cfg.train.eval_every
        if self.eval_sets is None or st.micro_step or st.step % every:
            return False
        result = held_out_loss(self, self.eval_sets)
        self._last_eval = (st.step, result.loss)
        self.logger.log(st.step, result.metrics())
        self.logger.print(result.line(st.step, self.cfg.train.max_steps))
        return True

    def _preempted(self, tag: str | None) -> dict[str, Any]:
        """Stop agreed: wait until the stop's checkpoint is committed on every rank (no rank may
        exit before: launchers kill the rest when one exits), record it, exit ``EXIT_PREEMPTED``."""
        if tag is not None:
            self._settle()
        saved = f"saved {tag}" if tag else f"nothing new to save (resumes from {self.ckpt.resumed_from or 'the start'})"
        self.logger.print(f"stop requested ({self.stop.describe()}): {saved}, exiting")
        self.profiler.finish()  # before the barrier: once one rank exits, the launcher kills the others
        self._record_run_state("preempted", tag or self.ckpt.resumed_from)
        dist.barrier()  # the record is written before any rank exits
        self.stop.consume()
        self.exit_code = EXIT_PREEMPTED
        self.logger.close(EXIT_PREEMPTED)  # flushed; W&B marks the run preempted
        return {"step": self.state.step, "preempted": True}

    def _settle(self) -> None:
        """Collective: the write in flight is committed, or its failure handled on every rank."""
        try:
            self.ckpt.settle()
        except WriteFailed as e:
            self._write_failed(str(e))

    def _write_failed(self, failure: str) -> None:
        """Every rank knows a checkpoint write failed (after its retry): stop or warn, per
        ``checkpoint.on_write_error``. Collective."""
        self.ckpt.writer.abort()
        self.ckpt.writer.wait()
        newest = self._newest_committed()
        where = f"the newest committed checkpoint is {newest}" if newest else "no checkpoint is committed yet"
        if self.cfg.checkpoint.on_write_error == "stop":
            raise CheckpointIOError(
                f"a checkpoint could not be written (retried once):\n  {failure.replace(chr(10), chr(10) + '  ')}\n"
                f"stopping (checkpoint.on_write_error: stop); {where}. Fix {self.ckpt.store.root} (free space, "
                "permissions) and resume with --resume auto, or set checkpoint.on_write_error: warn to train on")
        if self.topo.is_main:
            print(f"seqpar: warning: a checkpoint could not be written (retried once): {failure}; training goes "
                  f"on (checkpoint.on_write_error: warn); {where}", file=sys.stderr, flush=True)
        self.ckpt.writer.clear()
        dist.barrier()

    def _newest_committed(self) -> str | None:
        return next((c.tag for c in reversed(self.ckpt.store.list()) if (c.path / "COMMITTED").is_file()), None)

    def _record_run_state(self, state: str, checkpoint: Path | str | None = None) -> None:
        """The outcome where restart loops look: <run_dir>/run_state.json (rank 0) and the
        wrapper's own file ``$SEQPAR_RUN_STATE`` (each node's first rank: multi-node wrappers)."""
        if self.topo.is_main or os.environ.get("LOCAL_RANK", "0") == "0":
            write_run_state(self.run_dir if self.topo.is_main else None, state, exit_code=RUN_STATE_EXIT[state],
                            step=self.state.step, checkpoint=Path(checkpoint).name if checkpoint else None)

    def train_micro_batch(self) -> None:
        """Forward + backward of one micro-batch; an optimizer step when it closes the window."""
        st, lay = self.state, self.layout
        if self._window is None:
            self._open_window()
        ids, pos, labels, meta = self._model_inputs(self._window[st.micro_step])
        out = self.engine(ids, pos, labels, meta)
        # DeepSpeed averages gradients over all world ranks (DP x SP replicas); see module docstring
        loss = out.loss_sum * (lay.world_size / self._acc["tokens"]) + out.aux_loss / lay.grad_accum_steps
        self.engine.backward(loss, scale_wrt_gas=False)
        self.memory.release()  # offloaded inputs a skipped recomputation left behind
        closes = st.micro_step + 1 == lay.grad_accum_steps
        assert self.engine.is_gradient_accumulation_boundary() == closes, "DeepSpeed micro-step drifted"
        if closes:  # the optimizer step changes what a checkpoint in flight may still be copying
            self.ckpt.writer.wait_deferred()
            if self._own_clipping:  # gradients are reduced by now (DeepSpeed's backward epilogue)
                self._grad_norm = clip_grad_norm_(*self._own_clipping, self.expert_parallel, self.cfg.train.grad_clip)
            elif self.int8_weights is not None:  # INT8 weights' gradients: reduced here, clipped with the rest
                self._grad_norm = self.int8_weights.finish(self._trainable, self.cfg.train.grad_clip, lay.world_size)
            skipped = self.nonfinite.step(self._grad_norm)
            if skipped and self.int8_weights is not None:  # the optimizer did not consume them
                self.int8_weights.discard()
        else:
            self.engine.step()
        self._acc["ce"] += out.loss_sum.detach().double()
        self._acc["aux"] += out.aux_loss.detach().double()
        st.record_micro_batch(out.loss_sum.detach().clone(),
                              self.model.routing_digest_parts() if self.cfg.model.moe else None)
        st.micro_step += 1
        st.consumed_samples += lay.micro_batch_size * lay.dp
        self.extensions.call("on_micro_batch_end", self)
        if closes:
            self._close_window(skipped)
            self.extensions.call("on_step_end", self)

    def _model_inputs(self, batch):
        """Device tensors for the model: the whole micro-batch, or this rank's sequence shard.

        Document boundaries and shards are computed on the host batch, before the copy: they read
        values (``nonzero``, lengths), which on device tensors would make the host wait for the GPU.
        """
        dev = self.device
        if self.topo.sp == 1:
            meta = attn_meta_from_positions(batch.position_ids)
            batch = batch.to(dev)
            return batch.input_ids, batch.position_ids, batch.labels, meta.to(dev)
        sh = shard_for(self.topo, batch.input_ids, batch.labels, batch.position_ids, self.dataset.pad_id)
        meta = sh.meta.to(dev) if isinstance(sh.meta, AttnMeta) else sh.meta  # a RingMeta is host ints
        move = lambda t: to_device(t[None], dev)  # noqa: E731
        return move(sh.input_ids), move(sh.position_ids), move(sh.labels), meta

    def _open_window(self) -> None:
        """Fetch this rank's micro-batches of the step and count labelled tokens globally."""
        self._window = self.loader.window(self.state.step)
        # Host numbers summed on the host (gloo control group): no GPU wait. Every SP rank of a DP
        # group holds the same whole sequences, so the world sum counts each sp times (exact in
        # float64). The FLOPs for MFU count attention per document; they ride along.
        local = sum(b.num_loss_tokens for b in self._window)
        flops = sum(step_flops(self.cfg.model, b.position_ids) for b in self._window)
        counts = torch.tensor([float(local), flops], dtype=torch.float64)
        dist.all_reduce(counts, group=self.topo.control_group)
        tokens, self._step_flops = float(counts[0]) / self.topo.sp, float(counts[1]) / self.topo.sp
        if tokens == 0:
            raise RuntimeError(f"step {self.state.step}: the global batch has no labelled tokens")
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        self._acc = {"tokens": torch.tensor(tokens, dtype=torch.float32, device=self.device),
                     "ce": zero.clone(), "aux": zero.clone(), "t0": time.time(), "tokens_n": int(tokens)}
        if self._resumed_acc is not None:  # resumed inside this window: sums of the micro-batches done
            self._acc["ce"] += self._resumed_acc["ce"]
            self._acc["aux"] += self._resumed_acc["aux"]
            self._resumed_acc = None

    def _close_window(self, skipped: bool = False) -> None:
        st, lay = self.state, self.layout
        st.materialize()  # the step's one host read (DeepSpeed's clipping reads the norm anyway)
        router_stats = self.model.update_routers(step_bias=not skipped)
        sums = torch.stack([self._acc["ce"], self._acc["aux"]])
        dist.all_reduce(sums)  # CE is split over SP ranks; each SP rank holds the whole-sequence aux
        loss = (sums[0] / self._acc["tokens"].double()).item()
        aux = (sums[1] / (lay.grad_accum_steps * lay.world_size)).item()
        st.step += 1
        st.micro_step = 0
        st.consumed_tokens += self._acc["tokens_n"]
        st.record_step(loss)
        self._window = None
        st.skipped_steps += skipped
        st.skips_in_a_row = st.skips_in_a_row + 1 if skipped else 0
        if st.step % self.cfg.logging.log_every == 0 or st.step == self.cfg.train.max_steps or skipped:
            self._log(loss, aux, router_stats)
        if skipped:
            self._skipped(loss)

    def _skipped(self, loss: float) -> None:
        """Say so on the step, or stop once train.max_skipped_steps is passed (every rank alike)."""
        st, limit = self.state, self.cfg.train.max_skipped_steps
        if st.skips_in_a_row > limit:
            self._settle()  # every rank is here: a checkpoint still being written is named if it commits
            raise Diverged(diverged_message(st.step, st.skips_in_a_row, limit, self._newest_committed()))
        self.logger.print(skipped_message(st.step, self.cfg.train.max_steps, loss, st.skips_in_a_row, limit))

    def _log(self, loss: float, aux: float, router_stats: dict[str, float]) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = max(time.time() - self._acc["t0"], 1e-9)
        tok_s = self.layout.global_batch_size * self.cfg.data.seq_len / dt
        metrics: dict[str, Any] = {
            "loss": loss,
            "lr": self.scheduler.get_last_lr()[0],
            "tok_s": tok_s,
            "step_time_s": dt,
            "mem_gib": memory_gib(self.device),
            "consumed_tokens": self.state.consumed_tokens,
        }
        waited, self.ckpt.writer.deferred_wait_s = self.ckpt.writer.deferred_wait_s, 0.0
        if waited:  # the optimizer step waited for a checkpoint's background copy
            metrics["ckpt_wait_s"] = waited
        own = self._own_clipping or self.int8_weights is not None
        grad_norm = self._grad_norm if own else self.engine.get_global_grad_norm()
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        if self.state.skipped_steps:
            metrics["skipped_steps"] = self.state.skipped_steps
        if self.cfg.model.moe is not None:
            metrics["aux_loss"] = aux
            metrics.update(router_stats)
        if self.peak is not None:
            metrics["mfu"] = self._step_flops / dt / (self.peak * 1e12 * self.topo.world_size)
        self.logger.log(self.state.step, metrics, progress=True)

    # -- checkpoints ------------------------------------------------------------------------------
    def _position(self) -> Position:
        st, lay = self.state, self.layout
        return Position(step=st.step, window_samples=st.micro_step * lay.micro_batch_size * lay.dp,
                        consumed_samples=st.consumed_samples, micro_step=st.micro_step)

    def _saved_at(self, pos: Position) -> bool:
        return self._last_tag == pos.tag

    @property
    def galore_sharded(self) -> bool:
        """GaLore's state sharded over the ranks holding the same weights (train.galore.shard_state;
        the planner uses the same rule)."""
        # the engine's own optimizer is GaLore (no DeepSpeed wrapper: a user's deepspeed.bf16 adds one)
        return galore_sharded(self.cfg, self.topo.world_size) and dss.optimizer_kind(self.engine) == "torch"

    def _meta(self) -> dict[str, Any]:
        import deepspeed

        mem = self.cfg.memory
        return {
            "format_version": FORMAT_VERSION,
            "config_hash": self.cfg.fingerprint(),
            "topology": {"world_size": self.topo.world_size, "dp": self.layout.dp, "ulysses": self.topo.ulysses,
                         "ring": self.topo.ring, "zero_stage": self.cfg.parallel.zero_stage,
                         "grad_accum_steps": self.layout.grad_accum_steps,
                         # only when used: checkpoints without them (EP = 1, no offload) keep resuming exactly
                         **({"ep": self.cfg.parallel.expert_degree} if self.cfg.parallel.expert_degree > 1 else {}),
                         **({"offload": [mem.offload_optimizer, mem.offload_params]}
                            if mem.offload_optimizer or mem.offload_params else {})},
            "optimizer_kind": dss.optimizer_kind(self.engine),
            "versions": {"seqpar": __version__, "torch": torch.__version__, "deepspeed": deepspeed.__version__,
                         "python": platform.python_version()},
        }

    def save_checkpoint(self) -> str:
        """Checkpoint after the current micro-batch (collective; returns the tag). What goes in it:
        ``engine/snapshot.py``."""
        st = self.state
        st.materialize()
        args = (self._position(), *Snapshot(self).contents())
        try:
            tag = self.ckpt.save(*args)
        except WriteFailed as e:  # the previous write failed somewhere: stop, or warn and save this one
            self._write_failed(str(e))
            tag = self.ckpt.save(*args)
        self._last_tag = tag
        self.logger.checkpoint(st.step, tag, self.ckpt.last_block_s, self.cfg.checkpoint.async_write,
                               ends_run=self.stop.received is not None or st.step >= self.cfg.train.max_steps)
        return tag

    def resume(self, spec: str) -> None:
        """Restore everything from a checkpoint (``auto`` | ``none`` | path); every rank."""
        Resume(self).run(spec)

    # -- evaluation -------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Greedy next-token ids [S] for one sequence [1, S] (sequence-parallel aware)."""
        labels = torch.zeros_like(input_ids)
        ids, pos, _, meta = self._model_inputs(Batch(input_ids, labels, position_ids))
        pred = self.engine(ids, pos, None, meta).logits[0].argmax(-1)
        if self.topo.sp == 1:
            return pred
        sh_index = shard_for(self.topo, input_ids, labels, position_ids).local_index.to(self.device)
        parts = [torch.empty_like(pred) for _ in range(self.topo.sp)]
        index = [torch.empty_like(sh_index) for _ in range(self.topo.sp)]
        dist.all_gather(parts, pred, group=self.topo.sp_group)
        dist.all_gather(index, sh_index, group=self.topo.sp_group)
        full = torch.empty(int(sum(i.numel() for i in index)), dtype=pred.dtype, device=self.device)
        for p, i in zip(parts, index):
            full[i] = p
        return full[: input_ids.shape[1]]

    @torch.no_grad()
    def evaluate_passkey(self) -> dict[str, float]:
        """Share of held-out passkey samples whose key digits are all the greedy prediction
        (teacher forced). Under sequence parallelism also the share among samples whose key was
        planted in another rank's shard than the one holding the question."""
        eval_set = PasskeyDataset(self.cfg.data, split="eval")
        n = min(self.cfg.data.passkey.eval_samples, len(eval_set))
        # every DP rank scores its share; ZeRO-3 needs all ranks in every forward, so pad the turns
        mine = list(range(self.topo.dp_rank, n, self.layout.dp))
        turns = -(-n // self.layout.dp)
        self.engine.eval()
        results = passkey_results(self.logger.counted(self.predict, turns, "evaluating passkey"), eval_set, mine,
                                  turns, self.device)
        self.engine.train()
        owner = owner_of(self.cfg.data.seq_len, self.topo.ring, self.topo.ulysses)
        far = [ok for i, ok in results if owner[eval_set.needle(i)] != owner[eval_set.answer(i)[1]]]
        stats = torch.tensor([sum(ok for _, ok in results), len(far), sum(far)], dtype=torch.float64,
                             device=self.device)
        dist.all_reduce(stats, group=self.topo.dp_group)
        out = {"passkey_accuracy": stats[0].item() / n}
        if self.topo.sp > 1 and stats[1] > 0:
            out["passkey_accuracy_other_shard"] = stats[2].item() / stats[1].item()
            out["passkey_other_shard_samples"] = int(stats[1].item())
        return out
