"""``sra_attention``: the public SRA op, validated and dispatched to a backend."""

from __future__ import annotations

import torch

from . import reference
from .dispatch import resolve_backend
from .torch_sdpa import sra_attention_sdpa
from .validation import KERNEL_DTYPES, check_sra_args


def _triton_sra_attention(*args, **kwargs):
    from .fused import sra_attention_triton

    return sra_attention_triton(*args, **kwargs)


_IMPLEMENTATIONS = {
    "reference": reference.sra_attention,
    "sdpa": sra_attention_sdpa,
    "triton": _triton_sra_attention,
}


def sra_attention(
    x: torch.Tensor,
    size: tuple[int, int],
    q_weight: torch.Tensor,
    q_bias: torch.Tensor | None,
    kv_weight: torch.Tensor,
    kv_bias: torch.Tensor | None,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor | None,
    sr_weight: torch.Tensor | None = None,
    sr_bias: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    norm_bias: torch.Tensor | None = None,
    *,
    num_heads: int,
    sr_ratio: int = 1,
    linear: bool = False,
    eps: float = 1e-5,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Spatial-reduction attention of PVT v1/v2 (SegFormer's efficient self-attention).

    Computes ``proj(softmax(q k^T * scale) v)`` over ``num_heads`` heads, where q = x W_q + b_q and
    k, v come from x reduced by Conv2d(C, C, kernel=stride=sr_ratio) + LayerNorm (or, with
    ``linear=True``, PVTv2's AdaptiveAvgPool2d(7) + 1x1 conv + LayerNorm + GELU; with
    ``sr_ratio == 1`` and not linear, from x itself).

    Args:
        x: tokens (B, N, C), N = H * W, fp32 / fp16 / bf16 (fp64 on the reference and sdpa backends).
        size: (H, W) of the token grid.
        q_weight (C, C), q_bias (C,) or None: query projection.
        kv_weight (2C, C), kv_bias (2C,) or None: key/value projection; rows [:C] give k.
        proj_weight (C, C), proj_bias (C,) or None: output projection.
        sr_weight (C, C, sr, sr) -- (C, C, 1, 1) in linear mode --, sr_bias (C,): reduction conv;
            required when sr_ratio > 1 or linear.
        norm_weight, norm_bias (C,): LayerNorm after the reduction conv.
        num_heads: heads; must divide C.
        sr_ratio: reduction conv kernel and stride, 1 <= sr_ratio <= min(H, W).
        linear: PVTv2 linear SRA (pool to 7x7; sr_ratio is then unused by the math).
        eps: LayerNorm epsilon (PVT's ``attn.norm`` uses 1e-5).
        scale: softmax scale, default head_dim ** -0.5.
        backend: ``auto`` | ``reference`` | ``sdpa`` | ``triton`` (see :mod:`sra_kernels.dispatch`).

    Returns:
        (B, N, C) in x's dtype.

    Raises:
        TypeError / ValueError naming the bad argument; RuntimeError when the requested backend
        cannot run on x's device.
    """
    size, num_heads, sr_ratio, eps, scale = check_sra_args(
        x, size, q_weight, q_bias, kv_weight, kv_bias, proj_weight, proj_bias,
        sr_weight, sr_bias, norm_weight, norm_bias,
        num_heads=num_heads, sr_ratio=sr_ratio, linear=linear, eps=eps, scale=scale,
    )
    backend = resolve_backend(backend, x.device)
    if backend == "triton" and x.dtype not in KERNEL_DTYPES:
        raise ValueError(f"x must be fp32, fp16 or bf16 for backend 'triton', got {x.dtype}")
    return _IMPLEMENTATIONS[backend](
        x, size, q_weight, q_bias, kv_weight, kv_bias, proj_weight, proj_bias,
        sr_weight, sr_bias, norm_weight, norm_bias,
        num_heads=num_heads, sr_ratio=sr_ratio, linear=linear, eps=eps, scale=scale,
    )
