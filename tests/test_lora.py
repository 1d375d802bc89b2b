"""LoRA adapters (seqpar.models.lora): frozen base, exact start, merged export equal to the adapted
model, and the PEFT round trip: peft loads our adapter onto the transformers base model with
equal logits (peft and transformers are test dependencies)."""

from __future__ import annotations

import peft  # test dependencies (the `test` extra): never skipped
import pytest
import torch
import transformers
from test_model import MOE, tiny_cfg

from seqpar.config import ConfigError, LoRAConfig, load_config
from seqpar.models import build_model
from seqpar.models.hf import load_hf_checkpoint, save_hf_checkpoint
from seqpar.models.lora import LoRALinear, is_adapter, merged_state_dict, save_peft_adapter

SEQ = 20


def batch(vocab: int = 97):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (2, SEQ), generator=g)
    return ids, torch.arange(SEQ).repeat(2, 1)


def nudge(model, scale: float = 0.05) -> None:
    """Give every adapter a non-zero B (a trained adapter), deterministically."""
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.mark.parametrize("extra", [{}, MOE])
def test_adapters_start_at_the_base_and_only_they_train(extra):
    lora = LoRAConfig(rank=4, alpha=8, experts=bool(extra), trainable=["norms"])
    base = build_model(tiny_cfg(**extra), seed=3)
    model = build_model(tiny_cfg(**extra, lora=lora), seed=3)
    ids, pos = batch()
    torch.testing.assert_close(model(ids, pos).logits, base(ids, pos).logits, rtol=0, atol=0)  # B = 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(is_adapter(n) or "norm" in n for n in trainable)
    assert any("experts.lora" in n for n in trainable) == bool(extra)
    assert not any(n.endswith("q_proj.weight") or n.endswith("embed_tokens.weight") for n in trainable)
    out = model(ids, pos, ids.roll(-1, 1))
    (out.loss_sum + out.aux_loss).backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n  # frozen base: no gradient at all
    # merged export = adapted model
    nudge(model)
    merged = build_model(tiny_cfg(**extra), seed=3)
    sd = merged_state_dict(model)
    missing, unexpected = merged.load_state_dict(sd, strict=False)
    assert not unexpected and all("tokens_per_expert" in k or "routing_digest" in k for k in missing)
    torch.testing.assert_close(merged(ids, pos).logits, model(ids, pos).logits, rtol=1e-5, atol=1e-5)


def test_peft_loads_our_adapter_onto_the_transformers_model(tmp_path):
    hf_cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    hf.save_pretrained(tmp_path / "base")
    cfg = load_config(None, ["--model.hf_path", str(tmp_path / "base")]).model
    cfg = cfg.model_copy(update={"lora": LoRAConfig(rank=4, alpha=16, targets=["q_proj", "v_proj", "down_proj"])})
    model = build_model(cfg, seed=0)
    assert isinstance(model.model.layers[0].self_attn.q_proj, LoRALinear)
    assert not isinstance(model.model.layers[0].self_attn.k_proj, LoRALinear)
    nudge(model)
    save_peft_adapter(model, tmp_path / "adapter", base_model=str(tmp_path / "base"))
    loaded = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base"),
                                            tmp_path / "adapter").eval()
    ids, pos = batch(128)
    with torch.no_grad():
        want = model.eval()(ids, pos).logits
        got = loaded(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # and the merged export loads as a plain transformers model with the same logits
    save_hf_checkpoint(merged_state_dict(model), cfg.model_copy(update={"lora": None}), tmp_path / "merged")
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(FileExistsError, match="not empty"):
        save_peft_adapter(model, tmp_path / "adapter")


def test_unsupported_exports_and_configs_say_why(tmp_path):
    moe = build_model(tiny_cfg(**MOE, lora=LoRAConfig(experts=True)), seed=0)
    with pytest.raises(ValueError, match="routed experts"):
        save_peft_adapter(moe, tmp_path / "a")
    norms = build_model(tiny_cfg(lora=LoRAConfig(trainable=["norms"])), seed=0)
    with pytest.raises(ValueError, match="merged model"):
        save_peft_adapter(norms, tmp_path / "b")
    with pytest.raises(ValueError, match="no LoRA adapters"):
        save_peft_adapter(build_model(tiny_cfg(), seed=0), tmp_path / "c")
    with pytest.raises(ConfigError, match="nothing would get an adapter"):
        load_config(None, ["--model.lora.targets", "[]"])
    with pytest.raises(ConfigError, match="model.lora.targets"):
        load_config(None, ["--model.lora.targets", "[qkv]"])
    with pytest.raises(ConfigError, match="model.lora with ZeRO-3 needs parallel.zero3_init false"):
        load_config(None, ["--model.lora.rank", "8", "--parallel.zero_stage", "3"])
    with pytest.raises(ConfigError, match="model.lora.experts with train.compile"):
        load_config(None, ["--model.lora.experts", "true", "--train.compile", "true"])
    assert load_config(None, ["--model.lora.rank", "8"]).model.lora.rank == 8


def test_hf_weights_load_into_the_base_of_an_adapted_model(tmp_path):
    """Adapters wrap the loaded base (names unchanged), so importing a Hub checkpoint and then
    adding adapters equals adding adapters to a model that loads the same weights."""
    src = build_model(tiny_cfg(), seed=5)
    save_hf_checkpoint({k: v for k, v in src.state_dict().items()}, src.cfg, tmp_path / "m")
    model = build_model(tiny_cfg(lora=LoRAConfig(rank=2)), seed=0)
    load_hf_checkpoint(model, tmp_path / "m")
    ids, pos = batch()
    torch.testing.assert_close(model(ids, pos).logits, src(ids, pos).logits, rtol=0, atol=0)


def test_qlora_base_is_nf4_and_exports_dequantized():
    """QLoRA: the adapted projections keep their frozen weight as 4-bit NF4 (bitsandbytes, a test
    dependency; CPU backend here): no parameter, no state-dict entry; the model computes with the
    dequantized base (exactly the merged export at B = 0 and after training the adapters)."""
    import bitsandbytes.functional as bnbf

    from seqpar.models.lora import QLoRALinear

    cfg = tiny_cfg(lora=LoRAConfig(rank=4, alpha=8, quantize_base="nf4"))
    model = build_model(cfg, seed=3)
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, QLoRALinear) and q.qweight.dtype == torch.uint8
    assert not any(n.endswith("q_proj.weight") for n, _ in model.named_parameters())
    assert not any("qweight" in k for k in model.state_dict())
    base = build_model(tiny_cfg(), seed=3)
    want = bnbf.dequantize_4bit(*bnbf.quantize_4bit(base.model.layers[0].self_attn.q_proj.weight.detach(),
                                                    quant_type="nf4", blocksize=64))
    torch.testing.assert_close(q.base_weight(torch.float32), want, rtol=0, atol=0)
    ids, pos = batch()
    nudge(model)
    out = model(ids, pos, ids.roll(-1, 1))
    out.loss_sum.backward()
    assert all((p.grad is not None) == p.requires_grad for p in model.parameters())
    merged = build_model(tiny_cfg(), seed=3)
    merged.load_state_dict(merged_state_dict(model), strict=True)
    torch.testing.assert_close(merged(ids, pos).logits, model(ids, pos).logits, rtol=1e-5, atol=1e-5)
    # the memory planner counts the base as the model holds it: 4 bits + an fp32 absmax per 64
    from seqpar import plan

    plan_cfg = load_config(None, ["--model.lora.rank", "4", "--model.lora.alpha", "8", "--model.lora.quantize_base",
                                  "nf4", "--parallel.zero_stage", "0"])
    real = build_model(plan_cfg.model, seed=0)
    held = sum(p.numel() * p.element_size() for p in real.parameters())
    for m in real.modules():
        if isinstance(m, QLoRALinear):
            held += m.qweight.numel() * m.qweight.element_size() + m.quant_state.absmax.numel() * 4
    assert plan.model_state(plan_cfg, 1)[0]["params"] == held
    # the 4-bit base is an approximation of the original, not another model
    err = (model(ids, pos).logits - build_model(tiny_cfg(lora=LoRAConfig(rank=4, alpha=8)), seed=3).eval()(ids, pos).logits)
    assert 0 < float(err.abs().max()) < 1.0
    with pytest.raises(ConfigError, match="quantize_base with ZeRO-3"):
        load_config(None, ["--model.lora.quantize_base", "nf4", "--parallel.zero_stage", "3",
                           "--parallel.zero3_init", "false"])


@pytest.mark.parametrize("path", ["loop", "grouped"])
def test_expert_adapters_run_beside_the_frozen_weights(path):
    """Per-expert adapters add s (x A^T) B^T to each projection: equal (fp32) to running the
    experts on the folded weights W + s B @ A, and neither the forward nor the backward builds a
    tensor of a full expert weight's shape (folding did, in every layer, kept for the backward).
    Both the loop and the grouped-GEMM path (torch._grouped_mm's CPU kernel here)."""
    from test_moe_grouped import FullSizeAllocations

    from seqpar.config import MoEConfig
    from seqpar.models import moe as moe_mod
    from seqpar.models.lora import LoRAExperts

    hidden = 16
    ex = moe_mod.Experts(hidden, MoEConfig(num_experts=4, top_k=2, intermediate_size=24))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in ex.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    ex.lora = LoRAExperts(ex, rank=8, alpha=16, generator=g)
    with torch.no_grad():
        for n, p in ex.lora.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    counts = torch.tensor([3, 0, 5, 2])
    x = torch.randn(10, hidden, generator=g)
    dy = torch.randn(10, hidden, generator=g)
    ab = ex.lora.factors()

    def run(fn):
        xx = x.clone().requires_grad_()
        for p in ex.lora.parameters():
            p.grad = None
        y = fn(xx)
        y.backward(dy)
        return [y.detach(), xx.grad] + [p.grad.clone() for p in ex.lora.parameters()]

    if path == "loop":
        new = lambda xx: moe_mod.looped_swiglu(xx, ex.gate_proj, ex.up_proj, ex.down_proj,  # noqa: E731
                                               counts.tolist(), lora=ab)
    else:
        new = lambda xx: moe_mod.grouped_swiglu(xx, ex.gate_proj, ex.up_proj, ex.down_proj, counts,  # noqa: E731
                                                lora=ab)
    folded = lambda xx: moe_mod.looped_swiglu(xx, *(w + ex.lora.delta(n) for w, n in  # noqa: E731
                                                    zip((ex.gate_proj, ex.up_proj, ex.down_proj),
                                                        ("gate_proj", "up_proj", "down_proj"))), counts.tolist())
    for a, b in zip(run(new), run(folded)):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max(), (a - b).abs().max()
    full = FullSizeAllocations([tuple(w.shape) for w in (ex.gate_proj, ex.up_proj, ex.down_proj)])
    with full:
        run(new)
    assert not full.hits, full.hits
    with full:
        run(folded)
    assert full.hits  # the detector sees the folded weights
