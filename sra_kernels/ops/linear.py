"""``biased_linear``: ``F.linear`` with a bias, whose backward sums the bias gradient with our deterministic column sum.

The out projection's input has B*N rows; autograd's own bias gradient there is torch's column sum, which
measured ~75 us at pvt_v2_b2's 512x512 stage 1 on an H200 (see :mod:`.column_sum`). The GEMMs stay cuBLAS's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .column_sum import column_sum
from .registration import register


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x (..., C_in) @ weight (C_out, C_in)^T + bias (C_out,) -> (..., C_out)."""
    return F.linear(x, weight, bias)


def _setup_context(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.bias_dtype = bias.dtype


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    grad = grad.reshape(-1, weight.shape[0])
    dx = (grad @ weight).view(x.shape) if ctx.needs_input_grad[0] else None
    dw = grad.T @ x.reshape(-1, weight.shape[1]) if ctx.needs_input_grad[1] else None
    db = column_sum(grad, ctx.bias_dtype) if ctx.needs_input_grad[2] else None
    return dx, dw, db


biased_linear_op, biased_linear = register(
    "linear", _linear,
    fake=lambda x, weight, bias: x.new_empty((*x.shape[:-1], weight.shape[0])),
    flops=lambda x_shape, weight_shape, bias_shape, out_shape=None, **kwargs:
        2 * math.prod(x_shape) * weight_shape[0],
    setup_context=_setup_context, backward=_backward)
"""biased_linear(x (..., C_in), weight (C_out, C_in), bias (C_out,)) -> (..., C_out); differentiable in all three."""
