"""Nested state (dicts, lists, tensors, numbers, a few known classes) <-> safetensors + JSON.

Checkpoints never contain a pickle: tensors go to a ``.safetensors`` file and everything else to a
JSON skeleton that refers to them by key. Non-JSON values are tagged:

    {"__tensor__": "3"}            a tensor stored under key "3"
    {"__ndarray__": "4"}           a numpy array (stored as a tensor)
    {"__tuple__": [...]}           a tuple
    {"__items__": [[k, v], ...]}   a dict whose keys are not all strings (optimizer state by index)
    {"__float__": "inf"}           inf / -inf / nan
    {"__dtype__": "bfloat16"}      a torch dtype
    {"__enum__": "mod:Cls", "name": "X"}, {"__namedtuple__": ...}, {"__object__": ...}

Classes are rebuilt only if their ``module:qualname`` is in ``ALLOWED_CLASSES``, so loading a
checkpoint runs no code a file chose; anything else fails to *save* with a message naming it.
"""

from __future__ import annotations

import enum
import importlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

# DeepSpeed optimizer state dicts carry these (ZeRO stage enum, flat-buffer fragment addresses,
# the static loss scaler); they are plain data.
ALLOWED_CLASSES = {
    "deepspeed.runtime.zero.config:ZeroStageEnum",
    "deepspeed.utils.tensor_fragment:fragment_address",
    "deepspeed.runtime.fp16.loss_scaler:LossScaler",
    "deepspeed.runtime.fp16.loss_scaler:DynamicLossScaler",
}


class CodecError(ValueError):
    pass


def _name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _resolve(name: str) -> type:
    if name not in ALLOWED_CLASSES:
        raise CodecError(f"checkpoint refers to class {name}, which is not allowed to be loaded")
    module, qual = name.split(":")
    obj: Any = importlib.import_module(module)
    for part in qual.split("."):
        obj = getattr(obj, part)
    return obj


def encode(tree: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """Split ``tree`` into a JSON-serialisable skeleton and a flat {key: tensor} dict."""
    tensors: dict[str, torch.Tensor] = {}

    def enc(x: Any, where: str) -> Any:
        if isinstance(x, torch.Tensor):
            key = str(len(tensors))
            tensors[key] = x.detach().to("cpu").contiguous().clone()
            return {"__tensor__": key}
        if isinstance(x, np.ndarray):
            key = str(len(tensors))
            tensors[key] = torch.from_numpy(np.ascontiguousarray(x).copy())
            return {"__ndarray__": key}
        if isinstance(x, enum.Enum):
            _check_allowed(type(x), where)
            return {"__enum__": _name(type(x)), "name": x.name}
        if isinstance(x, bool) or x is None or isinstance(x, (int, str)):
            return x
        if isinstance(x, float):
            return x if math.isfinite(x) else {"__float__": repr(x)}
        if isinstance(x, (np.integer, np.floating)):
            return enc(x.item(), where)
        if isinstance(x, torch.dtype):
            return {"__dtype__": str(x).removeprefix("torch.")}
        if isinstance(x, tuple) and hasattr(x, "_fields"):
            _check_allowed(type(x), where)
            return {"__namedtuple__": _name(type(x)), "fields": {f: enc(getattr(x, f), where) for f in x._fields}}
        if isinstance(x, (tuple, torch.Size)):
            return {"__tuple__": [enc(v, f"{where}[{i}]") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [enc(v, f"{where}[{i}]") for i, v in enumerate(x)]
        if isinstance(x, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in x):
                return {k: enc(v, f"{where}.{k}") for k, v in x.items()}
            return {"__items__": [[enc(k, where), enc(v, f"{where}[{k!r}]")] for k, v in x.items()]}
        if hasattr(x, "__dict__"):
            _check_allowed(type(x), where)
            return {"__object__": _name(type(x)), "state": enc(dict(vars(x)), where)}
        raise CodecError(f"cannot store {type(x).__name__} at {where or 'top level'} in a checkpoint")

    return enc(tree, ""), tensors


def _check_allowed(cls: type, where: str) -> None:
    if _name(cls) not in ALLOWED_CLASSES:
        raise CodecError(
            f"cannot store {_name(cls)} at {where or 'top level'}: add it to "
            f"seqpar.checkpoint.codec.ALLOWED_CLASSES if it is plain data"
        )


def decode(skeleton: Any, tensors: Any) -> Any:
    """Inverse of ``encode``."""

    def dec(x: Any) -> Any:
        if isinstance(x, list):
            return [dec(v) for v in x]
        if not isinstance(x, dict):
            return x
        if "__tensor__" in x:
            return tensors[x["__tensor__"]]
        if "__ndarray__" in x:
            return tensors[x["__ndarray__"]].numpy()
        if "__tuple__" in x:
            return tuple(dec(v) for v in x["__tuple__"])
        if "__items__" in x:
            return {_hashable(dec(k)): dec(v) for k, v in x["__items__"]}
        if "__float__" in x:
            return float(x["__float__"])
        if "__dtype__" in x:
            return getattr(torch, x["__dtype__"])
        if "__enum__" in x:
            return _resolve(x["__enum__"])[x["name"]]
        if "__namedtuple__" in x:
            return _resolve(x["__namedtuple__"])(**{k: dec(v) for k, v in x["fields"].items()})
        if "__object__" in x:
            cls = _resolve(x["__object__"])
            obj = cls.__new__(cls)
            obj.__dict__.update(dec(x["state"]))
            return obj
        return {k: dec(v) for k, v in x.items()}

    return dec(skeleton)


def _hashable(k: Any) -> Any:
    return tuple(_hashable(v) for v in k) if isinstance(k, list) else k


def save_tree(tree: Any, path: Path) -> list[Path]:
    """Write ``path.json`` and, when there are tensors, ``path.safetensors``. Returns the files."""
    skeleton, tensors = encode(tree)
    files = [path.with_suffix(".json")]
    files[0].write_text(json.dumps(skeleton))
    if tensors:
        files.append(path.with_suffix(".safetensors"))
        save_file(tensors, str(files[1]))
    return files


class LazyTensor:
    """A tensor of a checkpoint file, read on demand (elastic resume needs a few slices of each).

    ``flat(lo, hi)`` returns elements ``[lo, hi)`` of the flattened values, reading only the rows
    that hold them (safetensors slices of a memory-mapped file).
    """

    def __init__(self, handle: Any, key: str):
        self._slice = handle.get_slice(key)
        self.shape = tuple(self._slice.get_shape())

    def numel(self) -> int:
        return math.prod(self.shape)

    def flat(self, lo: int, hi: int) -> torch.Tensor:
        if len(self.shape) == 1:
            return self._slice[lo:hi]
        row = math.prod(self.shape[1:])
        first, last = lo // row, -(-hi // row)
        return self._slice[first:last].reshape(-1)[lo - first * row : hi - first * row]


LAZY_MIN_NUMEL = 1 << 16  # smaller tensors are read whole even when lazy


class _LazyTensors:
    def __init__(self, path: Path):
        self.handle = safe_open(str(path), framework="pt")

    def __getitem__(self, key: str) -> Any:
        t = LazyTensor(self.handle, key)
        return t if len(t.shape) >= 1 and t.numel() >= LAZY_MIN_NUMEL else self.handle.get_tensor(key)


def load_tree(path: Path, lazy: bool = False) -> Any:
    """Read ``path.json`` (+ ``.safetensors``). ``lazy``: large tensors come as ``LazyTensor``."""
    skeleton = json.loads(path.with_suffix(".json").read_text())
    st = path.with_suffix(".safetensors")
    if not st.exists():
        return decode(skeleton, {})
    return decode(skeleton, _LazyTensors(st) if lazy else load_file(str(st)))
