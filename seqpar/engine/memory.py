"""Activation memory policies: which decoder layers are checkpointed, how, and where their inputs
wait for the backward (``memory`` section of the config; the planner models the same choices).

- ``full``: a checkpointed layer keeps only its input; the backward recomputes the layer.
- ``selective``: the attention kernel's inputs and output (q, k, v, out and its LSE) are kept, the
  cheap parts around it (norms, projections, RoPE, the MLP) are recomputed: at long sequences
  attention is most of the FLOPs, so this costs little time, and it keeps ~5 of the ~27 hidden-
  sized tensors a Llama layer saves.
- ``checkpoint_every`` N: layers 0, N, 2N, ... are checkpointed, the others keep everything.
- ``offload_activations``: each checkpointed layer's input waits in pinned host memory (a copy on a
  side CUDA stream, overlapped with the next layers' forward) and comes back just before its
  recomputation, the previous layer's input prefetched meanwhile. The last checkpointed layer's
  input stays on the GPU: the backward needs it first, and its recomputation starts bringing back
  the one before.
- ``tiled_mlp``: the feed-forward runs over sequence tiles (``seqpar.models.tiling``).

All of it uses non-reentrant ``torch.utils.checkpoint``, so gradients flow through the original
graph (DeepSpeed's gradient hooks see one gradient per weight) and policies nest (tiles inside a
checkpointed layer). Offloading hands the layer input to the checkpoint through a ``Stash``
instead of as a tensor argument: a non-reentrant checkpoint keeps its tensor arguments alive until
the recomputation, which would pin the input on the GPU.

DeepSpeed 0.19.8 has ``CheckpointHiddenStatesOffload`` for Hugging Face layers; it is not used here
because it sees only tensors saved through autograd hooks (reentrant checkpointing), never
offloads on a CPU accelerator (so its path could not run in CI), and patches
``transformers.GradientCheckpointingLayer`` process-wide.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from seqpar.config import MemoryConfig, ModelConfig


class ActivationOffload:
    """Moves layer inputs to host memory and back. On CUDA: pinned buffers (pooled by shape and
    reused every micro-batch), copies on a side stream. Elsewhere the same path runs with plain
    copies (CPU, tested bitwise), or allocation only on the meta device (memory measurement)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self._pool: dict[tuple, list[Tensor]] = {}
        self._returning: list[tuple[tuple, Tensor, Any]] = []  # host buffers still being read
        self.offloaded_bytes = 0  # cumulative, for tests and the summary
        self.host_bytes = 0  # held now

    # -- host buffers -----------------------------------------------------------------------------
    def _buffer(self, x: Tensor) -> tuple[tuple, Tensor]:
        key = (tuple(x.shape), x.dtype)
        still = []
        for k, buf, event in self._returning:  # buffers whose device copy has finished
            if event is None or event.query():
                self._pool.setdefault(k, []).append(buf)
            else:
                still.append((k, buf, event))
        self._returning = still
        free = self._pool.get(key)
        if free:
            return key, free.pop()
        return key, torch.empty(x.shape, dtype=x.dtype, device="cpu", pin_memory=self.cuda)

    def to_host(self, stash: "Stash") -> None:
        x = stash.device_tensor
        key, host = self._buffer(x)
        if self.cuda:
            self.stream.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(self.stream):
                host.copy_(x.detach(), non_blocking=True)
            x.record_stream(self.stream)  # the allocator keeps x's memory until the copy is done
            stash.event = self.stream.record_event()
        elif not x.is_meta:  # meta: nothing to copy (shapes only)
            host.copy_(x.detach())
        stash.key, stash.host = key, host
        stash.device_tensor = None
        self.offloaded_bytes += host.numel() * host.element_size()
        self.host_bytes += host.numel() * host.element_size()

    def to_device(self, stash: "Stash") -> Tensor:
        """Start the copy back (side stream on CUDA); the compute stream waits for it in ``take``."""
        host = stash.host
        if self.cuda:
            # allocated from the compute stream's pool (memory the side stream allocated would stay
            # cached for it alone), filled on the side stream, kept alive until that copy is done
            compute = torch.cuda.current_stream(stash.device)
            x = torch.empty(host.shape, dtype=host.dtype, device=stash.device)
            self.stream.wait_stream(compute)
            with torch.cuda.stream(self.stream):
                self.stream.wait_event(stash.event)  # the copy to the host has finished
                x.copy_(host, non_blocking=True)
            x.record_stream(self.stream)
            event = self.stream.record_event()
            stash.event = event
        else:
            x = torch.empty(host.shape, dtype=host.dtype, device=stash.device)
            if not x.is_meta:
                x.copy_(host)
            event = None
        self._returning.append((stash.key, host, event))
        self.host_bytes -= host.numel() * host.element_size()
        stash.host = None
        return x


class Stash:
    """One checkpointed layer's input: on the device during the layer's forward, on the host until
    its recomputation, then on the device again for ``uses`` recomputations (selective has two)."""

    def __init__(self, x: Tensor, offload: ActivationOffload, uses: int):
        self.device_tensor: Tensor | None = x
        self.device, self.requires_grad = x.device, x.requires_grad
        self.offload, self.uses = offload, uses
        self.host: Tensor | None = None
        self.key: tuple = ()
        self.event: Any = None
        self.back: Tensor | None = None  # restored (or prefetched) copy
        self.previous: Stash | None = None  # the layer before: prefetched when this one is restored
        self.in_forward = True

    def park(self) -> None:
        """After the layer's forward: move the input off the device."""
        self.in_forward = False
        self.offload.to_host(self)

    def release(self) -> None:
        """After the backward: drop what a recomputation that never happened left behind (a
        checkpoint whose outputs needed no gradient is not recomputed)."""
        self.back = None
        if self.host is not None:
            self.offload._returning.append((self.key, self.host, self.event))
            self.offload.host_bytes -= self.host.numel() * self.host.element_size()
            self.host = None

    def prefetch(self) -> None:
        if self.back is None and self.host is not None:
            self.back = self.offload.to_device(self)

    def take(self) -> Tensor:
        if self.in_forward:
            return self.device_tensor
        if self.uses <= 0:
            raise RuntimeError("an offloaded layer input was recomputed more often than its policy allows "
                               "(a second backward through the same graph? retain_graph is not supported "
                               "with memory.offload_activations)")
        self.prefetch()
        x = self.back
        if self.offload.cuda:
            stream = torch.cuda.current_stream(x.device)
            stream.wait_event(self.event)
            x.record_stream(stream)
        if self.previous is not None:  # overlap the previous layer's copy with this recomputation
            self.previous.prefetch()
        self.uses -= 1
        if self.uses == 0:
            self.back = None
        return x.detach().requires_grad_(self.requires_grad)


class _Kept:
    """A checkpointed input that stays on the device (the last checkpointed layer's): handed out
    as is; its first recomputation prefetches the previous, offloaded layer's input, so that copy
    overlaps this layer's recomputation and backward instead of waiting for the next one."""

    def __init__(self, x: Tensor, previous: Stash):
        self.x, self.previous, self.in_forward = x, previous, True

    def park(self) -> None:
        self.in_forward = False

    def take(self) -> Tensor:
        if not self.in_forward:
            self.previous.prefetch()  # once: a prefetched (or taken) stash does not copy again
        return self.x


class LayerMemory:
    """``Transformer.memory``: runs decoder layer ``i`` under the configured policy."""

    def __init__(self, cfg: MemoryConfig, num_layers: int, device: torch.device):
        self.policy, self.every = cfg.activation_checkpointing, cfg.checkpoint_every
        self.checkpointed = [self.policy != "none" and i % self.every == 0 for i in range(num_layers)]
        last = max((i for i, c in enumerate(self.checkpointed) if c), default=-1)
        # the backward starts with the last checkpointed layer: its input stays where it is
        self.offloaded = [c and cfg.offload_activations and i != last for i, c in enumerate(self.checkpointed)]
        self.offload = ActivationOffload(device) if any(self.offloaded) else None
        self._previous: Stash | None = None

    def release(self) -> None:
        """End of a micro-batch's backward: every stash of its forward lets go of its tensors."""
        stash, self._previous = self._previous, None
        while stash is not None:
            stash.release()
            stash = stash.previous

    def describe(self) -> str:
        n = sum(self.checkpointed)
        if not n:
            return "activations kept"
        every = f" every {self.every} layers" if self.every > 1 else ""
        off = ", inputs offloaded to CPU" if self.offload is not None else ""
        return f"{self.policy} checkpointing{every} ({n}/{len(self.checkpointed)} layers{off})"

    def run_layer(self, i: int, layer: nn.Module, x: Tensor, cos: Tensor, sin: Tensor, meta, attn):
        if not self.checkpointed[i]:
            return layer(x, cos, sin, meta, attn)
        if i == 0:
            self._previous = None  # a new forward
        stash = None
        if self.offloaded[i]:
            stash = Stash(x, self.offload, uses=1 if self.policy == "full" else 2)
            stash.previous, self._previous = self._previous, stash
            get = stash.take
        elif self._previous is not None:  # the last checkpointed layer: its input stays, but its
            # recomputation (the backward's first) starts bringing back the layer before's
            stash = _Kept(x, self._previous)
            get = stash.take
        else:
            get = lambda: x  # noqa: E731
        if self.policy == "full":
            out = checkpoint(_layer_from_stash, layer, get, cos, sin, meta, attn, use_reentrant=False)
        else:
            q, k, v = checkpoint(_qkv_from_stash, layer, get, cos, sin, use_reentrant=False)
            o = attn(q, k, v, meta, layer.self_attn.scale)  # kept: the kernel saves q, k, v, o, lse
            out = checkpoint(_after_from_stash, layer, get, o, use_reentrant=False)
        if stash is not None:
            stash.park()
        return out


# Module-level functions (not closures over ``x``): the checkpoint keeps its arguments until the
# recomputation, and ``get`` is the only way they reach the layer input.
def _layer_from_stash(layer, get, cos, sin, meta, attn):
    return layer(get(), cos, sin, meta, attn)


def _qkv_from_stash(layer, get, cos, sin):
    return layer.attention_inputs(get(), cos, sin)


def _after_from_stash(layer, get, o):
    return layer.after_attention(get(), o)


def apply_memory_policy(model: nn.Module, cfg: MemoryConfig, model_cfg: ModelConfig, device: torch.device) -> LayerMemory:
    """Set the model's per-layer policy and MLP tiling from ``cfg``; returns the policy."""
    tile = (cfg.mlp_tile_tokens or model_cfg.hidden_size) if cfg.tiled_mlp else 0
    for layer in model.model.layers:
        layer.mlp_tile = tile
        if layer.is_moe:
            layer.mlp.recompute_experts = cfg.tiled_mlp
            layer.mlp.shared_tile = tile
    memory = LayerMemory(cfg, len(model.model.layers), device)
    model.memory = memory
    return memory
