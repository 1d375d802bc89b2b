"""Hugging Face checkpoint import/export (config.json + safetensors), without ``transformers``.

Our parameter names equal the Hub's except MoE experts, which we keep stacked per layer
(``model.layers.{i}.mlp.experts.gate_proj`` [E, I, H], ``up_proj`` [E, I, H], ``down_proj``
[E, H, I]). On disk we read and write the canonical per-expert Hub layout:

* Mixtral: ``model.layers.{i}.block_sparse_moe.gate.weight`` and
  ``...block_sparse_moe.experts.{e}.w1|w3|w2.weight`` (gate | up | down);
* Qwen2-MoE / Qwen3-MoE: ``model.layers.{i}.mlp.experts.{e}.gate_proj|up_proj|down_proj.weight``.

Import also accepts the fused layout of transformers 5 modules (``mlp.experts.gate_up_proj``
[E, 2I, H] = gate then up, ``mlp.experts.down_proj`` [E, H, I]) and our own stacked names.
(transformers 5.24's ``save_pretrained`` itself writes the per-expert layout.)
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from seqpar.config import ModelConfig
from seqpar.hf_config import (  # noqa: F401  (re-exported: the import/export API in one place)
    MOE_ARCHS,
    SUPPORTED_MODEL_TYPES,
    SUPPORTED_ROPE_TYPES,
    fields_to_hf_config,
    hf_config_to_fields,
)
from seqpar.hf_files import SAFETENSORS_FILE, SAFETENSORS_INDEX, checkpoint_files
from seqpar.models.transformer import Transformer

# ----------------------------------------------------------------------------------------------
# import
# ----------------------------------------------------------------------------------------------
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
_PROJ = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj",
         "gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"}
_STACKED = re.compile(r"^model\.layers\.\d+\.mlp\.experts\.(gate_proj|up_proj|down_proj)$")


def _is_ignored(key: str) -> bool:
    # rotary tables are recomputed from the config; old checkpoints saved them as buffers
    return key.endswith(".inv_freq") or ".rotary_emb." in key


def _targets(key: str) -> list[tuple[str, int | None, slice | None]]:
    """Hub tensor name -> [(our name, expert index or None, slice of dim 1 or None)]."""
    name = key.replace(".block_sparse_moe.", ".mlp.")  # Mixtral's MoE block is our mlp
    m = _LAYER.match(name)
    if m is None:
        return [(name, None, None)]
    prefix, rest = f"model.layers.{m[1]}.", m[2]
    e = _EXPERT.match(rest)
    if e:
        return [(f"{prefix}mlp.experts.{_PROJ[e[2]]}", int(e[1]), None)]
    if rest == "mlp.experts.gate_up_proj":  # transformers-5 fused [E, 2I, H]: gate then up
        return [(f"{prefix}mlp.experts.gate_proj", None, slice(0, 1)),
                (f"{prefix}mlp.experts.up_proj", None, slice(1, 2))]
    if rest == "mlp.gate.e_score_correction_bias":  # DeepSeek's name for the expert bias
        return [(f"{prefix}mlp.gate.expert_bias", None, None)]
    return [(name, None, None)]


def _listing(names: Iterable[str], limit: int = 20) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


@torch.no_grad()
def load_hf_checkpoint(model: nn.Module, path: str | Path, write: Callable[[str, Tensor], None] | None = None,
                       shapes: dict[str, torch.Size] | None = None) -> None:
    """Copy a Hub safetensors checkpoint (single file or sharded) into ``model`` (cast to its dtype).

    Strict: every parameter must be found and every tensor used, else ``ValueError`` listing them
    (rotary ``inv_freq`` buffers and LoRA adapters are ignored). The expert bias (``mlp.gate.e_score_correction_bias``)
    is optional: without it the model's ``expert_bias`` buffer keeps its value. All names and
    shapes are checked before anything is copied. ``model`` is an unwrapped ``Transformer``.

    ``write(name, value)``: instead of copying piece by piece in place, each parameter is first
    assembled whole on the CPU (one at a time) and handed over; ``shapes`` then gives the full
    shapes of parameters that have none of their own (ZeRO-3 partitions).
    """
    from seqpar.models.lora import is_adapter

    files, by_key = checkpoint_files(Path(path))
    # LoRA adapters are not part of a base checkpoint (they are initialised, or resumed, apart)
    ours = {k: v for k, v in model.state_dict(keep_vars=True).items() if not is_adapter(k)}
    full_shape = {k: tuple((shapes or {}).get(k, v.shape)) for k, v in ours.items()}
    cfg: ModelConfig | None = getattr(model, "cfg", None)
    tied = bool(cfg is not None and cfg.tie_word_embeddings)

    # -- pass 1: names and shapes only (no tensor data read) --------------------------------------
    plan: dict[Path, list[tuple[str, str, int | None, slice | None]]] = {}
    covered: dict[str, set[int]] = {}  # our name -> experts (or {-1} = whole tensor) provided
    extras: list[tuple[Path, str, str]] = []  # (file, key, kind) checked by value in pass 2
    unexpected, problems = [], []
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            keys = list(sf.keys())
            shapes = {k: tuple(sf.get_slice(k).get_shape()) for k in keys}
        for key in keys:
            if by_key and by_key.get(key, f) != f:
                continue  # a stray tensor the index assigns to another shard
            if _is_ignored(key):
                continue
            shape = shapes[key]
            if key not in ours and key.endswith(("self_attn.o_proj.bias", "self_attn.q_proj.bias",
                                                 "self_attn.k_proj.bias", "self_attn.v_proj.bias")):
                # HF llama/qwen3 attention_bias adds an o_proj bias, Qwen2 always has q/k/v bias;
                # a model without them can load them only when they are all zero (our exports)
                extras.append((f, key, "zero"))
                continue
            if key == "lm_head.weight" and tied and key not in ours:
                extras.append((f, key, "tied"))  # some tied checkpoints keep a copy
                continue
            for name, expert, part in _targets(key):
                if name not in ours:
                    unexpected.append(key)
                    break
                want = full_shape[name]
                if expert is not None:
                    want = want[1:]
                    if not 0 <= expert < full_shape[name][0]:
                        unexpected.append(key)
                        break
                elif part is not None:
                    want = (want[0], 2 * want[1], *want[2:])
                if shape != want:
                    problems.append(f"tensor '{key}' in {f} has shape {list(shape)}, but the model "
                                    f"expects {list(want)} (for {name})")
                    break
                got = covered.setdefault(name, set())
                new = {expert} if expert is not None else {-1}
                if got & new or (-1 in got) or (got and expert is None):
                    problems.append(f"tensor '{key}' in {f} duplicates another source of {name}")
                    break
                got |= new
                plan.setdefault(f, []).append((key, name, expert, part))
    missing = []
    for name, t in ours.items():
        got = covered.get(name, set())
        if -1 in got:
            continue
        if _STACKED.match(name):
            lost = sorted(set(range(full_shape[name][0])) - got)
            missing += [f"{name}[expert {e}]" for e in lost]
        elif not got and not name.endswith("mlp.gate.expert_bias"):  # expert bias is optional
            missing.append(name)
    if unexpected:
        hint = ""
        if any(k.endswith("e_score_correction_bias") for k in unexpected):
            hint = " (an expert bias needs model.moe.bias_update_rate > 0 to be loaded)"
        problems.append(f"unexpected tensors in the checkpoint{hint}: {_listing(unexpected)}")
    if missing:
        problems.append(f"tensors missing from the checkpoint: {_listing(missing)}")
    if problems:
        raise ValueError(f"cannot load '{path}' into this model:\n  - " + "\n  - ".join(problems))

    # -- pass 2a: value checks of tensors we accept without a place to put them ----------------
    for f, key, kind in extras:
        with safe_open(str(f), framework="pt") as sf:
            t = sf.get_tensor(key)
        if kind == "zero" and t.any():
            raise ValueError(f"'{key}' in {f} is non-zero, but seqpar's attention has no o_proj "
                             f"bias: this checkpoint cannot be represented")
        if kind == "tied":
            src = _read(files, by_key, "model.embed_tokens.weight")
            if tuple(t.shape) != full_shape["model.embed_tokens.weight"] or not torch.equal(t, src):
                raise ValueError(f"'{key}' in {f} differs from model.embed_tokens.weight but the "
                                 f"config ties them (tie_word_embeddings=true)")

    # -- pass 2b: copy ------------------------------------------------------------------------------
    pieces_left = {name: sum(n == name for items in plan.values() for _, n, _, _ in items) for name in covered}
    assembling: dict[str, Tensor] = {}
    for f, items in plan.items():
        with safe_open(str(f), framework="pt") as sf:
            for key, name, expert, part in items:
                t = sf.get_tensor(key)
                if write is None:
                    dst = ours[name]
                else:
                    dst = assembling.setdefault(name, torch.empty(full_shape[name], dtype=t.dtype))
                if expert is not None:
                    dst[expert].copy_(t)
                elif part is not None:
                    half = t.shape[1] // 2
                    dst.copy_(t[:, half * part.start : half * part.stop])
                else:
                    dst.copy_(t)
                pieces_left[name] -= 1
                if write is not None and pieces_left[name] == 0:
                    write(name, assembling.pop(name))


def _read(files: list[Path], by_key: dict[str, Path], key: str) -> Tensor:
    for f in [by_key[key]] if key in by_key else files:
        with safe_open(str(f), framework="pt") as sf:
            if key in sf.keys():
                return sf.get_tensor(key)
    raise KeyError(key)


# ----------------------------------------------------------------------------------------------
# export
# ----------------------------------------------------------------------------------------------
def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Our state-dict names and shapes for ``cfg`` (built on the meta device: no memory)."""
    with torch.device("meta"):
        ref = Transformer(cfg)
    return {k: tuple(v.shape) for k, v in ref.state_dict().items()}


def _hub_entries(sd: dict[str, Tensor], cfg: ModelConfig) -> list[tuple[str, Callable[[], Tensor], int]]:
    """[(Hub name, tensor producer, bytes)] in state-dict order; producers copy lazily."""
    mixtral = cfg.arch == "mixtral"
    out: list[tuple[str, Callable[[], Tensor], int]] = []

    def add(name: str, fn: Callable[[], Tensor], shape: Iterable[int], dtype: torch.dtype) -> None:
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        out.append((name, fn, nbytes))

    for name, t in sd.items():
        m = _LAYER.match(name)
        rest = m[2] if m else ""
        if m and _STACKED.match(name):
            proj = rest.rsplit(".", 1)[1]
            w = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}[proj] if mixtral else proj
            block = "block_sparse_moe" if mixtral else "mlp"
            for e in range(t.shape[0]):
                # clone: safetensors refuses tensors that share storage
                add(f"model.layers.{m[1]}.{block}.experts.{e}.{w}.weight",
                    lambda t=t, e=e: t[e].detach().cpu().clone(), t.shape[1:], t.dtype)
            continue
        hub = name
        if m and rest == "mlp.gate.expert_bias":
            hub = f"model.layers.{m[1]}.mlp.gate.e_score_correction_bias"
        if mixtral and m and rest.startswith("mlp."):
            hub = hub.replace(".mlp.", ".block_sparse_moe.", 1)
        add(hub, lambda t=t: t.detach().cpu().contiguous(), t.shape, t.dtype)

    # Biases HF has but we do not: zeros compute exactly what our model computes.
    wdt = sd["model.embed_tokens.weight"].dtype
    h, d = cfg.hidden_size, cfg.dim_per_head
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}.self_attn."
        if cfg.arch in ("qwen2", "qwen2_moe") and not cfg.attention_bias:
            for proj, n in (("q_proj", cfg.num_attention_heads * d), ("k_proj", cfg.kv_heads * d),
                            ("v_proj", cfg.kv_heads * d)):
                add(f"{p}{proj}.bias", lambda n=n: torch.zeros(n, dtype=wdt), (n,), wdt)
        if cfg.arch in ("llama", "qwen3", "qwen3_moe") and cfg.attention_bias:
            add(f"{p}o_proj.bias", lambda: torch.zeros(h, dtype=wdt), (h,), wdt)
    return out


def _shards(entries: list[tuple[str, Callable[[], Tensor], int]], max_bytes: float) -> list[list[int]]:
    """Greedy split in order (like transformers): a new shard when the next tensor would not fit."""
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, _, n) in enumerate(entries):
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += n
    return shards


def save_hf_checkpoint(
    state_dict: dict[str, Tensor], cfg: ModelConfig, out_dir: str | Path, max_shard_bytes: float = 5e9,
    write_tensors: Callable[[Path, dict[str, Tensor], dict[str, str]], Any] | None = None, *,
    bos_token_id: int | None = None, eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
) -> Path:
    """Write our state dict as a Hub checkpoint: config.json + safetensors (sharded with
    ``model.safetensors.index.json`` above ``max_shard_bytes``), per-expert names.

    Given token ids (the training tokenizer's ``bos_id`` / ``eos_id`` / ``pad_id``) go into
    config.json and, when any is given, ``generation_config.json`` (what ``generate`` reads in
    transformers 4.x and 5; without that file it falls back to config.json), so generation stops
    at our eos. Tokenizer files are not written here.

    The expert bias (``moe.bias_update_rate > 0``) is written as
    ``model.layers.{i}.mlp.gate.e_score_correction_bias`` (DeepSeek's name) so seqpar can resume
    from the export; transformers ignores it for these architectures (it reports an unexpected
    key), so there routing is plain top-k and can pick different experts.
    Missing HF biases (Qwen2 q/k/v; llama/qwen3 o_proj with attention_bias) are written as zeros.
    The directory appears atomically (temp dir + rename); an existing non-empty ``out_dir`` is an
    error. ``write_tensors(path, tensors, metadata)`` replaces safetensors' ``save_file`` (the
    checkpoint writer hashes while it writes). Returns ``out_dir``.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"export directory '{out_dir}' exists and is not empty: choose a new "
                              f"path or remove it first (refusing to overwrite)")
    want = _expected_shapes(cfg)
    missing = sorted(set(want) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(want))
    wrong = [f"{k}: state dict {list(state_dict[k].shape)} vs config {list(want[k])}"
             for k in want if k in state_dict and tuple(state_dict[k].shape) != want[k]]
    optional = [k for k in missing if k.endswith("mlp.gate.expert_bias")]
    missing = [k for k in missing if k not in optional]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing: {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected: {_listing(unexpected)}")
        if wrong:
            parts.append(f"shape mismatch: {_listing(wrong)}")
        raise ValueError("state dict does not match the model config:\n  - " + "\n  - ".join(parts))
    dtype = state_dict["model.embed_tokens.weight"].dtype
    hf_cfg = fields_to_hf_config(cfg, dtype, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                                 pad_token_id=pad_token_id)  # raises before anything is written
    gen_cfg = {k: hf_cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in hf_cfg}
    entries = _hub_entries(state_dict, cfg)
    shards = _shards(entries, max_shard_bytes)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2, sort_keys=True) + "\n")
        if gen_cfg:
            (tmp / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2, sort_keys=True) + "\n")
        weight_map: dict[str, str] = {}
        for s, idx in enumerate(shards):
            fname = (SAFETENSORS_FILE if len(shards) == 1
                     else f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors")
            tensors = {entries[i][0]: entries[i][1]() for i in idx}
            if write_tensors is not None:
                write_tensors(tmp / fname, tensors, {"format": "pt"})
            else:
                save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in tensors})
            del tensors
        if len(shards) > 1:
            index = {
                "metadata": {"total_size": sum(n for _, _, n in entries)},
                "weight_map": dict(sorted(weight_map.items())),
            }
            (tmp / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        for p in tmp.iterdir():  # data on disk before the rename makes it visible
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        # rename(2) replaces an empty directory atomically and fails if it gained files meanwhile
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "fields_to_hf_config",
    "hf_config_to_fields",
    "load_hf_checkpoint",
    "save_hf_checkpoint",
]
