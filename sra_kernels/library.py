"""torch.library registration of the fused Triton ops.

Custom ops in the ``sra_kernels`` namespace, each with a fake (meta) implementation so that
``torch.compile`` traces them without graph breaks, and FLOP formulas so that
``torch.utils.flop_counter.FlopCounterMode`` counts them:

* ``spatial_reduce`` / ``spatial_reduce_backward`` -- conv(kernel=stride=sr) + LayerNorm (or the
  PVTv2 linear pool + 1x1 conv + LayerNorm + GELU) from the (B, N, C) tokens;
* ``project_and_reduce`` / ``project_and_reduce_backward`` -- the same plus the q projection, the two
  consumers of x in SRA: the backward adds the reduction's dx into the q path's dx in the pass that
  writes it, instead of autograd summing two full (B, N, C) gradients;
* ``reduced_kv_attention`` / ``reduced_kv_attention_backward`` -- short-KV FlashAttention;
* fusion steps 2/3 (``SRA_KERNELS_FUSE_PROJECTIONS=1``, :mod:`.fused`): ``projected_attention`` (q
  projection, attention and out projection in one kernel), ``projected_sra`` (the whole SRA with a
  reduction: the reduction kernel with the kv projection in its epilogue, then that kernel) and
  ``projected_self_attention`` (the whole sr = 1 SRA over <= 64 tokens in one kernel, k and v projected
  in it too); their backwards are cuBLAS GEMMs around the attention and reduction backward ops.

The forward ops carry autograd (``register_autograd``) whose backward calls the backward op.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import (
    register_flop_formula,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)

from .ops.attention import attention_backward, attention_forward
from .ops.projected_attention import projected_attention_forward, projected_self_attention_forward
from .ops.spatial_reduce import (
    reduce_and_project_kv,
    reduced_size,
    spatial_reduce_backward,
    spatial_reduce_forward,
)
from .reference import LINEAR_POOL_SIZE

ATOMIC_BACKWARD_ENV_VAR = "SRA_KERNELS_ATOMIC_BACKWARD"
"""Set to 1 to reduce dK/dV with fp32 atomics (less memory, not bit-reproducible)."""


# --------------------------------------------------------------------------- eager fast path
def _eager(x: Tensor) -> bool:
    """True for an eager call on a real tensor: run the Python implementations directly.

    The dispatcher and torch.library's autograd wrapper cost ~0.1-0.3 ms of host time per op call,
    longer than the kernels at PVT sizes. Traced calls (torch.compile, export, fake or functional
    tensors), dispatch modes and functorch transforms take the registered ops, which is what makes
    them graph-break free and visible to those modes.
    """
    return (type(x) is Tensor and not torch.compiler.is_compiling()
            and torch._C._len_torch_dispatch_stack() == 0  # e.g. FlopCounterMode counts the ops
            and not torch._C._are_functorch_transforms_active())


def _run(op, impl, *args):
    """``op(*args)``, or its implementation ``impl(*args)`` directly in eager mode (see :func:`_eager`)."""
    return impl(*args) if _eager(args[0]) else op(*args)


def _entry_point(op, impl, setup_context, backward):
    """The callable for ``op`` with autograd: in eager mode an ``autograd.Function`` over ``impl`` with
    the op's own ``setup_context`` and ``backward``; the registered op when traced."""

    def forward(ctx, *args):  # the ctx-taking form: apply() then skips binding a signature per call
        output = impl(*args)
        setup_context(ctx, args, output)
        return output

    function = type(f"{op._name.split('::')[-1]}_eager", (torch.autograd.Function,), {
        "forward": staticmethod(forward), "backward": staticmethod(backward)})

    def call(*args):
        return function.apply(*args) if _eager(args[0]) else op(*args)

    return call


# --------------------------------------------------------------------------- spatial reduction
def _spatial_reduce_impl(
    x: Tensor, H: int, W: int, sr_weight: Tensor, sr_bias: Tensor, norm_weight: Tensor, norm_bias: Tensor,
    sr_ratio: int, linear: bool, eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """x (B, H*W, C) -> (y (B, M, C), z (B, M, C), mean (B, M), rstd (B, M), pooled (B, 49 or 0, C))."""
    return spatial_reduce_forward(x, H, W, sr_weight, sr_bias, norm_weight, norm_bias, sr_ratio, linear, eps)


spatial_reduce_op = torch.library.custom_op("sra_kernels::spatial_reduce", mutates_args=())(_spatial_reduce_impl)


@spatial_reduce_op.register_fake
def _spatial_reduce_fake(x, H, W, sr_weight, sr_bias, norm_weight, norm_bias, sr_ratio, linear, eps):
    B, _, C = x.shape
    Hr, Wr = reduced_size(H, W, sr_ratio, linear)
    M = Hr * Wr
    stats = x.new_empty((B, M), dtype=torch.float32)
    pooled = x.new_empty((B, LINEAR_POOL_SIZE ** 2 if linear else 0, C))
    return x.new_empty((B, M, C)), x.new_empty((B, M, C)), stats, torch.empty_like(stats), pooled


def _spatial_reduce_backward_impl(
    grad_y: Tensor, x: Tensor, H: int, W: int, sr_weight: Tensor, sr_bias: Tensor, norm_weight: Tensor,
    norm_bias: Tensor, z: Tensor, mean: Tensor, rstd: Tensor, pooled: Tensor, sr_ratio: int, linear: bool, eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, d_sr_weight, d_sr_bias, d_norm_weight, d_norm_bias), each shaped like its input."""
    return spatial_reduce_backward(grad_y, x, H, W, sr_weight, sr_bias, norm_weight, norm_bias,
                                   z, mean, rstd, pooled, sr_ratio, linear, eps)


spatial_reduce_backward_op = torch.library.custom_op("sra_kernels::spatial_reduce_backward", mutates_args=())(
    _spatial_reduce_backward_impl)


@spatial_reduce_backward_op.register_fake
def _spatial_reduce_backward_fake(grad_y, x, H, W, sr_weight, sr_bias, norm_weight, norm_bias, z, mean, rstd, pooled,
                                  sr_ratio, linear, eps):
    return (x.new_empty(x.shape), sr_weight.new_empty(sr_weight.shape), sr_bias.new_empty(sr_bias.shape),
            norm_weight.new_empty(norm_weight.shape), norm_bias.new_empty(norm_bias.shape))


def _spatial_reduce_setup_context(ctx, inputs, output):
    x, H, W, sr_weight, sr_bias, norm_weight, norm_bias, sr_ratio, linear, eps = inputs
    _, z, mean, rstd, pooled = output
    ctx.save_for_backward(x, sr_weight, sr_bias, norm_weight, norm_bias, z, mean, rstd, pooled)
    ctx.geometry = (H, W, sr_ratio, linear, eps)
    ctx.mark_non_differentiable(z, mean, rstd, pooled)


def _spatial_reduce_backward(ctx, grad_y, *_unused_grads):
    x, sr_weight, sr_bias, norm_weight, norm_bias, z, mean, rstd, pooled = ctx.saved_tensors
    H, W, sr_ratio, linear, eps = ctx.geometry
    dx, dw, db, dnw, dnb = _run(spatial_reduce_backward_op, _spatial_reduce_backward_impl,
        grad_y, x, H, W, sr_weight, sr_bias, norm_weight, norm_bias, z, mean, rstd, pooled, sr_ratio, linear, eps
    )
    return dx, None, None, dw, db, dnw, dnb, None, None, None


spatial_reduce_op.register_autograd(_spatial_reduce_backward, setup_context=_spatial_reduce_setup_context)
spatial_reduce = _entry_point(spatial_reduce_op, _spatial_reduce_impl, _spatial_reduce_setup_context,
                              _spatial_reduce_backward)


def _conv_flops(x_shape, H, W, sr_weight_shape, sr_ratio, linear) -> int:
    """2 * B * M * C_out * (C_in * kernel area): the conv as a GEMM over reduced tokens."""
    Hr, Wr = reduced_size(H, W, sr_ratio, linear)
    c_out, c_in, kh, kw = sr_weight_shape
    return 2 * x_shape[0] * Hr * Wr * c_out * c_in * kh * kw


@register_flop_formula(torch.ops.sra_kernels.spatial_reduce)
def _(x_shape, H, W, sr_weight_shape, *args, out_shape=None, **kwargs) -> int:
    sr_ratio, linear = args[3], args[4]
    return _conv_flops(x_shape, H, W, sr_weight_shape, sr_ratio, linear)


@register_flop_formula(torch.ops.sra_kernels.spatial_reduce_backward)
def _(grad_y_shape, x_shape, H, W, sr_weight_shape, *args, out_shape=None, **kwargs) -> int:
    sr_ratio, linear = args[-3], args[-2]
    return 2 * _conv_flops(x_shape, H, W, sr_weight_shape, sr_ratio, linear)  # grad input + grad weight


# --------------------------------------------------------------------------- q projection + reduction
def _project_and_reduce_impl(
    x: Tensor, H: int, W: int, q_weight: Tensor, q_bias: Tensor | None, sr_weight: Tensor, sr_bias: Tensor,
    norm_weight: Tensor, norm_bias: Tensor, sr_ratio: int, linear: bool, eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """x (B, H*W, C) -> (q = x W_q^T + b_q (B, N, C), then the outputs of ``spatial_reduce``)."""
    q = F.linear(x, q_weight, q_bias)
    return (q, *spatial_reduce_forward(x, H, W, sr_weight, sr_bias, norm_weight, norm_bias, sr_ratio, linear, eps))


project_and_reduce_op = torch.library.custom_op("sra_kernels::project_and_reduce", mutates_args=())(
    _project_and_reduce_impl)


@project_and_reduce_op.register_fake
def _(x, H, W, q_weight, q_bias, sr_weight, sr_bias, norm_weight, norm_bias, sr_ratio, linear, eps):
    reduced = _spatial_reduce_fake(x, H, W, sr_weight, sr_bias, norm_weight, norm_bias, sr_ratio, linear, eps)
    return (x.new_empty(x.shape), *reduced)


def _project_and_reduce_backward_impl(
    grad_q: Tensor, grad_y: Tensor, x: Tensor, H: int, W: int, q_weight: Tensor, sr_weight: Tensor, sr_bias: Tensor,
    norm_weight: Tensor, norm_bias: Tensor, z: Tensor, mean: Tensor, rstd: Tensor, pooled: Tensor,
    sr_ratio: int, linear: bool, eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx = grad_q W_q + the reduction's dx, d_sr_weight, d_sr_bias, d_norm_weight, d_norm_bias)."""
    dx = torch.mm(grad_q.reshape(-1, x.shape[-1]), q_weight).view(x.shape)
    return spatial_reduce_backward(grad_y, x, H, W, sr_weight, sr_bias, norm_weight, norm_bias,
                                   z, mean, rstd, pooled, sr_ratio, linear, eps, dx_accumulate=dx)


project_and_reduce_backward_op = torch.library.custom_op("sra_kernels::project_and_reduce_backward", mutates_args=())(
    _project_and_reduce_backward_impl)


@project_and_reduce_backward_op.register_fake
def _(grad_q, grad_y, x, H, W, q_weight, sr_weight, sr_bias, norm_weight, norm_bias, z, mean, rstd, pooled,
      sr_ratio, linear, eps):
    return _spatial_reduce_backward_fake(grad_y, x, H, W, sr_weight, sr_bias, norm_weight, norm_bias,
                                        z, mean, rstd, pooled, sr_ratio, linear, eps)


def _project_and_reduce_setup_context(ctx, inputs, output):
    x, H, W, q_weight, q_bias, sr_weight, sr_bias, norm_weight, norm_bias, sr_ratio, linear, eps = inputs
    _, _, z, mean, rstd, pooled = output
    ctx.save_for_backward(x, q_weight, sr_weight, sr_bias, norm_weight, norm_bias, z, mean, rstd, pooled)
    ctx.geometry = (H, W, sr_ratio, linear, eps)
    ctx.has_q_bias = q_bias is not None
    ctx.mark_non_differentiable(z, mean, rstd, pooled)


def _project_and_reduce_backward(ctx, grad_q, grad_y, *_unused_grads):
    x, q_weight, sr_weight, sr_bias, norm_weight, norm_bias, z, mean, rstd, pooled = ctx.saved_tensors
    H, W, sr_ratio, linear, eps = ctx.geometry
    dx, dw, db, dnw, dnb = _run(project_and_reduce_backward_op, _project_and_reduce_backward_impl,
        grad_q, grad_y, x, H, W, q_weight, sr_weight, sr_bias, norm_weight, norm_bias, z, mean, rstd, pooled,
        sr_ratio, linear, eps,
    )
    C = x.shape[-1]
    grad_q = grad_q.reshape(-1, C)
    dq_weight = grad_q.T @ x.reshape(-1, C)
    dq_bias = grad_q.sum(0) if ctx.has_q_bias else None
    return dx, None, None, dq_weight, dq_bias, dw, db, dnw, dnb, None, None, None


project_and_reduce_op.register_autograd(_project_and_reduce_backward, setup_context=_project_and_reduce_setup_context)
project_and_reduce = _entry_point(project_and_reduce_op, _project_and_reduce_impl, _project_and_reduce_setup_context,
                                  _project_and_reduce_backward)


@register_flop_formula(torch.ops.sra_kernels.project_and_reduce)
def _(x_shape, H, W, q_weight_shape, q_bias_shape, sr_weight_shape, *args, out_shape=None, **kwargs) -> int:
    sr_ratio, linear = args[3], args[4]
    projection = 2 * x_shape[0] * x_shape[1] * q_weight_shape[0] * q_weight_shape[1]
    return projection + _conv_flops(x_shape, H, W, sr_weight_shape, sr_ratio, linear)


@register_flop_formula(torch.ops.sra_kernels.project_and_reduce_backward)
def _(grad_q_shape, grad_y_shape, x_shape, H, W, q_weight_shape, sr_weight_shape, *args, out_shape=None,
      **kwargs) -> int:
    sr_ratio, linear = args[-3], args[-2]
    projection_grad_input = 2 * x_shape[0] * x_shape[1] * q_weight_shape[0] * q_weight_shape[1]
    return projection_grad_input + 2 * _conv_flops(x_shape, H, W, sr_weight_shape, sr_ratio, linear)


# --------------------------------------------------------------------------- attention
def _reduced_kv_attention_impl(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """q (B, N, h, d), k/v (B, M, h, d) -> (o (B, N, h, d), lse (B, h, N) fp32)."""
    return attention_forward(q, k, v, scale)


reduced_kv_attention_op = torch.library.custom_op("sra_kernels::reduced_kv_attention", mutates_args=())(
    _reduced_kv_attention_impl)


@reduced_kv_attention_op.register_fake
def _(q, k, v, scale):
    B, N, h, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((B, h, N), dtype=torch.float32)


def _reduced_kv_attention_backward_impl(
    grad_o: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, scale: float, deterministic: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) shaped like q, k, v (contiguous)."""
    return attention_backward(grad_o, q, k, v, o, lse, scale, deterministic)


reduced_kv_attention_backward_op = torch.library.custom_op(
    "sra_kernels::reduced_kv_attention_backward", mutates_args=())(_reduced_kv_attention_backward_impl)


@reduced_kv_attention_backward_op.register_fake
def _(grad_o, q, k, v, o, lse, scale, deterministic):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attention_setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _deterministic() -> bool:
    return os.environ.get(ATOMIC_BACKWARD_ENV_VAR, "0") != "1"


def _attention_backward(ctx, grad_o, _grad_lse):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = _run(reduced_kv_attention_backward_op, _reduced_kv_attention_backward_impl,
                      grad_o, q, k, v, o, lse, ctx.scale, _deterministic())
    return dq, dk, dv, None


reduced_kv_attention_op.register_autograd(_attention_backward, setup_context=_attention_setup_context)
reduced_kv_attention = _entry_point(reduced_kv_attention_op, _reduced_kv_attention_impl, _attention_setup_context,
                                    _attention_backward)


def _to_bhsd(shape):
    """(B, L, h, d) -> (B, h, L, d), the layout torch's SDPA FLOP formulas expect."""
    B, L, h, d = shape
    return (B, h, L, d)


@register_flop_formula(torch.ops.sra_kernels.reduced_kv_attention)
def _(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(_to_bhsd(q_shape), _to_bhsd(k_shape), _to_bhsd(v_shape))


@register_flop_formula(torch.ops.sra_kernels.reduced_kv_attention_backward)
def _(grad_o_shape, q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(_to_bhsd(grad_o_shape), _to_bhsd(q_shape), _to_bhsd(k_shape), _to_bhsd(v_shape))



# --------------------------------------------------------------------------- projected attention (fusion step 2/3)
def _projected_attention_impl(
    x: Tensor, q_weight: Tensor, q_bias: Tensor, k: Tensor, v: Tensor, proj_weight: Tensor, proj_bias: Tensor,
    scale: float, save: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """x (B, N, C), k/v (B, M, h, d) -> (out (B, N, C), then q, o (B, N, C) and lse (B, h, N) fp32 when
    ``save``, else empty): proj(attention(q(x), k, v)) with both projections inside one kernel."""
    return projected_attention_forward(x, q_weight, q_bias, k, v, proj_weight, proj_bias, scale, save)


projected_attention_op = torch.library.custom_op("sra_kernels::projected_attention", mutates_args=())(
    _projected_attention_impl)


@projected_attention_op.register_fake
def _(x, q_weight, q_bias, k, v, proj_weight, proj_bias, scale, save):
    return _projected_outputs_fake(x, k.shape[2], save)


def _projected_outputs_fake(x, heads, save):
    """(out, q, o, lse) of the projected ops, as meta tensors: see ``projected_attention_forward``."""
    B, N, C = x.shape
    saved = (B, N, C) if save else (0,)
    lse = x.new_empty((B, heads, N) if save else (0,), dtype=torch.float32)
    return x.new_empty((B, N, C)), x.new_empty(saved), x.new_empty(saved), lse


def _projected_attention_setup_context(ctx, inputs, output):
    x, q_weight, _, k, v, proj_weight, _, scale, _ = inputs
    _, q, o, lse = output
    ctx.save_for_backward(x, q_weight, k, v, proj_weight, q, o, lse)
    ctx.scale = scale
    ctx.mark_non_differentiable(q, o, lse)


def _projected_attention_backward(ctx, grad_out, *_unused_grads):
    """The step-1 backward on the saved q, o and lse: cuBLAS for the projections, our attention backward."""
    x, q_weight, k, v, proj_weight, q, o, lse = ctx.saved_tensors
    dq, dk, dv, d_proj_weight, d_proj_bias = _projected_backward(grad_out, x, k, v, proj_weight, q, o, lse, ctx.scale)
    dx = (dq @ q_weight).view(x.shape)
    return dx, dq.T @ x.reshape(-1, x.shape[-1]), dq.sum(0), dk, dv, d_proj_weight, d_proj_bias, None, None


def _projected_backward(grad_out, x, k, v, proj_weight, q, o, lse, scale):
    """Shared by both projected ops: (dq (B*N, C), dk, dv (B, M, h, d), dW_proj, db_proj) from dOut (B, N, C)."""
    B, N, C = x.shape
    heads, head_dim = k.shape[2], k.shape[3]
    if q.numel() != x.numel():
        raise RuntimeError("the projected attention ran with save=False, so it cannot be differentiated")
    grad_out = grad_out.reshape(-1, C)
    do = (grad_out @ proj_weight).view(B, N, heads, head_dim)
    dq, dk, dv = _run(reduced_kv_attention_backward_op, _reduced_kv_attention_backward_impl,
                      do, q.view(B, N, heads, head_dim), k, v, o.view(B, N, heads, head_dim), lse, scale,
                      _deterministic())
    return dq.reshape(-1, C), dk, dv, grad_out.T @ o.reshape(-1, C), grad_out.sum(0)


projected_attention_op.register_autograd(_projected_attention_backward,
                                         setup_context=_projected_attention_setup_context)
projected_attention = _entry_point(projected_attention_op, _projected_attention_impl,
                                   _projected_attention_setup_context, _projected_attention_backward)


@register_flop_formula(torch.ops.sra_kernels.projected_attention)
def _(x_shape, q_weight_shape, q_bias_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    B, N, C = x_shape
    return 2 * (2 * B * N * C * C) + sdpa_flop_count((B, k_shape[2], N, k_shape[3]), _to_bhsd(k_shape),
                                                     _to_bhsd(v_shape))


# --------------------------------------------------------------------------- projected self attention (sr = 1)
def _projected_self_attention_impl(
    x: Tensor, q_weight: Tensor, q_bias: Tensor, kv_weight: Tensor, kv_bias: Tensor, proj_weight: Tensor,
    proj_bias: Tensor, heads: int, scale: float, save: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """x (B, N, C), N <= 64 -> as ``projected_attention``, with k, v = x W_kv^T + b_kv projected in the kernel:
    the whole sr = 1 SRA in one launch."""
    return projected_self_attention_forward(x, q_weight, q_bias, kv_weight, kv_bias, proj_weight, proj_bias, heads,
                                            scale, save)


projected_self_attention_op = torch.library.custom_op("sra_kernels::projected_self_attention", mutates_args=())(
    _projected_self_attention_impl)


@projected_self_attention_op.register_fake
def _(x, q_weight, q_bias, kv_weight, kv_bias, proj_weight, proj_bias, heads, scale, save):
    return _projected_outputs_fake(x, heads, save)


def _projected_self_attention_setup_context(ctx, inputs, output):
    x, q_weight, _, kv_weight, kv_bias, proj_weight, _, heads, scale, _ = inputs
    _, q, o, lse = output
    ctx.save_for_backward(x, q_weight, kv_weight, kv_bias, proj_weight, q, o, lse)
    ctx.heads, ctx.scale = heads, scale
    ctx.mark_non_differentiable(q, o, lse)


def _projected_self_attention_backward(ctx, grad_out, *_unused_grads):
    """As ``projected_attention``'s, on k, v recomputed by one cuBLAS GEMM (the forward kernel never writes them;
    at N <= 64 rows per image the GEMM costs one more read of x than saving them would)."""
    x, q_weight, kv_weight, kv_bias, proj_weight, q, o, lse = ctx.saved_tensors
    B, N, C = x.shape
    x2d = x.reshape(-1, C)
    kv = F.linear(x2d, kv_weight, kv_bias).view(B, N, 2, ctx.heads, C // ctx.heads)
    dq, dk, dv, d_proj_weight, d_proj_bias = _projected_backward(grad_out, x, kv[:, :, 0], kv[:, :, 1], proj_weight,
                                                                 q, o, lse, ctx.scale)
    dkv = torch.cat((dk.reshape(-1, C), dv.reshape(-1, C)), 1)
    dx = torch.addmm(dq @ q_weight, dkv, kv_weight).view(B, N, C)
    return (dx, dq.T @ x2d, dq.sum(0), dkv.T @ x2d, dkv.sum(0), d_proj_weight, d_proj_bias, None, None, None)


projected_self_attention_op.register_autograd(_projected_self_attention_backward,
                                              setup_context=_projected_self_attention_setup_context)
projected_self_attention = _entry_point(projected_self_attention_op, _projected_self_attention_impl,
                                        _projected_self_attention_setup_context, _projected_self_attention_backward)


@register_flop_formula(torch.ops.sra_kernels.projected_self_attention)
def _(x_shape, q_weight_shape, q_bias_shape, kv_weight_shape, kv_bias_shape, proj_weight_shape, proj_bias_shape,
      heads, *args, out_shape=None, **kwargs) -> int:
    B, N, C = x_shape
    qkv = (B, heads, N, C // heads)
    return 2 * B * N * C * (C + 2 * C + C) + sdpa_flop_count(qkv, qkv, qkv)


# --------------------------------------------------------------------------- the whole reducing SRA, projections fused
def _projected_sra_impl(
    x: Tensor, H: int, W: int, q_weight: Tensor, q_bias: Tensor, kv_weight: Tensor, kv_bias: Tensor,
    proj_weight: Tensor, proj_bias: Tensor, sr_weight: Tensor, sr_bias: Tensor, norm_weight: Tensor,
    norm_bias: Tensor, sr_ratio: int, linear: bool, eps: float, heads: int, scale: float, save: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """x (B, H*W, C), C <= 128, with a reduction (sr > 1 or linear) -> (out (B, N, C), then q, o, lse as
    ``projected_attention`` returns them, kv (B, M, 2C), then the outputs of ``spatial_reduce``): the
    reduction kernel with the kv projection in its epilogue, then the projected-attention kernel."""
    kv, *reduced = reduce_and_project_kv(x, H, W, sr_weight, sr_bias, norm_weight, norm_bias, sr_ratio, linear, eps,
                                         kv_weight, kv_bias)
    B, M, C = reduced[0].shape
    k, v = kv.view(B, M, 2, heads, C // heads).unbind(2)
    return (*projected_attention_forward(x, q_weight, q_bias, k, v, proj_weight, proj_bias, scale, save), kv,
            *reduced)


projected_sra_op = torch.library.custom_op("sra_kernels::projected_sra", mutates_args=())(_projected_sra_impl)


@projected_sra_op.register_fake
def _(x, H, W, q_weight, q_bias, kv_weight, kv_bias, proj_weight, proj_bias, sr_weight, sr_bias, norm_weight,
      norm_bias, sr_ratio, linear, eps, heads, scale, save):
    reduced = _spatial_reduce_fake(x, H, W, sr_weight, sr_bias, norm_weight, norm_bias, sr_ratio, linear, eps)
    B, M, C = reduced[0].shape
    return (*_projected_outputs_fake(x, heads, save), x.new_empty((B, M, 2 * C)), *reduced)


def _projected_sra_setup_context(ctx, inputs, output):
    (x, H, W, q_weight, _, kv_weight, _, proj_weight, _, sr_weight, sr_bias, norm_weight, norm_bias,
     sr_ratio, linear, eps, heads, scale, _) = inputs
    _, *saved = output
    ctx.save_for_backward(x, q_weight, kv_weight, proj_weight, sr_weight, sr_bias, norm_weight, norm_bias, *saved)
    ctx.geometry = (H, W, sr_ratio, linear, eps)
    ctx.heads, ctx.scale = heads, scale
    ctx.mark_non_differentiable(*saved)


def _projected_sra_backward(ctx, grad_out, *_unused_grads):
    """The projections' and attention's backward as ``projected_attention``'s, then the reduction's backward
    adds its dx into the q path's in the pass that writes it (``project_and_reduce_backward``)."""
    x, q_weight, kv_weight, proj_weight, sr_weight, sr_bias, norm_weight, norm_bias, q, o, lse, kv, y, z, mean, \
        rstd, pooled = ctx.saved_tensors
    H, W, sr_ratio, linear, eps = ctx.geometry
    B, N, C = x.shape
    k, v = kv.view(B, -1, 2, ctx.heads, C // ctx.heads).unbind(2)
    dq, dk, dv, d_proj_weight, d_proj_bias = _projected_backward(grad_out, x, k, v, proj_weight, q, o, lse, ctx.scale)
    dkv = torch.cat((dk.reshape(-1, C), dv.reshape(-1, C)), 1)
    grad_y = (dkv @ kv_weight).view(y.shape)
    dx, dw, db, dnw, dnb = _run(project_and_reduce_backward_op, _project_and_reduce_backward_impl,
                                dq.view(B, N, C), grad_y, x, H, W, q_weight, sr_weight, sr_bias, norm_weight,
                                norm_bias, z, mean, rstd, pooled, sr_ratio, linear, eps)
    return (dx, None, None, dq.T @ x.reshape(-1, C), dq.sum(0), dkv.T @ y.reshape(-1, C), dkv.sum(0), d_proj_weight,
            d_proj_bias, dw, db, dnw, dnb, None, None, None, None, None, None)


projected_sra_op.register_autograd(_projected_sra_backward, setup_context=_projected_sra_setup_context)
projected_sra = _entry_point(projected_sra_op, _projected_sra_impl, _projected_sra_setup_context,
                             _projected_sra_backward)


@register_flop_formula(torch.ops.sra_kernels.projected_sra)
def _(x_shape, H, W, q_weight_shape, q_bias_shape, kv_weight_shape, kv_bias_shape, proj_weight_shape,
      proj_bias_shape, sr_weight_shape, sr_bias_shape, norm_weight_shape, norm_bias_shape, sr_ratio, linear, eps,
      heads, *args, out_shape=None, **kwargs) -> int:
    B, N, C = x_shape
    Hr, Wr = reduced_size(H, W, sr_ratio, linear)
    kv = (B, heads, Hr * Wr, C // heads)
    return (_conv_flops(x_shape, H, W, sr_weight_shape, sr_ratio, linear) + 2 * B * Hr * Wr * C * 2 * C
            + 2 * (2 * B * N * C * C) + sdpa_flop_count((B, heads, N, C // heads), kv, kv))

