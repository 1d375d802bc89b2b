"""``seqpar/train.py`` with NaN embeddings at chosen steps (tests/test_nonfinite.py): the command
line, run states and checkpoints of a run whose gradients are not finite, without a hook in seqpar.
``SEQPAR_TEST_NAN_STEPS``: comma-separated 0-based optimizer steps whose micro-batches get NaN."""

from __future__ import annotations

import os
import sys

from seqpar.train import main


class NaNAtSteps:
    """An extra_state object (no state) that hooks the embedding once the trainer exists."""

    def __init__(self) -> None:
        self.steps = {int(s) for s in os.environ["SEQPAR_TEST_NAN_STEPS"].split(",") if s}
        self.hooked = False

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def on_micro_batch_end(self, trainer) -> None:
        if not self.hooked:  # from the second micro-batch the trainer runs
            self.hooked = True
            trainer.model.model.embed_tokens.register_forward_hook(
                lambda module, args, out: out * float("nan") if trainer.state.step in self.steps else out)


if __name__ == "__main__":
    sys.exit(main(extra_state={"nan_at_steps": NaNAtSteps()}))
