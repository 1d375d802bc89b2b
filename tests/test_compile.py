"""Per-layer torch.compile (seqpar.models.compile): equal to eager, one graph per layer, no breaks.

One test uses inductor (the fusion that matters, ~40 s of compiling on 2 CPU cores); the others
use aot_eager, which runs the same dynamo + AOT-autograd graphs without inductor's codegen.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from seqpar.config import ModelConfig, MoEConfig
from seqpar.kernels import (
    AttnMeta,
    LocalAttention,
    TorchAttention,
    attn_meta_from_positions,
    select_attention,
)
from seqpar.models import build_model
from seqpar.models import compile as C
from seqpar.models.compile import compile_layers

MOE = {"arch": "qwen2_moe", "moe": MoEConfig(num_experts=4, top_k=2, intermediate_size=16,
                                            shared_expert_intermediate_size=8, shared_expert_gate=True,
                                            aux_loss_coef=0.01, bias_update_rate=1e-3)}


def tiny_cfg(**kw) -> ModelConfig:
    """hidden 32, 2 layers, 4 query heads on 2 kv heads (GQA)."""
    base = {"vocab_size": 97, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2}
    return ModelConfig(**{**base, **kw})


def batch(docs: list[list[int]], seed: int = 0) -> tuple[torch.Tensor, ...]:
    """[B, S] ids, positions restarting at 0 at every document of a row, labels (shifted)."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in docs])
    ids = torch.randint(0, 97, pos.shape, generator=g)
    labels = ids.roll(-1, 1)
    labels[torch.roll(pos == 0, -1, 1)] = -100  # no target across a document boundary
    return ids, pos, labels


PACKED_64 = [[20, 12], [9, 23]]  # 2 rows x 32 = 64 tokens, 4 documents
PACKED_48 = [[17, 7], [5, 4, 15]]  # 2 rows x 24 = 48 tokens, 5 documents


def step(model, b) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(*b)
    loss = out.loss_sum + out.aux_loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_close(eager, compiled, rtol: float = 1e-5) -> None:
    (le, ge), (lc, gc) = eager, compiled
    assert abs(lc.item() - le.item()) <= rtol * abs(le.item())
    assert ge.keys() == gc.keys()
    for n in ge:
        err = (gc[n] - ge[n]).norm() / ge[n].norm().clamp_min(1e-30)
        assert err <= rtol, f"{n}: relative gradient error {err:.2e}"


def pair(cfg: ModelConfig, kernel: str, **compile_kw):
    """(eager, compiled) models with the same weights and attention."""
    models = [build_model(cfg, seed=1) for _ in range(2)]
    for m in models:
        m.set_attention(LocalAttention(select_attention(kernel, torch.device("cpu"))))
    compile_layers(models[1], **compile_kw)
    return models


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
    assert not C._STASH, "kept attention graphs leaked"
    assert not C._METAS, "attention metadata leaked"


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def compiles() -> int:
    """Frames dynamo compiled, recompilations included."""
    return counters["frames"]["ok"]


def test_inductor_dense_matches_eager_dynamic_and_deterministic():
    """Inductor, dense GQA model, packed documents: loss and every gradient within 1e-5 of eager;
    a new token count reuses the graph; a repeated step is bitwise identical."""
    eager, comp = pair(tiny_cfg(), "sdpa", mode="default", dynamic=None)
    b64, b48 = batch(PACKED_64), batch(PACKED_48, seed=1)
    first = step(comp, b64)
    assert_close(step(eager, b64), first)
    assert graphs() == 1 and not counters["graph_break"]  # both layers share one graph
    assert_close(step(eager, b48), step(comp, b48))  # 48 tokens, 5 documents, other max_seqlen
    assert graphs() == 1 and compiles() == 1, "a new sequence length recompiled"
    again = step(comp, b64)
    assert torch.equal(again[0], first[0])
    assert all(torch.equal(again[1][n], first[1][n]) for n in first[1])


@pytest.mark.parametrize("kernel", ["torch", "sdpa"])
def test_moe_matches_eager_in_one_graph(kernel):
    """MoE (router, dropless experts, shared expert, aux loss): one graph, no breaks, no recompile,
    and the router counts the compiled model adds up equal eager's."""
    eager, comp = pair(tiny_cfg(**MOE), kernel, mode=None, dynamic=None, backend="aot_eager")
    for docs, seed in ((PACKED_64, 0), (PACKED_48, 1)):
        assert_close(step(eager, batch(docs, seed)), step(comp, batch(docs, seed)))
    assert graphs() == 1 and compiles() == 1 and not counters["graph_break"]
    for (name, a), (_, b) in zip(eager.routers(), comp.routers()):
        assert torch.equal(a.tokens_per_expert, b.tokens_per_expert), name
        assert torch.equal(a.routing_digest, b.routing_digest), name


def test_moe_aux_loss_with_sequence_parallel_group_stays_one_graph():
    """With an SP group (1 process here) the MoE aux loss all-reduces its statistics through a
    differentiable collective dynamo cannot trace: the aux-loss op keeps the layer one graph."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        eager, comp = pair(tiny_cfg(**MOE), "torch", mode=None, dynamic=None, backend="aot_eager")
        for m in (eager, comp):
            m.set_sequence_parallel_group(dist.new_group([0]))
        for docs, seed in ((PACKED_64, 0), (PACKED_48, 1)):
            assert_close(step(eager, batch(docs, seed)), step(comp, batch(docs, seed)))
        assert graphs() == 1 and compiles() == 1 and not counters["graph_break"]
    finally:
        dist.destroy_process_group()


def test_layer_is_one_graph_and_the_test_would_see_a_break():
    """torch._dynamo.explain on one layer: one graph, no break; the raw injected attention (traced
    by dynamo) breaks it, which is what the custom op prevents."""
    model = build_model(tiny_cfg(), seed=1)
    layer, attn = model.model.layers[0], model.attention
    ids, pos, _ = batch(PACKED_64)
    x = model.model.embed_tokens(ids.reshape(-1))
    cos, sin = model.rotary(pos.reshape(-1), x.dtype)
    meta = attn_meta_from_positions(pos)
    token = C._token(C._METAS, meta)
    ours = torch._dynamo.explain(C._layer_body)(layer, x, cos, sin, token, C.handle_tensor(attn))
    assert ours.graph_count == 1 and ours.graph_break_count == 0, ours.break_reasons
    raw = torch._dynamo.explain(type(layer).forward)(layer, x, cos, sin, meta, attn)
    assert raw.graph_break_count > 0
    del token


def test_activation_checkpointing_composes_and_frees_attention_state():
    """Checkpointed compiled layers: eager's gradients, and the first forward keeps no attention
    graph (checkpointing drops the saved token, the finalizer drops the kept graph)."""
    eager, comp = pair(tiny_cfg(), "torch", mode=None, dynamic=None, backend="aot_eager")
    comp.activation_checkpointing = True
    b = batch(PACKED_64)
    want = step(eager, b)
    out = comp(*b)
    assert not C._STASH  # forward done, nothing kept: recomputed in backward
    comp.zero_grad(set_to_none=True)
    (out.loss_sum + out.aux_loss).backward()
    got = out.loss_sum.detach() + out.aux_loss.detach(), {n: p.grad.clone() for n, p in comp.named_parameters()}
    assert_close(want, got)
    assert not counters["graph_break"]


def test_kept_graphs_are_released():
    """Without checkpointing one graph per layer is kept until backward; a dropped forward, and a
    forward under no_grad, keep nothing."""
    _, comp = pair(tiny_cfg(), "torch", mode=None, dynamic=None, backend="aot_eager")
    b = batch(PACKED_64)
    out = comp(*b)
    assert len(C._STASH) == 2
    del out
    assert not C._STASH
    with torch.no_grad():
        comp(*b)
    assert not C._STASH
    step(comp, b)
    assert not C._STASH


def test_attention_op_opcheck():
    """torch.library.opcheck: schema, fake impl vs the real op (shapes, dtypes, strides), autograd
    registration. Not its AOT-dispatch check: that compares outputs of two runs, and the token is
    unique per run; AOT dispatch is what every model test here runs."""
    attn = LocalAttention(TorchAttention())
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(24, h, 8, generator=g, requires_grad=True) for h in (4, 2, 2))
    meta = AttnMeta(torch.tensor([0, 10, 11, 24]), 13)
    token = C._token(C._METAS, meta)
    args = (q, k, v, token, 0.35, C.handle_tensor(attn), True)
    torch.library.opcheck(C.attention_op, args, test_utils=("test_schema", "test_autograd_registration",
                                                           "test_faketensor"))
    out, kept = C.attention_op(*args)
    with torch._subclasses.FakeTensorMode() as mode:
        fake = C.attention_op(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
    assert [(t.shape, t.dtype) for t in fake] == [(out.shape, out.dtype), (kept.shape, kept.dtype)]
    # its backward is the real one: same gradients as calling the attention directly
    dout = torch.randn(out.shape, generator=g)
    got = torch.autograd.grad(out, (q, k, v), dout)
    want = torch.autograd.grad(attn(q, k, v, meta, 0.35), (q, k, v), dout)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    del out, kept, token, args


def test_experts_op_opcheck():
    """The experts op: schema, fake impl, autograd registration; gradients equal the module's."""
    experts = build_model(tiny_cfg(**MOE), seed=1).model.layers[0].mlp.experts
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 32, generator=g, requires_grad=True)
    counts = torch.tensor([3, 0, 5, 2])  # one expert without tokens
    w = (experts.gate_proj, experts.up_proj, experts.down_proj)
    args = (x, counts, *w, C.handle_tensor(experts), True)
    torch.library.opcheck(C.experts_op, args, test_utils=("test_schema", "test_autograd_registration",
                                                          "test_faketensor"))
    out, _ = C.experts_op(*args)
    dout = torch.randn(out.shape, generator=g)
    got = torch.autograd.grad(out, (x, *w), dout)
    want = torch.autograd.grad(experts(x, counts), (x, *w), dout)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_compile_refuses_cuda_graph_modes():
    with pytest.raises(ValueError, match="CUDA graphs"):
        compile_layers(build_model(tiny_cfg()), mode="reduce-overhead")
