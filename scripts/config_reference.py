"""Print the configuration reference table (Markdown) generated from ``seqpar.config``.

    python scripts/config_reference.py > /tmp/ref.md

docs/configuration.md embeds this output between its GENERATED markers; a test keeps them equal.
"""

from __future__ import annotations

import sys
import typing
from pathlib import Path

from pydantic import BaseModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from seqpar.config import Config  # noqa: E402


def _type_name(ann: typing.Any) -> str:
    origin = typing.get_origin(ann)
    if origin is typing.Literal:
        return " \\| ".join(repr(a).replace("'", "") for a in typing.get_args(ann))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " \\| ".join(_type_name(a) for a in typing.get_args(ann))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(ann))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if ann is type(None):
        return "null"
    return getattr(ann, "__name__", str(ann))


def _default(field) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        return "(section)" if isinstance(value, BaseModel) else f"`{value!r}`"
    return f"`{field.default!r}`".replace("PosixPath", "")


def rows(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        ann = field.annotation
        sub = next(
            (a for a in (ann, *typing.get_args(ann)) if isinstance(a, type) and issubclass(a, BaseModel)), None
        )
        if sub is not None:
            out.append(f"| `{key}` | section{' or null' if type(None) in typing.get_args(ann) else ''} | "
                       f"{_default(field)} | {((sub.__doc__ or '').strip().splitlines() or [''])[0]} |")
            out.extend(rows(sub, key + "."))
        else:
            out.append(f"| `{key}` | {_type_name(ann)} | {_default(field)} | {field.description or ''} |")
    return out


def reference() -> str:
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    return "\n".join(lines + rows(Config)) + "\n"


if __name__ == "__main__":
    sys.stdout.write(reference())
