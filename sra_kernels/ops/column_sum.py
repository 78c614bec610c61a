"""Deterministic column sums on the GPU: the bias gradients of the projections (rows = tokens, up to B*N).

torch's column sum of a tall (B*N, C) gradient with C = 64-512 (``reduce_kernel``) measured ~75 us at
pvt_v2_b2's 512x512 stage 1 on an H200 (B*N = 262144, C = 64: 33.5 MB, a ~8 us read), once per bias
gradient. Here a grid of programs each sums a block of rows into an fp32 partial, and a second kernel adds
the partials in a fixed order: bit-identical reruns, no atomics. The second kernel also finalises the
spatial reduction's three parameter gradients from its LayerNorm-backward partials (``sum_partials``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .interpreter import rounded_cast
from .launch import cdiv, next_power_of_2
from .registration import register

_TARGET_PROGRAMS = 528
"""Programs the partial sums aim for: 4 waves of an H100 / H200's 132 SMs."""

_alloc = torch.empty
"""Allocator of every kernel-written buffer (tests swap in a NaN-filled one to prove full coverage)."""


@triton.jit
def _column_partials_kernel(x_ptr, part_ptr, R, C, rows_per_program, stride_r,
                            BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """part[pid] (C,) fp32 = the sum of rows [pid * rows_per_program, +rows_per_program) of x (R, C), columns
    contiguous, BLOCK_R rows at a time in order; program (pid, column block)."""
    pid = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    start = pid * rows_per_program
    end = tl.minimum(start + rows_per_program, R)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for r0 in range(start, end, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        v = tl.load(x_ptr + r.to(tl.int64)[:, None] * stride_r + c[None, :], mask=(r < end)[:, None] & c_mask[None, :],
                    other=0.0)
        acc += tl.sum(v.to(tl.float32), axis=0)
    tl.store(part_ptr + pid.to(tl.int64) * C + c, acc, mask=c_mask)


@triton.jit
def _finish_column_sums_kernel(part_ptr, out0_ptr, out1_ptr, out2_ptr, rows, C,
                         BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    """out_i (C,) in its dtype = part[i] (rows, C) fp32 summed over rows in a fixed order (BLOCK_ROWS at a
    time); program (i, column block) writes out_i, i < 3."""
    i = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    part = part_ptr + i.to(tl.int64) * rows * C
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for r0 in range(0, rows, BLOCK_ROWS):
        r = r0 + tl.arange(0, BLOCK_ROWS)
        acc += tl.sum(tl.load(part + r.to(tl.int64)[:, None] * C + c[None, :],
                              mask=(r < rows)[:, None] & c_mask[None, :], other=0.0), axis=0)
    if i == 0:
        tl.store(out0_ptr + c, rounded_cast(acc, out0_ptr.dtype.element_ty), mask=c_mask)
    elif i == 1:
        tl.store(out1_ptr + c, rounded_cast(acc, out1_ptr.dtype.element_ty), mask=c_mask)
    else:
        tl.store(out2_ptr + c, rounded_cast(acc, out2_ptr.dtype.element_ty), mask=c_mask)


def _column_block(C: int) -> int:
    return min(128, max(16, next_power_of_2(C)))


def sum_partials(part: torch.Tensor, *outs: torch.Tensor) -> None:
    """outs[i] (C,) = part[i] (len(outs) <= 3, rows, C) fp32 summed over its rows in a fixed order."""
    G, rows, C = part.shape
    if G != len(outs) or not 1 <= G <= 3:
        raise ValueError(f"part holds {G} partial blocks for {len(outs)} outputs (1 to 3)")
    padded = (*outs, *(outs[0],) * (3 - G))
    block_c = _column_block(C)
    _finish_column_sums_kernel[(G, cdiv(C, block_c))](part, *padded, rows, C, BLOCK_ROWS=32, BLOCK_C=block_c,
                                                num_warps=4)


def _column_sum(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x (R, C) summed over its rows -> (C,) in ``dtype``; fp32 accumulation, deterministic."""
    R, C = x.shape
    out = _alloc((C,), dtype=dtype, device=x.device)
    if x.stride(1) != 1:
        x = x.contiguous()
    block_r = 64 if C <= 128 else 16
    block_c = _column_block(C)
    col_blocks = cdiv(C, block_c)
    rows_per_program = max(block_r, cdiv(cdiv(R, max(1, _TARGET_PROGRAMS // col_blocks)), block_r) * block_r)
    programs = max(1, cdiv(R, rows_per_program))
    part = _alloc((1, programs, C), dtype=torch.float32, device=x.device)
    _column_partials_kernel[(programs, col_blocks)](x, part, R, C, rows_per_program, x.stride(0),
                                                    BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4)
    sum_partials(part, out)
    return out


column_sum_op, column_sum = register("column_sum", _column_sum,
                                     fake=lambda x, dtype: x.new_empty((x.shape[1],), dtype=dtype))
"""column_sum(x (R, C), dtype) -> (C,): the deterministic column sum (a bias gradient), traceable."""
