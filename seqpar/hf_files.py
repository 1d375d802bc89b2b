"""Where a Hugging Face model directory keeps its weights: one ``model.safetensors`` or shards
named by ``model.safetensors.index.json`` (the index is input: shard names must stay inside the
directory). No model or config knowledge: ``config.py`` checks ``model.hf_path`` with it, and
``models/hf.py`` loads and writes weights with it."""

from __future__ import annotations

import json
from pathlib import Path

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


def checkpoint_files(path: Path) -> tuple[list[Path], dict[str, Path]]:
    """Safetensors files of a Hub model dir and (for sharded ones) the index's weight map."""
    path = Path(path)
    if path.is_file():
        return [path], {}
    index = path / SAFETENSORS_INDEX
    if index.is_file():
        from seqpar.checkpoint.verify import UnsafePath, safe_member

        try:
            wmap = json.loads(index.read_text())["weight_map"]
            if not isinstance(wmap, dict):
                raise TypeError(f"weight_map is a {type(wmap).__name__}, not an object")
            # the index is input: a shard name must be a plain file name inside ``path`` (Hub
            # cache snapshots are symlinks into blobs/, so symlinks themselves are allowed)
            by_key = {k: safe_member(path, f, symlinks=True) for k, f in wmap.items()}
        except (ValueError, KeyError, TypeError) as e:
            why = f"bad shard name {e}" if isinstance(e, UnsafePath) else f"{type(e).__name__}: {e}"
            raise ValueError(f"{index}: unusable index ({why})") from None
        files = sorted(set(by_key.values()))
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shard files that do not exist: {missing}")
        return files, by_key
    single = path / SAFETENSORS_FILE
    if single.is_file():
        return [single], {}
    raise FileNotFoundError(
        f"no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX} in '{path}' (only safetensors checkpoints "
        f"are supported; convert .bin files with transformers' save_pretrained first)"
    )
