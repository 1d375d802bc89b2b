"""Your own stateful objects, checkpointed and restored with the run (bitwise, like the built-ins).

    trainer = Trainer(cfg, topo, extra_state={"curriculum": my_curriculum})

Each object needs ``state_dict() -> dict`` and ``load_state_dict(dict)``; the state may hold what a
checkpoint can store without pickle: numbers, strings, lists, dicts, tuples, tensors and numpy
arrays (``seqpar/checkpoint/codec.py``). Optional hooks, called on every rank:
``on_micro_batch_end(trainer)`` after each micro-batch and ``on_step_end(trainer)`` after each
optimizer step. State is per rank (``rank*/extra-<name>.*``); on an elastic resume onto another
layout every rank gets saved rank 0's state (as for RNG streams). A checkpoint saved without an
object (you added it later) leaves that object as constructed, with a one-line notice.
See docs/extending.md for a worked example.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from seqpar.checkpoint.codec import CodecError, encode
from seqpar.errors import UserError

_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
PREFIX = "extra-"


class Extensions:
    """The registry: names -> objects, validated once, saved and restored by name."""

    def __init__(self, objects: dict[str, Any] | None = None):
        self.objects = dict(objects or {})
        for name, obj in self.objects.items():
            if not isinstance(name, str) or not _NAME.match(name):
                raise UserError(f"extra_state name {name!r}: use lowercase letters, digits and _ (it names a file)")
            missing = [m for m in ("state_dict", "load_state_dict") if not callable(getattr(obj, m, None))]
            if missing:
                raise UserError(f"extra_state[{name!r}] ({type(obj).__name__}) has no {' or '.join(missing)}(): "
                                "give it both so it can be checkpointed")
            try:
                encode(obj.state_dict(), copy=lambda t: t)  # fails now, not at the first save
            except CodecError as e:
                raise UserError(f"extra_state[{name!r}].state_dict() cannot be stored in a checkpoint: {e}") from None

    def trees(self) -> dict[str, Any]:
        """{file stem: state} for this rank's checkpoint directory."""
        return {PREFIX + name: obj.state_dict() for name, obj in self.objects.items()}

    def load(self, read: Callable[[str], Any], log: Callable[[str], None]) -> None:
        """Restore every object from ``read(file stem)`` (None: not in the checkpoint)."""
        for name, obj in self.objects.items():
            state = read(PREFIX + name)
            if state is None:
                log(f"extra_state {name!r}: not in the checkpoint (registered after it was saved); starting it fresh")
            else:
                obj.load_state_dict(state)

    def call(self, hook: str, trainer: Any) -> None:
        for obj in self.objects.values():
            fn = getattr(obj, hook, None)
            if fn is not None:
                fn(trainer)
