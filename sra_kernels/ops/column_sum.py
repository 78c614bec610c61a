"""Deterministic column sums on the GPU: the bias and norm-parameter gradients (rows = tokens, up to B*N).

torch's column sum of a tall (B*N, C) gradient with C = 64-512 (``reduce_kernel``) measured ~75 us at
pvt_v2_b2's 512x512 stage 1 on an H200 (B*N = 262144, C = 64: 33.5 MB, a ~8 us read), once per bias
gradient. Here fp32 partial column sums (rows of partials, each the sum of a block of rows) come from a
partials kernel or from the kernels that hold the data anyway (the attention backward's dq and dkv, the
LayerNorm backward's), and one more launch adds every set of them in a fixed order into its gradient: up to
six gradients per launch, bit-identical reruns, no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .interpreter import rounded_cast
from .launch import cdiv, next_power_of_2
from .registration import fake_rows, register

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
def _finish_group(part_ptr, out_ptr, rows, C, BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    """out (C,) in its dtype = part (rows, C) fp32 summed over rows in a fixed order: this program's columns."""
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for r0 in range(0, rows, BLOCK_ROWS):
        r = r0 + tl.arange(0, BLOCK_ROWS)
        acc += tl.sum(tl.load(part_ptr + r.to(tl.int64)[:, None] * C + c[None, :],
                              mask=(r < rows)[:, None] & c_mask[None, :], other=0.0), axis=0)
    tl.store(out_ptr + c, rounded_cast(acc, out_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def _finish_column_sums_kernel(p0, o0, r0, c0, p1, o1, r1, c1, p2, o2, r2, c2, p3, o3, r3, c3, p4, o4, r4, c4,
                               p5, o5, r5, c5, BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    """Up to six groups g: o_g (c_g,) = p_g (r_g, c_g) fp32 summed over its rows; program (g, column block)."""
    g = tl.program_id(0)
    if g == 0:
        _finish_group(p0, o0, r0, c0, BLOCK_ROWS, BLOCK_C)
    elif g == 1:
        _finish_group(p1, o1, r1, c1, BLOCK_ROWS, BLOCK_C)
    elif g == 2:
        _finish_group(p2, o2, r2, c2, BLOCK_ROWS, BLOCK_C)
    elif g == 3:
        _finish_group(p3, o3, r3, c3, BLOCK_ROWS, BLOCK_C)
    elif g == 4:
        _finish_group(p4, o4, r4, c4, BLOCK_ROWS, BLOCK_C)
    else:
        _finish_group(p5, o5, r5, c5, BLOCK_ROWS, BLOCK_C)


MAX_GROUPS = 6
"""Partial sets one :func:`finish_column_sums` launch finishes: the out, q and kv biases and the reduction's
norm weight, norm bias and conv bias."""


def _column_block(C: int) -> int:
    return min(128, max(16, next_power_of_2(C)))


def finish_column_sums(parts: list[torch.Tensor], outs: list[torch.Tensor]) -> None:
    """outs[g] (C_g,) = parts[g] (rows_g, C_g) fp32, contiguous, summed over its rows in a fixed order, for up
    to :data:`MAX_GROUPS` groups in one launch."""
    if len(parts) != len(outs) or not 1 <= len(parts) <= MAX_GROUPS:
        raise ValueError(f"{len(parts)} partial sets for {len(outs)} outputs (1 to {MAX_GROUPS} of each)")
    args = []
    for part, out in zip(parts, outs):
        rows, C = part.shape
        if out.shape != (C,) or part.dtype != torch.float32 or not part.is_contiguous():
            raise ValueError(f"partials {tuple(part.shape)} {part.dtype} cannot finish into {tuple(out.shape)}")
        args += [part, out, rows, C]
    args += args[:4] * (MAX_GROUPS - len(parts))  # unused slots: never run
    width = max(part.shape[1] for part in parts)
    block_c = _column_block(width)
    _finish_column_sums_kernel[(len(parts), cdiv(width, block_c))](*args, BLOCK_ROWS=32, BLOCK_C=block_c,
                                                                   num_warps=4)


def _partials_grid(R: int, C: int) -> tuple[int, int, int, int]:
    """(rows per program, programs P, BLOCK_R, BLOCK_C) of the partials kernel over x (R, C)."""
    block_r = 64 if C <= 128 else 16
    block_c = _column_block(C)
    rows_per_program = max(block_r, cdiv(cdiv(R, max(1, _TARGET_PROGRAMS // cdiv(C, block_c))), block_r) * block_r)
    return rows_per_program, max(1, cdiv(R, rows_per_program)), block_r, block_c


def _column_partials(x: torch.Tensor) -> torch.Tensor:
    """x (R, C), rows through their stride -> fp32 partial column sums (P, C) (rows of x in P fixed blocks),
    which :func:`finish_column_sums` adds up."""
    R, C = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    rows_per_program, programs, block_r, block_c = _partials_grid(R, C)
    col_blocks = cdiv(C, block_c)
    part = _alloc((programs, C), dtype=torch.float32, device=x.device)
    _column_partials_kernel[(programs, col_blocks)](x, part, R, C, rows_per_program, x.stride(0),
                                                    BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4)
    return part


def _column_sum(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x (R, C) summed over its rows -> (C,) in ``dtype``; fp32 accumulation, deterministic."""
    out = _alloc((x.shape[1],), dtype=dtype, device=x.device)
    finish_column_sums([_column_partials(x)], [out])
    return out


def _finish_column_sums(parts: list[torch.Tensor], like: list[torch.Tensor]) -> list[torch.Tensor]:
    """:func:`finish_column_sums` into new (C_g,) tensors of the dtypes of ``like``."""
    outs = [_alloc((p.shape[1],), dtype=t.dtype, device=p.device) for p, t in zip(parts, like)]
    finish_column_sums(parts, outs)
    return outs


column_sum_op, column_sum = register("column_sum", _column_sum,
                                     fake=lambda x, dtype: x.new_empty((x.shape[1],), dtype=dtype))
"""column_sum(x (R, C), dtype) -> (C,): the deterministic column sum (a bias gradient), traceable."""


finish_column_sums_op, finish_column_sums_call = register(
    "finish_column_sums", _finish_column_sums,
    fake=lambda parts, like: [p.new_empty((p.shape[1],), dtype=t.dtype) for p, t in zip(parts, like)])
"""finish_column_sums(parts [(rows_g, C_g) fp32], like [tensors]) -> [(C_g,) in like[g]'s dtype]: the bias and
norm-parameter gradients of one backward, from their partials, in one launch (traceable)."""


column_partials_op, column_partials = register(
    "column_partials", _column_partials,
    fake=lambda x: x.new_empty((fake_rows(lambda R, C: _partials_grid(R, C)[1], *x.shape), x.shape[1]),
                               dtype=torch.float32))
"""column_partials(x (R, C)) -> (P, C) fp32 partial column sums for :func:`finish_column_sums` (traceable)."""
