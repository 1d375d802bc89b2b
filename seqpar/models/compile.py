"""``torch.compile`` of each decoder layer, with attention (and MoE experts) as opaque custom ops.

Why per layer: a decoder layer is ~115 small memory-bound kernels (RMSNorm, RoPE, SwiGLU, residual
adds, fwd + bwd) around a few matmuls and attention; inductor fuses them. All layers run the same
code, so they share one compiled graph (the compile time of one layer, not of L); the embedding,
the loss, activation checkpointing and DeepSpeed around the layers stay eager and unchanged, and
parameter names stay the same (no ``_orig_mod.`` prefix), so checkpoints do not change.

Why custom ops: the injected attention (``Transformer.set_attention``) has Python control flow on
document metadata, autograd.Functions with hand-written backward, and sequence-parallel
collectives. Dynamo must not trace into it, and ``torch.compiler.disable`` would split the layer
into two graphs. ``seqpar::attention`` is one graph node with a fake impl (shapes only). At run
time its forward runs the real attention on detached inputs *with autograd recording*. It keeps
that small autograd graph in ``_STASH`` under an integer token and returns the output plus the
token (a CPU int64 scalar). The backward op ``seqpar::attention_backward`` runs the real backward
on the kept graph (``torch.autograd.grad``). Nothing is recomputed, and the gradients and
collectives are eager's. The attention object cannot be an op argument, so the op gets a small
integer handle (a CPU tensor, so the layers share a graph) into ``_FUNCTIONS``. The metadata
(``AttnMeta``, or ``RingMeta`` with python ints under ring attention) travels the same way, as a
per-call token into ``_METAS``: nothing in it is guarded, so no new layout recompiles. The kept graph
lives as long as the token: the compiled layer saves the token for backward like any activation.
Freeing the autograd graph, or activation checkpointing dropping its saved tensors, therefore
frees the attention state too (a finalizer on the token's storage).

MoE experts use ``seqpar::experts`` in the same way. Their dropless dispatch reads the per-expert
counts on the host (``counts.tolist()``) and has data-dependent shapes. Traced, that breaks the
graph: measured on a 2-layer MoE model, 4 graph breaks, 9 graphs and recompiles on the second batch.
Run as an op, an MoE layer is one graph too.
Under sequence parallelism the MoE aux loss all-reduces its routing statistics with a
differentiable ``torch.distributed.nn`` collective, which dynamo refuses (it fell back to eager,
8 graphs for 2 layers); there, and only there, it runs as ``seqpar::moe_aux_loss``.

Modules marked ``compile_opaque`` (Q-GaLore's ``Int8Linear``: its backward accumulates the weight's
gradient outside autograd) run as ``seqpar::opaque_linear`` the same way.

Compiled: ``DecoderLayer.forward`` except attention and the experts' matmuls. That is the norms,
the q/k/v/o projections, RoPE, the router, the sort, gather and scatter of the dispatch, the
shared expert and the residual adds. Not compiled: the embedding, the final norm, the LM head and
loss, the attention kernels, the experts.

Costs and limits:
- The first step compiles: about 40 s for a dense layer's forward and backward with inductor on
  2 busy CPU cores, cached on disk by inductor afterwards. Under ``torch.no_grad`` (evaluation)
  there is one more compile.
- New shapes recompile unless they are dynamic. With ``dynamic=None`` the token dimension of x,
  cos and sin is marked dynamic before the first call, and the metadata is opaque, so new sequence
  lengths and document layouts reuse the graph. ``dynamic=False`` specialises on every shape.
- Inductor must not recycle buffers that a kept graph still reads in backward (q, k, v, the
  attention output). With its default buffer reuse the q buffer is overwritten right after the op
  and the gradients are wrong. So ``allow_buffer_reuse`` and ``inplace_buffers`` are off for these
  graphs. Buffers are still freed after their last use; only in-place recycling is lost.
- No CUDA graphs: modes "reduce-overhead" and "max-autotune" are refused, because the ops run
  Python.
- A second backward through the same graph (``retain_graph=True``) and double backward are not
  supported: the first backward releases the kept graph.
- Autocast does not reach inside the ops (seqpar casts weights and does not use autocast).
- ZeRO-3 is refused: its parameter gather hooks would run inside the compiled region.
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

# -- the opaque callables (attention objects, expert modules), by handle --------------------------------
_FUNCTIONS: dict[int, Callable[..., Any]] = {}  # keeps each object alive, so its id stays unique
_HANDLES: dict[int, int] = {}  # id(callable) -> handle
_HANDLE_TENSORS: dict[int, Tensor] = {}
_next_handle = itertools.count(1)


def handle_tensor(fn: Callable[..., Any]) -> Tensor:
    """The handle of ``fn`` (registered on first use) as a CPU int64 scalar.

    A tensor is a graph input; an int would be a guarded constant, one graph per layer.
    """
    h = _HANDLES.get(id(fn))
    if h is None:
        h = _HANDLES[id(fn)] = next(_next_handle)
        _FUNCTIONS[h] = fn
        _HANDLE_TENSORS[h] = torch.tensor(h, dtype=torch.int64)
    return _HANDLE_TENSORS[h]


# -- kept autograd graphs, by token ---------------------------------------------------------------------
_STASH: dict[int, tuple[Tensor, tuple[Tensor, ...]]] = {}
_METAS: dict[int, Any] = {}  # token -> the attention metadata of one layer call
_next_token = itertools.count(1)
_DK = torch._C.DispatchKey
_AUTOGRAD_KEYS = (_DK.AutogradFunctionality, _DK.AutogradOther, _DK.AutogradNestedTensor, _DK.ADInplaceOrView)


@contextlib.contextmanager
def _autograd_recording() -> Iterator[None]:
    """Record autograd inside a custom op's impl.

    The impl runs below the Autograd dispatch key (those keys are excluded thread-locally), so aten
    ops would record nothing even with grad enabled (autograd.Functions still would). Put the keys
    back, with the private guard that torch's own ``leaf_function`` uses.
    """
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in _AUTOGRAD_KEYS:
        exclude = exclude.remove(key)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude), torch.enable_grad():
        yield


def _leaf(x: Tensor) -> Tensor:
    return x.detach().requires_grad_(True)


def _token(table: dict[int, Any], value: Any) -> Tensor:
    """A CPU int64 scalar (no GPU sync, ever) under which ``table`` holds ``value`` until the
    scalar's storage dies (or someone pops it)."""
    tid = next(_next_token)
    token = torch.tensor(tid, dtype=torch.int64)
    table[tid] = value
    weakref.finalize(token.untyped_storage(), table.pop, tid, None)
    return token


def _keep(out: Tensor, inputs: tuple[Tensor, ...]) -> Tensor:
    """Keep ``out``'s autograd graph until backward runs or the returned token dies."""
    return _token(_STASH, (out, inputs))


def _no_token() -> Tensor:
    return torch.zeros((), dtype=torch.int64)


def _grads_of_kept(token: Tensor, dout: Tensor) -> list[Tensor]:
    """The real backward of a kept graph, contiguous (as the fake impls say), zeros for inputs it
    does not reach. Releases the graph."""
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


_TAGS = (torch.Tag.cudagraph_unsafe,)


# -- seqpar::attention ----------------------------------------------------------------------------------
@torch.library.custom_op("seqpar::attention", mutates_args=(), tags=_TAGS)
def attention_op(
    q: Tensor, k: Tensor, v: Tensor, meta: Tensor, scale: float, handle: Tensor, needs_grad: bool
) -> tuple[Tensor, Tensor]:
    """``attention(q, k, v, meta, scale)`` -> (out, token of the kept graph).

    ``attention`` is the callable under ``handle``; ``meta`` is the token of this call's metadata
    (``AttnMeta``, or ``RingMeta`` under ring attention: python ints that would otherwise be
    guarded and recompile every micro-batch). With ``needs_grad`` the autograd graph is kept for
    ``attention_backward_op``.
    """
    fn = _FUNCTIONS[int(handle)]
    meta = _METAS[int(meta)]
    if not needs_grad:
        with torch.no_grad():
            return fn(q, k, v, meta, scale).contiguous(), _no_token()
    leaves = (_leaf(q), _leaf(k), _leaf(v))
    with _autograd_recording():
        out = fn(*leaves, meta, scale).contiguous()
    return out.detach(), _keep(out, leaves)


@attention_op.register_fake
def _(q, k, v, meta, scale, handle, needs_grad):
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"seqpar::attention needs one dtype for q, k, v, got {q.dtype}, {k.dtype}, {v.dtype}")
    return q.new_empty(q.shape), torch.empty((), dtype=torch.int64)


@torch.library.custom_op("seqpar::attention_backward", mutates_args=(), tags=_TAGS)
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
    ctx.save_for_backward(output[1])  # only the token: the kept graph holds q, k, v, out, lse


def _attention_backward(ctx, dout: Tensor, _dtoken: Tensor | None):
    (token,) = ctx.saved_tensors
    dq, dk, dv = attention_backward_op(dout, token, ctx.kv_heads)
    return dq, dk, dv, None, None, None, None


attention_op.register_autograd(_attention_backward, setup_context=_attention_setup)


# -- seqpar::experts --------------------------------------------------------------------------------------
@torch.library.custom_op("seqpar::experts", mutates_args=(), tags=_TAGS)
def experts_op(
    x_sorted: Tensor, counts: Tensor, gate: Tensor, up: Tensor, down: Tensor, handle: Tensor, needs_grad: bool
) -> tuple[Tensor, Tensor]:
    """The ``Experts`` module under ``handle`` on expert-sorted tokens, with these weights."""
    experts = _FUNCTIONS[int(handle)]

    # ``eager``: the module's own forward, not this op again (once compile_layers has bound it)
    kwargs = {"eager": True} if "forward" in vars(experts) else {}

    def run(x: Tensor, g: Tensor, u: Tensor, d: Tensor) -> Tensor:
        weights = {"gate_proj": g, "up_proj": u, "down_proj": d}
        out = torch.func.functional_call(experts, weights, (x, counts), kwargs)
        return out.contiguous() if out.numel() else out.clone()  # an empty slice would alias x

    if not needs_grad:
        with torch.no_grad():
            return run(x_sorted, gate, up, down), _no_token()
    leaves = tuple(_leaf(t) for t in (x_sorted, gate, up, down))
    with _autograd_recording():
        out = run(*leaves)
    return out.detach(), _keep(out, leaves)


@experts_op.register_fake
def _(x_sorted, counts, gate, up, down, handle, needs_grad):
    return x_sorted.new_empty(x_sorted.shape[0], down.shape[1]), torch.empty((), dtype=torch.int64)


@torch.library.custom_op("seqpar::experts_backward", mutates_args=(), tags=_TAGS)
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
    ctx.save_for_backward(output[1], *inputs[2:5])  # the weights are graph inputs: saving them is free


def _experts_backward(ctx, dout: Tensor, _dtoken: Tensor | None):
    token, gate, up, down = ctx.saved_tensors
    dx, dg, du, dd = experts_backward_op(dout, token, gate, up, down)
    return dx, None, dg, du, dd, None, None


experts_op.register_autograd(_experts_backward, setup_context=_experts_setup)


# -- seqpar::moe_aux_loss (only under sequence parallelism) -----------------------------------------------
@torch.library.custom_op("seqpar::moe_aux_loss", mutates_args=(), tags=_TAGS)
def moe_aux_loss_op(scores: Tensor, counts: Tensor, handle: Tensor, needs_grad: bool) -> tuple[Tensor, Tensor]:
    """``MoE._aux_loss`` of the module under ``handle``: its statistics all-reduce over the SP group
    (a differentiable ``torch.distributed.nn`` collective) is what dynamo cannot trace."""
    moe = _FUNCTIONS[int(handle)]
    if not needs_grad:
        with torch.no_grad():
            return type(moe)._aux_loss(moe, scores, counts).clone(), _no_token()
    leaf = _leaf(scores)
    with _autograd_recording():
        aux = type(moe)._aux_loss(moe, leaf, counts).clone()
    return aux.detach(), _keep(aux, (leaf,))


@moe_aux_loss_op.register_fake
def _(scores, counts, handle, needs_grad):
    return scores.new_empty(()), torch.empty((), dtype=torch.int64)


@torch.library.custom_op("seqpar::kept_grad", mutates_args=(), tags=_TAGS)
def kept_grad_op(dout: Tensor, token: Tensor, x: Tensor) -> Tensor:
    """The gradient of the one input ``x`` of the graph kept under ``token``: the backward of an op
    with one differentiable input (the MoE aux loss's all-reduce, an opaque module's own backward
    and its effects run here)."""
    return _grads_of_kept(token, dout)[0]


@kept_grad_op.register_fake
def _(dout, token, x):
    return x.new_empty(x.shape)


def _aux_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(output[1], inputs[0])  # scores: saved by the router's softmax anyway


def _aux_backward(ctx, dout: Tensor, _dtoken: Tensor | None):
    token, scores = ctx.saved_tensors
    return kept_grad_op(dout, token, scores), None, None, None


moe_aux_loss_op.register_autograd(_aux_backward, setup_context=_aux_setup)


# -- seqpar::opaque_linear (modules whose backward has side effects: Q-GaLore's INT8 layers) ---------------
@torch.library.custom_op("seqpar::opaque_linear", mutates_args=(), tags=_TAGS)
def opaque_linear_op(x: Tensor, handle: Tensor, out_features: int, needs_grad: bool) -> tuple[Tensor, Tensor]:
    """The module under ``handle`` (a linear map of the last dimension) on ``x``, run eagerly. Its
    backward, run from the kept graph, may write outside autograd (``Int8Linear`` accumulates its
    weight's gradient in ``weight_grad``), which dynamo must not trace."""
    module = _FUNCTIONS[int(handle)]
    if not needs_grad:
        with torch.no_grad():
            return type(module).forward(module, x).contiguous(), _no_token()
    leaf = _leaf(x)
    with _autograd_recording():
        out = type(module).forward(module, leaf).contiguous()
    return out.detach(), _keep(out, (leaf,))


@opaque_linear_op.register_fake
def _(x, handle, out_features, needs_grad):
    return x.new_empty(*x.shape[:-1], out_features), torch.empty((), dtype=torch.int64)


def _opaque_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(output[1], inputs[0])  # x: the module's own graph keeps it anyway


def _opaque_backward(ctx, dout: Tensor, _dtoken: Tensor | None):
    token, x = ctx.saved_tensors
    return kept_grad_op(dout, token, x), None, None, None


opaque_linear_op.register_autograd(_opaque_backward, setup_context=_opaque_setup)


# -- what dynamo traces ---------------------------------------------------------------------------------
def _needs_grad(*xs: Tensor) -> bool:
    return torch.is_grad_enabled() and any(x.requires_grad for x in xs)


def _opaque_attention(handle: Tensor, meta: Tensor) -> Callable[..., Tensor]:
    def attend(q: Tensor, k: Tensor, v: Tensor, _meta: None, scale: float) -> Tensor:
        out, _ = attention_op(q, k, v, meta, scale, handle, _needs_grad(q, k, v))
        return out

    return attend


def _experts_forward(self: nn.Module, x_sorted: Tensor, counts: Tensor, eager: bool = False) -> Tensor:
    """Bound to each ``Experts`` module by ``compile_layers``: the call goes through the op."""
    if eager:  # the op's own call (functional_call): the original forward
        return type(self).forward(self, x_sorted, counts)
    w = (self.gate_proj, self.up_proj, self.down_proj)
    out, _ = experts_op(x_sorted, counts, *w, self._seqpar_handle, _needs_grad(x_sorted, *w))
    return out


def _moe_aux_loss(self: nn.Module, scores: Tensor, counts: Tensor) -> Tensor:
    """Bound to each ``MoE`` module: traced as usual, through the op under sequence parallelism."""
    if self.stats_group is None:
        return type(self)._aux_loss(self, scores, counts)
    aux, _ = moe_aux_loss_op(scores, counts, self._seqpar_handle, _needs_grad(scores))
    return aux


def _opaque_forward(self: nn.Module, x: Tensor) -> Tensor:
    """Bound to each module marked ``compile_opaque`` (``Int8Linear``): the call goes through the op.
    Grad mode alone decides whether the graph is kept: the module's weight trains even when
    nothing before it does (as its own forward ensures eagerly)."""
    grad = torch.is_grad_enabled()
    if grad and not x.requires_grad:
        x = x.detach().requires_grad_()
    out, _ = opaque_linear_op(x, self._seqpar_handle, self.out_features, grad)
    return out


def _bind_opaque(layer: nn.Module) -> None:
    """Route the layer's ``compile_opaque`` modules through ``seqpar::opaque_linear`` (at the first
    call: Q-GaLore swaps its INT8 layers in after the layers are compiled)."""
    for m in layer.modules():
        if getattr(m, "compile_opaque", False) and "forward" not in vars(m):
            m._seqpar_handle = handle_tensor(m)
            m.forward = types.MethodType(_opaque_forward, m)
    layer._seqpar_opaque_bound = True


def _layer_body(layer: nn.Module, x: Tensor, cos: Tensor, sin: Tensor, meta: Tensor, handle: Tensor):
    """The layer's own forward, with the attention op in place of the injected attention (which
    alone reads the metadata)."""
    return type(layer).forward(layer, x, cos, sin, None, _opaque_attention(handle, meta))


_CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")


def compile_layers(model: nn.Module, mode: str | None = "default", dynamic: bool | None = None,
                   backend: str = "inductor") -> None:
    """Compile each ``model.model.layers[i]`` in place (same modules, same parameter names).

    ``mode``: an inductor mode without CUDA graphs ("default", "max-autotune-no-cudagraphs").
    ``dynamic``: None = the token dimension is dynamic from the first call (no recompiles for new
    sequence lengths), True = everything dynamic, False = specialise on every shape.
    ``backend``: "inductor" fuses; "aot_eager" runs the same graphs unfused (debugging, tests).
    Idempotent. Call it before or after ``deepspeed.initialize`` (ZeRO 0/1/2), with or without
    ``model.activation_checkpointing``.
    """
    if mode in _CUDAGRAPH_MODES:
        raise ValueError(f"compile mode '{mode}' uses CUDA graphs, which the attention op cannot join: "
                         f"use 'default' or 'max-autotune-no-cudagraphs'")
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        raise ValueError("compile_layers does not support ZeRO-3 partitioned parameters: use ZeRO 0/1/2")
    if backend == "inductor":
        from torch._inductor import list_mode_options

        options = dict(list_mode_options(mode or "default", dynamic))
        # the kept attention/experts graphs read q, k, v and the outputs again in backward
        options.update(allow_buffer_reuse=False, inplace_buffers=False)
        compiled = torch.compile(_layer_body, backend=backend, dynamic=dynamic, options=options)
    else:
        compiled = torch.compile(_layer_body, backend=backend, dynamic=dynamic)

    for layer in model.model.layers:
        if getattr(layer, "_seqpar_compiled", False):
            continue
        if getattr(layer, "is_moe", False):
            moe, experts = layer.mlp, layer.mlp.experts
            for m in (moe, experts):
                m._seqpar_handle = handle_tensor(m)  # plain attribute: never moved or saved
            experts.forward = types.MethodType(_experts_forward, experts)
            moe._aux_loss = types.MethodType(_moe_aux_loss, moe)
        layer.forward = _compiled_forward(layer, compiled, dynamic)
        layer._seqpar_compiled = True


def _compiled_forward(layer: nn.Module, compiled: Callable[..., Any], dynamic: bool | None):
    """``DecoderLayer.forward``'s signature, calling the compiled body."""

    def forward(x: Tensor, cos: Tensor, sin: Tensor, meta: Any, attn: Callable[..., Tensor]):
        if not getattr(layer, "_seqpar_opaque_bound", False):
            _bind_opaque(layer)
        if dynamic is None:
            for t in (x, cos, sin):
                torch._dynamo.maybe_mark_dynamic(t, 0)
        # the token (and so the metadata) lives while this call or a graph it built needs it;
        # a checkpoint recomputation calls this forward again and gets a new one
        return compiled(layer, x, cos, sin, _token(_METAS, meta), handle_tensor(attn))

    return forward
