"""``sra``: the whole SRA of the ``cublas_projections`` path as one op, so that its backward owns every gradient.

Forward: q = x W_q^T + b_q (cuBLAS); with a reduction, the reduction kernels (patch GEMM, LayerNorm) give the
reduced tokens y, else y = x; kv = y W_kv^T + b_kv (cuBLAS), read by the attention kernel in place as its k / v
halves; out = o W_proj^T + b_proj (cuBLAS).

Backward, in one place: the out projection's GEMMs; the attention backward writes dq and dK/dV into one
kv-shaped buffer (the kv GEMMs read it as it is) and the q / kv bias partials from the data it holds; the
reduction backward adds its dx into the q path's and leaves its norm / conv-bias partials; one column-partials
launch covers the out bias; one launch then finishes all six bias and norm-parameter gradients. A reducing
stage's fwd + bwd is 20 launches (tests/test_launch_count.py; it was ~47 with one op per piece).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import sdpa_flop_count

from .attention import attention_forward, reduced_kv_attention_backward
from .column_sum import column_partials, finish_column_sums_call
from .registration import register
from .spatial_reduce import conv_flops, project_and_reduce_backward_call, reduced_size, reduction_outputs_fake, \
    spatial_reduce_forward


def _sra(
    x: torch.Tensor, H: int, W: int, q_weight: torch.Tensor, q_bias: torch.Tensor | None, kv_weight: torch.Tensor,
    kv_bias: torch.Tensor | None, proj_weight: torch.Tensor, proj_bias: torch.Tensor | None,
    sr_weight: torch.Tensor | None, sr_bias: torch.Tensor | None, norm_weight: torch.Tensor | None,
    norm_bias: torch.Tensor | None, sr_ratio: int, linear: bool, eps: float, heads: int, scale: float,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (B, H*W, C) -> (out (B, N, C), then what the backward reads: q (B, N, C), kv (B, M, 2C), o (B, N, C),
    lse (B, h, N) fp32, and the reduction's y (B, M, C), z, mean, rstd, pooled as ``spatial_reduce_forward``
    returns them; without a reduction (sr_weight None) the keys come from x, and y .. pooled are empty).

    The reduction parameters come filled (``SRAWeights.reduction_filled``); ``deterministic`` is the backward's.
    """
    B, N, C = x.shape
    q = F.linear(x, q_weight, q_bias)
    if sr_weight is None:
        keys, reduced = x, tuple(x.new_empty(0) for _ in range(5))
    else:
        reduced = spatial_reduce_forward(x, H, W, sr_weight, sr_bias, norm_weight, norm_bias, sr_ratio, linear, eps)
        keys = reduced[0]
    M = keys.shape[1]
    kv = F.linear(keys, kv_weight, kv_bias)
    k, v = kv.view(B, M, 2, heads, C // heads).unbind(2)
    o, lse = attention_forward(q.view(B, N, heads, C // heads), k, v, scale)
    out = F.linear(o.view(B, N, C), proj_weight, proj_bias)
    return out, q, kv, o.view(B, N, C), lse, *reduced


def _sra_fake(x, H, W, q_weight, q_bias, kv_weight, kv_bias, proj_weight, proj_bias, sr_weight, sr_bias, norm_weight,
              norm_bias, sr_ratio, linear, eps, heads, scale, deterministic):
    B, N, C = x.shape
    if sr_weight is None:
        M, reduced = N, tuple(x.new_empty(0) for _ in range(5))
    else:
        reduced = reduction_outputs_fake(x, H, W, sr_weight, sr_bias, norm_weight, norm_bias, sr_ratio, linear, eps)
        M = reduced[0].shape[1]
    lse = x.new_empty((B, heads, N), dtype=torch.float32)
    return (x.new_empty(x.shape), x.new_empty(x.shape), x.new_empty((B, M, 2 * C)), x.new_empty(x.shape), lse,
            *reduced)


def save_stage_context(ctx, inputs, output):
    """setup_context of a whole-stage op (this one, ``projected_sra``): inputs (x, H, W, q_weight, q_bias,
    kv_weight, kv_bias, proj_weight, proj_bias, sr_weight, sr_bias, norm_weight, norm_bias, sr_ratio, linear, eps,
    heads, scale, ..., deterministic), output (out, *saved). Saves x, the ten weights in that order, then saved."""
    x, H, W, *weights = inputs[:13]
    sr_ratio, linear, eps, heads, scale = inputs[13:18]
    _, *saved = output
    ctx.save_for_backward(x, *weights, *saved)
    ctx.geometry = (H, W, sr_ratio, linear, eps)
    ctx.heads, ctx.scale, ctx.deterministic = heads, scale, inputs[-1]
    ctx.mark_non_differentiable(*saved)


def _sra_autograd(ctx, grad_out, *_unused_grads):
    x, q_weight, q_bias, kv_weight, kv_bias, proj_weight, proj_bias, sr_weight, sr_bias, norm_weight, norm_bias, \
        q, kv, o, lse, y, z, mean, rstd, pooled = ctx.saved_tensors
    H, W, sr_ratio, linear, eps = ctx.geometry
    B, N, C = x.shape
    M, heads = kv.shape[1], ctx.heads
    g = grad_out.reshape(-1, C)
    do = (g @ proj_weight).view(B, N, heads, C // heads)
    d_proj_weight = g.T @ o.reshape(-1, C)
    k, v = kv.view(B, M, 2, heads, C // heads).unbind(2)
    with_biases = q_bias is not None or kv_bias is not None
    dq, dkv, q_part, kv_part = reduced_kv_attention_backward(
        do, q.view(B, N, heads, C // heads), k, v, o.view(B, N, heads, C // heads), lse, ctx.scale,
        ctx.deterministic, with_biases)
    dq, dkv = dq.view(-1, C), dkv.view(-1, 2 * C)
    d_kv_weight = dkv.T @ (x if sr_weight is None else y).reshape(-1, C)
    dy = dkv @ kv_weight
    reduction_grads = (None,) * 4
    parts, like = [], []
    if sr_weight is None:
        dx = torch.addmm(dy, dq, q_weight).view(x.shape)
    else:
        dx, d_sr_weight, norm_part = project_and_reduce_backward_call(
            dq.view(x.shape), dy.view(B, M, C), x, H, W, q_weight, sr_weight, norm_weight, norm_bias, z, mean, rstd,
            pooled, sr_ratio, linear, eps)
        parts += list(norm_part)
        like += [norm_weight, norm_bias, sr_bias]
    d_q_weight = dq.T @ x.reshape(-1, C)
    for bias, part in ((proj_bias, None), (q_bias, q_part), (kv_bias, kv_part)):
        if bias is not None:
            parts.append(column_partials(g) if part is None else part)
            like.append(bias)
    grads = finish_column_sums_call(parts, like) if parts else []
    if sr_weight is not None:
        d_norm_weight, d_norm_bias, d_sr_bias, *grads = grads
        reduction_grads = (d_sr_weight, d_sr_bias, d_norm_weight, d_norm_bias)
    d_proj_bias, d_q_bias, d_kv_bias = (None if bias is None else grads.pop(0) for bias in (proj_bias, q_bias, kv_bias))
    return (dx, None, None, d_q_weight, d_q_bias, d_kv_weight, d_kv_bias, d_proj_weight, d_proj_bias,
            *reduction_grads, None, None, None, None, None, None)


def sra_flops(x_shape, H, W, sr_weight_shape, sr_ratio, linear, heads) -> int:
    """FLOPs of the whole SRA: the reduction conv (none without ``sr_weight_shape``), the q / kv / out GEMMs and
    the attention."""
    B, N, C = x_shape
    if sr_weight_shape is None:
        M, conv = N, 0
    else:
        Hr, Wr = reduced_size(H, W, sr_ratio, linear)
        M, conv = Hr * Wr, conv_flops(x_shape, H, W, sr_weight_shape, sr_ratio, linear)
    kv = (B, heads, M, C // heads)
    return conv + 2 * B * M * C * 2 * C + 2 * (2 * B * N * C * C) + sdpa_flop_count((B, heads, N, C // heads), kv, kv)


sra_op, sra = register(
    "sra", _sra, fake=_sra_fake,
    flops=lambda x_shape, H, W, q_weight_shape, q_bias_shape, kv_weight_shape, kv_bias_shape, proj_weight_shape,
    proj_bias_shape, sr_weight_shape, sr_bias_shape, norm_weight_shape, norm_bias_shape, sr_ratio, linear, eps,
    heads, *args, out_shape=None, **kwargs: sra_flops(x_shape, H, W, sr_weight_shape, sr_ratio, linear, heads),
    setup_context=save_stage_context, backward=_sra_autograd)
"""sra(x, H, W, the ten weights (biases may be None; the reduction's None without one, else filled), sr_ratio,
linear, eps, heads, scale, deterministic) -> (out, then the saved tensors of :func:`_sra`); differentiable in x and
every weight."""
