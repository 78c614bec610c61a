"""Fusion step 2/3 forward: the q projection in the attention's prologue, the out projection in its epilogue.

One program holds a block of query tokens with all their channels (C <= 128): it reads x (B, N, C)
once, computes each head's q = x W_q^T + b_q on chip, runs the short-KV online softmax against that
head's k, v (B, M, h, d) (column slices, read in place), multiplies the head's output by its slice
of W_proj and accumulates, then adds b_proj and writes out (B, N, C). q and the attention output are
rounded to x's dtype on chip, as the unfused path rounds its Linear outputs. When gradients are
needed it also writes q and o (B, N, C) and the log-sum-exp (B, h, N) fp32, and the backward is the
step-1 attention backward plus cuBLAS projections (:mod:`sra_kernels.library`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .attention import LN2, LOG2E, _attend_key_blocks, _load_tile, _num_sms, _store_tile
from .interpreter import INTERPRETED, rounded_cast
from .launch import cdiv, next_power_of_2

MAX_CHANNELS = 128
"""Widest x this kernel takes: one program keeps a (BLOCK_N, C) block of x and of the output on chip."""
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FAST_DTYPES = (torch.float16, torch.bfloat16)
"""Where the fused path pays: fp32 dots run on FMA units and these tiles spill (tests/gpu_compile.py)."""

_empty = torch.empty
"""Allocator of every kernel-written buffer (tests swap in a NaN-filled one to prove full coverage)."""


@triton.jit
def _projected_fwd_kernel(
    X, WQ, BQ, K, V, WP, BP, OUT, Q, O, LSE,
    sx_b, sx_n, sx_c, sk_b, sk_m, sk_h, sk_d, sv_b, sv_m, sv_h, sv_d,
    N, M, C, D, qk_scale,
    H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
    SAVE: tl.constexpr, UPCAST: tl.constexpr,
):
    """Grid (B, P): program (b, p) handles query blocks p, p + P, ... of image b, every head.

    WQ, WP (C, C) and BQ, BP (C,) contiguous. Writes OUT (B, N, C); with SAVE also Q and O (B, N, C) and
    LSE (B, H, N), all contiguous.
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
            w_q = _load_tile(WQ + hh * D * C, cols, channels, C, 1, D, C, UPCAST)  # rows hh*D + d of W_q
            b_q = tl.load(BQ + hh * D + cols, mask=cols < D, other=0.0).to(tl.float32)
            q = rounded_cast(tl.dot(x, tl.trans(w_q), input_precision="ieee") + b_q[None, :], dtype)
            if UPCAST:
                q = q.to(tl.float32)
            m_i, l_i, acc = _attend_key_blocks(q, K + b * sk_b + hh * sk_h, sk_m, sk_d, V + b * sv_b + hh * sv_h,
                                               sv_m, sv_d, keys, cols, M, D, qk_scale,
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
def _plan(B: int, N: int, M: int, C: int, d: int, device: torch.device) -> _Plan:
    """64 query rows with all C <= 128 channels per program; keys in blocks of up to 64; a few programs per SM.

    Not yet tuned on a GPU (see benchmarks/results): sized to stay within the registers of 4 / 8 warps.
    """
    block_c = max(16, next_power_of_2(C))
    block_n = 64
    num_programs = max(1, min(cdiv(N, block_n), cdiv(4 * _num_sms(device), B)))
    return _Plan(block_n, max(16, min(64, next_power_of_2(M))), max(16, next_power_of_2(d)), block_c,
                 num_programs, 4 if block_c <= 64 else 8)


def applies(channels: int, dtype: torch.dtype) -> bool:
    """Whether the backend should take the fused path for x of this width and dtype (16-bit, C <= 128)."""
    return channels <= MAX_CHANNELS and dtype in FAST_DTYPES


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
    B, N, C = x.shape
    _, M, H, D = k.shape
    if C > MAX_CHANNELS or x.dtype not in DTYPES:
        raise ValueError(f"projected attention takes C <= {MAX_CHANNELS} in fp16/bf16/fp32, got C={C} {x.dtype}")
    if x.device.type == "cpu" and not INTERPRETED:
        raise RuntimeError(f"the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1), got {x.device}")
    out = _empty((B, N, C), dtype=x.dtype, device=x.device)
    q, o = (_empty((B, N, C) if save else (0,), dtype=x.dtype, device=x.device) for _ in range(2))
    lse = _empty((B, H, N) if save else (0,), dtype=torch.float32, device=x.device)
    if out.numel() == 0:
        return out, q, o, lse
    plan = _plan(B, N, M, C, D, x.device)
    _projected_fwd_kernel[(B, plan.num_programs)](
        x, q_weight.contiguous(), q_bias.contiguous(), k, v, proj_weight.contiguous(), proj_bias.contiguous(),
        out, q, o, lse, *x.stride(), *k.stride(), *v.stride(), N, M, C, D, scale * LOG2E.value,
        H=H, BLOCK_N=plan.block_n, BLOCK_M=plan.block_m, BLOCK_D=plan.block_d, BLOCK_C=plan.block_c,
        SAVE=save, UPCAST=INTERPRETED, num_warps=plan.num_warps, num_stages=2,
    )
    return out, q, o, lse
