"""The ``triton`` backend: the SRA op composed from the fused custom ops of :mod:`.ops`, route by route.

:mod:`sra_kernels.plan` chooses the route; this module runs it:

* ``reduce_attend`` / ``attend`` (path ``cublas_projections``): one op, ``sra`` (:mod:`.ops.sra`): the q / kv /
  out projections as torch matmuls (cuBLAS); the spatial reduction (conv + LayerNorm, or the linear pool path,
  with the backward's dx summed in place) and the attention are our Triton kernels. Heads are column slices:
  q, k and v reach the attention kernel as strided views, never permuted copies; dK / dV come back as one
  kv-shaped buffer, and every bias gradient is finished in one launch.
* ``reduce_project_attend`` / ``project_attend_self`` / ``kv_project_attend`` (path ``fused_projections``,
  C <= 128): the kv projection in the reduction kernel's epilogue, then the q projection, the attention
  and the out projection in one kernel (one op, ``projected_sra``, whose backward adds the reduction's dx
  into the q path's in place): x is read once for the queries and the output written once, with no q,
  pre-projection output or reduced tokens crossing HBM in inference. With sr = 1 over <= 64 tokens, k and
  v are projected inside the attention kernel too (one launch); longer sr = 1 inputs take a kv GEMM first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .ops.attention import reduced_kv_attention
from .ops.linear import biased_linear
from .ops.projected_attention import projected_attention, projected_self_attention, projected_sra
from .ops.spatial_reduce import spatial_reduce, tap_major_layout
from .ops.sra import sra
from .plan import Plan, autocast_dtype, differentiated
from .weights import SRAWeights, filled_reduction


def _autocast(*tensors):
    """The tensors (None stays None) in autocast's dtype when it is on, else unchanged."""
    dtype = autocast_dtype(tensors[0])
    return tensors if dtype is None else tuple(t if t is None else t.to(dtype) for t in tensors)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear; with a bias that autograd will differentiate, the op whose backward sums the bias gradient by
    our deterministic column sum (inference skips the op's autograd wrapper)."""
    if bias is None or not differentiated(x, weight, bias):
        return F.linear(x, weight, bias)
    return biased_linear(x, weight, bias)


def _kernel_weights(weights: SRAWeights, dtype: torch.dtype | None) -> SRAWeights:
    """``weights`` cast to autocast's ``dtype`` (None: as they are), the conv weight in the reduction kernels'
    tap-major layout: one copy of each at most (the conv's relayout and cast are one)."""
    if weights.sr_weight is not None:
        weights = weights._replace(sr_weight=tap_major_layout(weights.sr_weight, dtype))
    return weights if dtype is None else weights.to(dtype)


def spatial_reduce_triton(x, size, sr_weight, sr_bias, norm_weight, norm_bias, *, sr_ratio, linear, eps):
    """Fused reduction of tokens x (B, N, C) -> (B, M, C); x itself when sr_ratio == 1 and not linear."""
    if not linear and sr_ratio == 1:
        return x
    dtype = autocast_dtype(x)
    x, *optional = _autocast(x, sr_bias, norm_weight, norm_bias)
    return spatial_reduce(x, *size, tap_major_layout(sr_weight, dtype), *filled_reduction(x, *optional), sr_ratio,
                          linear, eps)[0]


def reduced_kv_attention_triton(q, k, v, scale=None, deterministic=True):
    """q (B, N, h, d), k/v (B, M, h, d) -> (B, N, h, d) through the fused attention kernel."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    q, k, v = _autocast(q, k, v)
    return reduced_kv_attention(q, k, v, scale, deterministic)[0]


def sra_attention_triton(x: torch.Tensor, size: tuple[int, int], weights: SRAWeights, *, num_heads: int,
                         sr_ratio: int, linear: bool, eps: float, scale: float | None, plan: Plan) -> torch.Tensor:
    """The SRA of :func:`sra_kernels.reference.sra_attention` (x (B, N, C) -> (B, N, C)), run on ``plan.route``
    (a ``cublas_projections`` or ``fused_projections`` plan of :mod:`sra_kernels.plan`)."""
    dtype = autocast_dtype(x)
    if dtype is not None:
        x = x.to(dtype)
    weights = _kernel_weights(weights, dtype)
    if plan.path == "fused_projections":
        return _sra_attention_projected(x, size, weights, num_heads=num_heads, sr_ratio=sr_ratio, linear=linear,
                                        eps=eps, scale=scale, plan=plan)
    reduction = weights.reduction_filled(x) if plan.route == "reduce_attend" else (None,) * 4
    scale = (x.shape[-1] // num_heads) ** -0.5 if scale is None else scale
    return sra(x, *size, *weights.projections, *reduction, sr_ratio, linear, eps, num_heads, scale,
               plan.deterministic)[0]


def _sra_attention_projected(x, size, weights, *, num_heads, sr_ratio, linear, eps, scale, plan) -> torch.Tensor:
    """The fused-projection routes: the reduction kernel with the kv projection in its epilogue, then q
    projection + attention + out projection in one kernel; sr = 1: one kernel for <= 64 tokens (k, v
    projected in it too), else a kv GEMM and that kernel."""
    B, N, C = x.shape
    head_dim = C // num_heads
    projections = weights.projections_filled(x)
    scale = head_dim ** -0.5 if scale is None else scale
    deterministic = plan.deterministic
    if plan.route == "reduce_project_attend":
        reduction = weights.reduction_filled(x)
        save = differentiated(x, *projections, *reduction)
        return projected_sra(x, *size, *projections, *reduction, sr_ratio, linear, eps, num_heads, scale, save,
                             deterministic)[0]
    if plan.route == "project_attend_self":
        save = differentiated(x, *projections)
        return projected_self_attention(x, *projections, num_heads, scale, save, deterministic)[0]
    q_weight, q_bias, kv_weight, kv_bias, proj_weight, proj_bias = projections
    k, v = _linear(x, kv_weight, kv_bias).view(B, N, 2, num_heads, head_dim).unbind(2)
    save = differentiated(x, q_weight, q_bias, k, proj_weight, proj_bias)
    return projected_attention(x, q_weight, q_bias, k, v, proj_weight, proj_bias, scale, save, deterministic)[0]
