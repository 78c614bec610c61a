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
      recompute: the ``fused_projections`` path's one-kernel case (sr = 1 over <= 64 tokens, one block per
      image) goes below it, since its k and v never leave the chip and x is read once.
    * ``unfused`` -- the eager PyTorch sequence of the reference backend (:mod:`sra_kernels.reference`):
      each op reads its inputs and writes its output once, including the materialised (B, h, N, M)
      score matrix three times over (q k^T, the scale, the softmax). Layout copies (head splits and
      merges, transposes) are not counted, so this is a lower bound of the eager traffic.
      ``SRACost.unfused_ops`` lists it op by op.
    * ``cublas_projections`` and ``fused_projections`` -- what the ``triton`` backend's two paths move,
      launch by launch as their plan (:func:`sra_kernels.plan.make_plan`) lists them, each launch
      reading its inputs and writing its outputs once. ``cublas_projections``: the q / kv / out
      projections as cuBLAS GEMMs around the fused reduction and attention kernels; the reduction
      kernel writes its conv output and LayerNorm statistics and the attention its log-sum-exp in
      inference too; the conv weight is re-laid out tap-major every call. ``fused_projections`` (C <=
      128, fp16/bf16): the kv projection in the reduction kernel's epilogue, q and out projections
      inside the attention kernel, so in inference x is read once for the queries and the output
      written once; training also writes q, o and the log-sum-exp, and its backward is
      ``cublas_projections``'s. With sr = 1 over at most 64 tokens, k and v are projected inside that
      kernel too (one launch; the backward recomputes them with a GEMM). Not counted: the fp32 dK/dV
      and conv-weight partials of the deterministic backward (their number follows the launch plan and
      the GPU's SM count; each is written once and read once). ``SRACost.*_ops`` list them launch by
      launch, with ``kind`` "triton" (our kernels), "gemm" (cuBLAS) or "torch" (other PyTorch kernels).
      Saving q and o rather than recomputing them is the cheaper choice while the backward is
      ``cublas_projections``'s kernels: recomputing q by a GEMM reads x and writes q (2 (B, N, C) passes)
      where saving it costs one write in the forward; both then read q in the attention backward. o
      cannot be recomputed short of a second attention forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .plan import Problem, make_plan
from .shapes import SRAShape

MODES = ("forward", "backward", "forward+backward")
"""``forward`` is inference; ``backward`` the backward pass alone; ``forward+backward`` a training step
(its forward also saves what the backward reads)."""

STAT_BYTES = 4
"""Bytes of one saved fp32 statistic (LayerNorm mean or rstd, log-sum-exp)."""


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
    cublas_projections: Cost
    cublas_projections_ops: tuple[tuple[str, str, Cost], ...]
    """(name, kind, cost) per launch of the ``cublas_projections`` path (:mod:`sra_kernels.plan`); kind is
    "triton" (our kernels), "gemm" (cuBLAS) or "torch" (other PyTorch kernels)."""
    fused_projections: Cost
    fused_projections_ops: tuple[tuple[str, str, Cost], ...]
    """The same for the ``fused_projections`` path (which runs only for C <= 128 in fp16 / bf16)."""
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


def _gemm_backward(rows: int, k: int, n: int, e: int, bias: bool = True) -> Cost:
    """da = dy W, dW = dy^T a, dbias = sum dy: dy read three times, a and W once; da, dW, dbias written.
    ``bias`` False: without dbias (our paths sum it from partials: ``out_bias_partials``, ``param_grads``)."""
    reads = 3 if bias else 2
    return Cost(4 * rows * k * n, (reads * rows * n + rows * k + n * k) * e, (rows * k + n * k + n * bias) * e)


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


def _forward_launch_costs(shape: SRAShape, dtype: torch.dtype, training: bool) -> dict[str, Cost]:
    """The cost of every forward launch a plan of :mod:`sra_kernels.plan` may name, by launch name.

    The reduction writes y, z and the LayerNorm statistics and the attention its log-sum-exp in inference
    too; the fused-projection kernels also write q, o and the log-sum-exp when ``training``; ``reduce_norm_kv``
    is the reduction's LayerNorm kernel with the kv projection after it (reads W_kv, b_kv, writes kv);
    ``projected_self_attention`` projects k, v from its x tile (reads W_kv, b_kv instead of k, v).
    """
    B, N, M, C, k = shape.batch, shape.tokens, shape.reduced_tokens, shape.channels, shape.kernel
    e, x, reduced, reduction_input = _sizes(shape, dtype)
    weight = C * C * k * k
    kv = _gemm_forward(B * M, C, 2 * C, e)
    # the patch GEMM writes its fp32 sums (one K split at least), the LayerNorm kernel reads them and writes y, z
    reduce = Cost(2 * B * M * weight, (reduction_input + weight) * e, reduced * 4)
    reduce_norm = Cost(0, reduced * 4 + 3 * C * e, 2 * reduced * e + 2 * B * M * STAT_BYTES)
    saved = 2 * x * e + _lse_bytes(shape) if training else 0
    projected_flops = 2 * (2 * B * N * C * C) + 4 * B * N * M * C
    return {
        "q": _gemm_forward(B * N, C, C, e),
        "pool": _pointwise(x, reduced, e),
        "reduce": reduce,
        "reduce_norm": reduce_norm,
        "reduce_norm_kv": reduce_norm + Cost(kv.flops, (2 * C * C + 2 * C) * e, kv.bytes_written),
        "kv": kv,
        "attention": Cost(4 * B * N * M * C, (x + 2 * reduced) * e, x * e + _lse_bytes(shape)),
        "proj": _gemm_forward(B * N, C, C, e),
        "projected_attention": Cost(projected_flops, (x + 2 * reduced + 2 * (C * C + C)) * e, x * e + saved),
        "projected_self_attention": Cost(projected_flops + kv.flops, (x + 4 * (C * C + C)) * e, x * e + saved),
    }


def _backward_launch_costs(shape: SRAShape, dtype: torch.dtype) -> dict[str, Cost]:
    """The cost of every backward launch, by name (x and every weight need gradients).

    The attention backward reads q, k, v, o, dO and the log-sum-exp and writes dq, dk, dv; the reduction's
    data-gradient kernel adds its dx into the q path's in place (reading it); ``kv_recompute`` is the
    one-kernel path's k, v GEMM, and ``kv_bwd_into_dx`` its kv backward, which adds dkv W_kv into the q
    path's dx (addmm: reads it once more), ``q_bwd_into_dx`` the q backward adding into the kv path's dx (sr = 1);
    ``dx_sum`` adds the query and key/value paths' dx; ``out_bias_partials`` and ``param_grads`` are the bias and
    norm-parameter gradients (partial column sums of dOut, then every gradient from its partials).
    """
    B, N, M, C, k = shape.batch, shape.tokens, shape.reduced_tokens, shape.channels, shape.kernel
    e, x, reduced, reduction_input = _sizes(shape, dtype)
    weight = C * C * k * k
    da = reduced if shape.linear else reduction_input  # the data-gradient kernel's da: pooled cells or patches
    da_read = 0 if shape.linear else da
    kv_bwd = _gemm_backward(B * M, C, 2 * C, e, bias=False)
    return {
        "proj_bwd": _gemm_backward(B * N, C, C, e, bias=False),
        "attention_bwd": Cost(10 * B * N * M * C, (3 * x + 2 * reduced) * e + _lse_bytes(shape), (x + 2 * reduced) * e),
        "kv_bwd": kv_bwd,
        "q_bwd": _gemm_backward(B * N, C, C, e, bias=False),
        "dx_sum": _pointwise(2 * x, x, e),
        "reduce_norm_bwd": Cost(0, (2 * reduced + 2 * C) * e + 2 * B * M * STAT_BYTES, reduced * e),
        "out_bias_partials": Cost(0, x * e, 0),  # reads dOut; writes a few KB of fp32 partials
        "param_grads": _pointwise(0, 7 * C, e),  # from the partials (the q / kv ones from the attention backward)
        "reduce_dgrad": Cost(2 * B * M * weight, (reduced + weight + da_read) * e, da * e),
        # fp32 sums of one token split at least, then cast into the weight's layout and dtype
        "conv_weight_grad": Cost(2 * B * M * weight, (da + reduced) * e, weight * 4),
        "conv_weight_grad_sum": Cost(0, weight * 4, weight * e),
        "pool_bwd": _pointwise(reduced + x, x, e),
        "kv_recompute": _gemm_forward(B * M, C, 2 * C, e),
        "kv_bwd_into_dx": kv_bwd + Cost(0, x * e, 0),
        "q_bwd_into_dx": _gemm_backward(B * N, C, C, e, bias=False) + Cost(0, x * e, 0),
    }


def path_ops(path: str, shape: SRAShape, dtype: torch.dtype, mode: str = "forward") -> tuple[Op, ...]:
    """The launches of ``path`` (a triton path of :mod:`sra_kernels.plan`) on ``shape`` in ``dtype``, priced."""
    _check_mode(mode)
    training = mode != "forward"
    plan = make_plan(path, Problem.of_shape(shape, dtype, backward=training), True, "cost model")
    ops = []
    if mode in ("forward", "forward+backward"):
        costs = _forward_launch_costs(shape, dtype, training)
        ops += [(launch.name, launch.kind, costs[launch.name]) for launch in plan.forward]
    if mode in ("backward", "forward+backward"):
        costs = _backward_launch_costs(shape, dtype)
        ops += [(launch.name, launch.kind, costs[launch.name]) for launch in plan.backward]
    return tuple(ops)


def sra_attention_cost(shape: SRAShape, dtype: torch.dtype = torch.bfloat16, mode: str = "forward") -> SRACost:
    """FLOPs and bytes of ``sra_attention`` on ``shape`` in ``dtype``: fused ideal and eager sequence.

    ``fused.flops`` follows SDPA's convention (attention backward recomputes the scores: +2*B*N*M*C
    over ``unfused.flops``, which is what ``FlopCounterMode`` counts on the reference backend).
    """
    _check_mode(mode)
    e = dtype.itemsize
    ops = []
    if mode in ("forward", "forward+backward"):
        ops += _eager_forward_ops(shape, e)
    if mode in ("backward", "forward+backward"):
        ops += _eager_backward_ops(shape, e)
    unfused = _total(cost for _, cost in ops)
    recompute = 2 * shape.batch * shape.tokens * shape.reduced_tokens * shape.channels if mode != "forward" else 0
    fused = _fused_ideal(shape, dtype, mode, unfused.flops + recompute)
    score_matrix = shape.batch * shape.heads * shape.tokens * shape.reduced_tokens * e
    cublas_ops, fused_ops = (path_ops(path, shape, dtype, mode) for path in ("cublas_projections", "fused_projections"))
    return SRACost(shape, dtype, mode, fused, unfused, tuple(ops), _total(cost for _, _, cost in cublas_ops),
                   cublas_ops, _total(cost for _, _, cost in fused_ops), fused_ops, score_matrix)
