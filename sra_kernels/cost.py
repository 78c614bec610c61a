"""Analytic FLOPs and minimal memory traffic of the SRA op and its fused parts: the roofline's two numbers.

Shapes: x (B, N, C) with N = H*W (+1 for PVT v1's cls token), h heads of d = C/h channels, M reduced
tokens (M = (H//sr)*(W//sr) for sr > 1, 49 in linear mode, N for sr = 1). ``e`` is the element size
of the dtype; weights have x's dtype (the op requires it); saved statistics (LayerNorm mean/rstd,
softmax log-sum-exp) are fp32.

FLOPs
    Matrix products and convolutions only, a multiply-add counted as 2 -- the convention of
    ``torch.utils.flop_counter.FlopCounterMode`` and of its SDPA formulas. Element-wise work (biases,
    LayerNorm, softmax, GELU, pooling) is left out: it is O(B*N*C + B*h*N*M) against
    O(B*N*C^2 + B*N*M*C) for the products, and it is not what a matmul ceiling measures.

    * Linear / conv-as-GEMM (rows x K) @ (K x Nout): forward 2*rows*K*Nout; backward twice that
      (input gradient and weight gradient).
    * Attention: forward 4*B*h*N*M*d (q k^T and P v). Backward: 10*B*h*N*M*d for the fused kernel,
      which recomputes q k^T -- exactly what torch registers for SDPA's backward
      (``sdpa_backward_flop_count``: five batched products); 8*B*h*N*M*d for the eager reference,
      which keeps P and so does four.

Bytes (HBM traffic)
    * ``fused`` -- the fully fused ideal: forward reads x twice (once for the queries, once for the
      reduction; for sr > 1 the second read covers the conv patches only) and every weight once,
      writes the reduced K/V once and reads it once (the one intermediate that must cross between
      the reduction and the attention: every query needs all keys), and writes the output once.
      Training's forward also writes what backward needs: the attention output before ``proj``
      (B, N, C), the log-sum-exp (B, h, N) fp32 and, when reducing, the conv output (B, M, C) and
      its LayerNorm mean/rstd (+ the pooled tokens (B, 49, C) in linear mode). Backward reads dY,
      those saved tensors, x twice and the weights once, writes and re-reads dK/dV (B, M, 2C) once,
      writes every weight gradient once and dx once, plus one more read and write of dx where the
      reduction path adds its part to the query path's. It is a floor for programs that do not
      recompute: the ``projected`` path's one-kernel case (sr = 1 over <= 64 tokens, one block per
      image) goes below it, since its k and v never leave the chip and x is read once.
    * ``unfused`` -- the eager PyTorch sequence of the reference backend (:mod:`sra_kernels.reference`):
      each op reads its inputs and writes its output once, including the materialised (B, h, N, M)
      score matrix three times over (q k^T, the scale, the softmax). Layout copies (head splits and
      merges, transposes) are not counted, so this is a lower bound of the eager traffic.
      ``SRACost.unfused_ops`` lists it op by op.
    * ``triton`` -- what the ``triton`` backend moves today (fusion step 1, :mod:`sra_kernels.fused`):
      the q / kv / out projections as cuBLAS GEMMs around the fused reduction and attention kernels,
      each launch reading its inputs and writing its outputs once. The reduction kernel writes its
      conv output and LayerNorm statistics and the attention its log-sum-exp in inference too; the
      conv weight is re-laid out tap-major every call. Not counted: the fp32 dK/dV and conv-weight
      partials of the deterministic backward (their number follows the launch plan and the GPU's SM
      count; each is written once and read once). ``SRACost.triton_ops`` lists it launch by launch,
      with ``kind`` "triton" (our kernels), "gemm" (cuBLAS) or "torch" (other PyTorch kernels).
    * ``projected`` -- the same for the opt-in fused-projection path (``SRA_KERNELS_FUSE_PROJECTIONS=1``,
      C <= 128, fp16/bf16): the kv projection in the reduction kernel's epilogue, q and out projections
      inside the attention kernel, so in inference x is read once for the queries and the output
      written once; training also writes q, o and the log-sum-exp, and its backward is step 1's.
      With sr = 1 over at most 64 tokens, k and v are projected inside that kernel too (one launch;
      the backward recomputes them with a GEMM).
      Saving q and o rather than recomputing them is the cheaper choice while the backward is step 1's
      kernels: recomputing q by a GEMM reads x and writes q (2 (B, N, C) passes) where saving it costs
      one write in the forward; both then read q in the attention backward. o cannot be recomputed
      short of a second attention forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .ops.projected_attention import keys_from_x_fit
from .reference import LINEAR_POOL_SIZE

MODES = ("forward", "backward", "forward+backward")
"""``forward`` is inference; ``backward`` the backward pass alone; ``forward+backward`` a training step
(its forward also saves what the backward reads)."""

STAT_BYTES = 4
"""Bytes of one saved fp32 statistic (LayerNorm mean or rstd, log-sum-exp)."""


@dataclass(frozen=True)
class SRAShape:
    """Geometry of one SRA call: x (batch, height*width [+ 1 cls token], channels)."""

    batch: int
    height: int
    width: int
    channels: int
    heads: int
    sr_ratio: int = 1
    linear: bool = False
    cls_token: bool = False

    def __post_init__(self):
        for name in ("batch", "height", "width", "channels", "heads", "sr_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.channels % self.heads:
            raise ValueError(f"heads must divide channels, got channels={self.channels}, heads={self.heads}")
        if self.cls_token and self.reduces:
            raise ValueError("a cls token needs sr_ratio 1 and linear=False (PVT v1's last stage)")
        if self.sr_ratio > min(self.size):
            raise ValueError(f"sr_ratio {self.sr_ratio} exceeds the {self.label} token grid")

    @property
    def tokens(self) -> int:
        """N: queries per image."""
        return self.height * self.width + int(self.cls_token)

    @property
    def reduces(self) -> bool:
        """True when keys/values come from a reduction (sr > 1 or linear), not from x itself."""
        return self.linear or self.sr_ratio > 1

    @property
    def reduced_tokens(self) -> int:
        """M: keys/values per image."""
        if self.linear:
            return LINEAR_POOL_SIZE * LINEAR_POOL_SIZE
        if self.sr_ratio > 1:
            return (self.height // self.sr_ratio) * (self.width // self.sr_ratio)
        return self.tokens

    @property
    def head_dim(self) -> int:
        return self.channels // self.heads

    @property
    def kernel(self) -> int:
        """Reduction conv kernel size (1 in linear mode, sr_ratio otherwise)."""
        return 1 if self.linear else self.sr_ratio

    @property
    def size(self) -> tuple[int, int]:
        """The ``size`` argument of ``sra_attention``: (H, W), or (1, N) with a cls token (as PVT v1 runs it)."""
        return (1, self.tokens) if self.cls_token else (self.height, self.width)

    @property
    def label(self) -> str:
        return f"{self.height}x{self.width}" + ("+cls" if self.cls_token else "")


@dataclass(frozen=True)
class Cost:
    """FLOPs (matmul/conv, multiply-add = 2) and HBM bytes of one op or a sequence of ops."""

    flops: int = 0
    bytes_read: int = 0
    bytes_written: int = 0

    @property
    def bytes(self) -> int:
        return self.bytes_read + self.bytes_written

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.flops + other.flops, self.bytes_read + other.bytes_read,
                    self.bytes_written + other.bytes_written)

    def floor_seconds(self, flops_per_second: float, bytes_per_second: float) -> float:
        """Roofline lower bound: the larger of compute time and memory time."""
        return max(self.flops / flops_per_second, self.bytes / bytes_per_second)


@dataclass(frozen=True)
class SRACost:
    """Cost of a whole ``sra_attention`` call (see the module docstring for what each number counts)."""

    shape: SRAShape
    dtype: torch.dtype
    mode: str
    fused: Cost
    unfused: Cost
    unfused_ops: tuple[tuple[str, Cost], ...]
    triton: Cost
    triton_ops: tuple[tuple[str, str, Cost], ...]
    """(name, kind, cost) per launch of the triton backend; kind is "triton", "gemm" or "torch"."""
    projected: Cost
    projected_ops: tuple[tuple[str, str, Cost], ...]
    """The same for the fused-projection path (which runs only for C <= 128 in fp16 / bf16)."""
    score_matrix_bytes: int
    """Size of one (B, h, N, M) score matrix in the dtype: what the eager reference materialises."""


def _total(costs) -> Cost:
    return sum(costs, Cost())


def _select(mode: str, forward: Cost, backward: Cost, saved_bytes: int) -> Cost:
    """Inference forward, backward alone, or a training step (forward + writing what backward reads + backward)."""
    if mode == "forward":
        return forward
    if mode == "backward":
        return backward
    return forward + Cost(0, 0, saved_bytes) + backward


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def _sizes(shape: SRAShape, dtype: torch.dtype):
    """Element size, and element counts of x (B*N*C), reduced tokens (B*M*C) and the reduction input."""
    e = dtype.itemsize
    B, C = shape.batch, shape.channels
    x = B * shape.tokens * C
    reduced = B * shape.reduced_tokens * C
    if shape.linear or not shape.reduces:
        reduction_input = x
    else:
        reduction_input = reduced * shape.sr_ratio ** 2  # the conv patches: floor-cropped x
    return e, x, reduced, reduction_input


def _lse_bytes(shape: SRAShape) -> int:
    """The attention's saved log-sum-exp, (B, h, N) fp32."""
    return shape.batch * shape.heads * shape.tokens * STAT_BYTES


def _reduction_saved_bytes(shape: SRAShape, e: int) -> int:
    """What the reduction saves for backward: conv output (B, M, C), LayerNorm mean/rstd (B, M) fp32,
    and in linear mode the pooled tokens (B, 49, C). Zero when the shape does not reduce."""
    if not shape.reduces:
        return 0
    rows = shape.batch * shape.reduced_tokens
    return rows * shape.channels * e * (2 if shape.linear else 1) + 2 * rows * STAT_BYTES


def _weights(shape: SRAShape) -> int:
    """Elements of every parameter: q, kv, proj (+ sr conv and norm when reducing), biases included."""
    C = shape.channels
    count = (C * C + C) + (2 * C * C + 2 * C) + (C * C + C)
    if shape.reduces:
        count += C * C * shape.kernel ** 2 + C + 2 * C
    return count


def _gemm_forward(rows: int, k: int, n: int, e: int) -> Cost:
    """y (rows, n) = a (rows, k) @ W (n, k)^T + bias (n): every operand read once, y written once."""
    return Cost(2 * rows * k * n, (rows * k + n * k + n) * e, rows * n * e)


def _gemm_backward(rows: int, k: int, n: int, e: int) -> Cost:
    """da = dy W, dW = dy^T a, dbias = sum dy: dy read three times, a and W once; da, dW, dbias written."""
    return Cost(4 * rows * k * n, (3 * rows * n + rows * k + n * k) * e, (rows * k + n * k + n) * e)


def _pointwise(read: int, written: int, e: int) -> Cost:
    return Cost(0, read * e, written * e)


def spatial_reduce_cost(shape: SRAShape, dtype: torch.dtype, mode: str = "forward") -> Cost:
    """The fused spatial-reduction kernel(s): x (B, N, C) -> reduced, normalised tokens (B, M, C).

    sr > 1: conv(kernel = stride = sr) as a patch GEMM + bias + LayerNorm; linear: 7x7 adaptive
    average pool + 1x1 conv + LayerNorm + GELU. Minimal bytes: forward reads the reduction input
    once (the conv patches, or all of x for the pool) and the weights, writes (B, M, C); training
    also writes the conv output (B, M, C), LayerNorm mean/rstd and (linear) the pooled tokens.
    Backward reads dR, those saved tensors, the input and weights again, and writes dx (the patch
    region, or all of x for the pool) and the weight gradients. Zero when the shape does not reduce.
    """
    _check_mode(mode)
    if not shape.reduces:
        return Cost()
    e, _, reduced, reduction_input = _sizes(shape, dtype)
    C, rows = shape.channels, shape.batch * shape.reduced_tokens
    weights = C * C * shape.kernel ** 2 + 3 * C
    saved = _reduction_saved_bytes(shape, e)
    conv_flops = 2 * rows * C * shape.kernel ** 2 * C
    forward = Cost(conv_flops, (reduction_input + weights) * e, reduced * e)
    backward = Cost(2 * conv_flops, (reduced + reduction_input + weights) * e + saved,
                    (reduction_input + weights) * e)
    return _select(mode, forward, backward, saved)


def attention_cost(shape: SRAShape, dtype: torch.dtype, mode: str = "forward") -> Cost:
    """The fused reduced-KV attention kernel: q (B, N, h, d), k and v (B, M, h, d) -> o (B, N, h, d).

    Forward: 4*B*h*N*M*d FLOPs; reads q, k, v once, writes o (+ the log-sum-exp (B, h, N) fp32 in
    training). Backward: 10*B*h*N*M*d FLOPs (scores recomputed, SDPA's convention); reads q, k, v,
    o, dO and the log-sum-exp once, writes dq, dk and dv once.
    """
    _check_mode(mode)
    e, x, _, _ = _sizes(shape, dtype)
    kv = shape.batch * shape.reduced_tokens * shape.channels
    lse = _lse_bytes(shape)
    products = 2 * shape.batch * shape.tokens * shape.reduced_tokens * shape.channels  # one (N x d)(d x M), all heads
    forward = Cost(2 * products, (x + 2 * kv) * e, x * e)
    backward = Cost(5 * products, (3 * x + 2 * kv) * e + lse, (x + 2 * kv) * e)
    return _select(mode, forward, backward, lse)


def _fused_ideal(shape: SRAShape, dtype: torch.dtype, mode: str, flops: int) -> Cost:
    """The whole op in the fewest bytes (module docstring); ``flops`` comes from the op sequence."""
    e, x, _, reduction_input = _sizes(shape, dtype)
    weights = _weights(shape)
    kv = 2 * shape.batch * shape.reduced_tokens * shape.channels
    saved = x * e + _lse_bytes(shape) + _reduction_saved_bytes(shape, e)  # + the attention output before proj
    forward = Cost(0, (x + reduction_input + weights + kv) * e, (x + kv) * e)
    # reads dY, x (query path), the reduction input, weights, K/V, dK/dV and dx once more, and the saved
    # tensors; writes dx twice (the reduction path adds to the query path's), dK/dV, the weight gradients
    backward = Cost(0, (3 * x + reduction_input + weights + 2 * kv) * e + saved, (2 * x + kv + weights) * e)
    total = _select(mode, forward, backward, saved)
    return Cost(flops, total.bytes_read, total.bytes_written)


def _eager_forward_ops(shape: SRAShape, e: int) -> list[tuple[str, Cost]]:
    """The reference backend's forward, op by op."""
    B, N, M, C = shape.batch, shape.tokens, shape.reduced_tokens, shape.channels
    x, reduced, scores = B * N * C, B * M * C, B * shape.heads * N * M
    ops = [("q", _gemm_forward(B * N, C, C, e))]
    if shape.linear:
        ops += [("pool", _pointwise(x, reduced, e)), ("sr_conv", _gemm_forward(B * M, C, C, e))]
    elif shape.reduces:
        ops += [("sr_conv", _gemm_forward(B * M, C * shape.sr_ratio ** 2, C, e))]
    if shape.reduces:
        ops += [("norm", Cost(0, (reduced + 2 * C) * e, reduced * e + 2 * B * M * STAT_BYTES))]
    if shape.linear:
        ops += [("act", _pointwise(reduced, reduced, e))]
    ops += [
        ("kv", _gemm_forward(B * M, C, 2 * C, e)),
        ("scores", Cost(2 * B * N * M * C, (x + reduced) * e, scores * e)),
        ("scale", _pointwise(scores, scores, e)),
        ("softmax", _pointwise(scores, scores, e)),
        ("pv", Cost(2 * B * N * M * C, (scores + reduced) * e, x * e)),
        ("proj", _gemm_forward(B * N, C, C, e)),
    ]
    return ops


def _eager_backward_ops(shape: SRAShape, e: int) -> list[tuple[str, Cost]]:
    """The reference backend's autograd backward, op by op (x and every weight need gradients)."""
    B, N, M, C = shape.batch, shape.tokens, shape.reduced_tokens, shape.channels
    x, reduced, scores = B * N * C, B * M * C, B * shape.heads * N * M
    ops = [
        ("proj_bwd", _gemm_backward(B * N, C, C, e)),
        # dP = dO v^T, dv = P^T dO
        ("pv_bwd", Cost(4 * B * N * M * C, (2 * x + reduced + scores) * e, (scores + reduced) * e)),
        ("softmax_bwd", _pointwise(2 * scores, scores, e)),
        ("scale_bwd", _pointwise(scores, scores, e)),
        # dq = dS k, dk = dS^T q
        ("scores_bwd", Cost(4 * B * N * M * C, (2 * scores + x + reduced) * e, (x + reduced) * e)),
        ("kv_bwd", _gemm_backward(B * M, C, 2 * C, e)),
    ]
    if shape.linear:
        ops += [("act_bwd", _pointwise(2 * reduced, reduced, e))]
    if shape.reduces:
        ops += [("norm_bwd", Cost(0, (2 * reduced + C) * e + 2 * B * M * STAT_BYTES, (reduced + 2 * C) * e))]
    if shape.linear:
        ops += [("sr_conv_bwd", _gemm_backward(B * M, C, C, e)), ("pool_bwd", _pointwise(reduced, x, e))]
    elif shape.reduces:
        ops += [("sr_conv_bwd", _gemm_backward(B * M, C * shape.sr_ratio ** 2, C, e))]
    ops += [
        ("q_bwd", _gemm_backward(B * N, C, C, e)),
        ("dx_sum", _pointwise(2 * x, x, e)),  # x feeds the query path and the key/value path
    ]
    return ops


Op = tuple[str, str, Cost]
"""(name, kind, cost) of one launch: kind "triton" (our kernels), "gemm" (cuBLAS) or "torch" (other kernels)."""


def _reduction_forward_ops(shape: SRAShape, dtype: torch.dtype) -> list[Op]:
    """The reduction's launches: (pool,) tap-major weight copy, patch GEMM + LayerNorm (writes y, z, mean, rstd)."""
    if not shape.reduces:
        return []
    B, M, C, k = shape.batch, shape.reduced_tokens, shape.channels, shape.kernel
    e, x, reduced, reduction_input = _sizes(shape, dtype)
    weight = C * C * k * k
    ops = [("pool", "triton", _pointwise(x, reduced, e))] if shape.linear else []
    return ops + [("conv_weight_layout", "torch", _pointwise(weight, weight, e)),
                  ("reduce", "triton", Cost(2 * B * M * weight, (reduction_input + weight + 3 * C) * e,
                                            2 * reduced * e + 2 * B * M * STAT_BYTES))]


def _reduction_backward_ops(shape: SRAShape, dtype: torch.dtype, accumulate: bool) -> list[Op]:
    """The reduction's backward launches; ``accumulate``: dx is added in place to the q path's dx
    (``project_and_reduce``), else written on its own (zeros outside the patches) for autograd to sum."""
    if not shape.reduces:
        return []
    B, M, C, k = shape.batch, shape.reduced_tokens, shape.channels, shape.kernel
    e, x, reduced, reduction_input = _sizes(shape, dtype)
    weight = C * C * k * k
    da = reduced if shape.linear else reduction_input  # the LayerNorm/input kernel's da: pooled cells or patches
    da_read = da if accumulate and not shape.linear else 0
    ops = [("conv_weight_layout", "torch", _pointwise(weight, weight, e)),
           # LayerNorm (+ GELU) backward and da = dz w^T
           ("reduce_bwd_input", "triton", Cost(2 * B * M * weight, (2 * reduced + weight + 2 * C + da_read) * e
                                               + 2 * B * M * STAT_BYTES, (reduced + da) * e)),
           ("conv_weight_grad", "triton", Cost(2 * B * M * weight, (da + reduced) * e, weight * e))]
    if shape.linear:
        ops += [("pool_bwd", "triton", _pointwise(reduced + (x if accumulate else 0), x, e))]
    elif not accumulate and reduction_input < x:
        ops += [("dx_zero_uncovered", "torch", _pointwise(0, x - reduction_input, e))]
    return ops


def _triton_forward_ops(shape: SRAShape, dtype: torch.dtype) -> list[Op]:
    """The triton backend's forward, launch by launch (module docstring, ``triton``)."""
    B, N, M, C = shape.batch, shape.tokens, shape.reduced_tokens, shape.channels
    e, x, reduced, _ = _sizes(shape, dtype)
    return ([("q", "gemm", _gemm_forward(B * N, C, C, e))] + _reduction_forward_ops(shape, dtype)
            + [("kv", "gemm", _gemm_forward(B * M, C, 2 * C, e)),
               ("attention", "triton", Cost(4 * B * N * M * C, (x + 2 * reduced) * e, x * e + _lse_bytes(shape))),
               ("proj", "gemm", _gemm_forward(B * N, C, C, e))])


def _projection_and_attention_backward_ops(shape: SRAShape, dtype: torch.dtype) -> list[Op]:
    """proj backward, attention backward (reads q, k, v, o, dO, lse; writes dq, dk, dv), kv and q backward."""
    B, N, M, C = shape.batch, shape.tokens, shape.reduced_tokens, shape.channels
    e, x, reduced, _ = _sizes(shape, dtype)
    return [("proj_bwd", "gemm", _gemm_backward(B * N, C, C, e)),
            ("attention_bwd", "triton", Cost(10 * B * N * M * C, (3 * x + 2 * reduced) * e + _lse_bytes(shape),
                                             (x + 2 * reduced) * e)),
            ("kv_bwd", "gemm", _gemm_backward(B * M, C, 2 * C, e)),
            ("q_bwd", "gemm", _gemm_backward(B * N, C, C, e))]


def _triton_backward_ops(shape: SRAShape, dtype: torch.dtype) -> list[Op]:
    """The triton backend's backward, launch by launch (x and every weight need gradients)."""
    e, x, _, _ = _sizes(shape, dtype)
    ops = _projection_and_attention_backward_ops(shape, dtype)
    if not shape.reduces:
        return ops + [("dx_sum", "torch", _pointwise(2 * x, x, e))]  # x feeds the query and the key/value path
    return ops + _reduction_backward_ops(shape, dtype, accumulate=True)


def _projected_forward_ops(shape: SRAShape, dtype: torch.dtype, training: bool) -> list[Op]:
    """The fused-projection path's forward (``SRA_KERNELS_FUSE_PROJECTIONS=1``): the reduction with the kv
    projection in its epilogue (reads W_kv, b_kv, writes kv too; a kv GEMM when sr = 1), then one kernel
    that reads x, k, v and the q / proj weights and writes the output (+ q, o and lse in training). sr = 1
    over <= 64 tokens: that one kernel projects k and v from its x tile (reads W_kv, b_kv instead of k, v)."""
    B, N, M, C = shape.batch, shape.tokens, shape.reduced_tokens, shape.channels
    e, x, reduced, _ = _sizes(shape, dtype)
    kv = _gemm_forward(B * M, C, 2 * C, e)
    saved = 2 * x * e + _lse_bytes(shape) if training else 0
    flops = 2 * (2 * B * N * C * C) + 4 * B * N * M * C
    if _projects_keys_in_kernel(shape):
        return [("projected_self_attention", "triton",
                 Cost(flops + kv.flops, (x + 4 * (C * C + C)) * e, x * e + saved))]
    if shape.reduces:
        *ops, (name, kind, reduce) = _reduction_forward_ops(shape, dtype)
        ops += [(name, kind, reduce + Cost(kv.flops, (2 * C * C + 2 * C) * e, kv.bytes_written))]
    else:
        ops = [("kv", "gemm", kv)]
    return ops + [("projected_attention", "triton",
                   Cost(flops, (x + 2 * reduced + 2 * (C * C + C)) * e, x * e + saved))]


def _projects_keys_in_kernel(shape: SRAShape) -> bool:
    """sr = 1 over <= 64 tokens: one block holds queries and keys."""
    return not shape.reduces and keys_from_x_fit(shape.tokens)


def _projected_backward_ops(shape: SRAShape, dtype: torch.dtype) -> list[Op]:
    """The fused-projection path's backward: step 1's kernels (with a reduction, its dx is added into the q
    path's in place, as in step 1). The one-kernel sr = 1 path first recomputes k, v with a GEMM (it saved
    neither) and adds dkv W_kv into the q path's dx (addmm: reads it once more); a longer sr = 1 input takes
    step 1's backward, autograd summing the two dx."""
    B, M, C = shape.batch, shape.reduced_tokens, shape.channels
    e, x, _, _ = _sizes(shape, dtype)
    if not _projects_keys_in_kernel(shape):
        return _triton_backward_ops(shape, dtype)
    *ops, (kv_name, kind, kv_cost), q = _projection_and_attention_backward_ops(shape, dtype)
    return ([("kv_recompute", "gemm", _gemm_forward(B * M, C, 2 * C, e))] + ops
            + [q, (kv_name, kind, kv_cost + Cost(0, x * e, 0))])


def sra_attention_cost(shape: SRAShape, dtype: torch.dtype = torch.bfloat16, mode: str = "forward") -> SRACost:
    """FLOPs and bytes of ``sra_attention`` on ``shape`` in ``dtype``: fused ideal and eager sequence.

    ``fused.flops`` follows SDPA's convention (attention backward recomputes the scores: +2*B*N*M*C
    over ``unfused.flops``, which is what ``FlopCounterMode`` counts on the reference backend).
    """
    _check_mode(mode)
    e = dtype.itemsize
    ops, triton_ops, projected_ops = [], [], []
    if mode in ("forward", "forward+backward"):
        ops += _eager_forward_ops(shape, e)
        triton_ops += _triton_forward_ops(shape, dtype)
        projected_ops += _projected_forward_ops(shape, dtype, training=mode != "forward")
    if mode in ("backward", "forward+backward"):
        ops += _eager_backward_ops(shape, e)
        triton_ops += _triton_backward_ops(shape, dtype)
        projected_ops += _projected_backward_ops(shape, dtype)
    unfused = _total(cost for _, cost in ops)
    recompute = 2 * shape.batch * shape.tokens * shape.reduced_tokens * shape.channels if mode != "forward" else 0
    fused = _fused_ideal(shape, dtype, mode, unfused.flops + recompute)
    score_matrix = shape.batch * shape.heads * shape.tokens * shape.reduced_tokens * e
    return SRACost(shape, dtype, mode, fused, unfused, tuple(ops), _total(cost for _, _, cost in triton_ops),
                   tuple(triton_ops), _total(cost for _, _, cost in projected_ops), tuple(projected_ops), score_matrix)


# Attention geometry of the PVT families (channels, heads and sr ratios of stages 1-4).
_PVT_HEADS = (1, 2, 5, 8)
_PVT_SR = (8, 4, 2, 1)
_PVT_DIMS = (64, 128, 320, 512)
_STAGE_CONFIGS = {
    **{f"pvt_{size}": ("v1", _PVT_DIMS, False) for size in ("tiny", "small", "medium", "large")},
    "pvt_v2_b0": ("v2", (32, 64, 160, 256), False),
    **{f"pvt_v2_b{i}": ("v2", _PVT_DIMS, False) for i in range(1, 6)},
    "pvt_v2_b2_li": ("v2", _PVT_DIMS, True),
}
STAGE_MODELS = tuple(sorted(_STAGE_CONFIGS))
"""Model names :func:`model_stages` knows."""


def _stage_grids(family: str, height: int, width: int) -> list[tuple[int, int]]:
    """Token grid of each stage: the patch-embedding conv's output size (n + 2*pad - k) // s + 1.

    v1: non-overlapping patches, k = s = 4 then 2, no padding (floor). v2: overlapping patches,
    k=7, s=4, pad=3 then k=3, s=2, pad=1 (ceil).
    """
    convs = [(4, 4, 0)] + [(2, 2, 0)] * 3 if family == "v1" else [(7, 4, 3)] + [(3, 2, 1)] * 3
    grids = []
    for kernel, stride, pad in convs:
        height, width = ((n + 2 * pad - kernel) // stride + 1 for n in (height, width))
        grids.append((height, width))
    return grids


def model_stages(model: str, image_size: int | tuple[int, int], batch: int = 1) -> tuple[SRAShape, ...]:
    """The attention shape of each of the 4 stages of ``model`` for (batch, 3, *image_size) images.

    PVT v1's last stage carries the cls token (N = H*W + 1, sr 1). Every block of a stage has the
    same shape; the stage's depth does not matter here.
    """
    if model not in _STAGE_CONFIGS:
        raise ValueError(f"unknown model {model!r}; known: {', '.join(STAGE_MODELS)}")
    family, dims, linear = _STAGE_CONFIGS[model]
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    grids = _stage_grids(family, height, width)
    return tuple(
        SRAShape(batch, h, w, dims[i], _PVT_HEADS[i], _PVT_SR[i], linear, cls_token=(family == "v1" and i == 3))
        for i, (h, w) in enumerate(grids)
    )
