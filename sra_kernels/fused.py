"""The ``triton`` backend: the SRA op composed from the fused custom ops of :mod:`.library`.

Today the q / kv / out projections run as torch matmuls (cuBLAS); the spatial reduction (conv +
LayerNorm, or the linear pool path, with the backward's dx summed in place) and the attention are
our Triton kernels. Heads are column
slices: q, k and v reach the attention kernel as strided views, never permuted copies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .library import project_and_reduce, reduced_kv_attention, spatial_reduce


def _autocast_inputs(x, *tensors):
    """Under autocast, cast x and weights to the autocast dtype, as autocast casts Conv2d and Linear.

    (The custom ops are opaque to autocast; the kv and out projections are torch Linears, cast by it.)
    """
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return (x, *tensors)
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if t is not None else None for t in (x, *tensors))


def _filled(C, like, sr_bias, norm_weight, norm_bias):
    """The optional conv/norm parameters as the kernels take them: zeros / ones where None."""
    return (like.new_zeros(C) if sr_bias is None else sr_bias,
            like.new_ones(C) if norm_weight is None else norm_weight,
            like.new_zeros(C) if norm_bias is None else norm_bias)


def spatial_reduce_triton(x, size, sr_weight, sr_bias, norm_weight, norm_bias, *, sr_ratio, linear, eps):
    """Fused reduction of tokens x (B, N, C) -> (B, M, C); x itself when sr_ratio == 1 and not linear."""
    if not linear and sr_ratio == 1:
        return x
    x, sr_weight, *optional = _autocast_inputs(x, sr_weight, sr_bias, norm_weight, norm_bias)
    return spatial_reduce(x, *size, sr_weight, *_filled(x.shape[-1], x, *optional), sr_ratio, linear, eps)[0]


def reduced_kv_attention_triton(q, k, v, scale=None):
    """q (B, N, h, d), k/v (B, M, h, d) -> (B, N, h, d) through the fused attention kernel."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    q, k, v = _autocast_inputs(q, k, v)
    return reduced_kv_attention(q, k, v, scale)[0]


def sra_attention_triton(
    x, size, q_weight, q_bias, kv_weight, kv_bias, proj_weight, proj_bias,
    sr_weight=None, sr_bias=None, norm_weight=None, norm_bias=None,
    *, num_heads, sr_ratio=1, linear=False, eps=1e-5, scale=None,
) -> torch.Tensor:
    """Same arguments and result as :func:`sra_kernels.reference.sra_attention`: (B, N, C) -> (B, N, C).

    With a reduction, the q projection and the reduction are one op whose backward writes dx in one
    pass (see ``project_and_reduce`` in :mod:`.library`).
    """
    B, N, C = x.shape
    head_dim = C // num_heads
    if linear or sr_ratio > 1:
        x, q_weight, q_bias, sr_weight, *optional = _autocast_inputs(
            x, q_weight, q_bias, sr_weight, sr_bias, norm_weight, norm_bias)
        q, reduced = project_and_reduce(x, *size, q_weight, q_bias, sr_weight, *_filled(C, x, *optional),
                                           sr_ratio, linear, eps)[:2]
    else:
        q, reduced = F.linear(x, q_weight, q_bias), x
    kv = F.linear(reduced, kv_weight, kv_bias).view(B, reduced.shape[1], 2, num_heads, head_dim)
    out = reduced_kv_attention_triton(q.view(B, N, num_heads, head_dim), kv[:, :, 0], kv[:, :, 1], scale)
    return F.linear(out.view(B, N, C), proj_weight, proj_bias)
