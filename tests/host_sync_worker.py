"""One process: train a tiny MoE model and record every value read from a tensor the model produced
(loss, gradients' graph, parameters, buffers) inside a micro-batch that does not close its window.
On a GPU each such read makes the host wait for the GPU; the trainer must do none of them there.
Prints a JSON summary on its last line."""

from __future__ import annotations

import json
import sys
import tempfile

import torch

from seqpar.config import Config
from seqpar.engine import Trainer
from seqpar.parallel import init_topology

READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")


def main() -> None:
    run_dir = tempfile.mkdtemp(prefix="seqpar-host-sync-")
    cfg = Config(**{
        "model": {"arch": "mixtral", "vocab_size": 320, "hidden_size": 32, "intermediate_size": 64,
                  "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                  "moe": {"num_experts": 4, "top_k": 2, "intermediate_size": 32}},
        "data": {"type": "passkey", "seq_len": 128, "passkey": {"key_digits": 2, "eval_samples": 0}},
        "train": {"max_steps": 3, "micro_batch_size": 1, "global_batch_size": 4, "warmup_steps": 1},
        "checkpoint": {"every_micro_batches": 0, "at_end": False},
        "logging": {"run_dir": run_dir, "progress_bar": False, "tensorboard": "off", "log_every": 1},
    })
    topo = init_topology(1, 1, torch.device("cpu"))
    tr = Trainer(cfg, topo, config_path="host_sync_worker")
    tr.engine.train()
    owned = {id(t) for t in list(tr.model.parameters()) + list(tr.model.buffers())}
    reads: list[str] = []
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def spy(name):
        def read(self, *a, **k):
            if self.requires_grad or self.grad_fn is not None or id(self) in owned:
                reads.append(f"{name} of {tuple(self.shape)} {self.dtype}")
            return originals[name](self, *a, **k)
        return read

    mid_window = 0
    while tr.state.step < 2:
        watch = tr.state.step == 1 and 0 < tr.state.micro_step < 3  # neither opens nor closes it
        if watch:
            for name in READS:
                setattr(torch.Tensor, name, spy(name))
        try:
            tr.train_micro_batch()
        finally:
            for name, fn in originals.items():
                setattr(torch.Tensor, name, fn)
        mid_window += watch
        # the stop agreement after every micro-batch, as the loop does it
        tr.stop.agree(tr.ckpt.writer.failed(), tr.ckpt.interval_elapsed(), group=tr.topo.control_group)
    tr.ckpt.finish()
    print(json.dumps({"mid_window_micro_batches": mid_window, "reads": reads,
                      "micro_losses": tr.state.micro_losses, "routing": tr.state.routing,
                      "losses": tr.state.losses}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
