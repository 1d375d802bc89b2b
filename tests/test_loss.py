"""The chunked cross-entropy (issue 11): exact vs the dense definition, fp32 accumulation of the
vocabulary gradient, no host syncs, one tile of logits, frozen inputs, and ``select_loss``."""

from __future__ import annotations

import importlib.machinery
import sys
import types
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from seqpar.loss import LOSS_IMPLS, chunked_cross_entropy, select_loss, token_cross_entropy

IGN = -100
CPU = torch.device("cpu")


def make(t: int, h: int = 12, v: int = 37, dtype=torch.float32, ignore=(), seed: int = 0, w_scale=0.5):
    g = torch.Generator().manual_seed(seed)
    hid = torch.randn(t, h, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    w = (torch.randn(v, h, generator=g, dtype=torch.float64) * w_scale).to(dtype).requires_grad_()
    lab = torch.randint(0, v, (t,), generator=g)
    lab[list(ignore)] = IGN
    return hid, w, lab


def reference(h, w, lab, scale: float = 1.0):
    """fp64 dense definition on the same input values: loss and (hidden, weight) grads."""
    hh, ww = (x.detach().double().requires_grad_() for x in (h, w))
    loss = F.cross_entropy(hh @ ww.t(), lab, reduction="sum", ignore_index=IGN)
    gh, gw = torch.autograd.grad(loss * scale, (hh, ww))
    return loss.detach(), gh, gw


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).norm() / want.norm().clamp_min(1e-300))


CASES = [  # (T, chunk, ignored positions)
    (24, 6, (0, 7)),  # chunk divides T
    (23, 5, (0, 7, 8, 22)),  # it does not
    (10, 64, (3,)),  # chunk > T
    (30, 5, tuple(range(10, 20))),  # two all-ignored chunks in the middle
    (1, 4, ()),  # T = 1
    (1, 1, ()),
]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("t,chunk,ignore", CASES)
def test_matches_dense_cross_entropy(dtype, tol, t, chunk, ignore):
    h, w, lab = make(t, dtype=dtype, ignore=ignore)
    got = chunked_cross_entropy(h, w, lab, chunk)
    (got * 0.37).backward()
    want, gh, gw = reference(h, w, lab, 0.37)
    assert got.dtype == dtype and h.grad.dtype == dtype and w.grad.dtype == dtype
    assert abs(float(got.detach()) - float(want)) <= tol * abs(float(want))
    assert rel(h.grad, gh) <= tol and rel(w.grad, gw) <= tol


@pytest.mark.parametrize("t,chunk,ignore", CASES)
def test_token_losses_are_the_dense_definition_and_sum_to_the_loss(t, chunk, ignore):
    """Evaluation's per-token path: each token's CE (0 when ignored), summing to the training loss."""
    h, w, lab = make(t, ignore=ignore, dtype=torch.float64)
    got = token_cross_entropy(h, w, lab, chunk)
    want = F.cross_entropy(h.detach() @ w.detach().t(), lab, reduction="none", ignore_index=IGN)
    assert got.shape == (t,) and not got.requires_grad
    assert torch.allclose(got, want, rtol=1e-12, atol=0) and bool((got[list(ignore)] == 0).all())
    assert float(got.sum()) == pytest.approx(float(chunked_cross_entropy(h, w, lab, chunk)), rel=1e-12)
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        token_cross_entropy(h, w, lab, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_all_ignored_is_exactly_zero(dtype):
    h, w, lab = make(13, dtype=dtype, ignore=range(13))
    got = chunked_cross_entropy(h, w, lab, 4)
    got.backward()
    assert got.item() == 0.0
    assert torch.equal(h.grad, torch.zeros_like(h)) and torch.equal(w.grad, torch.zeros_like(w))


def test_bf16_within_bf16_tolerance():
    h, w, lab = make(64, h=32, v=50, dtype=torch.bfloat16, ignore=(1, 2, 40))
    got = chunked_cross_entropy(h, w, lab, 16)
    got.backward()
    want, gh, gw = reference(h, w, lab)
    assert got.dtype == torch.float32  # the sum is reported in fp32
    assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    assert abs(float(got.detach()) - float(want)) <= 2e-2 * abs(float(want))
    assert rel(h.grad, gh) <= 2e-2 and rel(w.grad, gw) <= 2e-2


def test_bf16_vocab_gradient_accumulates_in_fp32():
    """256 tiles whose d_weight partials all push the same way: a bf16 running sum drifts (each
    add rounds at the sum's magnitude), an fp32 one rounds once at the end."""
    t, chunk, hdim, v = 2048, 8, 16, 8
    g = torch.Generator().manual_seed(1)
    h = (torch.rand(t, hdim, generator=g) + 0.5).bfloat16().requires_grad_()
    w = (torch.randn(v, hdim, generator=g) * 0.05).bfloat16().requires_grad_()
    lab = torch.zeros(t, dtype=torch.long)
    chunked_cross_entropy(h, w, lab, chunk).backward()
    _, _, gw = reference(h, w, lab)

    # a naive loop with exact probabilities but a bf16 accumulator
    hh, ww = h.detach().double(), w.detach().double()
    naive = torch.zeros(v, hdim, dtype=torch.bfloat16)
    for lo in range(0, t, chunk):
        p = torch.softmax(hh[lo : lo + chunk] @ ww.t(), -1)
        p[:, 0] -= 1.0
        naive += p.bfloat16().t() @ h.detach()[lo : lo + chunk]

    err_ours = float((w.grad.double() - gw).abs().max())
    err_naive = float((naive.double() - gw).abs().max())
    assert err_naive > 8 * err_ours, (err_ours, err_naive)
    assert rel(w.grad, gw) <= 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bitwise_repeatable(dtype):
    def run():
        h, w, lab = make(45, dtype=dtype, ignore=(0, 5, 6, 7, 8, 9, 44))
        loss = chunked_cross_entropy(h, w, lab, 8)
        loss.backward()
        return loss.detach(), h.grad, w.grad

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


def test_no_host_sync(monkeypatch):
    """A sync needs a tensor value on the host: make every such conversion raise during the call."""
    h, w, lab = make(40, dtype=torch.bfloat16, ignore=range(8, 24))

    def sync(*_a, **_k):
        raise AssertionError("host sync inside the loss")

    for name in ("item", "__bool__", "tolist", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    loss = chunked_cross_entropy(h, w, lab, 8)
    loss.backward()
    monkeypatch.undo()
    assert torch.isfinite(loss) and h.grad is not None and w.grad is not None


def test_saves_no_logits():
    t, chunk, hdim, v = 64, 8, 12, 37
    h, w, lab = make(t, h=hdim, v=v, dtype=torch.bfloat16, ignore=(3,))
    saved: list[tuple[tuple[int, ...], torch.dtype]] = []

    def pack(x):
        saved.append((tuple(x.shape), x.dtype))
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss = chunked_cross_entropy(h, w, lab, chunk)
    assert sorted(saved, key=str) == sorted(
        [((t, hdim), torch.bfloat16), ((v, hdim), torch.bfloat16), ((t,), torch.int64), ((t,), torch.float32)],
        key=str,
    )
    assert len(loss.grad_fn.saved_tensors) == 4
    assert not any(len(s) == 2 and s[1] == v for s, _ in saved)


class _LiveTiles(TorchDispatchMode):
    """Tracks every op output with V columns (a logits tile) and the peak bytes alive at once."""

    def __init__(self, v: int, exclude: torch.Tensor):
        super().__init__()
        self.v, self.skip = v, exclude.untyped_storage().data_ptr()
        self.live: list[weakref.ref] = []
        self.peak_bytes = self.max_rows = 0
        self.mm = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.mm += func.overloadpacket is torch.ops.aten.mm
        for x in tree_leaves(out):
            tile = isinstance(x, torch.Tensor) and x.dim() == 2 and x.shape[1] == self.v
            if tile and x.untyped_storage().data_ptr() != self.skip:  # weight views are no tiles
                self.live.append(weakref.ref(x))
                self.max_rows = max(self.max_rows, x.shape[0])
        alive = {}
        for r in self.live:
            x = r()
            if x is not None:
                alive[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        self.live = [r for r in self.live if r() is not None]
        self.peak_bytes = max(self.peak_bytes, sum(alive.values()))
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_tile_of_logits_at_a_time(dtype):
    t, chunk, v = 128, 16, 37
    h, w, lab = make(t, v=v, dtype=dtype, ignore=(5,))
    with _LiveTiles(v, w) as mode:
        chunked_cross_entropy(h, w, lab, chunk).backward()
    tile_fp32 = chunk * v * 4
    assert mode.max_rows == chunk  # every tile seen is at most one chunk of tokens
    # a tile's compute-dtype logits and fp32 softmax may overlap briefly; two chunks never do
    assert tile_fp32 <= mode.peak_bytes <= tile_fp32 + chunk * v * h.element_size()
    assert mode.peak_bytes < t * v * 4 / 4  # far below the full logits


@pytest.mark.parametrize("frozen", ["weight", "hidden"])
def test_frozen_input(frozen):
    t, chunk = 30, 8
    h, w, lab = make(t, ignore=(2,))
    (w if frozen == "weight" else h).requires_grad_(False)
    with _LiveTiles(37, w) as mode:
        chunked_cross_entropy(h, w, lab, chunk).backward()
    _, gh, gw = reference(h, w, lab)
    live, dead = (h, w) if frozen == "weight" else (w, h)
    assert dead.grad is None
    assert rel(live.grad, gh if live is h else gw) <= 1e-5
    tiles = -(-t // chunk)
    assert mode.mm == 3 * tiles  # forward logits + backward logits + the one needed gradient


def test_chunk_must_be_positive():
    h, w, lab = make(4)
    with pytest.raises(ValueError, match="chunk"):
        chunked_cross_entropy(h, w, lab, 0)


# -- select_loss ------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["torch", "auto"])
def test_select_loss_cpu_is_chunked(impl):
    loss = select_loss(impl, CPU)
    assert loss.name == "torch" and loss.fn is chunked_cross_entropy and "torch" in loss.describe()
    h, w, lab = make(9)
    assert torch.equal(loss(h, w, lab, 4), chunked_cross_entropy(h, w, lab, 4))


@pytest.mark.parametrize("impl", ["liger", "cce"])
def test_select_loss_kernels_need_cuda(impl):
    with pytest.raises(ValueError, match=r"train\.loss_impl='" + impl) as e:
        select_loss(impl, CPU)
    assert "\n" not in str(e.value) and "'torch'" in str(e.value) and "CUDA" in str(e.value)


def test_select_loss_unknown_names_choices():
    with pytest.raises(ValueError, match="train.loss_impl") as e:
        select_loss("flash", CPU)
    assert all(name in str(e.value) for name in LOSS_IMPLS)


def _fake_module(monkeypatch, name: str, **attrs):
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
    mod.__dict__.update(attrs)
    monkeypatch.setitem(sys.modules, name, mod)
    return mod


def _install_liger(monkeypatch, calls: list, keywords: bool = True):
    if keywords:

        def flce(input, weight, target, bias=None, ce_weight=None, ignore_index=-100, lse_square_scale=0.0,
                 label_smoothing=0.0, reduction="mean", softcap=None, return_z_loss=False, accum_dtype=None):
            calls.append((ignore_index, reduction, accum_dtype))
            return F.cross_entropy(input @ weight.t(), target, ignore_index=ignore_index, reduction=reduction)
    else:

        def flce(input, weight, target, bias=None):  # too old: no ignore_index / reduction keywords
            raise AssertionError("must not be called")

    _fake_module(monkeypatch, "liger_kernel")
    _fake_module(monkeypatch, "liger_kernel.transformers")
    _fake_module(monkeypatch, "liger_kernel.transformers.functional", liger_fused_linear_cross_entropy=flce)


def _install_cce(monkeypatch, calls: list):
    def lce(e, c, targets, ignore_index=-100, softcap=None, reduction="mean", shift=False):
        calls.append((ignore_index, reduction))
        return F.cross_entropy(e @ c.t(), targets, ignore_index=ignore_index, reduction=reduction)

    _fake_module(monkeypatch, "cut_cross_entropy", linear_cross_entropy=lce)


def _hide(monkeypatch, *names: str):
    for name in names:
        monkeypatch.setitem(sys.modules, name, None)  # import fails, find_spec says "not installed"


CUDA = torch.device("cuda")  # select_loss only looks at the device type: no GPU is touched


def test_select_loss_liger_path(monkeypatch):
    calls: list = []
    _install_liger(monkeypatch, calls)
    h, w, lab = make(11, ignore=(4,))
    for impl in ("auto", "liger"):
        loss = select_loss(impl, CUDA)
        assert loss.name == "liger" and "liger" in loss.describe()
        got = loss(h, w, lab, 4)
        assert torch.allclose(got, chunked_cross_entropy(h, w, lab, 4), rtol=1e-5)
    assert calls == [(IGN, "sum", torch.float32)] * 2
    assert select_loss("auto", CPU).name == "torch"  # liger is CUDA-only


def test_select_loss_cce_path(monkeypatch):
    calls: list = []
    _hide(monkeypatch, "liger_kernel")
    _install_cce(monkeypatch, calls)
    h, w, lab = make(11, dtype=torch.bfloat16, ignore=(4,))
    for impl in ("auto", "cce"):
        loss = select_loss(impl, CUDA)
        assert loss.name == "cce" and "cce" in loss.describe()
        assert torch.allclose(loss(h, w, lab, 4).float(), chunked_cross_entropy(h, w, lab, 4), rtol=2e-2)
    assert calls == [(IGN, "sum")] * 2
    h32, w32, lab32 = make(11, dtype=torch.float32)
    select_loss("cce", CUDA)(h32.bfloat16(), w32.bfloat16(), lab32, 4)
    assert len(calls) == 3
    select_loss("cce", CUDA)(h32, w32, lab32, 4)  # its backward is bf16/fp16 only: chunked torch path
    assert len(calls) == 3
    # its backward adds in scheduling order: deterministic runs skip it, or refuse it by name
    assert select_loss("auto", CUDA, deterministic=True).name == "torch"
    with pytest.raises(ValueError, match="deterministic"):
        select_loss("cce", CUDA, deterministic=True)


def test_select_loss_on_cuda_without_kernels(monkeypatch):
    _hide(monkeypatch, "liger_kernel", "cut_cross_entropy")
    assert select_loss("auto", CUDA).name == "torch"
    for impl, pip in (("liger", "liger-kernel"), ("cce", "cut-cross-entropy")):
        with pytest.raises(ValueError, match=rf"train\.loss_impl='{impl}'.*pip install {pip}, or use 'torch'"):
            select_loss(impl, CUDA)


def test_select_loss_refuses_old_liger_api(monkeypatch):
    _install_liger(monkeypatch, [], keywords=False)
    _hide(monkeypatch, "cut_cross_entropy")
    assert select_loss("auto", CUDA).name == "torch"  # unusable API: fall through, never crash
    with pytest.raises(ValueError, match="pip install -U liger-kernel"):
        select_loss("liger", CUDA)
