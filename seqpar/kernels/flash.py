"""flash-attn (Dao-AILab) varlen kernel, used when the optional ``flash`` extra is installed."""

from __future__ import annotations

from torch import Tensor


def fa4_available() -> bool:
    """FlashAttention-4 (``flash-attn-4``: CuTe DSL kernels, Hopper/Blackwell, JIT-compiled)."""
    try:
        from flash_attn.cute import flash_attn_varlen_func  # noqa: F401
    except Exception:
        return False
    return True


def fa4_varlen(q: Tensor, k: Tensor, v: Tensor, cu: Tensor, max_len: int, scale: float):
    """FA4's varlen entry point as an SDPA-chooser backend: (out [T, H, D], lse [H, T] fp32).

    Its signature has changed between releases, so arguments go by keyword and the LSE layout is
    normalised from either [H, T] or [T, H]; the chooser checks the result against exact math
    before it is ever used."""
    from flash_attn.cute import flash_attn_varlen_func

    cu = cu.int()
    res = flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_len,
                                 max_seqlen_k=max_len, softmax_scale=scale, causal=True)
    out, lse = res if isinstance(res, tuple) else (res, None)
    if lse is None:
        raise NotImplementedError("this flash-attn-4 version returns no LSE")
    if lse.shape[0] == q.shape[0] and lse.shape[-1] == q.shape[1]:
        lse = lse.transpose(0, 1)
    return out, lse.float()


def available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except Exception:  # ImportError, or a broken CUDA build
        return False
    return True


class FlashAttnAttention:
    """Causal attention within documents via ``flash_attn_varlen_func`` (GQA native)."""

    name = "flash_attn"

    def __init__(self, deterministic: bool = False):
        from flash_attn import flash_attn_varlen_func

        self._fn = flash_attn_varlen_func
        self.deterministic = deterministic

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, scale: float):
        cu = cu_seqlens.int()
        out, lse, _ = self._fn(
            q, k, v, cu, cu, max_seqlen, max_seqlen,
            dropout_p=0.0, softmax_scale=scale, causal=True,
            return_attn_probs=True, deterministic=self.deterministic,
        )
        return out, lse.detach().float()  # [H, T] for flash-attn >= 2.4 varlen

    def describe(self) -> str:
        return "flash_attn"
