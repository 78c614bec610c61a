"""Fused spatial reduction of PVT attention: Triton forward and backward kernels and their launchers.

Strided mode (sr_ratio > 1): y = LayerNorm(Conv2d(C, C, kernel=stride=sr)(image) + bias), computed straight
from the tokens x (B, N=H*W, C) as an implicit patch GEMM. Reduced token (i, j) reads the patch of tokens
(i*sr + kh)*W + j*sr + kw (all channels), i.e. sr rows of sr*C contiguous values; with the conv weight laid
out tap-major as (sr, sr, C_in, C_out) = (K = sr*sr*C, C) the conv is patches (M, K) @ weight (K, C).
Trailing rows/columns (H, W not multiples of sr) are never read, as in Conv2d.

Linear mode (PVTv2 linear SRA): y = GELU(LayerNorm(Conv1x1(AdaptiveAvgPool2d(7)(image)) + bias)). A pooling
kernel writes the (B, 49, C) pooled tokens; the same kernels then run on them with sr = 1.

Forward, two kernels: the patch GEMM over the reduced tokens of all images flattened into rows (R = B*M, so
M = 49 does not pad tiles), in tiles of 64-128 rows x 64-128 output channels and, when that leaves the GPU
short of programs, split over the K loop; it writes fp32 sums. A whole-row kernel adds the splits in order,
the bias, and applies the LayerNorm (+ GELU, + the kv projection on the fused-projection path).

Backward, from well-shaped pieces: a whole-row kernel does the LayerNorm (+ GELU) backward once per row
(dz, and per-program partial sums of the norm / bias gradients, added in a fixed order by a small kernel);
a data-gradient GEMM dz @ weight^T writes the patch (or pooled) gradient, one K step per program; patches do
not overlap, so the strided-mode dx is a plain scatter, and pooled gradients are gathered into dx by a
pooling-backward kernel (each token sums the <= CELLS_H * CELLS_W windows containing it). The conv weight
gradient is patches^T @ dz, one program per output tile and token range, its fp32 partials summed in order
into the weight's own (C_out, C_in, kh, kw) layout and dtype. Every reduction is a fixed-order sum: no
atomics, bit-identical reruns. Accumulation is fp32 throughout; fp32 inputs use IEEE fp32 dots (never TF32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference import LINEAR_POOL_SIZE
from .attention import strided_offsets
from .column_sum import finish_column_sums
from .interpreter import INTERPRETED, rounded_cast
from .launch import cdiv, next_power_of_2
from .registration import fake_rows, register

_TARGET_PROGRAMS = 528
"""Programs a backward reduction grid should offer before it is split further: 4 waves of an H100's 132 SMs."""

_GEMM_TARGET_PROGRAMS = 264
"""Programs the forward patch GEMM splits its K loop for: 2 waves of an H100 / H200's 132 SMs (not yet tuned on a
GPU: benchmarks/sweep_reduce.py measures the alternatives)."""

_MIN_STEPS_PER_SPLIT = 4
"""Fewest K steps a split of the patch GEMM keeps (a 3-stage pipeline needs a few to fill)."""

_alloc = torch.empty
"""Allocator of every kernel-written buffer (tests swap in a NaN-filled one to prove full coverage)."""


# ----------------------------------------------------------------------------------------------------------
# Triton helpers
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _mma(a, b, acc, UPCAST: tl.constexpr):
    """acc + a @ b in fp32; fp32 operands use IEEE fp32 (no TF32)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if a.dtype == tl.float32:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _patch_origin(b, m, Wr, W_img, stride_b, stride_n, SR: tl.constexpr):
    """int64 offset of the first tap of reduced token m = i*Wr + j of image b: token (i*SR)*W + j*SR."""
    i = m // Wr
    j = m - i * Wr
    token = (i * SR * W_img + j * SR).to(tl.int64)
    return b.to(tl.int64) * stride_b + token * stride_n


@triton.jit
def _k_step(s, n_chunks, W_img, stride_n, SR: tl.constexpr, BLOCK_K: tl.constexpr):
    """Step s = tap * n_chunks + chunk of the K loop (K = SR*SR*C, tap = kh*SR + kw, BLOCK_K-channel chunks).

    Returns (tap, int64 offset (kh*W + kw)*stride_n of the tap's token in a patch, first channel of the chunk).
    """
    tap = s // n_chunks
    kh = tap // SR
    kw = tap - kh * SR
    return tap, (kh * W_img + kw).to(tl.int64) * stride_n, (s - tap * n_chunks) * BLOCK_K


# ----------------------------------------------------------------------------------------------------------
# Forward kernels
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _adaptive_pool_kernel(
    x_ptr, out_ptr,
    H, W, C,
    stride_xb, stride_xn, stride_xc,
    P: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """out (B, P*P, C) = AdaptiveAvgPool2d(P) of x (B, H*W, C); one program per (image, cell, channel block).

    Cell (pi, pj) averages rows [floor(pi*H/P), ceil((pi+1)*H/P)) and the same columns of W.
    """
    cell = tl.program_id(0)
    b = cell // (P * P)
    pi = (cell % (P * P)) // P
    pj = cell % P
    h0 = (pi * H) // P
    h1 = ((pi + 1) * H + P - 1) // P
    w0 = (pj * W) // P
    w1 = ((pj + 1) * W + P - 1) // P
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    base = x_ptr + b.to(tl.int64) * stride_xb + strided_offsets(c, stride_xc)[None, :]
    acc = tl.zeros((BLOCK_W, BLOCK_C), tl.float32)
    for h in range(h0, h1):
        for ws in range(w0, w1, BLOCK_W):
            w = ws + tl.arange(0, BLOCK_W)
            token = (h * W + w).to(tl.int64)
            v = tl.load(base + token[:, None] * stride_xn, mask=(w < w1)[:, None] & c_mask[None, :], other=0.0)
            acc += v.to(tl.float32)
    mean = tl.sum(acc, axis=0) / ((h1 - h0) * (w1 - w0)).to(tl.float32)
    tl.store(out_ptr + cell.to(tl.int64) * C + c, rounded_cast(mean, out_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def _patch_gemm_kernel(
    a_ptr, w_ptr, part_ptr,
    R, M, Wr, W_img, C, steps_per_split,
    stride_ab, stride_an, stride_ac, stride_wk, stride_wn,
    SR: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """part[split] (R = B*M, C) fp32 = patches @ w over this program's split of the K steps (no bias).

    Program (row block, column block, split) owns reduced tokens r = b*M + m (rows flattened across images,
    so short images do not pad tiles) and output channels [n0, n0 + BLOCK_N). a: source tokens (B, L, C) of
    an image W_img wide, read through its strides; w: (SR*SR*C, C) tap-major, through its strides.
    """
    pid_m = tl.program_id(0)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < C
    split = tl.program_id(2)
    r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    r_mask = r < R
    b = r // M
    patches = a_ptr + _patch_origin(b, r - b * M, Wr, W_img, stride_ab, stride_an, SR)
    ck = tl.arange(0, BLOCK_K)
    n_chunks = tl.cdiv(C, BLOCK_K)
    s_start = split * steps_per_split
    s_end = tl.minimum(s_start + steps_per_split, SR * SR * n_chunks)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for s in range(s_start, s_end):
        tap, tap_offset, c0 = _k_step(s, n_chunks, W_img, stride_an, SR, BLOCK_K)
        ci = c0 + ck
        ci_mask = ci < C
        a = tl.load(patches[:, None] + (tap_offset + strided_offsets(ci, stride_ac))[None, :],
                    mask=r_mask[:, None] & ci_mask[None, :], other=0.0)
        # the chunk's first weight row in int64 (w has SR*SR*C*C elements), tile-local offsets in int32
        w_rows = w_ptr + (tap * C + c0).to(tl.int64) * stride_wk
        w = tl.load(w_rows + ck[:, None] * stride_wk + n[None, :] * stride_wn,
                    mask=ci_mask[:, None] & n_mask[None, :], other=0.0)
        acc = _mma(a, w, acc, UPCAST)
    offs = (split.to(tl.int64) * R + r)[:, None] * C + n[None, :]
    tl.store(part_ptr + offs, acc, mask=r_mask[:, None] & n_mask[None, :])


@triton.jit
def _sum_norm_kernel(
    part_ptr, bias_ptr, gamma_ptr, beta_ptr, kv_w_ptr, kv_b_ptr,
    y_ptr, z_ptr, mean_ptr, rstd_ptr, kv_ptr,
    R, C, num_splits, eps,
    GELU: tl.constexpr, KV: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """z = the splits of part (num_splits, R, C) fp32 summed in order + bias; y = LayerNorm(z) (+ GELU).

    BLOCK_R whole rows per program. Writes y and z (R, C) in y's dtype, mean and rstd (R,) fp32 (of the fp32
    z). With KV also kv (R, 2C) = y kv_w^T + kv_b (kv_w (2C, C), kv_b (2C,) contiguous), from y rounded.
    """
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = r < R
    c = tl.arange(0, BLOCK_C)
    c_mask = c < C
    mask = r_mask[:, None] & c_mask[None, :]
    offs = r.to(tl.int64)[:, None] * C + c[None, :]
    z = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)
    split_stride = tl.cast(R, tl.int64) * C
    for s in range(num_splits):
        z += tl.load(part_ptr + s * split_stride + offs, mask=mask, other=0.0)
    z += tl.load(bias_ptr + c, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    mean = tl.sum(z, axis=1) / C
    diff = tl.where(c_mask[None, :], z - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=1) / C + eps)
    gamma = tl.load(gamma_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    beta = tl.load(beta_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    out = diff * rstd[:, None] * gamma[None, :] + beta[None, :]
    if GELU:
        out = 0.5 * out * (1.0 + tl.math.erf(out * 0.7071067811865476))
    y = rounded_cast(out, y_ptr.dtype.element_ty)
    tl.store(y_ptr + offs, y, mask=mask)
    tl.store(z_ptr + offs, rounded_cast(z, z_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + r, mean, mask=r_mask)
    tl.store(rstd_ptr + r, rstd, mask=r_mask)
    if KV:  # kv columns in chunks of BLOCK_C: n < C are k, C <= n < 2C are v
        for n0 in range(0, 2 * C, BLOCK_C):
            n = n0 + c
            n_mask = n < 2 * C
            w_kv = tl.load(kv_w_ptr + n[None, :] * C + c[:, None], mask=c_mask[:, None] & n_mask[None, :],
                           other=0.0)
            kv = _mma(y, w_kv, tl.zeros((BLOCK_R, BLOCK_C), tl.float32), UPCAST)
            kv += tl.load(kv_b_ptr + n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            tl.store(kv_ptr + r.to(tl.int64)[:, None] * (2 * C) + n[None, :],
                     rounded_cast(kv, kv_ptr.dtype.element_ty), mask=r_mask[:, None] & n_mask[None, :])


# ----------------------------------------------------------------------------------------------------------
# Backward kernels
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _norm_bwd_kernel(
    gy_ptr, z_ptr, mean_ptr, rstd_ptr, gamma_ptr, beta_ptr,
    dz_ptr, part_ptr,
    R, M, C, num_programs,
    stride_gb, stride_gm, stride_gc,
    GELU: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """LayerNorm (+ GELU) backward of BLOCK_R whole rows r = b*M + m: dz (R, C) in dz's dtype, and row [pid]
    of part (3, num_programs, C) fp32: the block's column sums of gy*xhat, gy (after GELU backward) and dz.

    gy: (B, M, C) through its strides; z (R, C), mean/rstd (R,) from the forward.
    """
    pid = tl.program_id(0)
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = r < R
    c = tl.arange(0, BLOCK_C)
    c_mask = c < C
    mask = r_mask[:, None] & c_mask[None, :]
    offs = r.to(tl.int64)[:, None] * C + c[None, :]
    z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + r, mask=r_mask, other=0.0)
    rstd = tl.load(rstd_ptr + r, mask=r_mask, other=0.0)
    b = r // M
    g_rows = gy_ptr + b.to(tl.int64) * stride_gb + (r - b * M).to(tl.int64) * stride_gm
    gy = tl.load(g_rows[:, None] + strided_offsets(c, stride_gc)[None, :], mask=mask, other=0.0).to(tl.float32)
    gamma = tl.load(gamma_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    xhat = tl.where(mask, (z - mean[:, None]) * rstd[:, None], 0.0)
    if GELU:
        u = xhat * gamma[None, :] + tl.load(beta_ptr + c, mask=c_mask, other=0.0).to(tl.float32)[None, :]
        cdf = 0.5 * (1.0 + tl.math.erf(u * 0.7071067811865476))
        gy = gy * (cdf + u * tl.exp(-0.5 * u * u) * 0.3989422804014327)
    dxhat = gy * gamma[None, :]
    c1 = tl.sum(dxhat * xhat, axis=1) / C
    c2 = tl.sum(dxhat, axis=1) / C
    dz = tl.where(mask, (dxhat - xhat * c1[:, None] - c2[:, None]) * rstd[:, None], 0.0)
    tl.store(dz_ptr + offs, rounded_cast(dz, dz_ptr.dtype.element_ty), mask=mask)
    part = part_ptr + pid.to(tl.int64) * C + c
    part_stride = tl.cast(num_programs, tl.int64) * C
    tl.store(part, tl.sum(gy * xhat, axis=0), mask=c_mask)
    tl.store(part + part_stride, tl.sum(gy, axis=0), mask=c_mask)
    tl.store(part + 2 * part_stride, tl.sum(dz, axis=0), mask=c_mask)


@triton.jit
def _patch_dgrad_kernel(
    dz_ptr, w_ptr, da_ptr,
    R, M, Wr, W_img, C,
    stride_db, stride_dn, stride_dc, stride_wk, stride_wn,
    SR: tl.constexpr, UPCAST: tl.constexpr, ACCUMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """da = dz @ w^T for BLOCK_M reduced tokens and one K step (a tap's BLOCK_K input channels), scattered into
    the patches of da through its strides (patches never overlap); with ACCUMULATE added to what they hold.

    dz: (R = B*M, C) contiguous; w: (SR*SR*C, C) tap-major, through its strides; the loop runs over the C output
    channels.
    """
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    r_mask = r < R
    tap, tap_offset, c0 = _k_step(tl.program_id(1), tl.cdiv(C, BLOCK_K), W_img, stride_dn, SR, BLOCK_K)
    ci = c0 + tl.arange(0, BLOCK_K)
    ci_mask = ci < C
    n = tl.arange(0, BLOCK_N)
    dz_rows = dz_ptr + r.to(tl.int64)[:, None] * C
    w_rows = w_ptr + (tap * C + c0).to(tl.int64) * stride_wk + tl.arange(0, BLOCK_K)[None, :] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_K), tl.float32)
    for n0 in range(0, C, BLOCK_N):
        n_mask = n0 + n < C
        d = tl.load(dz_rows + (n0 + n)[None, :], mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        w_t = tl.load(w_rows + (n0 + n)[:, None] * stride_wn, mask=n_mask[:, None] & ci_mask[None, :], other=0.0)
        acc = _mma(d, w_t, acc, UPCAST)
    b = r // M
    patches = da_ptr + _patch_origin(b, r - b * M, Wr, W_img, stride_db, stride_dn, SR)
    ptrs = patches[:, None] + (tap_offset + strided_offsets(ci, stride_dc))[None, :]
    da_mask = r_mask[:, None] & ci_mask[None, :]
    if ACCUMULATE:
        acc += tl.load(ptrs, mask=da_mask, other=0.0).to(tl.float32)
    tl.store(ptrs, rounded_cast(acc, da_ptr.dtype.element_ty), mask=da_mask)


@triton.jit
def _conv_weight_grad_kernel(
    a_ptr, dz_ptr, part_ptr,
    T, M, Wr, W_img, C, t_per_split,
    stride_ab, stride_an, stride_ac,
    SR: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """part[split] (SR*SR*C, C) fp32 = patches^T @ dz over the reduced tokens t = b*M + m of the token split.

    Program (step, n block, split) owns rows tap*C + [c0, c0 + BLOCK_K) and columns [n0, n0 + BLOCK_N).
    a: tokens read through its strides (patches as in the forward); dz: (T = B*M, C) contiguous.
    """
    tap, tap_offset, c0 = _k_step(tl.program_id(0), tl.cdiv(C, BLOCK_K), W_img, stride_an, SR, BLOCK_K)
    ci = c0 + tl.arange(0, BLOCK_K)
    ci_mask = ci < C
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < C
    split = tl.program_id(2)
    taps = a_ptr + tap_offset + strided_offsets(ci, stride_ac)
    acc = tl.zeros((BLOCK_K, BLOCK_N), tl.float32)
    t_start = split * t_per_split
    for t0 in range(t_start, tl.minimum(t_start + t_per_split, T), BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        t_mask = t < T
        b = t // M
        origin = _patch_origin(b, t - b * M, Wr, W_img, stride_ab, stride_an, SR)
        a = tl.load(taps[:, None] + origin[None, :], mask=ci_mask[:, None] & t_mask[None, :], other=0.0)
        d = tl.load(dz_ptr + t.to(tl.int64)[:, None] * C + n[None, :], mask=t_mask[:, None] & n_mask[None, :],
                    other=0.0)
        acc = _mma(a, d, acc, UPCAST)
    k = tap * C + ci
    offs = split.to(tl.int64) * (SR * SR * C) * C + k.to(tl.int64)[:, None] * C + n[None, :]
    tl.store(part_ptr + offs, acc, mask=ci_mask[:, None] & n_mask[None, :])


@triton.jit
def _weight_grad_sum_kernel(part_ptr, out_ptr, C, num_splits, stride_oo, stride_oi, stride_oh, stride_ow,
                            SR: tl.constexpr, BLOCK: tl.constexpr):
    """out (C_out, C_in, SR, SR) in out's dtype and strides = the splits of part (num_splits, SR*SR*C_in, C_out)
    fp32 summed in order: element (k = tap*C + ci, n) of a split lands at out[n, ci, kh, kw], tap = kh*SR + kw."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    numel = SR * SR * tl.cast(C, tl.int64) * C
    mask = offs < numel
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(num_splits):
        acc += tl.load(part_ptr + s * numel + offs, mask=mask, other=0.0)
    k = offs // C
    n = offs - k * C
    tap = k // C
    ci = k - tap * C
    kh = tap // SR
    kw = tap - kh * SR
    out = out_ptr + n * stride_oo + ci * stride_oi + kh * stride_oh + kw * stride_ow
    tl.store(out, rounded_cast(acc, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _adaptive_pool_bwd_kernel(
    dp_ptr, dx_ptr,
    N, H, W, C, num_n_blocks,
    P: tl.constexpr, CELLS_H: tl.constexpr, CELLS_W: tl.constexpr, ACCUMULATE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dx (B, N, C) contiguous = sum over the pooling cells containing each token of dp (B, P*P, C) / area
    (added to what dx holds with ACCUMULATE).

    Token row h lies in cells floor(P*h/H) .. floor((P*h + P-1)/H) (at most CELLS_H of them), likewise columns.
    """
    pid = tl.program_id(0)
    b = pid // num_n_blocks
    t = (pid % num_n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    t_mask = t < N
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    h = t // W
    w = t - h * W
    ph_lo = (P * h) // H
    ph_hi = tl.minimum((P * h + P - 1) // H, P - 1)
    pw_lo = (P * w) // W
    pw_hi = tl.minimum((P * w + P - 1) // W, P - 1)
    dp = dp_ptr + b.to(tl.int64) * (P * P * C)
    acc = tl.zeros((BLOCK_N, BLOCK_C), tl.float32)
    for di in tl.static_range(CELLS_H):
        ph = ph_lo + di
        rows = ((ph + 1) * H + P - 1) // P - (ph * H) // P
        for dj in tl.static_range(CELLS_W):
            pw = pw_lo + dj
            cols = ((pw + 1) * W + P - 1) // P - (pw * W) // P
            valid = t_mask & (ph <= ph_hi) & (pw <= pw_hi)
            cells = dp + (ph * P + pw) * C
            g = tl.load(cells[:, None] + c[None, :], mask=valid[:, None] & c_mask[None, :], other=0.0)
            acc += g.to(tl.float32) * (1.0 / (rows * cols).to(tl.float32))[:, None]
    dx = dx_ptr + (b.to(tl.int64) * N + t)[:, None] * C + c[None, :]
    dx_mask = t_mask[:, None] & c_mask[None, :]
    if ACCUMULATE:
        acc += tl.load(dx, mask=dx_mask, other=0.0).to(tl.float32)
    tl.store(dx, rounded_cast(acc, dx_ptr.dtype.element_ty), mask=dx_mask)


# ----------------------------------------------------------------------------------------------------------
# Launch heuristics (valid on sm_80 and sm_90: num_warps in {4, 8}, num_stages <= 3, blocks >= 16)
# ----------------------------------------------------------------------------------------------------------


def _channel_block(C: int, elem_size: int) -> int:
    """Channels per K-loop chunk: the largest power of two in [16, 64] (32 for fp32) dividing C, else 16."""
    block = 64 if elem_size == 2 else 32
    while block > 16 and C % block:
        block //= 2
    return block


def _row_config(C: int, dot: bool) -> dict:
    """Launch parameters of a whole-row kernel (LayerNorm forward or backward): ~4096 elements a program, or 64
    rows (a wgmma-sized tile) when it also multiplies the rows by a weight (``dot``: the kv projection)."""
    block_c = max(16, next_power_of_2(C))
    block_r = 64 if dot else max(1, min(64, 4096 // block_c))
    return dict(BLOCK_R=block_r, BLOCK_C=block_c, num_warps=8 if block_r * block_c >= 8192 else 4)


def _dgrad_config(R: int, C: int, sr: int, elem_size: int) -> dict:
    """Launch parameters of the data-gradient GEMM: (64 or 128 rows) x one K step, C reduced in 64-chunks."""
    block_k = _channel_block(C, elem_size)
    tiles = sr * sr * cdiv(C, block_k)
    block_m = 128 if elem_size == 2 and cdiv(R, 128) * tiles >= _TARGET_PROGRAMS else 64
    block_n = 64 if elem_size == 2 else 32
    return dict(BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_N=block_n,
                num_warps=8 if block_m * block_k >= 8192 else 4, num_stages=3)


def _weight_grad_config(C: int, elem_size: int) -> dict:
    """Launch parameters of the weight-gradient kernel: (BLOCK_K x BLOCK_N) output tiles, BLOCK_T tokens a step."""
    block_k = _channel_block(C, elem_size)
    block_n = min(128 if elem_size == 2 else 64, max(16, next_power_of_2(C)))
    return dict(
        BLOCK_K=block_k, BLOCK_N=block_n, BLOCK_T=64 if elem_size == 2 else 32,
        num_warps=8 if block_k * block_n >= 4096 else 4, num_stages=3,
    )


def _split(total: int, block: int, tiles: int, target: int = _TARGET_PROGRAMS) -> tuple[int, int]:
    """Split `total` items (in blocks) so that tiles * splits approaches `target` programs: (per_split, splits)."""
    blocks = cdiv(total, block)
    splits = max(1, min(blocks, cdiv(target, tiles)))
    per_split = cdiv(blocks, splits) * block
    return per_split, cdiv(total, per_split)


def _patch_gemm_config(R: int, C: int, sr: int, elem_size: int) -> tuple[dict, int, int]:
    """(launch parameters, K splits, K steps per split) of the patch GEMM over R reduced tokens.

    Tiles of 64 or 128 rows (wgmma needs >= 64 on Hopper) by the whole channel row up to C = 128, else by 64
    columns (C = 320: 5 column tiles, no padding); the K loop (sr*sr taps x BLOCK_K-channel chunks) is split
    until the grid offers _GEMM_TARGET_PROGRAMS, each split keeping >= _MIN_STEPS_PER_SPLIT steps.
    """
    block_n = max(16, next_power_of_2(C)) if C <= 128 else 64
    col_tiles = cdiv(C, block_n)
    block_m = 128 if elem_size == 2 and cdiv(R, 128) * col_tiles >= _GEMM_TARGET_PROGRAMS // 2 else 64
    block_k = _channel_block(C, elem_size)
    steps = sr * sr * cdiv(C, block_k)
    tiles = cdiv(R, block_m) * col_tiles
    max_splits = max(1, steps // _MIN_STEPS_PER_SPLIT)
    steps_per_split, splits = _split(steps, 1, tiles, target=min(_GEMM_TARGET_PROGRAMS, tiles * max_splits))
    cfg = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
               num_warps=8 if block_m * block_n >= 8192 else 4, num_stages=3)
    return cfg, splits, steps_per_split


def reduced_size(H: int, W: int, sr_ratio: int, linear: bool) -> tuple[int, int]:
    """Grid (H', W') of the reduced tokens: (7, 7) in linear mode, else (H // sr, W // sr); M = H' * W'."""
    if linear:
        return LINEAR_POOL_SIZE, LINEAR_POOL_SIZE
    return H // sr_ratio, W // sr_ratio


def tap_major_layout(sr_weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The conv weight (C_out, C_in, k, k) in a memory layout the kernels read in place, cast to ``dtype`` on the
    way: a ``torch.channels_last`` weight (C_in fastest, then kw, kh: what :class:`SpatialReductionAttention`
    keeps) as it is, or only cast; any other laid out tap-major, as (kh, kw, C_in, C_out), in one copy. The
    gradient comes back in the weight's own layout, through the copy for free."""
    if _reads_in_place(sr_weight):
        return sr_weight if dtype is None else sr_weight.to(dtype)  # .to preserves the layout
    taps = sr_weight.permute(2, 3, 1, 0)
    if dtype is not None and dtype != sr_weight.dtype:
        taps = taps.to(dtype, memory_format=torch.contiguous_format)
    return taps.contiguous().permute(3, 2, 0, 1)


def _reads_in_place(sr_weight: torch.Tensor) -> bool:
    """Whether :func:`_tap_major` is a view: a channels_last weight, or one in :func:`tap_major_layout`'s."""
    return (sr_weight.is_contiguous(memory_format=torch.channels_last)
            or sr_weight.permute(2, 3, 1, 0).is_contiguous())


def _tap_major(sr_weight: torch.Tensor) -> torch.Tensor:
    """Conv weight (C_out, C_in, k, k) -> (k*k*C_in, C_out), any strides: row (kh*k + kw)*C_in + ci; a view of a
    :func:`tap_major_layout` weight (column-major for a channels_last one), else a copy."""
    return sr_weight.permute(2, 3, 1, 0).reshape(-1, sr_weight.shape[0])


def _weight_like(sr_weight: torch.Tensor) -> torch.Tensor:
    """An uninitialised gradient of the conv weight: channels_last for a channels_last weight (the layout
    AccumulateGrad keeps without a copy), else (C_out, C_in, k, k) contiguous."""
    C_out, C_in, kh, kw = sr_weight.shape
    if sr_weight.is_contiguous() or not sr_weight.is_contiguous(memory_format=torch.channels_last):
        return _alloc(sr_weight.shape, dtype=sr_weight.dtype, device=sr_weight.device)
    return _alloc((C_out, kh, kw, C_in), dtype=sr_weight.dtype, device=sr_weight.device).permute(0, 3, 1, 2)


def _conv_geometry(x, pooled, W, sr_ratio, linear):
    """(source tokens, their image width, conv stride) of the patch GEMM: pooled 7x7 tokens in linear mode."""
    if linear:
        return pooled, LINEAR_POOL_SIZE, 1
    return x, W, sr_ratio


# ----------------------------------------------------------------------------------------------------------
# Public launchers
# ----------------------------------------------------------------------------------------------------------


def kv_max_channels(dtype: torch.dtype) -> int:
    """Widest C for which the forward kernel also applies the kv projection: a (C, C) weight tile per step,
    which at C = 128 in fp32 overflows an A100's shared memory (tests/gpu_compile.py)."""
    return 64 if dtype == torch.float32 else 128


def spatial_reduce_forward(
    x: torch.Tensor, H: int, W: int,
    sr_weight: torch.Tensor, sr_bias: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor,
    sr_ratio: int, linear: bool, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reduction alone: :func:`reduce_and_project_kv` without the projection (see there)."""
    return reduce_and_project_kv(x, H, W, sr_weight, sr_bias, norm_weight, norm_bias, sr_ratio, linear, eps)[1:]


def reduce_and_project_kv(
    x: torch.Tensor, H: int, W: int,
    sr_weight: torch.Tensor, sr_bias: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor,
    sr_ratio: int, linear: bool, eps: float,
    kv_weight: torch.Tensor | None = None, kv_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Spatial reduction of tokens x (B, N = H*W, C), any strides; fp32 / fp16 / bf16.

    sr_weight (C, C, sr, sr), or (C, C, 1, 1) in linear mode; sr_bias, norm_weight, norm_bias (C,).
    kv_weight (2C, C) and kv_bias (2C,), C <= :func:`kv_max_channels`: also project the reduced tokens in
    the same launch.
    Returns (kv, y, z, mean, rstd, pooled):
        kv: (B, M, 2C) x.dtype = y kv_weight^T + kv_bias, the keys and values; (B, M, 0) without kv_weight;
        y: (B, M, C) x.dtype, M = (H // sr) * (W // sr), or 49 in linear mode;
        z: (B, M, C) x.dtype, the conv output (before the LayerNorm);
        mean, rstd: (B, M) fp32 LayerNorm statistics;
        pooled: (B, 49, C) x.dtype, the pooled tokens in linear mode; (B, 0, C) otherwise.
    The last four are what :func:`spatial_reduce_backward` needs.
    """
    if not linear and sr_ratio <= 1:
        raise ValueError(f"sr_ratio must be > 1 outside linear mode (sr_ratio 1 is the identity), got {sr_ratio}")
    B, _, C = x.shape
    Hr, Wr = reduced_size(H, W, sr_ratio, linear)
    M = Hr * Wr
    dev = x.device
    y = _alloc((B, M, C), dtype=x.dtype, device=dev)
    z = _alloc((B, M, C), dtype=x.dtype, device=dev)
    mean = _alloc((B, M), dtype=torch.float32, device=dev)
    rstd = _alloc((B, M), dtype=torch.float32, device=dev)
    pooled = _alloc((B, LINEAR_POOL_SIZE ** 2 if linear else 0, C), dtype=x.dtype, device=dev)
    project = kv_weight is not None
    if project and C > kv_max_channels(x.dtype):
        raise ValueError(f"the kv projection runs in the reduction kernel for C <= {kv_max_channels(x.dtype)} "
                         f"in {x.dtype}, got C={C}")
    kv = _alloc((B, M, 2 * C if project else 0), dtype=x.dtype, device=dev)
    if y.numel() == 0:
        return kv, y, z, mean, rstd, pooled

    if linear:
        block_c = min(128, max(16, next_power_of_2(C)))
        _adaptive_pool_kernel[(B * M, cdiv(C, block_c))](
            x, pooled, H, W, C, *x.stride(),
            P=LINEAR_POOL_SIZE, BLOCK_W=16, BLOCK_C=block_c, num_warps=4,
        )
    src, src_w, sr = _conv_geometry(x, pooled, W, sr_ratio, linear)
    R = B * M
    cfg, splits, steps_per_split = _patch_gemm_config(R, C, sr, x.element_size())
    part = _alloc((splits, R, C), dtype=torch.float32, device=dev)
    w_t = _tap_major(sr_weight)
    _patch_gemm_kernel[(cdiv(R, cfg["BLOCK_M"]), cdiv(C, cfg["BLOCK_N"]), splits)](
        src, w_t, part,
        R, M, Wr, src_w, C, steps_per_split,
        *src.stride(), *w_t.stride(),
        SR=sr, UPCAST=INTERPRETED, **cfg,
    )
    cfg = _row_config(C, dot=project)
    _sum_norm_kernel[(cdiv(R, cfg["BLOCK_R"]),)](
        part, sr_bias.contiguous(), norm_weight.contiguous(), norm_bias.contiguous(),
        kv_weight.contiguous() if project else y, kv_bias.contiguous() if project else y,
        y, z, mean, rstd, kv,
        R, C, splits, eps,
        GELU=linear, KV=project, UPCAST=INTERPRETED, **cfg,
    )
    return kv, y, z, mean, rstd, pooled


def spatial_reduce_backward(
    grad_y: torch.Tensor, x: torch.Tensor, H: int, W: int,
    sr_weight: torch.Tensor, sr_bias: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor,
    z: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, pooled: torch.Tensor,
    sr_ratio: int, linear: bool, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`spatial_reduce_forward`; grad_y (B, M, C) any strides; z .. pooled as it returned.

    Returns (dx (B, N, C) contiguous, d_sr_weight, d_sr_bias, d_norm_weight, d_norm_bias), each with the
    shape and dtype of its input. Tokens the strided conv never reads get dx exactly 0. Deterministic.
    """
    dx, d_sr_weight, norm_part = _backward(grad_y, x, H, W, sr_weight, norm_weight, norm_bias, z, mean, rstd, pooled,
                                           sr_ratio, linear, eps, None)
    d_norm_weight, d_norm_bias, d_sr_bias = (_alloc(p.shape, dtype=p.dtype, device=x.device)
                                             for p in (norm_weight, norm_bias, sr_bias))
    if norm_part.shape[1]:
        finish_column_sums(list(norm_part), [d_norm_weight, d_norm_bias, d_sr_bias])
    else:
        for grad in (d_norm_weight, d_norm_bias, d_sr_bias):
            grad.zero_()
    return dx, d_sr_weight, d_sr_bias, d_norm_weight, d_norm_bias


def _backward(grad_y, x, H, W, sr_weight, norm_weight, norm_bias, z, mean, rstd, pooled, sr_ratio, linear, eps,
              dx_accumulate):
    """(dx, d_sr_weight, norm_part (3, rows, C) fp32: the partial sums of d_norm_weight, d_norm_bias and
    d_sr_bias, for :func:`.column_sum.finish_column_sums`); dx added in place to ``dx_accumulate`` if given
    (a contiguous (B, N, C) tensor in x.dtype) in the pass that writes it."""
    if not linear and sr_ratio <= 1:
        raise ValueError(f"sr_ratio must be > 1 outside linear mode (sr_ratio 1 is the identity), got {sr_ratio}")
    B, N, C = x.shape
    Hr, Wr = reduced_size(H, W, sr_ratio, linear)
    M = Hr * Wr
    dev = x.device
    accumulate = dx_accumulate is not None
    if accumulate and (dx_accumulate.shape != x.shape or dx_accumulate.dtype != x.dtype
                       or not dx_accumulate.is_contiguous()):
        raise ValueError(f"dx_accumulate must be a contiguous {x.dtype} tensor of shape {tuple(x.shape)}")
    dx = dx_accumulate if accumulate else _alloc((B, N, C), dtype=x.dtype, device=dev)
    if B * M == 0:
        return (dx if accumulate else dx.zero_(), torch.zeros_like(sr_weight),
                torch.zeros((3, 0, C), dtype=torch.float32, device=dev))
    z, mean, rstd = z.contiguous(), mean.contiguous(), rstd.contiguous()
    src, src_w, sr = _conv_geometry(x, pooled.contiguous(), W, sr_ratio, linear)
    w_t = _tap_major(sr_weight)
    R = B * M

    # LayerNorm (+ GELU) backward once per row: dz and the norm / conv-bias partials, summed in a fixed order.
    cfg = _row_config(C, dot=False)
    rows = cdiv(R, cfg["BLOCK_R"])
    dz = _alloc((B, M, C), dtype=x.dtype, device=dev)
    norm_part = _alloc((3, rows, C), dtype=torch.float32, device=dev)
    _norm_bwd_kernel[(rows,)](
        grad_y, z, mean, rstd, norm_weight.contiguous(), norm_bias.contiguous(),
        dz, norm_part,
        R, M, C, rows,
        *grad_y.stride(),
        GELU=linear, **cfg,
    )

    # Data gradient: da = dz @ w^T into the patches (dx) or the pooled cells.
    da = _alloc((B, M, C), dtype=torch.float32, device=dev) if linear else dx
    cfg = _dgrad_config(R, C, sr, x.element_size())
    _patch_dgrad_kernel[(cdiv(R, cfg["BLOCK_M"]), sr * sr * cdiv(C, cfg["BLOCK_K"]))](
        dz, w_t, da,
        R, M, Wr, src_w, C,
        *da.stride(), *w_t.stride(),
        SR=sr, UPCAST=INTERPRETED, ACCUMULATE=accumulate and not linear, **cfg,
    )

    # Conv weight gradient: patches^T @ dz, split over tokens, partials summed in a fixed order into the
    # weight's (C_out, C_in, kh, kw) layout and dtype.
    cfg = _weight_grad_config(C, x.element_size())
    grid_k, grid_n = sr * sr * cdiv(C, cfg["BLOCK_K"]), cdiv(C, cfg["BLOCK_N"])
    t_per_split, t_splits = _split(R, cfg["BLOCK_T"], grid_k * grid_n)
    w_part = _alloc((t_splits, sr * sr * C, C), dtype=torch.float32, device=dev)
    _conv_weight_grad_kernel[(grid_k, grid_n, t_splits)](
        src, dz, w_part,
        R, M, Wr, src_w, C, t_per_split,
        *src.stride(),
        SR=sr, UPCAST=INTERPRETED, **cfg,
    )
    d_sr_weight = _weight_like(sr_weight)
    _weight_grad_sum_kernel[(cdiv(w_part[0].numel(), 1024),)](w_part, d_sr_weight, C, t_splits, *d_sr_weight.stride(),
                                                              SR=sr, BLOCK=1024, num_warps=4)

    if linear:
        P = LINEAR_POOL_SIZE
        block_n, block_c = 16, min(64, max(16, next_power_of_2(C)))
        num_n_blocks = cdiv(N, block_n)
        _adaptive_pool_bwd_kernel[(B * num_n_blocks, cdiv(C, block_c))](
            da, dx, N, H, W, C, num_n_blocks,
            P=P, CELLS_H=min(P, cdiv(P, H) + 1), CELLS_W=min(P, cdiv(P, W) + 1),
            ACCUMULATE=accumulate, BLOCK_N=block_n, BLOCK_C=block_c, num_warps=4,
        )
    elif not accumulate:
        image = dx.view(B, H, W, C)
        image[:, Hr * sr:].zero_()
        image[:, : Hr * sr, Wr * sr:].zero_()
    return dx, d_sr_weight, norm_part


# ----------------------------------------------------------------------------------------------------------
# torch.library ops: spatial_reduce, and the backward of the q projection and the reduction together (the two
# consumers of x: the reduction adds its dx into the q path's in the pass that writes it)
# ----------------------------------------------------------------------------------------------------------


def reduction_outputs_fake(x, H, W, sr_weight, sr_bias, norm_weight, norm_bias, sr_ratio, linear, eps):
    """The outputs of :func:`spatial_reduce_forward` as meta tensors (also part of the fused-projection ops')."""
    B, _, C = x.shape
    Hr, Wr = reduced_size(H, W, sr_ratio, linear)
    stats = x.new_empty((B, Hr * Wr), dtype=torch.float32)
    pooled = x.new_empty((B, LINEAR_POOL_SIZE ** 2 if linear else 0, C))
    return x.new_empty((B, Hr * Wr, C)), x.new_empty((B, Hr * Wr, C)), stats, torch.empty_like(stats), pooled


def _spatial_reduce_backward_fake(grad_y, x, H, W, sr_weight, sr_bias, norm_weight, norm_bias, *saved_and_geometry):
    return (x.new_empty(x.shape), sr_weight.new_empty(sr_weight.shape), sr_bias.new_empty(sr_bias.shape),
            norm_weight.new_empty(norm_weight.shape), norm_bias.new_empty(norm_bias.shape))


def conv_flops(x_shape, H, W, sr_weight_shape, sr_ratio, linear) -> int:
    """2 * B * M * C_out * (C_in * kernel area): the conv as a GEMM over reduced tokens."""
    Hr, Wr = reduced_size(H, W, sr_ratio, linear)
    c_out, c_in, kh, kw = sr_weight_shape
    return 2 * x_shape[0] * Hr * Wr * c_out * c_in * kh * kw


spatial_reduce_backward_op, spatial_reduce_backward_call = register(
    "spatial_reduce_backward", spatial_reduce_backward, fake=_spatial_reduce_backward_fake,
    flops=lambda grad_y_shape, x_shape, H, W, sr_weight_shape, *args, out_shape=None, **kwargs:
        2 * conv_flops(x_shape, H, W, sr_weight_shape, args[-3], args[-2]))  # grad input + grad weight


def _spatial_reduce_setup_context(ctx, inputs, output):
    x, H, W, sr_weight, sr_bias, norm_weight, norm_bias, sr_ratio, linear, eps = inputs
    _, z, mean, rstd, pooled = output
    ctx.save_for_backward(x, sr_weight, sr_bias, norm_weight, norm_bias, z, mean, rstd, pooled)
    ctx.geometry = (H, W, sr_ratio, linear, eps)
    ctx.mark_non_differentiable(z, mean, rstd, pooled)


def _spatial_reduce_autograd(ctx, grad_y, *_unused_grads):
    x, sr_weight, sr_bias, norm_weight, norm_bias, z, mean, rstd, pooled = ctx.saved_tensors
    H, W, sr_ratio, linear, eps = ctx.geometry
    dx, dw, db, dnw, dnb = spatial_reduce_backward_call(grad_y, x, H, W, sr_weight, sr_bias, norm_weight, norm_bias,
                                             z, mean, rstd, pooled, sr_ratio, linear, eps)
    return dx, None, None, dw, db, dnw, dnb, None, None, None


spatial_reduce_op, spatial_reduce = register(
    "spatial_reduce", spatial_reduce_forward, fake=reduction_outputs_fake,
    flops=lambda x_shape, H, W, sr_weight_shape, *args, out_shape=None, **kwargs:
        conv_flops(x_shape, H, W, sr_weight_shape, args[3], args[4]),
    setup_context=_spatial_reduce_setup_context, backward=_spatial_reduce_autograd)
"""spatial_reduce(x, H, W, sr_weight, sr_bias, norm_weight, norm_bias, sr_ratio, linear, eps) -> the outputs of
:func:`spatial_reduce_forward`; differentiable in x and the four parameters."""


def project_and_reduce_backward(
    grad_q: torch.Tensor, grad_y: torch.Tensor, x: torch.Tensor, H: int, W: int, q_weight: torch.Tensor,
    sr_weight: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor, z: torch.Tensor,
    mean: torch.Tensor, rstd: torch.Tensor, pooled: torch.Tensor, sr_ratio: int, linear: bool, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward of the q projection and the reduction, which both read x: (dx = grad_q W_q + the reduction's
    dx (added in the pass that writes it), d_sr_weight, the (3, rows, C) fp32 partials of d_norm_weight,
    d_norm_bias and d_sr_bias for :func:`.column_sum.finish_column_sums`, which the caller finishes with its
    other bias gradients in one launch)."""
    dx = torch.mm(grad_q.reshape(-1, x.shape[-1]), q_weight).view(x.shape)
    return _backward(grad_y, x, H, W, sr_weight, norm_weight, norm_bias, z, mean, rstd, pooled, sr_ratio, linear,
                     eps, dx)


def _project_and_reduce_backward_fake(grad_q, grad_y, x, H, W, q_weight, sr_weight, norm_weight, norm_bias, z,
                                      *rest):
    rows = fake_rows(lambda B, M, C: cdiv(B * M, _row_config(C, dot=False)["BLOCK_R"]), *z.shape)
    return (x.new_empty(x.shape), sr_weight.new_empty(sr_weight.shape),
            x.new_empty((3, rows, x.shape[-1]), dtype=torch.float32))


project_and_reduce_backward_op, project_and_reduce_backward_call = register(
    "project_and_reduce_backward", project_and_reduce_backward,
    fake=_project_and_reduce_backward_fake,
    flops=lambda grad_q_shape, grad_y_shape, x_shape, H, W, q_weight_shape, sr_weight_shape, *args, out_shape=None,
    **kwargs: (2 * x_shape[0] * x_shape[1] * q_weight_shape[0] * q_weight_shape[1]
               + 2 * conv_flops(x_shape, H, W, sr_weight_shape, args[-3], args[-2])))
"""The backward of the reduction in the ``sra`` op (:mod:`.sra`) and the fused-projection path's
(:mod:`.projected_attention`)."""
