"""The ``triton`` backend: the SRA op composed from the fused custom ops of :mod:`.library`.

Step 1 (the default): the q / kv / out projections run as torch matmuls (cuBLAS); the spatial
reduction (conv + LayerNorm, or the linear pool path, with the backward's dx summed in place) and
the attention are our Triton kernels. Heads are column slices: q, k and v reach the attention
kernel as strided views, never permuted copies.

Steps 2/3, opt-in with ``SRA_KERNELS_FUSE_PROJECTIONS=1`` until GPU measurements choose: for
C <= 128 the q projection and the out projection run inside the attention kernel, and the kv
projection runs in the reduction kernel's epilogue (one op, ``projected_sra``, whose backward adds
the reduction's dx into the q path's in place, as step 1 does): x is read once for the queries and
the output written once, with no q, pre-projection output or reduced tokens crossing HBM in
inference: two launches when reducing. With sr = 1 and at most 64 tokens, k and v are projected
inside the attention kernel too (one launch); longer sr = 1 inputs take a kv GEMM first.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .library import (
    project_and_reduce,
    projected_attention,
    projected_self_attention,
    projected_sra,
    reduced_kv_attention,
    spatial_reduce,
)
from .ops.projected_attention import applies as projected_attention_applies, keys_from_x_fit

FUSE_PROJECTIONS_ENV_VAR = "SRA_KERNELS_FUSE_PROJECTIONS"
"""Set to 1 to run the q and out projections inside the attention kernel where C <= 128."""


def _autocast_inputs(x, *tensors):
    """Under autocast, cast x and weights to the autocast dtype, as autocast casts Conv2d and Linear.

    (The custom ops are opaque to autocast; the kv and out projections are torch Linears, cast by it.)
    """
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return (x, *tensors)
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if t is not None else None for t in (x, *tensors))


def _compute_dtype(x):
    """The dtype the kernels will see: autocast's when it is on, else x's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


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
    if os.environ.get(FUSE_PROJECTIONS_ENV_VAR, "0") == "1" and projected_attention_applies(C, _compute_dtype(x)):
        return _sra_attention_projected(x, size, q_weight, q_bias, kv_weight, kv_bias, proj_weight, proj_bias,
                                        sr_weight, sr_bias, norm_weight, norm_bias, num_heads=num_heads,
                                        sr_ratio=sr_ratio, linear=linear, eps=eps, scale=scale)
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


def _sra_attention_projected(
    x, size, q_weight, q_bias, kv_weight, kv_bias, proj_weight, proj_bias,
    sr_weight, sr_bias, norm_weight, norm_bias, *, num_heads, sr_ratio, linear, eps, scale,
) -> torch.Tensor:
    """Steps 2/3: the reduction kernel with the kv projection in its epilogue, then q projection + attention +
    out projection in one kernel. sr = 1: one kernel for <= 64 tokens (k, v projected in it too), else a kv
    GEMM and that kernel."""
    B, N, C = x.shape
    head_dim = C // num_heads
    x, q_weight, q_bias, kv_weight, kv_bias, proj_weight, proj_bias, sr_weight, *optional = _autocast_inputs(
        x, q_weight, q_bias, kv_weight, kv_bias, proj_weight, proj_bias, sr_weight, sr_bias, norm_weight, norm_bias)
    q_bias, kv_bias, proj_bias = (x.new_zeros(n) if bias is None else bias
                                  for n, bias in ((C, q_bias), (2 * C, kv_bias), (C, proj_bias)))
    scale = head_dim ** -0.5 if scale is None else scale
    projections = (q_weight, q_bias, kv_weight, kv_bias, proj_weight, proj_bias)
    if linear or sr_ratio > 1:  # two kernels, the kv projection in the reduction kernel's epilogue
        reduction = (sr_weight, *_filled(C, x, *optional))
        save = _needs_grad(x, *projections, *reduction)
        return projected_sra(x, *size, *projections, *reduction, sr_ratio, linear, eps, num_heads, scale, save)[0]
    if keys_from_x_fit(N):  # the whole SRA in one kernel
        save = _needs_grad(x, *projections)
        return projected_self_attention(x, *projections, num_heads, scale, save)[0]
    kv = F.linear(x, kv_weight, kv_bias).view(B, N, 2, num_heads, head_dim)
    save = _needs_grad(x, q_weight, q_bias, kv, proj_weight, proj_bias)
    return projected_attention(x, q_weight, q_bias, kv[:, :, 0], kv[:, :, 1], proj_weight, proj_bias, scale, save)[0]


def _needs_grad(*inputs) -> bool:
    """Whether autograd will differentiate a projected op on these inputs (then it saves q, o and lse)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
