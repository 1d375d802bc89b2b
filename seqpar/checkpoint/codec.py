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

Classes are rebuilt only if their ``module:qualname`` is in ``ALLOWED_CLASSES``, objects carry only
the fields listed there, as plain data, and every skeleton passes ``check_skeleton`` before it is
decoded, so loading a checkpoint runs no code and sets no attribute a file chose; anything else
fails to *save* with a message naming it.
"""

from __future__ import annotations

import enum
import functools
import importlib
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file


class _Allowlist(dict):
    """``{"module:qualname": fields}``; ``| {names}`` adds enums/namedtuples (as the old set did)."""

    def __or__(self, other: Any) -> "_Allowlist":
        return _Allowlist({**self, **(other if isinstance(other, dict) else dict.fromkeys(other))})


# DeepSpeed optimizer state dicts carry these (ZeRO stage enum, flat-buffer fragment addresses, the
# loss scalers). An object class maps to the only fields it may carry: exactly ``vars()`` of a real
# DeepSpeed 0.19.8 instance, so no field can shadow a method DeepSpeed calls (``update_scale``).
# Enums and namedtuples map to None: their members / ``_fields`` say what is valid.
_SCALER = "deepspeed.runtime.fp16.loss_scaler"
ALLOWED_CLASSES: dict[str, frozenset[str] | None] = _Allowlist({
    "deepspeed.runtime.zero.config:ZeroStageEnum": None,
    "deepspeed.utils.tensor_fragment:fragment_address": frozenset({"numel", "start"}),  # a dataclass
    f"{_SCALER}:LossScaler": frozenset({"cur_scale", "dynamic"}),
    f"{_SCALER}:DynamicLossScaler": frozenset({
        "cur_scale", "dynamic", "cur_iter", "last_overflow_iter", "scale_factor", "scale_window", "min_scale",
        "delayed_shift", "cur_hysteresis", "consecutive_hysteresis", "raise_error_at_min_scale", "dtype"}),
})
# Object fields whose value is a torch dtype rather than plain data (the scaler keeps the fp16 dtype).
DTYPE_FIELDS: dict[str, frozenset[str]] = {f"{_SCALER}:DynamicLossScaler": frozenset({"dtype"})}

# Looked up in torch's namespace, never with getattr (a name like "load" or "nn" is no dtype).
_DTYPES = {n: v for n, v in vars(torch).items() if isinstance(v, torch.dtype)}
_FLOATS = ("inf", "-inf", "nan")
_TAGS = {  # tag -> the keys a dict carrying it has, exactly
    "__tensor__": {"__tensor__"}, "__ndarray__": {"__ndarray__"}, "__tuple__": {"__tuple__"},
    "__items__": {"__items__"}, "__float__": {"__float__"}, "__dtype__": {"__dtype__"},
    "__enum__": {"__enum__", "name"}, "__namedtuple__": {"__namedtuple__", "fields"},
    "__object__": {"__object__", "state"},
}
# What a restricted position may hold besides JSON scalars and lists: (tags, untagged dicts too?, words)
_KINDS = {
    "plain": ({"__float__"}, True, "plain data"),
    "dtype": ({"__float__", "__dtype__"}, True, "plain data or a dtype"),
    "key": ({"__float__", "__tuple__"}, False, "a hashable plain value"),
}


class CodecError(ValueError):
    pass


def _name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _resolve(name: str) -> type:
    if name not in ALLOWED_CLASSES:
        raise CodecError(f"checkpoint refers to class {name}, which is not allowed to be loaded")
    return _lookup(name)


@functools.lru_cache(maxsize=64)  # a skeleton may name the same class 100k times (fragment addresses)
def _lookup(name: str) -> type:
    module, qual = name.split(":")
    obj: Any = importlib.import_module(module)
    for part in qual.split("."):
        obj = getattr(obj, part)
    if not isinstance(obj, type):
        raise CodecError(f"{name} in ALLOWED_CLASSES is not a class")
    return obj


def _at(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)


def _short(x: Any) -> str:
    r = repr(x)  # hostile values may be huge; a problem stays one short line
    return r if len(r) <= 60 else r[:57] + "..."


def encode(tree: Any, copy: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[Any, dict[str, torch.Tensor]]:
    """Split ``tree`` into a JSON-serialisable skeleton and a flat {key: tensor} dict.

    Each tensor is copied once, by ``copy`` (the checkpoint writer copies straight into pinned host
    memory), else by a plain CPU clone: the result never shares memory with the live tree.

    Raises ``CodecError`` for anything ``decode`` would refuse (unknown classes or fields, ...).
    """
    tensors: dict[str, torch.Tensor] = {}

    def enc(x: Any, where: str) -> Any:
        if isinstance(x, torch.Tensor):
            key = str(len(tensors))
            tensors[key] = copy(x) if copy is not None else x.detach().to("cpu", copy=True).contiguous()
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
                return {k: enc(v, _at(where, k)) for k, v in x.items()}
            return {"__items__": [[enc(k, where), enc(v, f"{where}[{k!r}]")] for k, v in x.items()]}
        if hasattr(x, "__dict__"):
            _check_allowed(type(x), where)
            try:
                return {"__object__": _name(type(x)), "state": {k: enc(v, _at(where, k)) for k, v in vars(x).items()}}
            except CodecError as e:
                raise CodecError(f"cannot store {_name(type(x))} at {where or 'top level'}: {e}") from None
        raise CodecError(f"cannot store {type(x).__name__} at {where or 'top level'} in a checkpoint")

    skeleton = enc(tree, "")
    problems = check_skeleton(skeleton, set(tensors))  # never write what load would refuse
    if problems:
        raise CodecError(f"cannot store this tree in a checkpoint: {_join(problems)}")
    return skeleton, tensors


def _check_allowed(cls: type, where: str) -> None:
    if _name(cls) not in ALLOWED_CLASSES:
        raise CodecError(
            f"cannot store {_name(cls)} at {where or 'top level'}: add it to "
            f"seqpar.checkpoint.codec.ALLOWED_CLASSES if it is plain data"
        )


def check_skeleton(skeleton: Any, tensor_keys: set[str] | None = None) -> list[str]:
    """Problems (one line each, with their place in the tree) that make ``decode`` refuse ``skeleton``.

    Reads no tensors; ``tensor_keys``: the keys of the sibling tensor file, when known.
    """
    problems: list[str] = []
    try:
        _check(skeleton, "", problems, tensor_keys)
    except RecursionError:
        problems.append("skeleton is nested too deeply")
    return problems


def _check(x: Any, where: str, out: list[str], keys: set[str] | None, kind: str = "any", owner: str = "value") -> None:
    at = where or "top level"
    if isinstance(x, list):
        for i, v in enumerate(x):
            _check(v, f"{where}[{i}]", out, keys, kind, owner)
        return
    if not isinstance(x, dict):
        if not (x is None or isinstance(x, (bool, int, float, str))):
            out.append(f"{at}: {type(x).__name__} is not JSON data")
        return
    tags = [k for k in x if k in _TAGS]
    if not tags:
        if kind != "any" and not _KINDS[kind][1]:
            out.append(f"{at}: {owner} must be {_KINDS[kind][2]}, not a dict")
            return
        for k, v in x.items():
            if isinstance(k, str) and not k.startswith("__"):  # encode stores such keys as __items__
                _check(v, _at(where, k), out, keys, kind, owner)
            else:
                out.append(f"{at}: unknown tag {_short(k)}")
        return
    tag = tags[0]
    if len(tags) > 1 or set(x) != _TAGS[tag]:
        got = _short(sorted(map(str, x)))
        out.append(f"{at}: a {tag} dict must have exactly the keys {sorted(_TAGS[tag])}, not {got}")
        return
    if kind != "any" and tag not in _KINDS[kind][0]:
        out.append(f"{at}: {owner} must be {_KINDS[kind][2]}, not {tag}")
        return
    v = x[tag]
    if tag in ("__tensor__", "__ndarray__"):
        if not isinstance(v, str):
            out.append(f"{at}: {tag} must be a tensor key (a string), not {_short(v)}")
        elif keys is not None and v not in keys:
            out.append(f"{at}: tensor {v!r} is not in the tensor file")
    elif tag == "__float__":
        if not (isinstance(v, str) and v in _FLOATS):
            out.append(f"{at}: __float__ must be one of {list(_FLOATS)}, not {_short(v)}")
    elif tag == "__dtype__":
        if not (isinstance(v, str) and v in _DTYPES):
            out.append(f"{at}: {_short(v)} is not a torch dtype")
    elif tag == "__tuple__":
        if not isinstance(v, list):
            out.append(f"{at}: __tuple__ must be a list, not {_short(v)}")
        else:
            _check(v, where, out, keys, kind, owner)
    elif tag == "__items__":
        if not (isinstance(v, list) and all(isinstance(p, list) and len(p) == 2 for p in v)):
            out.append(f"{at}: __items__ must be a list of [key, value] pairs")
            return
        for k, val in v:
            _check(k, f"{where}[{_short(k)}]", out, keys, "key", "a dict key")
            _check(val, f"{where}[{_short(k)}]", out, keys)
    else:
        _check_class(tag, x, where, out, keys)


def _check_class(tag: str, x: dict, where: str, out: list[str], keys: set[str] | None) -> None:
    at, name = where or "top level", x[tag]
    if not (isinstance(name, str) and name in ALLOWED_CLASSES):
        out.append(f"{at}: class {_short(name)} is not allowed to be loaded")
        return
    try:
        cls = _resolve(name)
    except (ImportError, AttributeError, CodecError) as e:
        out.append(f"{at}: cannot import allowed class {name}: {e}")
        return
    if tag == "__enum__":
        if not issubclass(cls, enum.Enum):
            out.append(f"{at}: {name} is not an enum")
        elif not (isinstance(x["name"], str) and x["name"] in cls.__members__):
            out.append(f"{at}: {name} has no member {_short(x['name'])}")
    elif tag == "__namedtuple__":
        fields = x["fields"]
        if not (issubclass(cls, tuple) and hasattr(cls, "_fields")):
            out.append(f"{at}: {name} is not a namedtuple")
        elif not (isinstance(fields, dict) and set(fields) == set(cls._fields)):
            got = sorted(map(str, fields)) if isinstance(fields, dict) else fields
            out.append(f"{at}: {name} needs exactly the fields {list(cls._fields)}, not {_short(got)}")
        else:
            for k, v in fields.items():
                _check(v, _at(where, k), out, keys)
    else:
        allowed, state = ALLOWED_CLASSES[name], x["state"]
        if allowed is None or issubclass(cls, (enum.Enum, tuple)):
            out.append(f"{at}: {name} lists no fields in ALLOWED_CLASSES, so it cannot be stored as an object")
        elif not isinstance(state, dict):
            out.append(f"{at}: the state of {name} must be a dict, not {_short(state)}")
        else:
            for k, v in state.items():
                if k not in allowed:
                    out.append(f"{_at(where, k)}: {name} may not carry field {_short(k)}")
                else:
                    kind = "dtype" if k in DTYPE_FIELDS.get(name, ()) else "plain"
                    _check(v, _at(where, k), out, keys, kind, f"field {k!r} of {name}")


def _join(problems: list[str]) -> str:
    more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
    return "; ".join(problems[:5]) + more


def decode(skeleton: Any, tensors: Any) -> Any:
    """Inverse of ``encode``; ``tensors``: a mapping with ``keys()``. Raises ``CodecError`` for any
    problem ``check_skeleton`` finds, before building anything."""
    problems = check_skeleton(skeleton, set(tensors.keys()))
    if problems:
        raise CodecError(f"checkpoint refused: {_join(problems)}")

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
            return _DTYPES[x["__dtype__"]]
        if "__enum__" in x:
            return _resolve(x["__enum__"]).__members__[x["name"]]
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


def _owned(t: torch.Tensor) -> torch.Tensor:
    """``t`` in fresh memory of its own. safetensors 0.8 hands out views into the file's buffer at
    any alignment (offset 12 of 64 is common); CPU kernels take other code paths for misaligned
    inputs and round differently, so a resumed run drifted from the uninterrupted one (GaLore's
    projector SVD on a restored gradient, AMD EPYC). A copy also leaves no live tensor on the file."""
    return t.clone(memory_format=torch.contiguous_format)


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

    def read(self) -> torch.Tensor:
        """The whole tensor."""
        return self.flat(0, self.numel()).reshape(self.shape)

    def read_rows(self, a: int, b: int) -> torch.Tensor:
        """Rows ``a..b`` of the first dimension, reading only those."""
        per_row = self.numel() // self.shape[0]
        return self.flat(a * per_row, b * per_row).reshape(b - a, *self.shape[1:])

    def flat(self, lo: int, hi: int) -> torch.Tensor:
        if len(self.shape) == 1:
            return _owned(self._slice[lo:hi])
        row = math.prod(self.shape[1:])
        first, last = lo // row, -(-hi // row)
        return _owned(self._slice[first:last].reshape(-1)[lo - first * row : hi - first * row])


LAZY_MIN_NUMEL = 1 << 16  # smaller tensors are read whole even when lazy


class _LazyTensors:
    def __init__(self, path: Path):
        self.handle = safe_open(str(path), framework="pt")

    def keys(self) -> list[str]:
        return self.handle.keys()

    def __getitem__(self, key: str) -> Any:
        t = LazyTensor(self.handle, key)
        return t if len(t.shape) >= 1 and t.numel() >= LAZY_MIN_NUMEL else _owned(self.handle.get_tensor(key))


def load_tree(path: Path, lazy: bool = False) -> Any:
    """Read ``path.json`` (+ ``.safetensors``). ``lazy``: large tensors come as ``LazyTensor``."""
    skeleton = json.loads(path.with_suffix(".json").read_text())
    st = path.with_suffix(".safetensors")
    if not st.exists():
        return decode(skeleton, {})
    if lazy:
        return decode(skeleton, _LazyTensors(st))
    return decode(skeleton, {k: _owned(t) for k, t in load_file(str(st)).items()})
