"""``torch.compile`` of each decoder layer, with attention (and MoE experts) as opaque custom ops.

Why per layer: a decoder layer is ~115 small memory-bound kernels (RMSNorm, RoPE, SwiGLU, residual
adds, fwd + bwd) between a few matmuls and attention; inductor fuses them. Every layer of a model
has the same code, so all layers share one compiled graph (compile time of one layer, not of L),
the embedding / loss / activation checkpointing around the layers stay eager and unchanged, and
parameter names are untouched (no ``_orig_mod.``): DeepSpeed and checkpoints see the same model.

Why a custom op: the injected attention (``Transformer.set_attention``) is Python control flow on
document metadata, autograd.Functions with hand-written backward, and sequence-parallel
collectives; dynamo must not trace into it, and ``torch.compiler.disable`` would split the layer
into two graphs. ``seqpar::attention`` is one graph node with a fake impl (shapes only). Its
forward runs the real attention on detached inputs *with autograd recording*, keeps that small
autograd graph in a side table (``_STASH``) under an integer token, and returns the output plus the
token (a CPU int64 scalar); the backward op ``seqpar::attention_backward`` runs the real backward
on the kept graph (``torch.autograd.grad``): no recomputation, exactly eager's gradients and
collectives. The attention callable itself cannot be an op argument, so it is passed as a small
integer handle into ``_FUNCTIONS``. The kept graph lives exactly as long as the token (a finalizer
on its storage): the compiled layer saves the token for backward like any activation, so freeing
the autograd graph, or activation checkpointing dropping saved tensors, frees the attention state
too. MoE experts (dropless dispatch: per-expert token counts read on the host, data-dependent
shapes, which would break the graph and specialise on the counts) go through ``seqpar::experts``
the same way, so an MoE layer is one graph as well.

Compiled: everything in ``DecoderLayer.forward`` except attention and the experts' matmuls (norms,
q/k/v/o projections, RoPE, router, sort/gather/scatter of the dispatch, shared expert, residuals).
Not compiled: embedding, final norm, LM head and loss, the attention kernels, the experts.

Costs and limits:
- The first step compiles (tens of seconds per distinct layer kind; cached on disk by inductor).
- Shape changes recompile unless dynamic: with ``dynamic=None`` the token dimension is marked
  dynamic before the first call (and ``max_seqlen`` travels as a tensor), so a new sequence length
  or document layout reuses the graph. ``dynamic=False`` specialises on every shape.
- Inductor must not reuse or write in place into buffers the kept attention graph still reads, so
  ``allow_buffer_reuse`` and ``inplace_buffers`` are off for these graphs (memory is still freed
  after last use; only in-place recycling is lost).
- No CUDA graphs (``mode`` "reduce-overhead" / "max-autotune" are refused): the ops run Python.
- ``retain_graph=True`` double backward through a compiled layer is not supported (the kept graph
  is released by the first backward), nor double backward (create_graph).
- ZeRO-3 is not supported (its parameter gather hooks would run inside the compiled region).
"""

from __future__ import annotations

import contextlib
import itertools
import types
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from seqpar.kernels import AttnMeta

# -- registry of the opaque callables (attention objects, expert modules) ------------------------
_FUNCTIONS: dict[int, Callable[..., Any]] = {}
_HANDLES: dict[int, int] = {}  # id(callable) -> handle; _FUNCTIONS keeps the object alive
_next_handle = itertools.count(1)


def handle_for(fn: Callable[..., Any]) -> int:
    """A small integer standing for ``fn`` inside compiled graphs (registered on first use)."""
    h = _HANDLES.get(id(fn))
    if h is None:
        h = _HANDLES[id(fn)] = next(_next_handle)
        _FUNCTIONS[h] = fn
    return h


def handle_tensor(fn: Callable[..., Any]) -> Tensor:
    """``handle_for(fn)`` as a CPU int64 scalar: a graph input rather than a guarded constant."""
    h = handle_for(fn)
    t = _HANDLE_TENSORS.get(h)
    if t is None:
        t = _HANDLE_TENSORS[h] = torch.tensor(h, dtype=torch.int64)
    return t


_HANDLE_TENSORS: dict[int, Tensor] = {}

# -- kept autograd graphs, keyed by token -----------------------------------------------------------
_STASH: dict[int, tuple[Tensor, tuple[Tensor, ...]]] = {}
_next_token = itertools.count(1)


def _no_token() -> Tensor:
    return torch.zeros((), dtype=torch.int64)


def _keep(out: Tensor, inputs: tuple[Tensor, ...]) -> Tensor:
    """Keep ``out``'s autograd graph until the returned token's storage dies or backward runs."""
    tid = next(_next_token)
    token = torch.tensor(tid, dtype=torch.int64)  # CPU: creating it never syncs a GPU
    _STASH[tid] = (out, inputs)
    weakref.finalize(token.untyped_storage(), _STASH.pop, tid, None)
    return token


def _grads_of_kept(token: Tensor, dout: Tensor) -> list[Tensor]:
    """The real backward of a kept graph; zeros for inputs it does not reach. Releases the graph."""
    entry = _STASH.pop(int(token), None)
    if entry is None:
        raise RuntimeError(
            "seqpar compiled layer: the attention/experts graph of this backward is gone (a second "
            "backward with retain_graph=True, or double backward, is not supported)"
        )
    out, inputs = entry
    with _autograd_recording():
        grads = torch.autograd.grad(out, inputs, dout, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g.contiguous() for x, g in zip(inputs, grads)]


_DK = torch._C.DispatchKey
_AUTOGRAD_KEYS = (_DK.AutogradFunctionality, _DK.AutogradOther, _DK.AutogradNestedTensor, _DK.ADInplaceOrView)


@contextlib.contextmanager
def _autograd_recording() -> Iterator[None]:
    """Record autograd inside a custom op's impl.

    The impl runs below the Autograd dispatch key (those keys are excluded thread-locally), so
    aten ops would not record a graph even with grad enabled; put the keys back (the same private
    guard torch's own ``leaf_function`` uses) for the kept forward and its backward.
    """
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in _AUTOGRAD_KEYS:
        exclude = exclude.remove(key)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude):
        with torch.enable_grad():
            yield


def _leaf(x: Tensor, grad: bool) -> Tensor:
    return x.detach().requires_grad_(grad and x.is_floating_point())


# -- seqpar::attention --------------------------------------------------------------------------------
@torch.library.custom_op("seqpar::attention", mutates_args=(), tags=(torch.Tag.cudagraph_unsafe,))
def attention_op(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: Tensor, scale: float, handle: Tensor,
    needs_grad: bool,
) -> tuple[Tensor, Tensor]:
    """``_FUNCTIONS[handle](q, k, v, AttnMeta(cu_seqlens, max_seqlen), scale)`` -> (out, token).

    ``max_seqlen`` is a CPU int64 scalar tensor (so a new value does not recompile the graph).
    """
    fn = _FUNCTIONS[int(handle)]
    meta = AttnMeta(cu_seqlens, int(max_seqlen))
    if not needs_grad:
        with torch.no_grad():
            return fn(q, k, v, meta, scale).contiguous(), _no_token()
    leaves = (_leaf(q, True), _leaf(k, True), _leaf(v, True))
    with _autograd_recording():
        out = fn(*leaves, meta, scale).contiguous()
    return out.detach(), _keep(out, leaves)


@attention_op.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, scale, handle, needs_grad):
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"seqpar::attention needs one dtype for q, k, v, got {q.dtype}, {k.dtype}, {v.dtype}")
    return q.new_empty(q.shape), torch.empty((), dtype=torch.int64)


@torch.library.custom_op("seqpar::attention_backward", mutates_args=(), tags=(torch.Tag.cudagraph_unsafe,))
def attention_backward_op(dout: Tensor, token: Tensor, kv_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) from the attention graph kept under ``token``."""
    dq, dk, dv = _grads_of_kept(token, dout)
    return dq, dk, dv


@attention_backward_op.register_fake
def _(dout, token, kv_heads):
    t, _, d = dout.shape
    return dout.new_empty(dout.shape), dout.new_empty(t, kv_heads, d), dout.new_empty(t, kv_heads, d)


def _attention_setup(ctx, inputs, output) -> None:
    ctx.kv_heads = inputs[1].shape[1]
    ctx.save_for_backward(output[1])


def _attention_backward(ctx, dout: Tensor, _dtoken: Tensor | None):
    (token,) = ctx.saved_tensors
    dq, dk, dv = attention_backward_op(dout, token, ctx.kv_heads)
    return dq, dk, dv, None, None, None, None, None


attention_op.register_autograd(_attention_backward, setup_context=_attention_setup)


# -- seqpar::experts ------------------------------------------------------------------------------------
@torch.library.custom_op("seqpar::experts", mutates_args=(), tags=(torch.Tag.cudagraph_unsafe,))
def experts_op(
    x_sorted: Tensor, counts: Tensor, gate: Tensor, up: Tensor, down: Tensor, handle: Tensor, needs_grad: bool
) -> tuple[Tensor, Tensor]:
    """``Experts`` module ``_FUNCTIONS[handle]`` on expert-sorted tokens with the given weights."""
    experts = _FUNCTIONS[int(handle)]

    def run(x: Tensor, g: Tensor, u: Tensor, d: Tensor) -> Tensor:
        # the module's own forward with these tensors as its weights (``eager``: not this op again)
        weights = {"gate_proj": g, "up_proj": u, "down_proj": d}
        out = torch.func.functional_call(experts, weights, (x, counts), {"eager": True})
        return out.contiguous() if out.numel() else out.clone()  # an empty slice would alias x

    if not needs_grad:
        with torch.no_grad():
            return run(x_sorted, gate, up, down), _no_token()
    leaves = tuple(_leaf(t, True) for t in (x_sorted, gate, up, down))
    with _autograd_recording():
        out = run(*leaves)
    return out.detach(), _keep(out, leaves)


@experts_op.register_fake
def _(x_sorted, counts, gate, up, down, handle, needs_grad):
    return x_sorted.new_empty(x_sorted.shape[0], down.shape[1]), torch.empty((), dtype=torch.int64)


@torch.library.custom_op("seqpar::experts_backward", mutates_args=(), tags=(torch.Tag.cudagraph_unsafe,))
def experts_backward_op(
    dout: Tensor, token: Tensor, gate: Tensor, up: Tensor, down: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx_sorted, dgate, dup, ddown) from the experts graph kept under ``token``."""
    dx, dg, du, dd = _grads_of_kept(token, dout)
    return dx, dg, du, dd


@experts_backward_op.register_fake
def _(dout, token, gate, up, down):
    return (dout.new_empty(dout.shape[0], gate.shape[2]), gate.new_empty(gate.shape), up.new_empty(up.shape),
            down.new_empty(down.shape))


def _experts_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(output[1], *inputs[2:5])  # weights: graph inputs, saving them is free


def _experts_backward(ctx, dout: Tensor, _dtoken: Tensor | None):
    token, gate, up, down = ctx.saved_tensors
    dx, dg, du, dd = experts_backward_op(dout, token, gate, up, down)
    return dx, None, dg, du, dd, None, None


experts_op.register_autograd(_experts_backward, setup_context=_experts_setup)


# -- what the compiled layer calls ------------------------------------------------------------------
def _needs_grad(*xs: Tensor) -> bool:
    return torch.is_grad_enabled() and any(x.requires_grad for x in xs)


def _opaque_attention(handle: Tensor, max_seqlen: Tensor) -> Callable[..., Tensor]:
    def attend(q: Tensor, k: Tensor, v: Tensor, meta: AttnMeta, scale: float) -> Tensor:
        out, _ = attention_op(q, k, v, meta.cu_seqlens, max_seqlen, scale, handle, _needs_grad(q, k, v))
        return out

    return attend


def _experts_forward(self: nn.Module, x_sorted: Tensor, counts: Tensor, eager: bool = False) -> Tensor:
    """Bound to each ``Experts`` module: the call goes through ``seqpar::experts``. The handle is a
    tensor attribute so that the layers share one graph (an int would be guarded per layer)."""
    if eager:  # the op's own call of the module (torch.func.functional_call)
        return type(self).forward(self, x_sorted, counts)
    w = (self.gate_proj, self.up_proj, self.down_proj)
    out, _ = experts_op(x_sorted, counts, *w, self._seqpar_handle, _needs_grad(x_sorted, *w))
    return out


def _layer_body(layer: nn.Module, x: Tensor, cos: Tensor, sin: Tensor, cu_seqlens: Tensor,
                max_seqlen: Tensor, handle: Tensor):
    """What dynamo traces: the layer's own forward with attention replaced by the custom op."""
    meta = AttnMeta(cu_seqlens, -1)  # the op reads max_seqlen from its tensor argument
    return type(layer).forward(layer, x, cos, sin, meta, _opaque_attention(handle, max_seqlen))


_UNSAFE_MODES = ("reduce-overhead", "max-autotune")


def compile_layers(model: nn.Module, mode: str | None = "default", dynamic: bool | None = None,
                   backend: str = "inductor") -> None:
    """Compile every ``model.model.layers[i]`` in place (same module objects and parameter names).

    ``mode``: an inductor mode without CUDA graphs ("default", "max-autotune-no-cudagraphs").
    ``dynamic``: None = the token dimension is dynamic from the first call (no recompiles for new
    sequence lengths), True = everything dynamic, False = specialise on every shape.
    ``backend``: "inductor" (fusion), or e.g. "aot_eager" for debugging.
    Idempotent; call before or after ``deepspeed.initialize`` (ZeRO 0/1/2).
    """
    if mode in _UNSAFE_MODES:
        raise ValueError(f"compile mode '{mode}' uses CUDA graphs, which the attention op cannot be part of: "
                         f"use 'default' or 'max-autotune-no-cudagraphs'")
    if backend == "inductor":
        from torch._inductor import list_mode_options

        options = dict(list_mode_options(mode or "default", dynamic))
        # the kept attention/experts graphs read their inputs' and outputs' buffers in backward
        options.update(allow_buffer_reuse=False, inplace_buffers=False)
        compiled = torch.compile(_layer_body, backend=backend, dynamic=dynamic, options=options)
    else:
        compiled = torch.compile(_layer_body, backend=backend, dynamic=dynamic)

    for layer in model.model.layers:
        if getattr(layer, "_seqpar_compiled", False):
            continue
        if getattr(layer, "is_moe", False):
            experts = layer.mlp.experts
            experts._seqpar_handle = handle_tensor(experts)  # plain attribute: not moved, not saved
            experts.forward = types.MethodType(_experts_forward, experts)
        layer.forward = _make_forward(layer, compiled, dynamic)
        layer._seqpar_compiled = True


def _make_forward(layer: nn.Module, compiled: Callable[..., Any], dynamic: bool | None):
    def forward(x: Tensor, cos: Tensor, sin: Tensor, meta: AttnMeta, attn: Callable[..., Tensor]):
        if dynamic is None:
            for t in (x, cos, sin, meta.cu_seqlens):
                torch._dynamo.maybe_mark_dynamic(t, 0)
        max_seqlen = torch.tensor(meta.max_seqlen, dtype=torch.int64)  # CPU scalar: no sync
        return compiled(layer, x, cos, sin, meta.cu_seqlens, max_seqlen, handle_tensor(attn))

    return forward
