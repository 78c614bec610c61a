"""Short-KV FlashAttention for PVT spatial-reduction attention: forward and backward Triton kernels.

Shapes: q (B, N, h, d) with N up to ~66k queries, k and v (B, M, h, d) with a short reduced key set
(M = 49 .. ~1k); any strides (they are column slices of the (B, L, h*d) projections and are read in
place). The forward writes o (B, N, h, d) contiguous in q.dtype and the natural log-sum-exp of the
scaled scores, lse (B, h, N) fp32, which the backward uses to recompute the probabilities.

When the keys of one (batch, head) fit in one block, a program loads K and V once and streams its
share of query blocks through them (persistent over query blocks); longer key sets loop over key
blocks. The backward writes dQ (B, N, h, d) and one dKV (B, M, 2, h, d) buffer (dK and dV, laid out as the
kv = x @ W_kv^T projection they are the gradient of). It is parallel over query blocks when N >> M: dQ is
written directly, and every program sums its queries' dK/dV into one fp32 partial, reduced in a fixed order by a
second kernel into dKV (or, opt-in, added with fp32 atomics). When the key blocks alone fill the GPU (N ~ M) it is
key-parallel instead: one kernel writes dQ (and delta, from the dO and O tiles it loads), a second sums each key
block's dK/dV over all queries in order, straight into dKV. Both are deterministic. On request the kernels that
write dQ and dKV also write fp32 partial column sums of them (the q and kv projections' bias gradients).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

from ..validation import KERNEL_DTYPES, KERNEL_MAX_HEAD_DIM
from .interpreter import INTERPRETED, rounded_cast
from .launch import cdiv, next_power_of_2
from .registration import fake_rows, register

GRID_Y_MAX = 65535
"""CUDA's limit on a launch grid's y (and z) dimension."""

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)


# ----------------------------------------------------------------------------------------------
# Triton helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def strided_offsets(index, stride):
    """index * stride in int64: with any strides (e.g. a channel-major view) the product can pass 2^31. A unit
    stride compiles to a constexpr 1 (Triton's specialisation, which ``isinstance`` sees unwrapped): index as is."""
    if isinstance(stride, int) and stride == 1:
        offsets = index
    else:
        offsets = index.to(tl.int64) * stride
    return offsets


@triton.jit
def _load_tile(base, rows, cols, stride_r, stride_c, n_rows, n_cols, UPCAST: tl.constexpr):
    """Tile (len(rows), len(cols)) of base[r * stride_r + c * stride_c], zero outside (n_rows, n_cols)."""
    ptrs = base + rows.to(tl.int64)[:, None] * stride_r + strided_offsets(cols, stride_c)[None, :]
    tile = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _store_tile(base, tile, rows, cols, stride_r, n_rows, n_cols):
    """base[r * stride_r + c] = tile (cast to base's dtype) inside (n_rows, n_cols)."""
    ptrs = base + rows.to(tl.int64)[:, None] * stride_r + cols[None, :]
    tl.store(ptrs, rounded_cast(tile, base.dtype.element_ty),
             mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols))


@triton.jit
def _store_tile_and_sums(base, sums, tile, rows, cols, stride_r, n_rows, n_cols, SUMS: tl.constexpr):
    """_store_tile of the fp32 tile; with SUMS also sums[c] = its column sums (fp32, before the cast) for c in cols,
    c < n_cols: one row of bias-gradient partials. The tile's rows past n_rows must be zeros."""
    _store_tile(base, tile, rows, cols, stride_r, n_rows, n_cols)
    if SUMS:
        tl.store(sums + cols, tl.sum(tile, 0), mask=cols < n_cols)


@triton.jit
def _softmax_step(q, kt, v, key_valid, m_i, l_i, acc, qk_scale):
    """One online-softmax step of q (BN, BD) against keys kt (BD, BM) (K transposed) and v (BM, BD); m_i in the
    log2 domain. K arrives transposed from its load: a ``tl.trans`` of a loaded K tile is re-stored to shared
    memory for every query block and spills at BM = 256 (tests/gpu_compile.py --pvt)."""
    s = tl.dot(q, kt, input_precision="ieee") * qk_scale
    s = tl.where(key_valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision="ieee")
    return m_new, l_i, acc


@triton.jit
def _attend_one_key_block(q, kt, v, key_valid, qk_scale, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Softmax of q (BN, BD) over the keys kt (BD, BM), v (BM, BD) of one block: (m_i, l_i, acc) as below."""
    m_i = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    return _softmax_step(q, kt, v, key_valid, m_i, l_i, acc, qk_scale)


@triton.jit
def _attend_key_blocks(q, k_base, sk_m, sk_d, v_base, sv_m, sv_d, keys, cols, M, D, qk_scale,
                       BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
    """Online softmax of q (BN, BD) over all M keys, one key block (keys = arange(BLOCK_M)) at a time.

    Returns (m_i, l_i, acc): running max (log2 domain), sum and unnormalised output (BN, BD) fp32.
    """
    m_i = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start_m in range(0, M, BLOCK_M):
        kt = _load_tile(k_base, cols, start_m + keys, sk_d, sk_m, D, M, UPCAST)
        v = _load_tile(v_base, start_m + keys, cols, sv_m, sv_d, M, D, UPCAST)
        m_i, l_i, acc = _softmax_step(q, kt, v, start_m + keys < M, m_i, l_i, acc, qk_scale)
    return m_i, l_i, acc


@triton.jit
def _row_delta(o_base, so_n, so_d, do, rows, cols, N, D, UPCAST: tl.constexpr):
    """delta = rowsum(dO * O) (BN,) fp32 for the rows of the dO tile ``do`` (BN, BD)."""
    o = _load_tile(o_base, rows, cols, so_n, so_d, N, D, UPCAST)
    return tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)


@triton.jit
def _load_query_rows(q_base, sq_n, sq_d, do_base, sdo_n, sdo_d, o_base, so_n, so_d, lse_row, delta_row,
                     rows, cols, N, D, FUSED_DELTA: tl.constexpr, UPCAST: tl.constexpr):
    """q, dO tiles (BN, BD), lse in the log2 domain and delta (BN,) of one query block.

    Padded rows get lse = +inf so that their probabilities are exactly 0. delta is computed from
    O when FUSED_DELTA, else read from the (B, h, N) buffer a dQ pass wrote.
    """
    q = _load_tile(q_base, rows, cols, sq_n, sq_d, N, D, UPCAST)
    do = _load_tile(do_base, rows, cols, sdo_n, sdo_d, N, D, UPCAST)
    lse2 = tl.load(lse_row + rows, mask=rows < N, other=float("inf")) * LOG2E
    if FUSED_DELTA:
        delta = _row_delta(o_base, so_n, so_d, do, rows, cols, N, D, UPCAST)
    else:
        delta = tl.load(delta_row + rows, mask=rows < N, other=0.0)
    return q, do, lse2, delta


@triton.jit
def _probs_and_dscores(q, k, v, do, lse2, delta, key_valid, qk_scale):
    """P = softmax probabilities and dS = P * (dO V^T - delta), both (BN, BM) fp32.

    dS is the gradient w.r.t. the scaled scores; dQ = scale * dS K and dK = scale * dS^T Q.
    """
    s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
    s = tl.where(key_valid[None, :], s, float("-inf"))
    p = tl.exp2(s - lse2[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision="ieee")
    return p, p * (dp - delta[:, None])


@triton.jit
def _store_dkv(dk_base, dkv_stride, dk, dv, rows, cols, row_stride, M, D, ATOMIC: tl.constexpr):
    """Write (or atomically add) a (BM, BD) fp32 dK / dV partial; dV lies dkv_stride elements after dK."""
    ptrs = dk_base + rows.to(tl.int64)[:, None] * row_stride + cols[None, :]
    mask = (rows[:, None] < M) & (cols[None, :] < D)
    if ATOMIC:
        tl.atomic_add(ptrs, dk, mask=mask, sem="relaxed")
        tl.atomic_add(ptrs + dkv_stride, dv, mask=mask, sem="relaxed")
    else:
        tl.store(ptrs, dk, mask=mask)
        tl.store(ptrs + dkv_stride, dv, mask=mask)


@triton.jit
def _backward_bases(pid_bh, N, H, D, Q, sq_b, sq_h, K, sk_b, sk_h, V, sv_b, sv_h, O, so_b, so_h, DO, sdo_b, sdo_h,
                    DQ, LSE, DELTA):
    """(b, head, then the q, k, v, o, dO, dQ bases and the lse, delta rows) of (batch, head) pid_bh = b*H + head."""
    b = (pid_bh // H).to(tl.int64)
    hh = (pid_bh % H).to(tl.int64)
    rows = pid_bh.to(tl.int64) * N
    return (b, hh, Q + b * sq_b + hh * sq_h, K + b * sk_b + hh * sk_h, V + b * sv_b + hh * sv_h,
            O + b * so_b + hh * so_h, DO + b * sdo_b + hh * sdo_h, DQ + b * N * H * D + hh * D, LSE + rows,
            DELTA + rows)


@triton.jit
def _dq_over_keys(q, do, lse2, delta, k_base, sk_m, sk_d, v_base, sv_m, sv_d, keys, cols, M, D, qk_scale,
                  BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
    """dQ / scale (BN, BD) fp32 of one query block (q, dO, lse, delta loaded) over all M keys, a key block at a time."""
    dq = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start_m in range(0, M, BLOCK_M):
        k = _load_tile(k_base, start_m + keys, cols, sk_m, sk_d, M, D, UPCAST)
        v = _load_tile(v_base, start_m + keys, cols, sv_m, sv_d, M, D, UPCAST)
        p, ds = _probs_and_dscores(q, k, v, do, lse2, delta, start_m + keys < M, qk_scale)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision="ieee")
    return dq


@triton.jit
def _dkdv_over_queries(k, v, key_valid, q_base, sq_n, sq_d, do_base, sdo_n, sdo_d, lse_row, delta_row, cols,
                       first_qb, num_qb, step, N, D, qk_scale,
                       BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
    """(dK / scale, dV) (BM, BD) fp32 of one key block (k, v loaded) over query blocks first_qb, +step, ..."""
    dk = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for qb in range(first_qb, num_qb, step):
        rows = qb * BLOCK_N + tl.arange(0, BLOCK_N)
        q, do, lse2, delta = _load_query_rows(q_base, sq_n, sq_d, do_base, sdo_n, sdo_d, q_base, sq_n, sq_d,
                                              lse_row, delta_row, rows, cols, N, D, False, UPCAST)
        p, ds = _probs_and_dscores(q, k, v, do, lse2, delta, key_valid, qk_scale)
        dv = tl.dot(tl.trans(p.to(do.dtype)), do, dv, input_precision="ieee")
        dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk, input_precision="ieee")
    return dk, dv


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE,
    sq_b, sq_n, sq_h, sq_d, sk_b, sk_m, sk_h, sk_d, sv_b, sv_m, sv_h, sv_d,
    N, M, H, D, qk_scale,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    SINGLE_KV: tl.constexpr, UPCAST: tl.constexpr,
):
    """Grid (B*h, P): program (bh, p) handles query blocks p, p + P, ... of one (batch, head).

    Writes O (B, N, h, d) contiguous and LSE (B, h, N) = natural log-sum-exp of the scaled scores.
    """
    pid_bh = tl.program_id(0)
    b = (pid_bh // H).to(tl.int64)
    hh = (pid_bh % H).to(tl.int64)
    q_base = Q + b * sq_b + hh * sq_h
    k_base = K + b * sk_b + hh * sk_h
    v_base = V + b * sv_b + hh * sv_h
    o_base = O + b * N * H * D + hh * D
    lse_row = LSE + pid_bh.to(tl.int64) * N
    cols = tl.arange(0, BLOCK_D)
    keys = tl.arange(0, BLOCK_M)
    if SINGLE_KV:
        kt = _load_tile(k_base, cols, keys, sk_d, sk_m, D, M, UPCAST)
        v = _load_tile(v_base, keys, cols, sv_m, sv_d, M, D, UPCAST)
    for qb in range(tl.program_id(1), tl.cdiv(N, BLOCK_N), tl.num_programs(1)):
        rows = qb * BLOCK_N + tl.arange(0, BLOCK_N)
        q = _load_tile(q_base, rows, cols, sq_n, sq_d, N, D, UPCAST)
        if SINGLE_KV:
            m_i, l_i, acc = _attend_one_key_block(q, kt, v, keys < M, qk_scale, BLOCK_N, BLOCK_D)
        else:
            m_i, l_i, acc = _attend_key_blocks(q, k_base, sk_m, sk_d, v_base, sv_m, sv_d, keys, cols, M, D, qk_scale,
                                               BLOCK_N, BLOCK_M, BLOCK_D, UPCAST)
        _store_tile(o_base, acc / l_i[:, None], rows, cols, H * D, N, D)
        tl.store(lse_row + rows, (m_i + tl.log2(l_i)) * LN2, mask=rows < N)


@triton.jit
def _bwd_kernel(
    Q, K, V, O, DO, LSE, DELTA, DQ, DKV, QP,
    sq_b, sq_n, sq_h, sq_d, sk_b, sk_m, sk_h, sk_d, sv_b, sv_m, sv_h, sv_d,
    so_b, so_n, so_h, so_d, sdo_b, sdo_n, sdo_h, sdo_d,
    N, M, H, D, scale, qk_scale, partial_stride,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    SINGLE_KV: tl.constexpr, ATOMIC: tl.constexpr, UPCAST: tl.constexpr, BIAS_PARTIALS: tl.constexpr,
):
    """Grid (B*h, P): program (bh, p) handles query blocks p, p + P, ... of one (batch, head).

    Writes DQ (B, N, h, d) contiguous and its dK/dV sums into DKV (num_partials, B, M, 2, h, d) fp32
    at partial p (partial_stride = 0 when ATOMIC: all programs add into one). With SINGLE_KV, K and V stay
    loaded and one pass gives dQ, dK and dV; otherwise a dQ pass (keys inner) is followed by a dK/dV pass
    (query blocks inner): the dQ pass computes delta from the O tiles and writes it to DELTA (B, h, N), which the
    dK/dV pass over the same query blocks reads back (no separate delta launch). With BIAS_PARTIALS, the column sums of the
    program's dQ over all its query blocks go to row b * P + p, columns head * d + c, of QP (B * P, h*d) fp32.
    """
    pid_bh = tl.program_id(0)
    pid_q = tl.program_id(1)
    num_q = tl.num_programs(1)
    b, hh, q_base, k_base, v_base, o_base, do_base, dq_base, lse_row, delta_row = _backward_bases(
        pid_bh, N, H, D, Q, sq_b, sq_h, K, sk_b, sk_h, V, sv_b, sv_h, O, so_b, so_h, DO, sdo_b, sdo_h, DQ, LSE, DELTA)
    dk_base = DKV + pid_q.to(tl.int64) * partial_stride + b * M * 2 * H * D + hh * D
    cols = tl.arange(0, BLOCK_D)
    keys = tl.arange(0, BLOCK_M)
    num_qb = tl.cdiv(N, BLOCK_N)
    dq_sum = tl.zeros([BLOCK_D], dtype=tl.float32)
    if SINGLE_KV:
        k = _load_tile(k_base, keys, cols, sk_m, sk_d, M, D, UPCAST)
        v = _load_tile(v_base, keys, cols, sv_m, sv_d, M, D, UPCAST)
        dk = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for qb in range(pid_q, num_qb, num_q):
            rows = qb * BLOCK_N + tl.arange(0, BLOCK_N)
            q, do, lse2, delta = _load_query_rows(q_base, sq_n, sq_d, do_base, sdo_n, sdo_d, o_base, so_n, so_d,
                                                  lse_row, delta_row, rows, cols, N, D, True, UPCAST)
            p, ds = _probs_and_dscores(q, k, v, do, lse2, delta, keys < M, qk_scale)
            dv = tl.dot(tl.trans(p.to(do.dtype)), do, dv, input_precision="ieee")
            dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk, input_precision="ieee")
            dq = tl.dot(ds.to(k.dtype), k, input_precision="ieee") * scale
            _store_tile(dq_base, dq, rows, cols, H * D, N, D)
            dq_sum += tl.sum(dq, 0)  # padded query rows are zeros
        _store_dkv(dk_base, H * D, dk * scale, dv, keys, cols, 2 * H * D, M, D, ATOMIC)
    else:
        for qb in range(pid_q, num_qb, num_q):
            rows = qb * BLOCK_N + tl.arange(0, BLOCK_N)
            q, do, lse2, delta = _load_query_rows(q_base, sq_n, sq_d, do_base, sdo_n, sdo_d, o_base, so_n, so_d,
                                                  lse_row, delta_row, rows, cols, N, D, True, UPCAST)
            tl.store(delta_row + rows, delta, mask=rows < N)  # for this program's dK/dV pass over the same rows
            dq = _dq_over_keys(q, do, lse2, delta, k_base, sk_m, sk_d, v_base, sv_m, sv_d, keys, cols, M, D, qk_scale,
                               BLOCK_N, BLOCK_M, BLOCK_D, UPCAST) * scale
            _store_tile(dq_base, dq, rows, cols, H * D, N, D)
            dq_sum += tl.sum(dq, 0)
        tl.debug_barrier()  # the block's delta stores are visible to all its threads before they read them back
        for start_m in range(0, M, BLOCK_M):
            k = _load_tile(k_base, start_m + keys, cols, sk_m, sk_d, M, D, UPCAST)
            v = _load_tile(v_base, start_m + keys, cols, sv_m, sv_d, M, D, UPCAST)
            dk, dv = _dkdv_over_queries(k, v, start_m + keys < M, q_base, sq_n, sq_d, do_base, sdo_n, sdo_d, lse_row,
                                        delta_row, cols, pid_q, num_qb, num_q, N, D, qk_scale,
                                        BLOCK_N, BLOCK_M, BLOCK_D, UPCAST)
            _store_dkv(dk_base, H * D, dk * scale, dv, start_m + keys, cols, 2 * H * D, M, D, ATOMIC)
    if BIAS_PARTIALS:
        tl.store(QP + (b * num_q + pid_q) * H * D + hh * D + cols, dq_sum, mask=cols < D)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, O, DO, LSE, DELTA, DQ, QP,
    sq_b, sq_n, sq_h, sq_d, sk_b, sk_m, sk_h, sk_d, sv_b, sv_m, sv_h, sv_d,
    so_b, so_n, so_h, so_d, sdo_b, sdo_n, sdo_h, sdo_d,
    N, M, H, D, scale, qk_scale,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
    BIAS_PARTIALS: tl.constexpr,
):
    """Key-parallel backward, first kernel. Grid (B*h, P): program (bh, p) handles query blocks p, p + P, ...

    Computes delta = rowsum(dO * O) from the tiles it loads (writing DELTA (B, h, N) fp32 for the dK/dV kernel)
    and writes DQ (B, N, h, d) contiguous, looping over all keys; with BIAS_PARTIALS also QP as ``_bwd_kernel``
    (row b * P + p: the sums over the program's query blocks).
    """
    pid_bh = tl.program_id(0)
    b, hh, q_base, k_base, v_base, o_base, do_base, dq_base, lse_row, delta_row = _backward_bases(
        pid_bh, N, H, D, Q, sq_b, sq_h, K, sk_b, sk_h, V, sv_b, sv_h, O, so_b, so_h, DO, sdo_b, sdo_h, DQ, LSE, DELTA)
    cols = tl.arange(0, BLOCK_D)
    keys = tl.arange(0, BLOCK_M)
    dq_sum = tl.zeros([BLOCK_D], dtype=tl.float32)
    for qb in range(tl.program_id(1), tl.cdiv(N, BLOCK_N), tl.num_programs(1)):
        rows = qb * BLOCK_N + tl.arange(0, BLOCK_N)
        q, do, lse2, delta = _load_query_rows(q_base, sq_n, sq_d, do_base, sdo_n, sdo_d, o_base, so_n, so_d,
                                              lse_row, delta_row, rows, cols, N, D, True, UPCAST)
        tl.store(delta_row + rows, delta, mask=rows < N)
        dq = _dq_over_keys(q, do, lse2, delta, k_base, sk_m, sk_d, v_base, sv_m, sv_d, keys, cols, M, D, qk_scale,
                           BLOCK_N, BLOCK_M, BLOCK_D, UPCAST) * scale
        _store_tile(dq_base, dq, rows, cols, H * D, N, D)
        dq_sum += tl.sum(dq, 0)  # padded query rows are zeros
    if BIAS_PARTIALS:
        row = b * tl.num_programs(1) + tl.program_id(1)
        tl.store(QP + row * H * D + hh * D + cols, dq_sum, mask=cols < D)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DKV, KVP,
    sq_b, sq_n, sq_h, sq_d, sk_b, sk_m, sk_h, sk_d, sv_b, sv_m, sv_h, sv_d,
    sdo_b, sdo_n, sdo_h, sdo_d,
    N, M, H, D, scale, qk_scale,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
    BIAS_PARTIALS: tl.constexpr,
):
    """Key-parallel backward, second kernel. Grid (B*h, cdiv(M, BLOCK_M)): program (bh, kb) owns key block kb
    and sums its dK, dV over every query, in order, straight into DKV (B, M, 2, h, d) contiguous in its dtype
    (no partials); delta comes from DELTA (B, h, N) written by ``_bwd_dq_kernel``. With BIAS_PARTIALS, the key
    block's dK and dV column sums go to row b * cdiv(M, BLOCK_M) + kb, columns head * d + c and h*d + head * d + c,
    of KVP (B * cdiv(M, BLOCK_M), 2*h*d) fp32.
    """
    pid_bh = tl.program_id(0)
    b = (pid_bh // H).to(tl.int64)
    hh = (pid_bh % H).to(tl.int64)
    q_base = Q + b * sq_b + hh * sq_h
    do_base = DO + b * sdo_b + hh * sdo_h
    lse_row = LSE + pid_bh.to(tl.int64) * N
    delta_row = DELTA + pid_bh.to(tl.int64) * N
    cols = tl.arange(0, BLOCK_D)
    keys = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    k = _load_tile(K + b * sk_b + hh * sk_h, keys, cols, sk_m, sk_d, M, D, UPCAST)
    v = _load_tile(V + b * sv_b + hh * sv_h, keys, cols, sv_m, sv_d, M, D, UPCAST)
    dk, dv = _dkdv_over_queries(k, v, keys < M, q_base, sq_n, sq_d, do_base, sdo_n, sdo_d, lse_row, delta_row, cols,
                                0, tl.cdiv(N, BLOCK_N), 1, N, D, qk_scale, BLOCK_N, BLOCK_M, BLOCK_D, UPCAST)
    dkv_base = DKV + b * M * 2 * H * D + hh * D
    kvp_base = KVP + (b * tl.num_programs(1) + tl.program_id(1)) * 2 * H * D + hh * D
    _store_tile_and_sums(dkv_base, kvp_base, dk * scale, keys, cols, 2 * H * D, M, D, BIAS_PARTIALS)
    _store_tile_and_sums(dkv_base + H * D, kvp_base + H * D, dv, keys, cols, 2 * H * D, M, D, BIAS_PARTIALS)


@triton.jit
def _sum_partials_kernel(PART, DKV, KVP, num_partials, R, C, partial_stride,
                         BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BIAS_PARTIALS: tl.constexpr):
    """Grid (cdiv(R, BLOCK_R), cdiv(C, BLOCK_C)): DKV (R, C) = sum over p, in order, of PART (num_partials, R, C)
    fp32, cast to DKV's dtype (R = B*M rows, C = 2*h*d columns). With BIAS_PARTIALS, row tile i's column sums go
    to row i of KVP (cdiv(R, BLOCK_R), C) fp32."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ptrs = PART + rows.to(tl.int64)[:, None] * C + cols[None, :]
    mask = (rows[:, None] < R) & (cols[None, :] < C)
    dkv = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for _ in range(num_partials):
        dkv += tl.load(ptrs, mask=mask, other=0.0)
        ptrs += partial_stride
    _store_tile_and_sums(DKV, KVP + tl.program_id(0).to(tl.int64) * C, dkv, rows, cols, C, R, C, BIAS_PARTIALS)


# ----------------------------------------------------------------------------------------------
# Launch heuristics and host wrappers
# ----------------------------------------------------------------------------------------------


class _Plan(NamedTuple):
    """Launch parameters of one forward or backward call."""

    block_n: int  # query rows per block
    block_m: int  # keys per block
    block_d: int  # head_dim padded to a power of two >= 16
    single_kv: bool  # all M keys in one block, loaded once per program
    num_programs: int  # programs per (batch, head), each striding over query blocks
    num_warps: int
    num_stages: int
    key_parallel: bool = False  # backward: dQ by query blocks, then dK/dV by key blocks (no partials)


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 for the CPU interpreter."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=None)
def _capability(device: torch.device) -> tuple[int, int] | None:
    """(major, minor) compute capability of a CUDA device; None for the CPU interpreter."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_capability(device)


@functools.lru_cache(maxsize=1024)
def _plan(N: int, M: int, d: int, batch_heads: int, dtype: torch.dtype, device: torch.device, *,
          backward: bool) -> _Plan:
    """Per-shape launch heuristic for sm_80 and sm_90 (no autotuning).

    Chosen by compiling for both targets: fp16/bf16 plans spill at most a few hundred bytes.
    """
    block_d = max(16, next_power_of_2(d))
    if dtype == torch.float32:
        # fp32 dots (input_precision="ieee") run on FMA units, which hold whole operand tiles in
        # registers: small tiles, and K/V are re-read per query block unless M is tiny.
        kv_max = 16 if backward and block_d > 64 else 32
        block_m = max(16, next_power_of_2(M)) if M <= kv_max else kv_max
        block_n = 16 if backward else 32
        num_warps, num_stages = 8, 2
    else:
        # Longest key set kept whole on chip: K and V (and, backward, the fp32 dK/dV accumulators).
        kv_max = (128 if backward else 256) * 64 // max(block_d, 64)
        # Longer key sets loop over 64-key blocks: 128-key blocks spilled 32-96 bytes per thread on sm_90
        # (M = 1024 at d = 64, M = 256 at d = 128; tests/gpu_compile.py), 64 none. Not yet timed on a GPU.
        block_m = max(16, next_power_of_2(M)) if M <= kv_max else 64
        # Measured on an H200 (benchmarks/sweep_attention.py, d = 64, M = 256): 64-row query blocks
        # and 4 warps beat 8 warps by 1.5-2x in both passes. head_dim > 64 needs 8 warps not to spill.
        # A padded head_dim (e.g. 40 in 64 columns: its loads are not provably 16-byte aligned, so they are
        # scalar) spilled 250-560 bytes per thread in the backward with 64-row blocks on Triton 3.6, 0-8 with 32.
        block_n = 32 if backward and (block_m * block_d > 64 * 64 or block_d != d) else 64
        if not backward and block_m * block_d > 128 * 64 and (_capability(device) or (9, 0))[0] < 9:
            # Before Hopper, 64 query rows against 256 whole keys (d = 64) spilled 8 bytes per thread; 32 rows do
            # not (tests/gpu_compile.py --pvt). Hopper keeps 64 rows: wgmma needs them.
            block_n = 32
        num_warps = 8 if block_d > 64 else 4
        # CUDA-graph timed on an H200: 2 stages beat 3 by 15% with one 64-key block (M = 49), 3 won at M = 256.
        num_stages = 3 if block_m >= 128 else 2
    if backward:
        # Triton 3.6 on an H200: software-pipelining the backward's query loop (num_stages 2) gave
        # dK relative errors of 1e-2 to 1 at head_dim 128 (M = 100, key loop), for every block
        # size and warp count tried, with atomics or partials; num_stages 1 was right in all of them.
        num_stages = 1
    # Several programs per SM hide latency. Backward: each program owns one dK/dV partial (fp32,
    # B*M*h*d*2 each), so the partials stay bounded by about four per SM.
    per_sm = 4
    num_sms = _num_sms(device)
    num_programs = max(1, min(cdiv(N, block_n), cdiv(per_sm * num_sms, batch_heads)))
    # Keys looped (M > kv_max): when the key blocks of all (batch, head)s alone fill the GPU (N ~ M, e.g. every
    # 512 px stage but the first), one program per key block sums dK/dV over all queries, and no fp32 partials
    # (~70 MB per call at 512 px) are written and re-read. Chosen by this count, not yet timed on a GPU.
    key_blocks = cdiv(M, block_m)
    key_parallel = backward and M > kv_max and batch_heads * key_blocks >= num_sms and key_blocks <= GRID_Y_MAX
    return _Plan(block_n, block_m, block_d, M <= kv_max, num_programs, num_warps, num_stages, key_parallel)


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocation of every buffer the kernels fully overwrite (tests poison it to prove that)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _check_launchable(q: torch.Tensor) -> None:
    """Raise before launching what these kernels cannot run (dtype, head_dim, device)."""
    if q.dtype not in KERNEL_DTYPES:
        raise ValueError(f"the Triton attention kernels take float16, bfloat16 or float32, got {q.dtype}")
    if q.shape[-1] > KERNEL_MAX_HEAD_DIM:
        raise ValueError(f"the Triton attention kernels take head_dim <= {KERNEL_MAX_HEAD_DIM}, got {q.shape[-1]}")
    if q.device.type != "cuda" and not INTERPRETED:
        raise RuntimeError(f"the Triton attention kernels need CUDA tensors (or TRITON_INTERPRET=1), got {q.device}")


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scale) v per head.

    Args:
        q: (B, N, h, d) fp16/bf16/fp32, any strides.
        k, v: (B, M, h, d), M >= 1, q's dtype and device, any strides.
        scale: softmax scale.

    Returns:
        o (B, N, h, d) contiguous in q.dtype, and lse (B, h, N) fp32, the natural log-sum-exp of
        each row of the scaled scores.
    """
    B, N, H, D = q.shape
    M = k.shape[1]
    o = _empty((B, N, H, D), q.dtype, q.device)
    lse = _empty((B, H, N), torch.float32, q.device)
    if B * N * H == 0:
        return o, lse
    _check_launchable(q)
    plan = _plan(N, M, D, B * H, q.dtype, q.device, backward=False)
    _fwd_kernel[(B * H, plan.num_programs)](
        q, k, v, o, lse, *q.stride(), *k.stride(), *v.stride(), N, M, H, D, scale * LOG2E.value,
        BLOCK_N=plan.block_n, BLOCK_M=plan.block_m, BLOCK_D=plan.block_d, SINGLE_KV=plan.single_kv,
        UPCAST=INTERPRETED, num_warps=plan.num_warps, num_stages=plan.num_stages,
    )
    return o, lse


def attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                       lse: torch.Tensor, scale: float, deterministic: bool = True, bias_partials: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`attention_forward`, and on request partial column sums of them for bias gradients.

    Args:
        do: (B, N, h, d) gradient of o, q's dtype, any strides.
        q, k, v, scale: the forward's inputs; o (B, N, h, d) and lse (B, h, N) its outputs.
        deterministic: reduce the per-program dK/dV partials in a fixed order (bit-reproducible);
            False adds them with fp32 atomics instead (less memory, order-dependent rounding).
        bias_partials: also write the fp32 partial column sums q_part and kv_part.

    Returns:
        dq (B, N, h, d) and dkv (B, M, 2, h, d), contiguous in q.dtype: dk = dkv[:, :, 0], dv = dkv[:, :, 1], so
        that dkv.view(B*M, 2*h*d) is the gradient of the kv = x @ W_kv^T projection. q_part (Pq, h*d) and kv_part
        (Pk, 2*h*d) fp32, whose rows sum to dq.view(-1, h*d).sum(0) and dkv.view(-1, 2*h*d).sum(0) of the fp32
        values before their rounding to q.dtype (bias gradients of the q and kv projections). Row b * P + p of
        q_part sums the query blocks program p of batch b's heads handled: Pq = B * P (P programs per head). Row i of
        kv_part sums rows [i * BLOCK_R, (i + 1) * BLOCK_R) of dkv.view(B*M, 2*h*d), BLOCK_R = 4096 //
        min(128, next_power_of_2(2*h*d)): Pk = cdiv(B*M, BLOCK_R); key-parallel, row b * cdiv(M, BLOCK_M) + j sums
        key block j of batch b: Pk = B * cdiv(M, BLOCK_M). Without bias_partials, or when B*N*h*d = 0, both have
        no rows.
    """
    B, N, H, D = q.shape
    M = k.shape[1]
    if B * N * H * D == 0:
        return (q.new_zeros(q.shape), k.new_zeros((B, M, 2, H, D)), _bias_partials(0, H * D, False, q.device),
                _bias_partials(0, 2 * H * D, False, q.device))
    _check_launchable(q)
    lse = lse.contiguous()
    plan = _plan(N, M, D, B * H, q.dtype, q.device, backward=True)
    q_rows, kv_rows = _partial_rows(plan, B, N, M, H, D)
    dq = _empty((B, N, H, D), q.dtype, q.device)
    dkv = _empty((B, M, 2, H, D), q.dtype, q.device)
    q_part = _bias_partials(q_rows, H * D, bias_partials, q.device)
    kv_part = _bias_partials(kv_rows, 2 * H * D, bias_partials, q.device)
    if plan.key_parallel:
        _key_parallel_backward(do, q, k, v, o, lse, dq, dkv, q_part, kv_part, scale, plan, bias_partials)
        return dq, dkv, q_part, kv_part
    if deterministic:
        partials = _empty((plan.num_programs, B, M, 2, H, D), torch.float32, q.device)
    else:
        partials = torch.zeros((1, B, M, 2, H, D), dtype=torch.float32, device=q.device)
    # one key block: delta stays in registers; looped keys: the dQ pass writes it for the dK/dV pass
    delta = lse if plan.single_kv else _empty((B, H, N), torch.float32, q.device)
    _bwd_kernel[(B * H, plan.num_programs)](
        q, k, v, o, do, lse, delta, dq, partials, q_part,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(), *do.stride(),
        N, M, H, D, scale, scale * LOG2E.value, partials.stride(0) if deterministic else 0,
        BLOCK_N=plan.block_n, BLOCK_M=plan.block_m, BLOCK_D=plan.block_d, SINGLE_KV=plan.single_kv,
        ATOMIC=not deterministic, UPCAST=INTERPRETED, BIAS_PARTIALS=bias_partials,
        num_warps=plan.num_warps, num_stages=plan.num_stages,
    )
    block_r, block_c = _sum_blocks(2 * H * D)
    _sum_partials_kernel[(cdiv(B * M, block_r), cdiv(2 * H * D, block_c))](
        partials, dkv, kv_part, partials.shape[0], B * M, 2 * H * D, partials.stride(0),
        BLOCK_R=block_r, BLOCK_C=block_c, BIAS_PARTIALS=bias_partials, num_warps=4,
    )
    return dq, dkv, q_part, kv_part


def _sum_blocks(C: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_C) of ``_sum_partials_kernel`` over C = 2*h*d columns: 4096-element fp32 tiles."""
    block_c = min(128, next_power_of_2(C))
    return 4096 // block_c, block_c


def _partial_rows(plan: _Plan, B: int, N: int, M: int, H: int, D: int) -> tuple[int, int]:
    """(Pq, Pk): rows of :func:`attention_backward`'s q and kv bias partials under ``plan``."""
    kv_rows = B * cdiv(M, plan.block_m) if plan.key_parallel else cdiv(B * M, _sum_blocks(2 * H * D)[0])
    return B * plan.num_programs, kv_rows


def _bias_partials(rows: int, cols: int, wanted: bool, device: torch.device) -> torch.Tensor:
    """(rows, cols) fp32 bias-gradient partials, which the kernels fully write; (0, cols) unless ``wanted``."""
    return _empty((rows if wanted else 0, cols), torch.float32, device)


def _key_parallel_backward(do, q, k, v, o, lse, dq, dkv, q_part, kv_part, scale, plan, bias_partials):
    """:func:`attention_backward` by two kernels: dQ (and delta) by query blocks, then dK, dV by key blocks."""
    B, N, H, D = q.shape
    M = k.shape[1]
    delta = _empty((B, H, N), torch.float32, q.device)
    common = dict(BLOCK_N=plan.block_n, BLOCK_M=plan.block_m, BLOCK_D=plan.block_d, UPCAST=INTERPRETED,
                  BIAS_PARTIALS=bias_partials, num_warps=plan.num_warps, num_stages=plan.num_stages)
    _bwd_dq_kernel[(B * H, plan.num_programs)](
        q, k, v, o, do, lse, delta, dq, q_part,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(), *do.stride(),
        N, M, H, D, scale, scale * LOG2E.value, **common,
    )
    _bwd_dkdv_kernel[(B * H, cdiv(M, plan.block_m))](
        q, k, v, do, lse, delta, dkv, kv_part,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(),
        N, M, H, D, scale, scale * LOG2E.value, **common,
    )


# ----------------------------------------------------------------------------------------------
# torch.library op: reduced_kv_attention
# ----------------------------------------------------------------------------------------------


def _to_bhsd(shape):
    """(B, L, h, d) -> (B, h, L, d), the layout torch's SDPA FLOP formulas expect."""
    B, L, h, d = shape
    return (B, h, L, d)


def _attention_backward_fake(grad_o, q, k, v, o, lse, scale, deterministic=True, bias_partials=False):
    """Meta outputs of :func:`attention_backward`. The partials' rows come from the launch plan at concrete sizes;
    at symbolic ones they are new dynamic sizes (only the finishing sum reads them), so nothing guards on the
    sizes and a dynamic-shape graph stays dynamic."""
    B, N, H, D = q.shape
    M = k.shape[1]
    rows = (0, 0)
    if bias_partials:
        rows = fake_rows(lambda B, N, M, H, D: _partial_rows(_plan(N, M, D, B * H, q.dtype, q.device, backward=True),
                                                             B, N, M, H, D) if B * N * H * D else (0, 0),
                         B, N, M, H, D, count=2)
    return (q.new_empty(q.shape), q.new_empty((B, M, 2, H, D)), q.new_empty((rows[0], H * D), dtype=torch.float32),
            q.new_empty((rows[1], 2 * H * D), dtype=torch.float32))


reduced_kv_attention_backward_op, reduced_kv_attention_backward = register(
    "reduced_kv_attention_backward", attention_backward, fake=_attention_backward_fake,
    flops=lambda grad_o_shape, q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs: sdpa_backward_flop_count(
        _to_bhsd(grad_o_shape), _to_bhsd(q_shape), _to_bhsd(k_shape), _to_bhsd(v_shape)))
"""reduced_kv_attention_backward(grad_o, q, k, v, o, lse, scale, deterministic, bias_partials) -> (dq, dkv, q_part,
kv_part): the op of :func:`attention_backward`, also the backward of the fused-projection ops
(:mod:`.projected_attention`)."""


def _attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, deterministic: bool
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`attention_forward`; ``deterministic`` is its backward's (an op argument, so that a traced graph
    records it)."""
    return attention_forward(q, k, v, scale)


def _attention_setup_context(ctx, inputs, output):
    q, k, v, scale, deterministic = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.scale, ctx.deterministic = scale, deterministic
    ctx.mark_non_differentiable(lse)


def _attention_autograd(ctx, grad_o, _grad_lse):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dkv, _, _ = reduced_kv_attention_backward(grad_o, q, k, v, o, lse, ctx.scale, ctx.deterministic)
    return dq, dkv[:, :, 0], dkv[:, :, 1], None, None


reduced_kv_attention_op, reduced_kv_attention = register(
    "reduced_kv_attention", _attention_forward,
    fake=lambda q, k, v, scale, deterministic: (q.new_empty(q.shape),
                                                q.new_empty(q.shape[:1] + q.shape[2:3] + q.shape[1:2],
                                                            dtype=torch.float32)),
    flops=lambda q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs: sdpa_flop_count(
        _to_bhsd(q_shape), _to_bhsd(k_shape), _to_bhsd(v_shape)),
    setup_context=_attention_setup_context, backward=_attention_autograd)
"""reduced_kv_attention(q, k, v, scale, deterministic) -> (o, lse) of :func:`attention_forward`, differentiable
in q, k and v."""
