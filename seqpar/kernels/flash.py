"""flash-attn (Dao-AILab) varlen kernel, used when the optional ``flash`` extra is installed."""

from __future__ import annotations

from torch import Tensor


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
