"""Activation memory policies (seqpar.engine.memory) on one process: every policy, every-N, CPU
offload and the tiled MLP give the loss and gradients of keeping every activation, on dense and
MoE models (SP 2 and 4: tests/sp_worker.py); offload moves exactly the checkpointed inputs and
gives everything back."""

from __future__ import annotations

import itertools

import pytest
import torch
from test_model import MOE, tiny_cfg

from seqpar.config import ConfigError, MemoryConfig, load_config
from seqpar.engine.memory import ActivationOffload, LayerMemory, Stash, apply_memory_policy
from seqpar.models import build_model

CPU = torch.device("cpu")
LAYERS = 4


def run(kind: str, memory: MemoryConfig | None, micro_batches: int = 2):
    """Two micro-batches accumulated (as in one window): loss, gradients, router state, model."""
    cfg = tiny_cfg(num_hidden_layers=LAYERS, **(MOE if kind == "moe" else {}))
    model = build_model(cfg, seed=3)
    if memory is not None:
        apply_memory_policy(model, memory, cfg, CPU)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(micro_batches):
        ids = torch.randint(0, 97, (2, 24), generator=g)
        pos = torch.cat([torch.arange(10), torch.arange(14)]).repeat(2, 1)  # packed documents
        out = model(ids, pos, ids.roll(-1, 1))
        (out.loss_sum + out.aux_loss).backward()
        losses.append(out.loss_sum.detach() + out.aux_loss.detach())
    grads = {n: p.grad for n, p in model.named_parameters()}
    return torch.stack(losses), grads, model.router_state_dict(), model


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


POLICIES = [
    MemoryConfig(activation_checkpointing=p, checkpoint_every=n, offload_activations=o, tiled_mlp=t,
                 mlp_tile_tokens=7 if t else 0)
    for p, n, o, t in itertools.product(["none", "full", "selective"], [1, 3], [False, True], [False, True])
    if not (o and p == "none")
]


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_every_policy_equals_keeping_every_activation(kind):
    """Recomputation and offload are bitwise (same ops on the same values); tiles change the
    summation order of the weight gradients only (<= 1e-6 relative, fp32)."""
    ref_loss, ref_grads, ref_routers, _ = run(kind, None)
    for mem in POLICIES:
        loss, grads, routers, model = run(kind, mem)
        label = mem.model_dump_json(exclude_defaults=True)
        if mem.tiled_mlp:
            assert rel(loss, ref_loss) <= 1e-6, label
            worst = max(rel(grads[n], g) for n, g in ref_grads.items())
            assert worst <= 1e-6, (label, worst)
        else:
            assert torch.equal(loss, ref_loss), label
            for n, g in ref_grads.items():
                assert torch.equal(grads[n], g), (label, n)
        for key, value in ref_routers.items():  # recomputation never counts tokens twice
            assert torch.equal(routers[key], value), (label, key)
        layers = model.memory.checkpointed
        assert sum(layers) == (0 if mem.activation_checkpointing == "none" else len(range(0, LAYERS, mem.checkpoint_every)))


def test_offload_moves_the_checkpointed_inputs_and_returns_them():
    """The last checkpointed layer's input stays; every other checkpointed input goes to the host
    (bytes = layers x tokens x hidden x 4) and is back on the device (host holds 0) after backward."""
    mem = MemoryConfig(activation_checkpointing="full", offload_activations=True)
    cfg = tiny_cfg(num_hidden_layers=LAYERS)
    model = build_model(cfg, seed=3)
    policy = apply_memory_policy(model, mem, cfg, CPU)
    assert policy.offloaded == [True, True, True, False]
    ids = torch.randint(0, 97, (2, 24))
    out = model(ids, torch.arange(24).repeat(2, 1), ids)
    per_layer = 48 * cfg.hidden_size * 4
    assert policy.offload.host_bytes == 3 * per_layer and policy.offload.offloaded_bytes == 3 * per_layer
    out.loss_sum.backward()
    assert policy.offload.host_bytes == 0
    # host buffers are reused by the next micro-batch instead of allocated again
    pooled = sum(len(v) for v in policy.offload._pool.values()) + len(policy.offload._returning)
    assert pooled == 3
    model(ids, torch.arange(24).repeat(2, 1), ids).loss_sum.backward()
    assert sum(len(v) for v in policy.offload._pool.values()) + len(policy.offload._returning) == 3
    # no policy work outside training or without gradients
    with torch.no_grad():
        model(ids, torch.arange(24).repeat(2, 1), ids)
    assert policy.offload.offloaded_bytes == 6 * per_layer


def test_stash_prefetches_the_previous_layer():
    """Restoring layer i's input starts the copy of layer i-1's (overlap on CUDA); each input is
    handed out for exactly its number of recomputations, detached with its requires_grad."""
    off = ActivationOffload(CPU)
    xs = [torch.randn(5, 3, requires_grad=True) for _ in range(3)]
    stashes, prev = [], None
    for x in xs:
        s = Stash(x, off, uses=2)
        s.previous, prev = prev, s
        assert s.take() is x  # during the forward: the tensor itself
        s.park()
        stashes.append(s)
    assert off.host_bytes == 3 * 60
    got = stashes[2].take()
    assert torch.equal(got, xs[2]) and got.requires_grad and got.grad_fn is None
    assert stashes[1].back is not None and stashes[0].back is None  # prefetched one layer back
    assert torch.equal(stashes[2].take(), xs[2]) and stashes[2].back is None  # second use, then released
    assert off.host_bytes == 0 + 60  # layer 0 still on the host


def test_describe_and_config_errors():
    assert LayerMemory(MemoryConfig(), 4, CPU).describe() == "activations kept"
    d = LayerMemory(MemoryConfig(activation_checkpointing="selective", checkpoint_every=2,
                                 offload_activations=True), 4, CPU).describe()
    assert d == "selective checkpointing every 2 layers (2/4 layers, inputs offloaded to CPU)"
    with pytest.raises(ConfigError, match="train.compile compiles whole decoder layers; memory.tiled_mlp"):
        load_config(None, ["--train.compile", "true", "--memory.tiled_mlp", "true"])
    with pytest.raises(ConfigError, match="selective"):
        load_config(None, ["--train.compile", "true", "--memory.activation_checkpointing", "selective"])


def test_stashes_are_released_when_a_recomputation_is_skipped():
    """A checkpoint whose outputs need no gradient is never recomputed (layer 0's q/k/v with a
    frozen embedding and adapters only after attention): its offloaded input would stay referenced;
    ``release()`` (the trainer calls it after each backward) drops it and returns the host buffer."""
    from seqpar.config import LoRAConfig

    cfg = tiny_cfg(num_hidden_layers=LAYERS, lora=LoRAConfig(rank=2, targets=["o_proj", "down_proj"]))
    model = build_model(cfg, seed=3)
    policy = apply_memory_policy(model, MemoryConfig(activation_checkpointing="selective", offload_activations=True),
                                 cfg, CPU)
    ids = torch.randint(0, 97, (2, 24))
    model(ids, torch.arange(24).repeat(2, 1), ids).loss_sum.backward()
    held = []
    stash = policy._previous
    while stash is not None:
        held.append(stash.back is not None or stash.host is not None)
        stash = stash.previous
    assert any(held)  # layer 0's q/k/v recomputation never ran: its input is still held
    policy.release()
    assert policy._previous is None and policy.offload.host_bytes == 0


def test_last_kept_layer_prefetches_the_previous_offloaded_input(monkeypatch):
    """The backward starts with the last checkpointed layer, whose input stayed on the device: its
    recomputation already starts bringing back the layer before's (on CUDA that copy overlaps the
    layer's recomputation and backward), and each later restore is one layer ahead as before."""
    from seqpar.engine import memory as memory_mod

    events = []
    real_to_device, real_take = memory_mod.ActivationOffload.to_device, memory_mod._Kept.take

    def to_device(self, stash):
        events.append(("restore", stashes.index(stash)))
        return real_to_device(self, stash)

    def take(self):
        events.append(("kept", "forward" if self.in_forward else "recompute"))
        x = real_take(self)
        events.append(("kept", "returned"))
        return x

    monkeypatch.setattr(memory_mod.ActivationOffload, "to_device", to_device)
    monkeypatch.setattr(memory_mod._Kept, "take", take)
    stashes = []
    real_init = memory_mod.Stash.__init__

    def init(self, *a, **kw):
        real_init(self, *a, **kw)
        stashes.append(self)

    monkeypatch.setattr(memory_mod.Stash, "__init__", init)
    cfg = tiny_cfg(num_hidden_layers=LAYERS)
    model = build_model(cfg, seed=3)
    apply_memory_policy(model, MemoryConfig(activation_checkpointing="full", offload_activations=True), cfg, CPU)
    ids = torch.randint(0, 97, (2, 24))
    out = model(ids, torch.arange(24).repeat(2, 1), ids)
    assert events == [("kept", "forward"), ("kept", "returned")] and len(stashes) == LAYERS - 1
    out.loss_sum.backward()
    # the recomputation of the last layer restores layer 2's input (inside its take, before any of
    # its backward); layer 2's restores layer 1's, ...
    assert events[2:] == [("kept", "recompute"), ("restore", 2), ("kept", "returned"), ("restore", 1),
                          ("restore", 0)], events
