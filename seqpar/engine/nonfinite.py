"""Optimizer steps whose gradients are not finite (NaN or inf) are never applied.

One overflow in a long run must not cost the run, and must never reach the weights: checkpoints
taken after it would hold NaN, and ``checkpoint.keep_last`` would delete the good ones. DeepSpeed's
ZeRO and 16-bit optimizers already skip such a step (the gradient norm they compute is not
finite); the plain optimizer DeepSpeed runs at stage 0 in fp32 (also GaLore's) would apply it.
seqpar makes it one rule for every layout, so a run behaves alike on all of them (elastic resume):

* the update is not applied: weights, optimizer moments and seqpar's own optimizer state stay as
  they were; the step's data counts as consumed, and the LR schedule moves on, as it is a function
  of the step number (DeepSpeed alone would hold it back a step; Megatron does that too). A
  resumed or elastic run therefore computes the same LR at every step;
* the step is counted (``skipped_steps`` in the state, metrics.jsonl, the end-of-run line) and rank
  0 says so on the step;
* ``train.max_skipped_steps`` skips in a row stop the run (``Diverged``: run state ``diverged``,
  exit status 2, which restart wrappers do not retry): the weights no longer give finite
  gradients, and a restart from the newest checkpoint would skip the same steps again.

Cost: none where DeepSpeed decides (it reads the norm for clipping anyway); on the plain stage-0
path one read of the gradient norm per optimizer step, never inside a window.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch import Tensor

from seqpar.engine import deepspeed_state as dss


class Diverged(Exception):
    """``train.max_skipped_steps`` optimizer steps in a row had gradients that are not finite."""


class NonFiniteGuard:
    """Takes the window-closing ``engine.step()`` and says whether its update was skipped."""

    def __init__(self, engine, trainable: list[torch.nn.Parameter], group=None):
        self.engine = engine
        self.trainable = trainable
        self.group = group  # host (gloo) group over every rank: all ranks take the same decision
        self.deepspeed_decides = dss.skips_nonfinite_steps(engine)

    def step(self, grad_norm: Tensor | None = None) -> bool:
        """``engine.step()`` at an accumulation boundary; True when the update was skipped.
        ``grad_norm``: the global norm when seqpar clipped the gradients itself (else computed here
        on the plain path, from the reduced, identical gradients)."""
        before = dss.skipped_steps(self.engine)
        bad = False if self.deepspeed_decides else self._not_finite(grad_norm)
        with dss.step_skipped(self.engine) if bad else nullcontext():
            self.engine.step()
        skipped = dss.skipped_steps(self.engine) > before
        if skipped:
            dss.advance_schedule(self.engine)
        return skipped

    def _not_finite(self, grad_norm: Tensor | None) -> bool:
        if grad_norm is None:  # one fused pass, no squared copies
            grads = [p.grad for p in self.trainable if p.grad is not None]
            grad_norm = torch.stack(torch._foreach_norm(grads)).norm() if grads else torch.zeros(())
        flag = torch.tensor([0.0 if math.isfinite(float(grad_norm)) else 1.0])
        if self.group is not None and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)  # one verdict, whatever the rank saw
        return bool(flag.item())


def skipped_message(step: int, max_steps: int, loss: float, in_a_row: int, limit: int) -> str:
    """The line rank 0 prints for a skipped step."""
    return (f"WARNING: step {step}/{max_steps}: gradients are not finite (loss {loss:.4g}); the update was skipped "
            f"(weights and optimizer state unchanged), {in_a_row} in a row (the run stops at {limit + 1}: "
            f"train.max_skipped_steps={limit})")


def diverged_message(step: int, in_a_row: int, limit: int, newest: str | None) -> str:
    """Why the run stopped, and what to do (one paragraph)."""
    first = step - in_a_row + 1
    steps = f"step {first}" if in_a_row == 1 else f"steps {first}-{step}"
    where = (f"the newest checkpoint is {newest} (it may already hold the weights that overflow)" if newest
             else "no checkpoint was written")
    return (f"training diverged: gradients were not finite at {steps} ({in_a_row} in a row, more than "
            f"train.max_skipped_steps={limit}); their updates were not applied. The weights of step {first - 1} "
            f"no longer give finite gradients; {where}. Resume an earlier checkpoint (--resume <run_dir>/"
            f"checkpoints/<tag>) with a lower train.lr (--checkpoint.allow_changes '[train.lr]'), or raise "
            f"train.max_skipped_steps to step over a longer stretch of bad data")
