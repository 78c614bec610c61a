"""The public ops -- ``sra_attention`` and its fused building blocks ``spatial_reduce`` and
``reduced_kv_attention`` -- validated, planned by :mod:`sra_kernels.plan` and run."""

from __future__ import annotations

import torch

from . import autotune, options as call_options, reference
from .plan import Plan, Problem, autocast_dtype, building_block_backend, differentiated, make_plan, plan_sra
from .reference import LINEAR_POOL_SIZE
from .torch_sdpa import reduced_kv_attention_sdpa, sra_attention_sdpa
from .validation import check_attention_args, check_probability, check_spatial_reduction_args, check_sra_args
from .weights import SRAWeights

try:
    from . import fused
except ModuleNotFoundError as error:  # no Triton (e.g. not Linux): the plan never picks a triton path
    if error.name != "triton":
        raise
    fused = None

_PLANS: dict[tuple, Plan] = {}
"""Eager calls' plans by (problem, device, backend, options, dropout, defaults): planned once per key."""


def _problem(x: torch.Tensor, size, weights: SRAWeights, num_heads: int, sr_ratio: int, linear: bool) -> Problem:
    H, W = size
    B, N, C = x.shape
    if linear:
        M = LINEAR_POOL_SIZE * LINEAR_POOL_SIZE
    else:
        M = (H // sr_ratio) * (W // sr_ratio) if sr_ratio > 1 else N
    return Problem(B, N, M, C, num_heads, sr_ratio, linear, autocast_dtype(x) or x.dtype,
                   differentiated(x, *weights))


def _run(plan: Plan, x: torch.Tensor, size, weights: SRAWeights, kwargs, dropout_p: float) -> torch.Tensor:
    if plan.path == "reference":
        return reference.sra_attention(x, size, *weights, **kwargs)
    if plan.path == "sdpa":
        return sra_attention_sdpa(x, size, *weights, **kwargs, dropout_p=dropout_p)
    return fused.sra_attention_triton(x, size, weights, **kwargs, plan=plan)


def _measurer(problem: Problem, x, size, weights: SRAWeights, kwargs, deterministic: bool):
    """``measure(path) -> seconds`` of this call on ``path``, on detached copies of its inputs (forward, and
    backward through every input that requires grad when the call will be differentiated)."""

    def measure(path: str) -> float:
        plan = make_plan(path, problem, deterministic, "autotune candidate")
        x_copy, *copies = (t if t is None else t.detach().requires_grad_(t.requires_grad) for t in (x, *weights))
        wanted = [t for t in (x_copy, *copies) if t is not None and t.requires_grad]

        def call():
            out = _run(plan, x_copy, size, SRAWeights(*copies), kwargs, 0.0)
            if problem.backward:
                torch.autograd.grad(out, wanted, torch.ones_like(out))

        return autotune.time_call(call, x.device)

    return measure


def plan_call(x: torch.Tensor, size, weights: SRAWeights, kwargs, backend: str, options: call_options.Options,
              dropout_p: float) -> Plan:
    """The plan of one validated ``sra_attention`` call: cached per key in eager mode; made while the graph is
    traced under torch.compile, torch.export, torch.jit.trace and the ONNX exporters."""
    problem = _problem(x, size, weights, kwargs["num_heads"], kwargs["sr_ratio"], kwargs["linear"])
    device = x.device
    defaults = call_options.DEFAULTS
    compiling = torch.compiler.is_compiling()
    if compiling or torch.jit.is_tracing():  # traced: planned per trace; the ONNX exporters need PyTorch's ops
        return plan_sra(problem, device, backend, options, dropout_p=dropout_p, compiling=compiling,
                        jit_tracing=not compiling, onnx_export=torch.onnx.is_in_onnx_export(), defaults=defaults)
    key = (problem, device, backend, options, dropout_p > 0, defaults)
    plan = _PLANS.get(key)
    if plan is None:
        measure = _measurer(problem, x, size, weights, kwargs, options.deterministic) if options.autotune else None
        plan = plan_sra(problem, device, backend, options, dropout_p=dropout_p, measure=measure, defaults=defaults)
        if not options.autotune or plan.reason.startswith("autotune"):  # else retried once the tuner may time
            _PLANS[key] = plan
    return plan


def sra_attention(
    x: torch.Tensor,
    size: tuple[int, int],
    q_weight: torch.Tensor,
    q_bias: torch.Tensor | None,
    kv_weight: torch.Tensor,
    kv_bias: torch.Tensor | None,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor | None,
    sr_weight: torch.Tensor | None = None,
    sr_bias: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    norm_bias: torch.Tensor | None = None,
    *,
    num_heads: int,
    sr_ratio: int = 1,
    linear: bool = False,
    eps: float = 1e-5,
    scale: float | None = None,
    dropout_p: float = 0.0,
    backend: str = "auto",
    fuse_projections: bool | None = None,
    deterministic: bool | None = None,
    autotune: bool | None = None,
) -> torch.Tensor:
    """Spatial-reduction attention of PVT v1/v2 (SegFormer's efficient self-attention).

    Computes ``proj(softmax(q k^T * scale) v)`` over ``num_heads`` heads, where q = x W_q + b_q and
    k, v come from x reduced by Conv2d(C, C, kernel=stride=sr_ratio) + LayerNorm (or, with
    ``linear=True``, PVTv2's AdaptiveAvgPool2d(7) + 1x1 conv + LayerNorm + GELU; with
    ``sr_ratio == 1`` and not linear, from x itself).

    Args:
        x: tokens (B, N, C), N = H * W, fp32 / fp16 / bf16 (fp64 on the reference and sdpa backends).
        size: (H, W) of the token grid.
        q_weight (C, C), q_bias (C,) or None: query projection.
        kv_weight (2C, C), kv_bias (2C,) or None: key/value projection; rows [:C] give k.
        proj_weight (C, C), proj_bias (C,) or None: output projection.
        sr_weight (C, C, sr, sr) -- (C, C, 1, 1) in linear mode --, sr_bias (C,): reduction conv;
            required when sr_ratio > 1 or linear.
        norm_weight, norm_bias (C,): LayerNorm after the reduction conv.
        num_heads: heads; must divide C.
        sr_ratio: reduction conv kernel and stride, 1 <= sr_ratio <= min(H, W).
        linear: PVTv2 linear SRA (pool to 7x7; sr_ratio is then unused by the math).
        eps: LayerNorm epsilon (PVT's ``attn.norm`` uses 1e-5).
        scale: softmax scale, default head_dim ** -0.5.
        dropout_p: attention-probability dropout (training); > 0 runs the ``sdpa`` path, which applies it.
        backend: ``auto`` | ``reference`` | ``sdpa`` | ``triton``. ``auto`` runs, per call, the path measured
            fastest for this shape on this GPU (``sdpa`` where there is no measurement, off CUDA, and where
            the kernels cannot run: fp64, head_dim > 128); ``triton`` forces our kernels. See
            :mod:`sra_kernels.plan`; ``python -m sra_kernels --explain MODEL`` prints the choice per stage.
        fuse_projections: True: the q / kv / out projections inside our kernels wherever they apply (C <= 128,
            fp16 / bf16); False: never; None (default): the policy decides.
        deterministic: the attention backward sums dK/dV in a fixed order (default True); False: fp32 atomics.
        autotune: time the candidate paths on the first call of each new shape and keep the fastest
            (:mod:`sra_kernels.autotune`); default False.
            Each of the last three: None takes the default of :mod:`sra_kernels.options` (from the environment
            at import).

    Returns:
        (B, N, C) in x's dtype.

    Raises:
        TypeError / ValueError naming the bad argument; RuntimeError when the requested backend
        cannot run on x's device.
    """
    size, num_heads, sr_ratio, eps, scale = check_sra_args(
        x, size, q_weight, q_bias, kv_weight, kv_bias, proj_weight, proj_bias,
        sr_weight, sr_bias, norm_weight, norm_bias,
        num_heads=num_heads, sr_ratio=sr_ratio, linear=linear, eps=eps, scale=scale,
    )
    dropout_p = check_probability("dropout_p", dropout_p)
    options = call_options.resolve(fuse_projections, deterministic, autotune, call_options.DEFAULTS)
    weights = SRAWeights(q_weight, q_bias, kv_weight, kv_bias, proj_weight, proj_bias,
                         sr_weight, sr_bias, norm_weight, norm_bias)
    kwargs = dict(num_heads=num_heads, sr_ratio=sr_ratio, linear=linear, eps=eps, scale=scale)
    plan = plan_call(x, size, weights, kwargs, backend, options, dropout_p)
    return _run(plan, x, size, weights, kwargs, dropout_p)


def spatial_reduce(
    x: torch.Tensor,
    size: tuple[int, int],
    sr_weight: torch.Tensor | None,
    sr_bias: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    norm_bias: torch.Tensor | None = None,
    *,
    sr_ratio: int,
    linear: bool = False,
    eps: float = 1e-5,
    backend: str = "auto",
) -> torch.Tensor:
    """The key/value source of SRA: LayerNorm(Conv2d(kernel=stride=sr_ratio)(x) + bias), fused.

    Args:
        x: tokens (B, N = H*W, C), read in place (any strides).
        size: (H, W); H, W need not be multiples of sr_ratio (the conv floors, as Conv2d does).
        sr_weight: (C, C, sr, sr), or (C, C, 1, 1) with ``linear=True`` (PVTv2's
            AdaptiveAvgPool2d(7) + 1x1 conv + LayerNorm + GELU).
        sr_bias, norm_weight, norm_bias: (C,) or None.
        backend: ``triton`` runs the fused kernel; ``reference``/``sdpa`` run Conv2d + LayerNorm.

    Returns:
        (B, M, C) with M = (H // sr) * (W // sr), 49 in linear mode; x itself when sr_ratio == 1.
    """
    H, W, sr_ratio, eps = check_spatial_reduction_args(x, size, sr_weight, sr_bias, norm_weight, norm_bias,
                                                       sr_ratio=sr_ratio, linear=linear, eps=eps)
    chosen = building_block_backend(backend, x.device, x.dtype, defaults=call_options.DEFAULTS)
    implementation = fused.spatial_reduce_triton if chosen == "triton" else reference.spatial_reduction
    return implementation(x, (H, W), sr_weight, sr_bias, norm_weight, norm_bias,
                          sr_ratio=sr_ratio, linear=linear, eps=eps)


def reduced_kv_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None, *, backend: str = "auto",
) -> torch.Tensor:
    """softmax(q k^T * scale) v per head, for many queries against a short key/value set.

    Args:
        q: (B, N, h, d) -- e.g. ``(x @ W_q.T).view(B, N, h, d)``; any strides.
        k, v: (B, M, h, d) -- e.g. the two halves of ``kv.view(B, M, 2, h, d)``; any strides.
        scale: default d ** -0.5.
        backend: ``triton`` (fused online-softmax kernel), ``sdpa`` or ``reference``.

    Returns:
        (B, N, h, d), contiguous, so ``.view(B, N, h * d)`` is the (B, N, C) token layout.
    """
    scale = check_attention_args(q, k, v, scale)
    implementation = {
        "reference": reference.reduced_kv_attention,
        "sdpa": reduced_kv_attention_sdpa,
        "triton": fused and fused.reduced_kv_attention_triton,
    }[building_block_backend(backend, q.device, q.dtype, q.shape[-1], defaults=call_options.DEFAULTS)]
    return implementation(q, k, v, scale)
