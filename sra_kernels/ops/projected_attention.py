"""The fused-projection path's forward: q projection in the attention's prologue, out projection in its epilogue.

One program holds a block of query tokens with all their channels (C <= 128): it reads x (B, N, C)
once, computes each head's q = x W_q^T + b_q on chip, runs the short-KV online softmax against that
head's k, v (B, M, h, d) (column slices, read in place), multiplies the head's output by its slice
of W_proj and accumulates, then adds b_proj and writes out (B, N, C). q and the attention output are
rounded to x's dtype on chip, as the unfused path rounds its Linear outputs. For self attention
(sr = 1) over at most 64 tokens, one block holds the whole image, and k, v = x W_kv^T + b_kv are
projected from the same x tile: the whole SRA is this one launch. When gradients are
needed it also writes q and o (B, N, C) and the log-sum-exp (B, h, N) fp32, and the backward is the
attention backward of the cublas_projections path plus cuBLAS projections (the ops at the end of this file).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch.utils.flop_counter import sdpa_flop_count

from ..validation import FUSED_PROJECTIONS_MAX_CHANNELS, ONE_KERNEL_MAX_TOKENS
from .attention import (
    LN2,
    LOG2E,
    _attend_key_blocks,
    _attend_one_key_block,
    _capability,
    _load_tile,
    _num_sms,
    _store_tile,
    _to_bhsd,
    reduced_kv_attention_backward,
)
from .column_sum import column_partials, finish_column_sums_call
from .interpreter import INTERPRETED, rounded_cast
from .launch import cdiv, next_power_of_2
from .registration import register
from .spatial_reduce import (
    conv_flops,
    project_and_reduce_backward_call,
    reduce_and_project_kv,
    reduced_size,
    reduction_outputs_fake,
)
from .sra import save_stage_context

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
"""What the kernel compiles for (the path runs fp16 / bf16: :data:`sra_kernels.validation.FUSED_PROJECTIONS_DTYPES`)."""

_empty = torch.empty
"""Allocator of every kernel-written buffer (tests swap in a NaN-filled one to prove full coverage)."""


@triton.jit
def _project_rows(x, W, BIAS, cols, channels, C, D, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """x (R, BC) W[cols]^T + BIAS[cols] -> (R, BD), rounded to ``dtype`` as a Linear's output; W (D.., C)
    row-major starting at the head's first row."""
    w = _load_tile(W, cols, channels, C, 1, D, C, UPCAST)
    bias = tl.load(BIAS + cols, mask=cols < D, other=0.0).to(tl.float32)
    y = rounded_cast(tl.dot(x, tl.trans(w), input_precision="ieee") + bias[None, :], dtype)
    if UPCAST:
        y = y.to(tl.float32)
    return y


@triton.jit
def _projected_fwd_kernel(
    X, WQ, BQ, K, V, WKV, BKV, WP, BP, OUT, Q, O, LSE,
    sx_b, sx_n, sx_c, sk_b, sk_m, sk_h, sk_d, sv_b, sv_m, sv_h, sv_d,
    N, M, C, D, qk_scale,
    H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
    KV_FROM_X: tl.constexpr, SAVE: tl.constexpr, UPCAST: tl.constexpr,
):
    """Grid (B, P): program (b, p) handles query blocks p, p + P, ... of image b, every head.

    WQ, WP (C, C) and BQ, BP (C,) contiguous. Keys: K, V (B, M, H, D) strided, or with KV_FROM_X (self
    attention, N <= BLOCK_N = BLOCK_M: one block holds the image) projected from the x tile itself by
    WKV (2C, C) and BKV (2C,) contiguous (K then V). Writes OUT (B, N, C); with SAVE also Q and O
    (B, N, C) and LSE (B, H, N), all contiguous.
    """
    b = tl.program_id(0).to(tl.int64)
    channels = tl.arange(0, BLOCK_C)
    cols = tl.arange(0, BLOCK_D)
    keys = tl.arange(0, BLOCK_M)
    dtype = OUT.dtype.element_ty
    for qb in range(tl.program_id(1), tl.cdiv(N, BLOCK_N), tl.num_programs(1)):
        rows = qb * BLOCK_N + tl.arange(0, BLOCK_N)
        x = _load_tile(X + b * sx_b, rows, channels, sx_n, sx_c, N, C, UPCAST)
        out = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
        for hh in range(H):
            q = _project_rows(x, WQ + hh * D * C, BQ + hh * D, cols, channels, C, D, dtype, UPCAST)
            if KV_FROM_X:
                k = _project_rows(x, WKV + hh * D * C, BKV + hh * D, cols, channels, C, D, dtype, UPCAST)
                v = _project_rows(x, WKV + (C + hh * D) * C, BKV + C + hh * D, cols, channels, C, D, dtype, UPCAST)
                m_i, l_i, acc = _attend_one_key_block(q, tl.trans(k), v, rows < N, qk_scale, BLOCK_N, BLOCK_D)
            else:
                hh64 = tl.cast(hh, tl.int64)  # hh * sk_h can pass 2^31 (any strides)
                m_i, l_i, acc = _attend_key_blocks(q, K + b * sk_b + hh64 * sk_h, sk_m, sk_d,
                                                   V + b * sv_b + hh64 * sv_h, sv_m, sv_d, keys, cols, M, D, qk_scale,
                                                   BLOCK_N, BLOCK_M, BLOCK_D, UPCAST)
            o = rounded_cast(acc / l_i[:, None], dtype)
            if UPCAST:
                o = o.to(tl.float32)
            if SAVE:
                head = b * N * C + hh * D
                _store_tile(Q + head, q, rows, cols, C, N, D)
                _store_tile(O + head, o, rows, cols, C, N, D)
                tl.store(LSE + (b * H + hh) * N + rows, (m_i + tl.log2(l_i)) * LN2, mask=rows < N)
            w_p = _load_tile(WP + hh * D, channels, cols, C, 1, C, D, UPCAST)  # columns hh*D + d of W_proj
            out = tl.dot(o, tl.trans(w_p), out, input_precision="ieee")
        b_p = tl.load(BP + channels, mask=channels < C, other=0.0).to(tl.float32)
        _store_tile(OUT + b * N * C, out + b_p[None, :], rows, channels, C, N, C)


class _Plan(NamedTuple):
    block_n: int
    block_m: int
    block_d: int
    block_c: int
    num_programs: int
    num_warps: int


@functools.lru_cache(maxsize=256)
def _plan(B: int, N: int, M: int, C: int, d: int, kv_from_x: bool, device: torch.device) -> _Plan:
    """64 query rows with all C <= 128 channels per program; keys in blocks of up to 64; a few programs per SM.
    Self attention from x (``kv_from_x``, N <= 64): one block of next_power_of_2(N) rows is queries and keys.

    Not yet tuned on a GPU (see benchmarks/results): sized to stay within the registers of 4 / 8 warps.
    """
    block_c = max(16, next_power_of_2(C))
    block_n = max(16, next_power_of_2(N)) if kv_from_x else 64
    block_m = block_n if kv_from_x else max(16, min(64, next_power_of_2(M)))
    num_programs = max(1, min(cdiv(N, block_n), cdiv(4 * _num_sms(device), B)))
    # 4 warps at C <= 64 spilled 8-16 bytes per thread before Hopper when saving q and o (tests/gpu_compile.py
    # --pvt); 8 do not
    narrow = block_c <= 64 and (_capability(device) or (9, 0))[0] >= 9
    return _Plan(block_n, block_m, max(16, next_power_of_2(d)), block_c, num_programs, 4 if narrow else 8)


def self_attention_max_channels(dtype: torch.dtype) -> int:
    """Widest x for that: at C = 128 the fp32 tiles overflow an A100's shared memory (tests/gpu_compile.py)."""
    return 64 if dtype == torch.float32 else FUSED_PROJECTIONS_MAX_CHANNELS


def projected_attention_forward(
    x: torch.Tensor, q_weight: torch.Tensor, q_bias: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    proj_weight: torch.Tensor, proj_bias: torch.Tensor, scale: float, save: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """proj(softmax((x W_q^T + b_q) k^T * scale) v) per head, in one launch.

    Args:
        x: (B, N, C), C <= 128, fp16 / bf16 / fp32, any strides.
        q_weight, proj_weight: (C, C); q_bias, proj_bias: (C,); x's dtype.
        k, v: (B, M, h, d) with h * d = C, any strides.
        save: also return q, o (B, N, C) and lse (B, h, N) fp32 for the backward; else they are empty.

    Returns:
        (out (B, N, C) contiguous, q, o, lse).
    """
    _, M, heads, _ = k.shape
    return _launch(x, q_weight, q_bias, proj_weight, proj_bias, scale, save, heads, M, k=k, v=v)


def projected_self_attention_forward(
    x: torch.Tensor, q_weight: torch.Tensor, q_bias: torch.Tensor, kv_weight: torch.Tensor, kv_bias: torch.Tensor,
    proj_weight: torch.Tensor, proj_bias: torch.Tensor, heads: int, scale: float, save: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same with k, v = halves of x W_kv^T + b_kv, projected inside the kernel (sr = 1, N <= 64).

    Args:
        kv_weight: (2C, C), kv_bias: (2C,): the k rows, then the v rows; heads: h, with C % h == 0.
        The others as in :func:`projected_attention_forward`, with N <= 64 (one block of queries and keys) and
        C <= :func:`self_attention_max_channels` (64 in fp32).
    """
    B, N, C = x.shape
    if N > ONE_KERNEL_MAX_TOKENS:
        raise ValueError(f"projected self attention takes N <= {ONE_KERNEL_MAX_TOKENS} tokens, got N={N}")
    if C > self_attention_max_channels(x.dtype):
        raise ValueError(f"projected self attention takes C <= {self_attention_max_channels(x.dtype)} in {x.dtype}, "
                         f"got C={C}")
    return _launch(x, q_weight, q_bias, proj_weight, proj_bias, scale, save, heads, N,
                   kv_weight=kv_weight.contiguous(), kv_bias=kv_bias.contiguous())


def _launch(x, q_weight, q_bias, proj_weight, proj_bias, scale, save, heads, M, *, k=None, v=None, kv_weight=None,
            kv_bias=None):
    """Allocate the outputs and launch, with keys k, v (B, M, h, d) or, for self attention, W_kv and b_kv."""
    B, N, C = x.shape
    D = C // heads
    if C > FUSED_PROJECTIONS_MAX_CHANNELS or x.dtype not in DTYPES:
        raise ValueError(f"projected attention takes C <= {FUSED_PROJECTIONS_MAX_CHANNELS} in fp16/bf16/fp32, "
                         f"got C={C} {x.dtype}")
    if x.device.type == "cpu" and not INTERPRETED:
        raise RuntimeError(f"the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1), got {x.device}")
    out = _empty((B, N, C), dtype=x.dtype, device=x.device)
    q, o = (_empty((B, N, C) if save else (0,), dtype=x.dtype, device=x.device) for _ in range(2))
    lse = _empty((B, heads, N) if save else (0,), dtype=torch.float32, device=x.device)
    if out.numel() == 0:
        return out, q, o, lse
    kv_from_x = kv_weight is not None
    if kv_from_x:  # the kernel's K / V pointers and strides go unused
        k = v = x
        key_strides = (0,) * 8
    else:  # its W_kv / b_kv pointers go unused
        kv_weight, kv_bias = q_weight, q_bias
        key_strides = (*k.stride(), *v.stride())
    plan = _plan(B, N, M, C, D, kv_from_x, x.device)
    _projected_fwd_kernel[(B, plan.num_programs)](
        x, q_weight.contiguous(), q_bias.contiguous(), k, v, kv_weight, kv_bias, proj_weight.contiguous(),
        proj_bias.contiguous(), out, q, o, lse, *x.stride(), *key_strides, N, M, C, D,
        scale * LOG2E.value, H=heads, BLOCK_N=plan.block_n, BLOCK_M=plan.block_m, BLOCK_D=plan.block_d,
        BLOCK_C=plan.block_c, KV_FROM_X=kv_from_x, SAVE=save, UPCAST=INTERPRETED, num_warps=plan.num_warps,
        num_stages=2,
    )
    return out, q, o, lse


# ----------------------------------------------------------------------------------------------
# torch.library ops: projected_attention, projected_self_attention (sr = 1, <= 64 tokens) and projected_sra
# (with a reduction). Their backwards are the cublas_projections path's kernels on the saved q, o and lse,
# with cuBLAS GEMMs for the projections.
# ----------------------------------------------------------------------------------------------


def _projected_outputs_fake(x, heads, save):
    """(out, q, o, lse) of the projected ops, as meta tensors: see :func:`projected_attention_forward`."""
    B, N, C = x.shape
    saved = (B, N, C) if save else (0,)
    lse = x.new_empty((B, heads, N) if save else (0,), dtype=torch.float32)
    return x.new_empty((B, N, C)), x.new_empty(saved), x.new_empty(saved), lse


def _attention_and_projection_backward(grad_out, x, k, v, proj_weight, q, o, lse, scale, deterministic):
    """(dq (B*N, C), dkv (B, M, 2, h, d), dW_proj, then the fp32 partial column sums of dOut, dq and dkv: the out,
    q and kv bias gradients once :func:`.column_sum.finish_column_sums` adds them up) from dOut (B, N, C), shared
    by the three ops."""
    B, N, C = x.shape
    heads, head_dim = k.shape[2], k.shape[3]
    if q.numel() != x.numel():
        raise RuntimeError("the projected attention ran with save=False, so it cannot be differentiated")
    grad_out = grad_out.reshape(-1, C)
    do = (grad_out @ proj_weight).view(B, N, heads, head_dim)
    dq, dkv, q_part, kv_part = reduced_kv_attention_backward(do, q.view(B, N, heads, head_dim), k, v,
                                                             o.view(B, N, heads, head_dim), lse, scale, deterministic,
                                                             True)
    return dq.reshape(-1, C), dkv, grad_out.T @ o.reshape(-1, C), column_partials(grad_out), q_part, kv_part


def _projected_attention(
    x: torch.Tensor, q_weight: torch.Tensor, q_bias: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    proj_weight: torch.Tensor, proj_bias: torch.Tensor, scale: float, save: bool, deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`projected_attention_forward`; ``deterministic`` is its backward's."""
    return projected_attention_forward(x, q_weight, q_bias, k, v, proj_weight, proj_bias, scale, save)


def _projected_attention_setup_context(ctx, inputs, output):
    x, q_weight, q_bias, k, v, proj_weight, proj_bias, scale, _, deterministic = inputs
    _, q, o, lse = output
    ctx.save_for_backward(x, q_weight, q_bias, k, v, proj_weight, proj_bias, q, o, lse)
    ctx.scale, ctx.deterministic = scale, deterministic
    ctx.mark_non_differentiable(q, o, lse)


def _projected_attention_autograd(ctx, grad_out, *_unused_grads):
    x, q_weight, q_bias, k, v, proj_weight, proj_bias, q, o, lse = ctx.saved_tensors
    dq, dkv, d_proj_weight, out_part, q_part, _ = _attention_and_projection_backward(
        grad_out, x, k, v, proj_weight, q, o, lse, ctx.scale, ctx.deterministic)
    dx = (dq @ q_weight).view(x.shape)
    d_proj_bias, d_q_bias = finish_column_sums_call([out_part, q_part], [proj_bias, q_bias])
    return (dx, dq.T @ x.reshape(-1, x.shape[-1]), d_q_bias, dkv[:, :, 0], dkv[:, :, 1], d_proj_weight,
            d_proj_bias, None, None, None)


def _projected_attention_flops(x_shape, q_weight_shape, q_bias_shape, k_shape, v_shape, *args, out_shape=None,
                               **kwargs) -> int:
    B, N, C = x_shape
    return 2 * (2 * B * N * C * C) + sdpa_flop_count((B, k_shape[2], N, k_shape[3]), _to_bhsd(k_shape),
                                                     _to_bhsd(v_shape))


projected_attention_op, projected_attention = register(
    "projected_attention", _projected_attention,
    fake=lambda x, q_weight, q_bias, k, v, proj_weight, proj_bias, scale, save, deterministic:
        _projected_outputs_fake(x, k.shape[2], save),
    flops=_projected_attention_flops,
    setup_context=_projected_attention_setup_context, backward=_projected_attention_autograd)
"""projected_attention(x, q_weight, q_bias, k, v, proj_weight, proj_bias, scale, save, deterministic) ->
(out, q, o, lse) of :func:`projected_attention_forward`; differentiable (when ``save``) in x, k, v and weights."""


def _projected_self_attention(
    x: torch.Tensor, q_weight: torch.Tensor, q_bias: torch.Tensor, kv_weight: torch.Tensor, kv_bias: torch.Tensor,
    proj_weight: torch.Tensor, proj_bias: torch.Tensor, heads: int, scale: float, save: bool, deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`projected_self_attention_forward`: the whole sr = 1 SRA over <= 64 tokens in one launch."""
    return projected_self_attention_forward(x, q_weight, q_bias, kv_weight, kv_bias, proj_weight, proj_bias, heads,
                                            scale, save)


def _projected_self_attention_setup_context(ctx, inputs, output):
    x, q_weight, q_bias, kv_weight, kv_bias, proj_weight, proj_bias, heads, scale, _, deterministic = inputs
    _, q, o, lse = output
    ctx.save_for_backward(x, q_weight, q_bias, kv_weight, kv_bias, proj_weight, proj_bias, q, o, lse)
    ctx.heads, ctx.scale, ctx.deterministic = heads, scale, deterministic
    ctx.mark_non_differentiable(q, o, lse)


def _projected_self_attention_autograd(ctx, grad_out, *_unused_grads):
    """As ``projected_attention``'s, on k, v recomputed by one cuBLAS GEMM (the forward kernel never writes them;
    at N <= 64 rows per image the GEMM costs one more read of x than saving them would)."""
    x, q_weight, q_bias, kv_weight, kv_bias, proj_weight, proj_bias, q, o, lse = ctx.saved_tensors
    B, N, C = x.shape
    x2d = x.reshape(-1, C)
    kv = torch.nn.functional.linear(x2d, kv_weight, kv_bias).view(B, N, 2, ctx.heads, C // ctx.heads)
    dq, dkv, d_proj_weight, *parts = _attention_and_projection_backward(
        grad_out, x, kv[:, :, 0], kv[:, :, 1], proj_weight, q, o, lse, ctx.scale, ctx.deterministic)
    dkv = dkv.view(-1, 2 * C)
    dx = torch.addmm(dq @ q_weight, dkv, kv_weight).view(B, N, C)
    d_proj_bias, d_q_bias, d_kv_bias = finish_column_sums_call(parts, [proj_bias, q_bias, kv_bias])
    return (dx, dq.T @ x2d, d_q_bias, dkv.T @ x2d, d_kv_bias, d_proj_weight, d_proj_bias, None, None, None, None)


def _projected_self_attention_flops(x_shape, q_weight_shape, q_bias_shape, kv_weight_shape, kv_bias_shape,
                                    proj_weight_shape, proj_bias_shape, heads, *args, out_shape=None, **kwargs) -> int:
    B, N, C = x_shape
    qkv = (B, heads, N, C // heads)
    return 2 * B * N * C * (C + 2 * C + C) + sdpa_flop_count(qkv, qkv, qkv)


projected_self_attention_op, projected_self_attention = register(
    "projected_self_attention", _projected_self_attention,
    fake=lambda x, q_weight, q_bias, kv_weight, kv_bias, proj_weight, proj_bias, heads, scale, save, deterministic:
        _projected_outputs_fake(x, heads, save),
    flops=_projected_self_attention_flops,
    setup_context=_projected_self_attention_setup_context, backward=_projected_self_attention_autograd)
"""projected_self_attention(x, q_weight, q_bias, kv_weight, kv_bias, proj_weight, proj_bias, heads, scale, save,
deterministic) -> (out, q, o, lse) of :func:`projected_self_attention_forward`."""


def _projected_sra(
    x: torch.Tensor, H: int, W: int, q_weight: torch.Tensor, q_bias: torch.Tensor, kv_weight: torch.Tensor,
    kv_bias: torch.Tensor, proj_weight: torch.Tensor, proj_bias: torch.Tensor, sr_weight: torch.Tensor,
    sr_bias: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor, sr_ratio: int, linear: bool,
    eps: float, heads: int, scale: float, save: bool, deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (B, H*W, C), C <= 128, with a reduction (sr > 1 or linear) -> (out (B, N, C), then q, o, lse as
    ``projected_attention`` returns them, kv (B, M, 2C), then the outputs of ``spatial_reduce_forward``): the
    reduction kernel with the kv projection in its epilogue, then the projected-attention kernel."""
    kv, *reduced = reduce_and_project_kv(x, H, W, sr_weight, sr_bias, norm_weight, norm_bias, sr_ratio, linear, eps,
                                         kv_weight, kv_bias)
    B, M, C = reduced[0].shape
    k, v = kv.view(B, M, 2, heads, C // heads).unbind(2)
    return (*projected_attention_forward(x, q_weight, q_bias, k, v, proj_weight, proj_bias, scale, save), kv,
            *reduced)


def _projected_sra_fake(x, H, W, q_weight, q_bias, kv_weight, kv_bias, proj_weight, proj_bias, sr_weight, sr_bias,
                        norm_weight, norm_bias, sr_ratio, linear, eps, heads, scale, save, deterministic):
    reduced = reduction_outputs_fake(x, H, W, sr_weight, sr_bias, norm_weight, norm_bias, sr_ratio, linear, eps)
    B, M, C = reduced[0].shape
    return (*_projected_outputs_fake(x, heads, save), x.new_empty((B, M, 2 * C)), *reduced)


def _projected_sra_autograd(ctx, grad_out, *_unused_grads):
    """The projections' and attention's backward as ``projected_attention``'s, then the reduction's backward
    adds its dx into the q path's in the pass that writes it (``project_and_reduce_backward``)."""
    x, q_weight, q_bias, kv_weight, kv_bias, proj_weight, proj_bias, sr_weight, sr_bias, norm_weight, norm_bias, \
        q, o, lse, kv, y, z, mean, rstd, pooled = ctx.saved_tensors
    H, W, sr_ratio, linear, eps = ctx.geometry
    B, N, C = x.shape
    k, v = kv.view(B, -1, 2, ctx.heads, C // ctx.heads).unbind(2)
    dq, dkv, d_proj_weight, *parts = _attention_and_projection_backward(
        grad_out, x, k, v, proj_weight, q, o, lse, ctx.scale, ctx.deterministic)
    dkv = dkv.view(-1, 2 * C)
    grad_y = (dkv @ kv_weight).view(y.shape)
    dx, dw, norm_part = project_and_reduce_backward_call(
        dq.view(B, N, C), grad_y, x, H, W, q_weight, sr_weight, norm_weight, norm_bias, z, mean, rstd, pooled,
        sr_ratio, linear, eps)
    dnw, dnb, db, d_proj_bias, d_q_bias, d_kv_bias = finish_column_sums_call(
        [*norm_part, *parts], [norm_weight, norm_bias, sr_bias, proj_bias, q_bias, kv_bias])
    return (dx, None, None, dq.T @ x.reshape(-1, C), d_q_bias, dkv.T @ y.reshape(-1, C), d_kv_bias, d_proj_weight,
            d_proj_bias, dw, db, dnw, dnb, None, None, None, None, None, None, None)


def _projected_sra_flops(x_shape, H, W, q_weight_shape, q_bias_shape, kv_weight_shape, kv_bias_shape,
                         proj_weight_shape, proj_bias_shape, sr_weight_shape, sr_bias_shape, norm_weight_shape,
                         norm_bias_shape, sr_ratio, linear, eps, heads, *args, out_shape=None, **kwargs) -> int:
    B, N, C = x_shape
    Hr, Wr = reduced_size(H, W, sr_ratio, linear)
    kv = (B, heads, Hr * Wr, C // heads)
    return (conv_flops(x_shape, H, W, sr_weight_shape, sr_ratio, linear) + 2 * B * Hr * Wr * C * 2 * C
            + 2 * (2 * B * N * C * C) + sdpa_flop_count((B, heads, N, C // heads), kv, kv))


projected_sra_op, projected_sra = register(
    "projected_sra", _projected_sra, fake=_projected_sra_fake, flops=_projected_sra_flops,
    setup_context=save_stage_context, backward=_projected_sra_autograd)
"""projected_sra(x, H, W, the ten weights, sr_ratio, linear, eps, heads, scale, save, deterministic) -> (out, q,
o, lse, kv, then the reduction's outputs): the whole reducing SRA of the fused-projection path."""
