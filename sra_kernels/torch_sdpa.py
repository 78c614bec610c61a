"""The ``sdpa`` backend: PVT attention in its fastest pure-PyTorch form, as timm runs it.

Conv2d + LayerNorm (shared with the reference), the q/kv Linears and
``F.scaled_dot_product_attention`` (flash / memory-efficient / cuDNN kernels on CUDA).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import spatial_reduction


def sra_attention_sdpa(
    x, size, q_weight, q_bias, kv_weight, kv_bias, proj_weight, proj_bias,
    sr_weight=None, sr_bias=None, norm_weight=None, norm_bias=None,
    *, num_heads: int, sr_ratio: int = 1, linear: bool = False, eps: float = 1e-5,
    scale: float | None = None, dropout_p: float = 0.0,
) -> torch.Tensor:
    """Same arguments and result as :func:`sra_kernels.reference.sra_attention`: x (B, N, C) -> (B, N, C).

    ``dropout_p`` is attention-probability dropout (the module passes it while training).
    """
    B, N, C = x.shape
    head_dim = C // num_heads
    q = F.linear(x, q_weight, q_bias).view(B, N, num_heads, head_dim).transpose(1, 2)
    reduced = spatial_reduction(
        x, size, sr_weight, sr_bias, norm_weight, norm_bias,
        sr_ratio=sr_ratio, linear=linear, eps=eps,
    )
    kv = F.linear(reduced, kv_weight, kv_bias).view(B, reduced.shape[1], 2, num_heads, head_dim).permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(q, kv[0], kv[1], dropout_p=dropout_p, scale=scale)
    return F.linear(out.transpose(1, 2).reshape(B, N, C), proj_weight, proj_bias)


def reduced_kv_attention_sdpa(q, k, v, scale: float | None = None) -> torch.Tensor:
    """q (B, N, h, d), k/v (B, M, h, d) -> (B, N, h, d) through ``F.scaled_dot_product_attention``."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2).contiguous()
