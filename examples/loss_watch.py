"""A stateful object of your own, checkpointed and restored with the run (docs/extending.md).

    python examples/loss_watch.py --config configs/tiny-cpu.yaml      (or under torchrun / deepspeed)

``LossWatch`` keeps an exponential moving average of the step loss, counts loss spikes, and audits a
random micro-batch now and then with its own random generator. Stop the run at any micro-batch
and resume it: its state continues bitwise as if the run had never stopped.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

from seqpar.train import main  # noqa: E402


class LossWatch:
    def __init__(self, decay: float = 0.9, spike: float = 1.5, seed: int = 0):
        self.decay, self.spike = decay, spike
        self.ema: float | None = None
        self.spikes = 0
        self.audited: list[int] = []  # micro-batches picked for an audit
        self.rng = torch.Generator().manual_seed(seed)  # its own stream: not touched by training

    # -- hooks (optional) ---------------------------------------------------------------------------
    def on_micro_batch_end(self, trainer) -> None:
        if torch.rand((), generator=self.rng).item() < 0.25:
            st = trainer.state
            self.audited.append(st.step * trainer.layout.grad_accum_steps + st.micro_step)

    def on_step_end(self, trainer) -> None:
        loss = trainer.state.last_loss
        if self.ema is not None and loss > self.spike * self.ema:
            self.spikes += 1
        self.ema = loss if self.ema is None else self.decay * self.ema + (1 - self.decay) * loss

    # -- what makes it resumable --------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"ema": self.ema, "spikes": self.spikes, "audited": list(self.audited),
                "rng": self.rng.get_state()}  # a uint8 tensor: stored as safetensors

    def load_state_dict(self, sd: dict) -> None:
        self.ema, self.spikes, self.audited = sd["ema"], sd["spikes"], list(sd["audited"])
        self.rng.set_state(sd["rng"])


if __name__ == "__main__":
    sys.exit(main(extra_state={"loss_watch": LossWatch()}))
