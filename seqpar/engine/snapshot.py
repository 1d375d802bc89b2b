"""What a checkpoint holds: every component's state after the current micro-batch, as the
checkpoint manager takes it (per-rank trees, shared raw files, background write jobs, tensors to
copy before the next optimizer step). The trainer calls ``Snapshot(trainer).contents()`` from
``save_checkpoint``; ``engine/resume.py`` is the way back.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml

from seqpar.checkpoint import hashio
from seqpar.checkpoint.manager import CONFIG_FILE, TRAINER_STATE
from seqpar.data.chat import template_for_export
from seqpar.config import DataConfig
from seqpar.data.tokenizer import Tokenizer, tokenizer_config
from seqpar.engine import deepspeed_state as dss
from seqpar.engine.reshard import fragment_map
from seqpar.models.lora import ADAPTER_DIR, ADAPTER_FILE, BASE_FILE, trainable_state_dict
from seqpar.optim.qgalore import QWEIGHTS_DIR, QWEIGHTS_FILE
from seqpar.parallel.experts import gather_experts
from seqpar.rng import rng_state_dict

if TYPE_CHECKING:
    from seqpar.engine.trainer import Trainer

Job = Any  # (part dir, file mode) -> {path: FileRecord | None}


class Snapshot:
    """One checkpoint's contents, read from a trainer (collective where noted)."""

    def __init__(self, trainer: "Trainer"):
        self.tr = trainer

    def contents(self) -> tuple[dict, dict, list[Job], dict, dict, list]:
        """(rank trees, raw shared files, write jobs, meta, deferred copies, live tensors)."""
        tr = self.tr
        st, eng = tr.state, tr.engine
        mid_window = st.micro_step > 0
        rank_trees: dict[str, Any] = {
            "rng": rng_state_dict(),
            "engine": {"counters": dss.capture_counters(eng),
                       "window": {"ce": float(tr._acc["ce"]), "aux": float(tr._acc["aux"])} if mid_window else None,
                       # per-rank records of the open window (trainer_state.json holds rank 0's)
                       "history": {"window_micro_losses": list(st.window_micro_losses),
                                   "window_routing": list(st.window_routing)}},
        }
        # changed only by the next optimizer step: copied in the background (the step waits for it)
        deferred: dict[str, Any] = {}
        # ZeRO-0 keeps one optimizer copy per rank; rank 0's is everyone's, except that with split
        # experts the ranks holding other experts (ranks 1..P-1) save theirs too
        ep = tr.cfg.parallel.expert_degree
        if tr.topo.is_main or not dss.optimizer_is_replicated(eng) or tr.topo.rank < ep:
            deferred["optimizer"] = dss.capture_optimizer(eng, copy=False)  # the snapshot copies once
            rank_trees["fragments"] = fragment_map(eng)  # makes the optimizer state reshardable
        if mid_window:
            rank_trees["grads"] = dss.capture_partial_grads(eng, copy=False)
            if tr.int8_weights is not None:  # Q-GaLore's INT8 layers' gradients (not DeepSpeed's)
                rank_trees["qgrads"] = tr.int8_weights.state_dict()
        if tr.cfg.model.moe is not None:
            rank_trees["router"] = tr.model.router_state_dict()
        rank_trees.update(tr.extensions.trees())
        jobs, live = self._weights(deferred)
        meta = tr._meta()
        if tr._last_eval and tr._last_eval[0] == st.step and not st.micro_step:
            loss = tr._last_eval[1]  # checkpoint.keep_best keeps the lowest; a NaN one is no loss (strict JSON)
            meta["eval_loss"] = loss if math.isfinite(loss) else None
            meta["eval_set"] = tr.ckpt.store.eval_set  # keep_best compares only losses measured alike
        trainer_state = {**meta, **st.state_dict(), "sampler": tr.sampler.state_dict(),
                         "special_tokens": self.special_ids(),  # for the export of ZeRO-3 shards
                         "data_fingerprint": tr.data_fingerprint}  # a resume on other data is refused
        if tr.logger.wandb_id is not None:  # the W&B run a resume from this checkpoint continues
            trainer_state["wandb_run_id"] = tr.logger.wandb_id
        raw = {TRAINER_STATE: json.dumps(trainer_state, indent=1).encode(),
               CONFIG_FILE: yaml.safe_dump(tr.cfg.model_dump(mode="json"), sort_keys=False).encode(),
               **tr.tokenizer_files}
        return rank_trees, raw if tr.topo.is_main else {}, jobs, meta, deferred, live

    def _weights(self, deferred: dict[str, Any]) -> tuple[list[Job], list]:
        """The model's weights: adapters only (LoRA), the Hugging Face export (ZeRO 0-2, rank 0;
        with split experts gathered first), or each rank's ZeRO-3 shard (``deferred``)."""
        tr = self.tr
        jobs, live = [], []
        if tr.cfg.model.lora is not None:
            # adapters: only what trains, and which base it trains on (the base is not copied);
            # at ZeRO-3 the (small) trainable tensors are gathered whole first (collective)
            weights = self._trainable_weights()
            if tr.topo.is_main:
                jobs.append(self._adapter_job(weights))
                live.append(weights)
        elif tr.int8_weights is not None:
            # Q-GaLore's state dict: INT8 codes and scales (ZeRO-0: every rank holds the same; rank 0 writes)
            if tr.topo.is_main:
                weights = {k: v.detach() for k, v in tr.model.state_dict().items()}
                jobs.append(self._qweights_job(weights))
                live.append(weights)
        elif tr.cfg.parallel.zero_stage < 3 and tr.expert_parallel is not None:
            # EP: the ranks holding experts 0..E-1 together (the first EP group) hand rank 0 theirs
            weights = {k: v.detach() for k, v in tr.model.state_dict().items()}
            if tr.topo.rank < tr.expert_parallel.degree:
                weights = gather_experts(weights, tr.expert_parallel)
            if tr.topo.is_main:
                jobs.append(self._hf_job(weights))
                live.append(weights)
        elif tr.cfg.parallel.zero_stage < 3 and tr.topo.is_main:
            # the snapshot copies them once, in the background, before the job writes them
            weights = {k: v.detach() for k, v in tr.model.state_dict().items()}
            jobs.append(self._hf_job(weights))
            live.append(weights)
        elif tr.cfg.parallel.zero_stage == 3:
            deferred["model_shard"] = {n: p.ds_tensor.detach() for n, p in tr.model.named_parameters()}
        return jobs, live

    def special_ids(self) -> dict[str, int | None]:
        tok = self.tr.tokenizer
        return {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id} if tok else {}

    def _hf_job(self, weights: dict[str, torch.Tensor]) -> Job:
        cfg = self.tr.cfg.model
        ids = self.special_ids()

        def job(part: Path, mode: int) -> dict[Path, hashio.FileRecord | None]:
            """Writes model/ (Hugging Face layout), hashing the weights while writing them."""
            from seqpar.models.hf import save_hf_checkpoint

            records: dict[str, hashio.FileRecord] = {}

            def write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
                records[path.name] = hashio.write_safetensors(path, tensors, metadata, mode=mode)

            out = save_hf_checkpoint(weights, cfg, part / "model", write_tensors=write, **ids)
            return {p: records.get(p.name) for p in sorted(Path(out).rglob("*")) if p.is_file()}
        return job

    def _trainable_weights(self) -> dict[str, torch.Tensor]:
        tr = self.tr
        if tr.cfg.parallel.zero_stage < 3:
            weights = trainable_state_dict(tr.model)
            ep = tr.expert_parallel
            if ep is not None and tr.topo.rank < ep.degree:  # expert adapters: every expert's, on rank 0
                weights = gather_experts(weights, ep)
            return weights
        import deepspeed

        params = [p for p in tr.model.parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return {k: v.detach().cpu().clone() for k, v in trainable_state_dict(tr.model).items()}

    def _qweights_job(self, weights: dict[str, torch.Tensor]) -> Job:
        meta = {"format": "pt", "seqpar": "qgalore-int8"}

        def job(part: Path, mode: int) -> dict[Path, hashio.FileRecord | None]:
            """Writes qweights/: the model with Q-GaLore's weights as INT8 codes and scales."""
            out = part / QWEIGHTS_DIR
            out.mkdir(parents=True, exist_ok=True)
            return {out / QWEIGHTS_FILE: hashio.write_safetensors(out / QWEIGHTS_FILE, weights, meta, mode=mode)}
        return job

    def _adapter_job(self, weights: dict[str, torch.Tensor]) -> Job:
        identity = (json.dumps(self.tr.base_identity, indent=1, sort_keys=True) + "\n").encode()

        def job(part: Path, mode: int) -> dict[Path, hashio.FileRecord | None]:
            """Writes adapter/: the trainable tensors and the base model's identity."""
            out = part / ADAPTER_DIR
            out.mkdir(parents=True, exist_ok=True)
            return {out / ADAPTER_FILE: hashio.write_safetensors(out / ADAPTER_FILE, weights, {"format": "pt"}, mode=mode),
                    out / BASE_FILE: hashio.write_bytes(out / BASE_FILE, identity, mode=mode)}
        return job


def tokenizer_files(data: DataConfig, tok: Tokenizer | None) -> dict[str, bytes]:
    """``tokenizer/`` of every checkpoint (exported beside the weights), read once at start-up, so
    checkpoints carry what the run trained with: the tokenizer.json, and a tokenizer_config.json
    that is the tokenizer's own (its added tokens, model_max_length, ...) with this run's special
    tokens written over it (a tokenizer.json alone loads in transformers without an eos token) and
    the chat template the run trained with, its ``data.chat_template_kwargs`` as defaults (an
    exported model renders chats as trained)."""
    if data.tokenizer is None or tok is None:
        return {}
    conf = {"tokenizer_class": "PreTrainedTokenizerFast", **_own_config(Path(data.tokenizer)), **{
        k: getattr(tok, k, None) for k in ("bos_token", "eos_token", "pad_token") if getattr(tok, k, None)}}
    conf.pop("chat_template", None)  # the one this run trained with, or none
    template = template_for_export(Path(data.tokenizer), data.chat_template, data.chat_template_file,
                                   data.type == "sft", data.chat_template_kwargs)
    if template:
        conf["chat_template"] = template
    return {"tokenizer/tokenizer.json": Path(data.tokenizer).read_bytes(),
            "tokenizer/tokenizer_config.json": (json.dumps(conf, indent=1) + "\n").encode()}


def _own_config(tokenizer: Path) -> dict[str, Any]:
    """The tokenizer's own config to carry (seqpar.data.tokenizer.tokenizer_config), without a
    custom-code tokenizer class (auto_map): the checkpoint does not carry that code."""
    conf = tokenizer_config(tokenizer)
    if "auto_map" in conf:
        conf = {k: v for k, v in conf.items() if k != "auto_map"}
        conf["tokenizer_class"] = "PreTrainedTokenizerFast"
    return conf
