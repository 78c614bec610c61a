"""The public ops -- ``sra_attention`` and its fused building blocks ``spatial_reduce`` and
``reduced_kv_attention`` -- validated and dispatched to a backend."""

from __future__ import annotations

import torch

from . import reference
from .dispatch import resolve_backend
from .torch_sdpa import reduced_kv_attention_sdpa, sra_attention_sdpa
from .validation import (
    KERNEL_DTYPES,
    KERNEL_MAX_HEAD_DIM,
    check_attention_args,
    check_spatial_reduction_args,
    check_sra_args,
)

try:
    from . import fused
except ModuleNotFoundError as error:  # no Triton (e.g. not Linux): resolve_backend refuses "triton"
    if error.name != "triton":
        raise
    fused = None


def _resolve(backend: str, x: torch.Tensor, head_dim: int | None = None) -> str:
    """The backend to run. What the kernels cannot take (fp64, head_dim > 128) falls back to ``sdpa``
    under ``auto`` and raises a ValueError when ``triton`` was asked for by name."""
    resolved = resolve_backend(backend, x.device)
    if resolved != "triton":
        return resolved
    if x.dtype not in KERNEL_DTYPES:
        problem = f"inputs must be fp32, fp16 or bf16 for backend 'triton', got {x.dtype}"
    elif head_dim is not None and head_dim > KERNEL_MAX_HEAD_DIM:
        problem = f"head_dim (C // num_heads) must be <= {KERNEL_MAX_HEAD_DIM} for backend 'triton', got {head_dim}"
    else:
        return resolved
    if backend == "auto":
        return "sdpa"
    raise ValueError(problem)


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
        backend: ``auto`` | ``reference`` | ``sdpa`` | ``triton`` (see :mod:`sra_kernels.dispatch`);
            ``auto`` runs ``sdpa`` where the kernels cannot (fp64, head_dim > 128).

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
    implementation = {
        "reference": reference.sra_attention,
        "sdpa": sra_attention_sdpa,
        "triton": fused and fused.sra_attention_triton,
    }[_resolve(backend, x, x.shape[-1] // num_heads)]
    return implementation(
        x, size, q_weight, q_bias, kv_weight, kv_bias, proj_weight, proj_bias,
        sr_weight, sr_bias, norm_weight, norm_bias,
        num_heads=num_heads, sr_ratio=sr_ratio, linear=linear, eps=eps, scale=scale,
    )


def spatial_reduce(
    x: torch.Tensor,
    size: tuple[int, int],
    sr_weight: torch.Tensor | None,
    sr_bias: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    norm_bias: torch.Tensor | None = None,
    *,
    sr_ratio: int,
    linear: bool = False,
    eps: float = 1e-5,
    backend: str = "auto",
) -> torch.Tensor:
    """The key/value source of SRA: LayerNorm(Conv2d(kernel=stride=sr_ratio)(x) + bias), fused.

    Args:
        x: tokens (B, N = H*W, C), read in place (any strides).
        size: (H, W); H, W need not be multiples of sr_ratio (the conv floors, as Conv2d does).
        sr_weight: (C, C, sr, sr), or (C, C, 1, 1) with ``linear=True`` (PVTv2's
            AdaptiveAvgPool2d(7) + 1x1 conv + LayerNorm + GELU).
        sr_bias, norm_weight, norm_bias: (C,) or None.
        backend: ``triton`` runs the fused kernel; ``reference``/``sdpa`` run Conv2d + LayerNorm.

    Returns:
        (B, M, C) with M = (H // sr) * (W // sr), 49 in linear mode; x itself when sr_ratio == 1.
    """
    H, W, sr_ratio, eps = check_spatial_reduction_args(x, size, sr_weight, sr_bias, norm_weight, norm_bias,
                                                       sr_ratio=sr_ratio, linear=linear, eps=eps)
    implementation = (fused.spatial_reduce_triton if _resolve(backend, x) == "triton"
                      else reference.spatial_reduction)
    return implementation(x, (H, W), sr_weight, sr_bias, norm_weight, norm_bias,
                          sr_ratio=sr_ratio, linear=linear, eps=eps)


def reduced_kv_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None, *, backend: str = "auto",
) -> torch.Tensor:
    """softmax(q k^T * scale) v per head, for many queries against a short key/value set.

    Args:
        q: (B, N, h, d) -- e.g. ``(x @ W_q.T).view(B, N, h, d)``; any strides.
        k, v: (B, M, h, d) -- e.g. the two halves of ``kv.view(B, M, 2, h, d)``; any strides.
        scale: default d ** -0.5.
        backend: ``triton`` (fused online-softmax kernel), ``sdpa`` or ``reference``.

    Returns:
        (B, N, h, d), contiguous, so ``.view(B, N, h * d)`` is the (B, N, C) token layout.
    """
    scale = check_attention_args(q, k, v, scale)
    implementation = {
        "reference": reference.reduced_kv_attention,
        "sdpa": reduced_kv_attention_sdpa,
        "triton": fused and fused.reduced_kv_attention_triton,
    }[_resolve(backend, q, q.shape[-1])]
    return implementation(q, k, v, scale)
