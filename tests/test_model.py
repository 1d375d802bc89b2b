"""Model pieces on one process: attention kernels, document masking, chunked loss, MoE routing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from seqpar.config import ModelConfig, MoEConfig, TrainConfig, flops_per_token
from seqpar.kernels import LocalAttention, SDPAAttention, TorchAttention, attn_meta_from_positions, select_attention
from seqpar.kernels.sdpa import BackendChooser, backend_order
from seqpar.kernels.torch_math import varlen_attention
from seqpar.loss import chunked_cross_entropy
from seqpar.models import build_model
from seqpar.models.moe import MoE
from seqpar.schedule import lr_at


def reference_attention(q, k, v, cu, scale):
    """Dense fp64 causal-within-document attention (the definition)."""
    t, h, _ = q.shape
    doc = torch.searchsorted(cu[1:], torch.arange(t), right=True)
    kk, vv = (x.double().repeat_interleave(h // k.shape[1], 1) for x in (k, v))
    s = torch.einsum("qhd,khd->hqk", q.double(), kk) * scale
    idx = torch.arange(t)
    s = s.masked_fill(~((doc[:, None] == doc[None, :]) & (idx[:, None] >= idx[None, :])), float("-inf"))
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), vv), torch.logsumexp(s, -1)


def rand_qkv(t=70, h=4, hkv=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(t, n, d, generator=g, requires_grad=True) for n in (h, hkv, hkv)]


CU = torch.tensor([0, 9, 10, 41, 70])  # uneven documents, one of length 1


@pytest.mark.parametrize("kernel", ["torch", "sdpa"])
@pytest.mark.parametrize("hkv", [1, 2, 4])
def test_kernels_match_dense_reference(kernel, hkv):
    q, k, v = rand_qkv(hkv=hkv)
    if kernel == "torch":
        out, lse = varlen_attention(q, k, v, CU, 0.25, chunk=16)  # chunks cross documents
    else:
        out, lse = SDPAAttention()(q, k, v, CU, 31, 0.25)
    ref, ref_lse = reference_attention(q, k, v, CU, 0.25)
    assert (out.double() - ref).abs().max() < 1e-5
    assert (lse.double() - ref_lse).abs().max() < 1e-5
    assert not lse.requires_grad
    g = torch.randn_like(ref)
    got = torch.autograd.grad((out.double() * g).sum(), (q, k, v))
    want = torch.autograd.grad((ref * g).sum(), (q, k, v))
    for a, b in zip(got, want):
        assert (a.double() - b).abs().max() / b.abs().max() < 1e-5


def test_attn_meta_from_positions():
    pos = torch.tensor([[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]])
    meta = attn_meta_from_positions(pos)
    assert meta.cu_seqlens.tolist() == [0, 3, 5, 7, 10] and meta.max_seqlen == 3
    with pytest.raises(ValueError, match="start every sequence with 0"):
        attn_meta_from_positions(torch.tensor([1, 2, 3]))


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2)
    return ModelConfig(**{**base, **kw})


MOE = dict(arch="qwen2_moe", moe=MoEConfig(num_experts=4, top_k=2, intermediate_size=16,
                                          shared_expert_intermediate_size=8, shared_expert_gate=True,
                                          aux_loss_coef=0.01, bias_update_rate=1e-3))


@pytest.mark.parametrize("kind", ["dense", "moe"])
@pytest.mark.parametrize("kernel", ["torch", "sdpa"])
def test_packing_never_crosses_documents(kind, kernel):
    """Logits of a packed [A | B] sequence equal those of A and B run alone, and changing A's
    tokens leaves B's logits untouched."""
    model = build_model(tiny_cfg(**(MOE if kind == "moe" else {})), seed=1).eval()
    model.set_attention(LocalAttention(select_attention(kernel, torch.device("cpu"))))
    a, b = torch.randint(0, 97, (1, 13)), torch.randint(0, 97, (1, 19))
    pos = torch.cat([torch.arange(13), torch.arange(19)])[None]
    with torch.no_grad():
        packed = model(torch.cat([a, b], 1), pos).logits
        alone_a = model(a, torch.arange(13)[None]).logits
        alone_b = model(b, torch.arange(19)[None]).logits
        a2 = (a + 1) % 97
        packed2 = model(torch.cat([a2, b], 1), pos).logits
    assert torch.allclose(packed[:, :13], alone_a, atol=1e-5)
    assert torch.allclose(packed[:, 13:], alone_b, atol=1e-5)
    # not bitwise for MoE: experts batch different token sets, so matmul rounding differs ~1e-8
    assert (packed2[:, 13:] - packed[:, 13:]).abs().max() < 1e-6
    assert (packed2[:, :13] - packed[:, :13]).abs().max() > 1e-3  # the change itself is visible


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_chunked_cross_entropy_matches_full(chunk):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(23, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 50, (23,), generator=g)
    labels[[0, 7, 8, 22]] = -100
    got = chunked_cross_entropy(h, w, labels, chunk)
    want = F.cross_entropy(h @ w.t(), labels, ignore_index=-100, reduction="sum")
    assert torch.allclose(got.double(), want, rtol=1e-6)
    gh, gw = torch.autograd.grad(got * 3, (h, w))
    wh, ww = torch.autograd.grad(want * 3, (h, w))
    assert torch.allclose(gh, wh, rtol=1e-5, atol=1e-7) and torch.allclose(gw, ww, rtol=1e-5, atol=1e-7)
    assert chunked_cross_entropy(h, w, torch.full((23,), -100), chunk).item() == 0.0


def naive_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Per-token loop: the definition of dropless top-k routing."""
    scores, idx, w = moe.gate(x)
    ex = moe.experts
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = idx[t, j]
            h = F.silu(x[t] @ ex.gate_proj[e].t()) * (x[t] @ ex.up_proj[e].t())
            out[t] += w[t, j] * (h @ ex.down_proj[e].t())
    s = moe.shared_expert(x)
    return out + torch.sigmoid(moe.shared_expert_gate(x)) * s


def test_moe_dropless_equals_per_token_loop():
    model = build_model(tiny_cfg(**MOE), seed=3)
    moe = model.model.layers[0].mlp
    x = torch.randn(40, 32)
    y, aux, (counts, digest, dropped) = moe(x)
    assert torch.allclose(y, naive_moe(moe, x), atol=1e-5)
    assert counts.sum().item() == 40 * 2 and aux.item() > 0 and dropped.item() == 0


def test_moe_capacity_factor_drops_later_tokens_and_counts_them():
    """capacity = ceil(factor x T x k / E) pairs per expert; an expert's later tokens (in sequence
    order) beyond it contribute zero; counts and aux still see every routed pair; a factor large
    enough to hold everything equals dropless bitwise. Router stats report the dropped fraction."""
    import math

    cfg = tiny_cfg(**MOE)
    x = torch.randn(40, 32, generator=torch.Generator().manual_seed(4))
    dropless = build_model(cfg, seed=3).model.layers[0].mlp
    want_y, want_aux, (want_counts, _, _) = dropless(x)
    big = build_model(cfg.model_copy(update={"moe": cfg.moe.model_copy(update={"capacity_factor": 4.0})}), seed=3)
    y, aux, (counts, _, dropped) = big.model.layers[0].mlp(x)
    assert torch.equal(y, want_y) and torch.equal(aux, want_aux) and dropped.item() == 0
    factor = 0.5
    small = build_model(cfg.model_copy(update={"moe": cfg.moe.model_copy(update={"capacity_factor": factor})}), seed=3)
    moe = small.model.layers[0].mlp
    y, aux, (counts, _, dropped) = moe(x)
    cap = math.ceil(factor * 40 * 2 / 4)
    assert torch.equal(counts, want_counts) and torch.equal(aux, want_aux)  # demand, not what ran
    assert dropped.item() == (want_counts - cap).clamp(min=0).sum().item() > 0
    # the definition: per-token loop with each expert's pairs after its first `cap` (token order) zeroed
    _, idx, w = moe.gate(x)
    seen = torch.zeros(4, dtype=torch.long)
    w = w.clone()
    for t in range(40):
        for j in range(2):
            e = idx[t, j]
            if seen[e] >= cap:
                w[t, j] = 0
            seen[e] += 1
    ex, ref = moe.experts, torch.zeros_like(x)
    for t in range(40):
        for j in range(2):
            e = idx[t, j]
            h = F.silu(x[t] @ ex.gate_proj[e].t()) * (x[t] @ ex.up_proj[e].t())
            ref[t] += w[t, j] * (h @ ex.down_proj[e].t())
    ref = ref + torch.sigmoid(moe.shared_expert_gate(x)) * moe.shared_expert(x)
    assert torch.allclose(y, ref, atol=1e-5)
    # through the model: dropped pairs accumulate per step, are logged as a fraction, then reset
    ids = torch.randint(0, 97, (2, 24))
    small(ids, torch.arange(24).repeat(2, 1), ids)
    assert small.model.layers[0].mlp.gate.dropped_tokens.item() > 0
    assert "model.layers.0.mlp.gate.dropped_tokens" in small.router_state_dict()
    stats = small.update_routers()
    assert 0 < stats["moe_dropped"] < 1 and stats["moe_max_load"] >= stats["moe_mean_load"] >= 1.0
    assert stats["moe_bias_norm"] > 0 and small.model.layers[0].mlp.gate.dropped_tokens.item() == 0
    assert "moe_dropped" not in build_model(cfg, seed=3).update_routers()


def test_expert_bias_changes_selection_not_weights():
    model = build_model(tiny_cfg(**MOE), seed=3)
    gate = model.model.layers[0].mlp.gate
    x = torch.randn(30, 32)
    scores, idx, w = gate(x)
    gate.expert_bias[2] = 10.0  # force expert 2 into every token's top-k
    scores_b, idx_b, w_b = gate(x)
    assert torch.equal(scores, scores_b) and (idx_b == 2).any(1).all()
    unbiased = scores.gather(1, idx_b)
    assert torch.allclose(w_b, unbiased / unbiased.sum(-1, keepdim=True))


def test_router_counts_bias_update_and_checkpointing():
    torch.manual_seed(0)
    ids, pos = torch.randint(0, 97, (2, 24)), torch.arange(24).repeat(2, 1)
    labels = ids.roll(-1, 1)
    plain = build_model(tiny_cfg(**MOE), seed=3)
    ckpt = build_model(tiny_cfg(**MOE), seed=3)
    ckpt.activation_checkpointing = True
    outs = []
    for m in (plain, ckpt):
        for _ in range(2):  # two micro-batches accumulate into one window
            o = m(ids, pos, labels)
            (o.loss_sum + o.aux_loss).backward()
        outs.append(o)
    for (n, p), (_, q) in zip(plain.named_parameters(), ckpt.named_parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), n
    sd_plain, sd_ckpt = plain.router_state_dict(), ckpt.router_state_dict()
    for key in sd_plain:
        assert torch.equal(sd_plain[key], sd_ckpt[key]), key  # recomputation did not count again
    counts = sd_plain["model.layers.0.mlp.gate.tokens_per_expert"]
    assert counts.sum().item() == 2 * 48 * 2  # micro-batches x tokens x top_k
    stats = plain.update_routers()
    bias = plain.model.layers[0].mlp.gate.expert_bias
    expect = 1e-3 * torch.sign(counts.mean() - counts)
    assert torch.equal(bias, expect) and stats["moe_max_load"] >= 1.0
    assert plain.model.layers[0].mlp.gate.tokens_per_expert.sum().item() == 0
    # state round trip, and fp32 routing state survives a bf16 cast of the model
    ckpt.load_router_state_dict(plain.router_state_dict())
    assert torch.equal(ckpt.model.layers[0].mlp.gate.expert_bias, bias)
    ckpt.bfloat16()
    assert ckpt.model.layers[0].mlp.gate.expert_bias.dtype == torch.float32
    assert ckpt.model.layers[0].mlp.gate.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="router state mismatch"):
        ckpt.load_router_state_dict({})


def test_backend_chooser_falls_back_and_remembers():
    calls = []

    def failing(name):
        def fn(q, k, v, *a):
            calls.append((name, k.shape[1]))
            raise RuntimeError(f"{name} unsupported")
        return fn

    def ok(q, k, v, *a):
        calls.append(("flash", k.shape[1]))
        if k.shape[1] != q.shape[1]:
            raise RuntimeError("no native GQA")
        return varlen_attention(q, k, v, torch.tensor([0, q.shape[0]]), a[-1])

    chooser = BackendChooser({"cudnn": failing("cudnn"), "flash": ok, "efficient": failing("efficient")},
                             backend_order(deterministic=False))
    q, k = torch.zeros(4, 4, 2), torch.zeros(4, 2, 2)
    chooser(("key",), q, k, k, None, 4, 1.0)
    assert calls == [("cudnn", 2), ("cudnn", 4), ("flash", 2), ("flash", 4)]
    calls.clear()
    chooser(("key",), q, k, k, None, 4, 1.0)
    assert calls == [("flash", 4)]  # remembered: flash with repeated kv heads
    assert backend_order(deterministic=True) == ["flash", "efficient"]
    with pytest.raises(ValueError, match="unknown SDPA backend"):
        backend_order(False, ["cudnn", "triton"])


def test_backend_chooser_times_candidates_and_drops_wrong_ones():
    """Fast mode on CUDA: every backend that runs is checked against exact math on a prefix and
    timed fwd+bwd; the fastest correct one is kept. Fake backends and a fake timer stand in for
    the GPU (each backend logs its name; the timer runs the step and reports that backend's
    preset time)."""
    log: list[str] = []
    preset = {"cudnn": 1.0, "flash": 3.0, "efficient": 2.0, "fa4": 0.5}

    def exact(name):
        def fn(q, k, v, cu, max_len, scale):
            log.append(name)
            if k.shape[1] != q.shape[1] and name == "efficient":
                raise RuntimeError("no native GQA")
            return varlen_attention(q, k, v, cu if cu is not None else torch.tensor([0, q.shape[0]]), scale)
        return fn

    def wrong(q, k, v, cu, max_len, scale):  # runs, fast, but not attention (like cuDNN varlen on torch 2.11)
        log.append("cudnn")
        return q * 1.0 + 0 * k.sum() + 0 * v.sum(), torch.zeros(q.shape[1], q.shape[0])

    def broken(*a):  # e.g. an installed package whose API changed
        log.append("fa4")
        raise TypeError("unexpected keyword argument 'cu_seqlens_q'")

    def timer(step):
        log.clear()
        step()
        assert log, "the timer must run the candidate"
        return preset[log[-1]]

    q, k, v = rand_qkv(t=40, h=4, hkv=2)
    cu = torch.tensor([0, 15, 40])
    table = {"cudnn": wrong, "flash": exact("flash"), "efficient": exact("efficient"), "fa4": broken}
    chooser = BackendChooser(table, ["cudnn", "flash", "efficient", "fa4"], timer)
    out, lse = chooser(("k",), q, k, v, cu, 25, 0.25)
    # cudnn dropped as wrong, fa4 as broken, efficient natively fails but runs with kv repeated:
    # efficient+expand (2.0) beats flash (3.0) and flash+expand (3.0)
    assert chooser.chosen[("k",)] == ("efficient", True)
    assert set(chooser.timings[("k",)]) == {"flash", "flash+expand", "efficient+expand"}
    assert "wrong result" in chooser.errors["cudnn"] and "unexpected keyword" in chooser.errors["fa4"]
    ref_out, ref_lse = reference_attention(q, k, v, cu, 0.25)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)
    assert q.grad is None, "timing runs on copies: the caller's tensors get no gradient"
    log.clear()
    chooser(("k",), q, k, v, cu, 25, 0.25)
    assert log == ["efficient"], "chosen once per signature, then reused without timing"
    assert chooser.describe() == "efficient+expand (efficient+expand 2000 ms, flash 3000 ms, flash+expand 3000 ms)"
    # without a timer (deterministic mode): the first in order that runs and is right
    plain = BackendChooser({"cudnn": wrong, "flash": exact("flash"), "efficient": exact("efficient")},
                           ["cudnn", "efficient", "flash"])
    plain(("k",), q, k, v, cu, 25, 0.25)
    assert plain.chosen[("k",)] == ("efficient", True) and not plain.timings
    assert "wrong result" in plain.errors["cudnn"]
    # a chosen backend that fails later (a longer sequence than the probe) is dropped, the next one runs
    def fails_when_long(q, k, v, cu, max_len, scale):
        log.append("cudnn")
        if q.shape[0] > 40:
            raise RuntimeError("sequence too long for this kernel")
        return exact("flash")(q, k, v, cu, max_len, scale)

    fallback = BackendChooser({"cudnn": fails_when_long, "efficient": exact("efficient")}, ["cudnn", "efficient"])
    qq, kk, vv = rand_qkv(t=40, h=4, hkv=4)
    fallback(("k",), qq, kk, vv, cu, 25, 0.25)
    assert fallback.chosen[("k",)] == ("cudnn", False)
    q2, k2, v2 = rand_qkv(t=70, h=4, hkv=4)
    out2, _ = fallback(("k",), q2, k2, v2, CU, 31, 0.25)
    assert fallback.chosen[("k",)] == ("efficient", False) and "failed after being chosen" in fallback.errors["cudnn"]
    torch.testing.assert_close(out2.double(), reference_attention(q2, k2, v2, CU, 0.25)[0], rtol=1e-5, atol=1e-5)
    # nothing correct: one clear error
    bad = BackendChooser({"cudnn": wrong}, ["cudnn"], timer)
    with pytest.raises(RuntimeError, match="no SDPA backend ran correctly.*wrong result"):
        bad(("k",), q, k, v, cu, 25, 0.25)


def test_prefix_reference_cuts_documents_at_the_prefix():
    from seqpar.kernels.sdpa import prefix_reference

    q, k, v = rand_qkv(t=70, h=4, hkv=2)
    out, lse = prefix_reference(q, k, v, CU, 0.25, rows=30)
    ref_out, ref_lse = reference_attention(q, k, v, CU, 0.25)
    torch.testing.assert_close(out.double(), ref_out[:30], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse[:, :30], rtol=1e-5, atol=1e-5)
    dense, _ = prefix_reference(q, k, v, None, 0.25, rows=30)
    one = torch.tensor([0, 70])
    torch.testing.assert_close(dense.double(), reference_attention(q, k, v, one, 0.25)[0][:30], rtol=1e-5, atol=1e-5)


def test_prepare_local_kernel_shape():
    """Start-up choice sees the local attention's shape: heads / Ulysses degree (kv heads repeated
    up to the degree), the micro-batch's tokens capped; ring layouts are left to the block kernel."""
    from types import SimpleNamespace

    from seqpar.parallel.attention import PREPARE_TOKENS, prepare_local_kernel

    seen = []
    kernel = SimpleNamespace(prepare=lambda *a: seen.append(a))
    dev = torch.device("cpu")
    prepare_local_kernel(kernel, SimpleNamespace(ring=1, ulysses=4), 32, 8, 64, 8192, torch.bfloat16, dev)
    prepare_local_kernel(kernel, SimpleNamespace(ring=1, ulysses=8), 32, 2, 64, 10**6, torch.bfloat16, dev)
    prepare_local_kernel(kernel, SimpleNamespace(ring=2, ulysses=1), 32, 8, 64, 8192, torch.bfloat16, dev)
    assert seen == [(8192, 8, 2, 64, torch.bfloat16, dev), (PREPARE_TOKENS, 4, 1, 64, torch.bfloat16, dev)]
    prepare_local_kernel(TorchAttention(), SimpleNamespace(ring=1, ulysses=1), 4, 4, 8, 64, torch.float32, dev)


def test_select_attention_errors():
    cpu = torch.device("cpu")
    assert isinstance(select_attention("torch", cpu), TorchAttention)
    assert isinstance(select_attention("auto", cpu), SDPAAttention)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        select_attention("flash_attn", cpu)


def test_lr_schedule():
    cfg = TrainConfig(max_steps=10, warmup_steps=2, lr=1.0, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(11)]
    assert lrs[:3] == [0.5, 1.0, 1.0] and abs(lrs[10] - 0.1) < 1e-12
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))
    lin = TrainConfig(max_steps=10, warmup_steps=0, lr=1.0, min_lr_ratio=0.0, decay="linear")
    assert [round(lr_at(s, lin), 6) for s in (0, 5, 10)] == [1.0, 0.5, 0.0]
    # warmup-stable-decay: 2 warmup, stable, then ceil(0.25 x 8) = 2 cooldown steps (8 and 9), the
    # last one at the floor
    wsd = TrainConfig(max_steps=10, warmup_steps=2, lr=1.0, min_lr_ratio=0.2, decay="wsd", cooldown_ratio=0.25)
    assert [round(lr_at(s, wsd), 6) for s in range(10)] == [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.6, 0.2]
    # extending the run during the stable phase changes no rate already used, only moves the cooldown
    longer = wsd.model_copy(update={"max_steps": 20})
    assert [lr_at(s, longer) for s in range(8)] == [lr_at(s, wsd) for s in range(8)]
    assert lr_at(14, longer) == 1.0 and lr_at(15, longer) < 1.0  # ceil(0.25 x 18) = 5 cooldown steps
    one = TrainConfig(max_steps=3, warmup_steps=0, lr=1.0, min_lr_ratio=0.0, decay="wsd", cooldown_ratio=0.01)
    assert [lr_at(s, one) for s in range(3)] == [1.0, 1.0, 0.0]  # at least one cooldown step: the last


def test_flops_per_token_formula():
    m = tiny_cfg()
    h, d, L, V, S = 32, 8, 2, 97, 100
    attn = h * d * (4 + 2 * 2) + 4 * d * h
    n = L * (attn + 3 * h * 64) + h * V
    assert flops_per_token(m, S) == 6 * n + 6 * L * 4 * d * S


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_saves_only_its_input_and_matches_eager(dtype):
    """The norm's forward is eager Llama RMSNorm's values exactly; its gradients equal autograd's
    through the eager formula (fp32: within rounding); it saves its input (the same storage, no
    copy), the weight and one rsqrt per row, where eager autograd also kept fp32 [T, H] copies."""
    from seqpar.models.transformer import RMSNorm

    def eager(x, w, eps):
        xf = x.float()
        return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    g = torch.Generator().manual_seed(0)
    for shape in ((9, 32), (3, 5, 2, 16)):  # hidden states; qk-norm's [T, heads, d]
        x = torch.randn(*shape, generator=g).to(dtype).requires_grad_()
        norm = RMSNorm(shape[-1], 1e-6).to(dtype)
        with torch.no_grad():
            norm.weight.copy_(torch.randn(shape[-1], generator=g))
        gy = torch.randn(*shape, generator=g).to(dtype)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = norm(x)
        assert {(tuple(t.shape), t.dtype) for t in saved} == {
            (shape, dtype), ((shape[-1],), dtype), ((*shape[:-1], 1), torch.float32)}
        assert any(t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for t in saved)
        y.backward(gy)
        w = norm.weight.detach().clone().requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        y2 = eager(x2, w, 1e-6)
        y2.backward(gy)
        assert torch.equal(y, y2)
        tol = 1e-6 if dtype == torch.float32 else 1e-2
        for a, b in ((x.grad, x2.grad), (norm.weight.grad, w.grad)):
            assert (a.float() - b.float()).abs().max() <= tol * b.float().abs().max()


def test_extending_a_decayed_run_warns_of_the_lr_jump():
    """A resume whose changed schedule raises the learning rate of a run that had already decayed
    says so (with, for wsd, the step to resume from to continue the stable phase); an extension
    in the stable phase, or one that keeps the rate, says nothing."""
    from seqpar.config import validate_config
    from seqpar.engine.resume import lr_jump

    def cfg(**train):
        return validate_config({"train": {"warmup_steps": 2, "lr": 1.0, "min_lr_ratio": 0.2, **train}})

    wsd = cfg(max_steps=10, decay="wsd", cooldown_ratio=0.25).model_dump(mode="json")
    longer = cfg(max_steps=20, decay="wsd", cooldown_ratio=0.25)
    msg = lr_jump(wsd, longer, 10)
    assert msg and "raises the learning rate from 2.00e-01 (step 10, the last one used) to 1.00e+00" in msg, msg
    assert "resume a checkpoint from step 8 or before" in msg and "seqpar.ckpt list runs/default/checkpoints" in msg
    assert lr_jump(wsd, longer, 6) is None  # stable phase: nothing changes
    cos = cfg(max_steps=10).model_dump(mode="json")
    msg = lr_jump(cos, cfg(max_steps=20), 10)
    assert msg and "the run had already decayed" in msg and "stable phase" not in msg
    assert lr_jump(cos, cfg(max_steps=10, lr=0.5), 10) is None  # lower: no warning
    assert lr_jump(cos, cfg(max_steps=20), 1) is None  # still warming up: rising is the plan
    assert lr_jump(cfg(max_steps=10, warmup_steps=5).model_dump(mode="json"), cfg(max_steps=10, warmup_steps=5), 4) is None
