"""The exact PVT spatial-reduction attention in plain PyTorch: the ground truth of every test.

This transcribes the ``Attention`` module of the official PVT v1/v2 code (and SegFormer's
``EfficientSelfAttention``) into functions of explicit weights, split into the two sub-steps the
kernels fuse:

* :func:`spatial_reduction` -- tokens (B, N, C) -> reduced, normalised tokens (B, M, C);
* :func:`reduced_kv_attention` -- softmax(q k^T * scale) v over heads, (B, N, h, d) layout;

and :func:`sra_attention`, the whole op with its q / kv / out projections.
Nothing here is fused or clever: it runs in the input dtype, like the official module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LINEAR_POOL_SIZE = 7
"""PVTv2 linear SRA pools every stage to a 7x7 grid (AdaptiveAvgPool2d(7))."""


def tokens_to_image(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """View tokens (B, N=H*W, C) as an image (B, C, H, W), as PVT does."""
    B, N, C = x.shape
    H, W = size
    return x.permute(0, 2, 1).reshape(B, C, H, W)


def image_to_tokens(image: torch.Tensor) -> torch.Tensor:
    """Flatten an image (B, C, H', W') to tokens (B, H'*W', C)."""
    return image.flatten(2).transpose(1, 2)


def spatial_reduction(
    x: torch.Tensor,
    size: tuple[int, int],
    sr_weight: torch.Tensor | None,
    sr_bias: torch.Tensor | None,
    norm_weight: torch.Tensor | None,
    norm_bias: torch.Tensor | None,
    *,
    sr_ratio: int,
    linear: bool = False,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Reduce tokens to the key/value source set of PVT attention.

    Args:
        x: tokens (B, N, C) with N = H * W.
        size: (H, W).
        sr_weight: conv weight (C, C, sr, sr), or (C, C, 1, 1) in linear mode.
        sr_bias: conv bias (C,) or None.
        norm_weight, norm_bias: LayerNorm affine parameters (C,) or None.
        sr_ratio: conv kernel size and stride; 1 means no reduction (x is returned as is).
        linear: PVTv2 linear SRA: AdaptiveAvgPool2d(7), 1x1 conv, LayerNorm, GELU.
        eps: LayerNorm epsilon.

    Returns:
        (B, M, C) with M = (H // sr) * (W // sr), 49 in linear mode, or N when sr_ratio == 1.
    """
    C = x.shape[-1]
    if linear:
        image = F.adaptive_avg_pool2d(tokens_to_image(x, size), LINEAR_POOL_SIZE)
        reduced = image_to_tokens(F.conv2d(image, sr_weight, sr_bias))
        return F.gelu(F.layer_norm(reduced, (C,), norm_weight, norm_bias, eps))
    if sr_ratio == 1:
        return x
    image = F.conv2d(tokens_to_image(x, size), sr_weight, sr_bias, stride=sr_ratio)
    return F.layer_norm(image_to_tokens(image), (C,), norm_weight, norm_bias, eps)


def reduced_kv_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """softmax(q k^T * scale) v per head, materialising the (N, M) scores as PVT does.

    Args:
        q: (B, N, h, d) queries.
        k, v: (B, M, h, d) reduced keys and values.
        scale: softmax scale; None means d ** -0.5.

    Returns:
        (B, N, h, d), contiguous (so ``.view(B, N, h * d)`` is the token layout).
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    attn = (q @ k.transpose(-2, -1)) * scale
    attn = attn.softmax(dim=-1)
    return (attn @ v).transpose(1, 2).contiguous()


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
) -> torch.Tensor:
    """The whole PVT attention: q / kv projections, spatial reduction, attention, out projection.

    Shapes: x (B, N, C); q_weight (C, C); kv_weight (2C, C), rows [:C] give k and [C:] give v,
    each head-major; proj_weight (C, C); conv and norm as in :func:`spatial_reduction`.
    Returns (B, N, C).
    """
    B, N, C = x.shape
    head_dim = C // num_heads
    q = F.linear(x, q_weight, q_bias).reshape(B, N, num_heads, head_dim)
    reduced = spatial_reduction(
        x, size, sr_weight, sr_bias, norm_weight, norm_bias,
        sr_ratio=sr_ratio, linear=linear, eps=eps,
    )
    kv = F.linear(reduced, kv_weight, kv_bias).reshape(B, reduced.shape[1], 2, num_heads, head_dim)
    out = reduced_kv_attention(q, kv[:, :, 0], kv[:, :, 1], scale)
    return F.linear(out.reshape(B, N, C), proj_weight, proj_bias)
