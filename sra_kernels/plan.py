"""How one SRA call runs: the one place that decides.

:func:`plan_sra` takes what the call computes (:class:`Problem`: shape, compute dtype, whether a
backward follows), where (the device), the requested backend and the options, and returns a
:class:`Plan`: the path, the route inside it, the Triton kernels and GEMMs each pass launches, and
why. The dispatcher (:mod:`sra_kernels.functional`) runs what it says, the cost model
(:mod:`sra_kernels.cost`) prices its launches, the benchmarks skip what it refuses, and the tests
count its launches.

Paths, named by what they run:

* ``reference`` -- the eager PVT math (materialises the N x M scores): the ground truth;
* ``sdpa`` -- PyTorch's fastest form: Conv2d + LayerNorm, the Linears and
  ``F.scaled_dot_product_attention`` (cuDNN / flash kernels on CUDA), as timm runs it;
* ``cublas_projections`` -- our fused reduction (conv + LayerNorm, read in place) and short-KV
  attention kernels; the q, kv and out projections by cuBLAS;
* ``fused_projections`` -- the kv projection in the reduction kernel's epilogue and the q and out
  projections inside the attention kernel (C <= 128, fp16 / bf16); with sr = 1 over <= 64 tokens the
  whole op is one kernel.

``backend="auto"`` chooses among them per call (:func:`plan_sra`): the autotune cache when autotuning,
else the measured table of :mod:`sra_kernels.policy`, else ``sdpa``: a path is taken over PyTorch's
only where a measurement says it is faster.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from .dispatch import triton_unavailable_reason
from .options import BACKENDS, DEFAULTS, Defaults, Options, check_backend_name
from .validation import (
    FUSED_PROJECTIONS_DTYPES,
    FUSED_PROJECTIONS_MAX_CHANNELS,
    KERNEL_DTYPES,
    KERNEL_MAX_HEAD_DIM,
    ONE_KERNEL_MAX_TOKENS,
)

PATHS = ("reference", "sdpa", "cublas_projections", "fused_projections")
TRITON_PATHS = ("cublas_projections", "fused_projections")
"""The paths of the ``triton`` backend."""

class Problem(NamedTuple):
    """What one SRA call computes, as the planner sees it: x (batch, tokens, channels) against
    reduced_tokens keys; ``dtype`` is the compute dtype (autocast's when it is on); ``backward``:
    autograd will differentiate the call."""

    batch: int
    tokens: int
    reduced_tokens: int
    channels: int
    heads: int
    sr_ratio: int
    linear: bool
    dtype: torch.dtype
    backward: bool

    @classmethod
    def of_shape(cls, shape, dtype: torch.dtype, backward: bool) -> Problem:
        """From a :class:`sra_kernels.shapes.SRAShape`."""
        return cls(shape.batch, shape.tokens, shape.reduced_tokens, shape.channels, shape.heads, shape.sr_ratio,
                   shape.linear, dtype, backward)


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """Autocast's dtype when autocast is on for x's device and would cast x (it leaves fp64 alone), else None:
    the custom ops are opaque to autocast, so the triton paths cast as it casts Conv2d and Linear."""
    device = x.device.type
    if device in ("cuda", "cpu") and x.dtype != torch.float64 and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return None


def differentiated(*tensors) -> bool:
    """Whether autograd will differentiate a call on these tensors (None entries are absent parameters)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class Launch(NamedTuple):
    """One launch of a pass: ``name`` is the cost model's key; ``kind`` "triton" (ours), "gemm" (cuBLAS) or
    "torch" (another PyTorch kernel); ``kernel`` the Triton kernel a "triton" launch runs."""

    name: str
    kind: str
    kernel: str | None = None


class Plan(NamedTuple):
    """How a call runs: ``path`` (see the module docstring), ``route`` (which composition of the path's
    launches), the launches of the forward and of the backward, the backward's determinism and why."""

    path: str
    route: str
    forward: tuple[Launch, ...]
    backward: tuple[Launch, ...]
    deterministic: bool
    reason: str

    @property
    def backend(self) -> str:
        return "triton" if self.path in TRITON_PATHS else self.path


# --------------------------------------------------------------------------- routes and their launches
_GEMM = "gemm"
# the conv weight as the module keeps it (channels_last: read in place; a standard-layout one adds a relayout copy)
_REDUCTION = (Launch("reduce", "triton", "_patch_gemm_kernel"), Launch("reduce_norm", "triton", "_sum_norm_kernel"))
_REDUCTION_KV = (_REDUCTION[0], Launch("reduce_norm_kv", "triton", "_sum_norm_kernel"))
_POOL = (Launch("pool", "triton", "_adaptive_pool_kernel"),)
_REDUCTION_BACKWARD = (Launch("reduce_norm_bwd", "triton", "_norm_bwd_kernel"),
                       Launch("reduce_dgrad", "triton", "_patch_dgrad_kernel"),
                       Launch("conv_weight_grad", "triton", "_conv_weight_grad_kernel"),
                       Launch("conv_weight_grad_sum", "triton", "_weight_grad_sum_kernel"))
_ATTENTION_BACKWARD = (Launch("proj_bwd", _GEMM), Launch("attention_bwd", "triton", "_bwd_kernel"))
# the out bias's partial column sums, then every bias / norm-parameter gradient from its partials in one launch
_PARAMETER_GRADS = (Launch("out_bias_partials", "triton", "_column_partials_kernel"),
                    Launch("param_grads", "triton", "_finish_column_sums_kernel"))
_PROJECTED = Launch("projected_attention", "triton", "_projected_fwd_kernel")

ROUTES = {
    "reduce_attend": "q GEMM, reduction kernels (patch GEMM, LayerNorm), kv GEMM, attention kernel, out GEMM",
    "attend": "q and kv GEMMs, attention kernel, out GEMM (sr = 1: keys are x)",
    "reduce_project_attend": "reduction kernels (kv projected after the LayerNorm), projected-attention kernel",
    "project_attend_self": "one kernel: q, k, v, attention and out projection (sr = 1)",
    "kv_project_attend": "kv GEMM, then the projected-attention kernel (sr = 1)",
    "sdpa": "Conv2d + LayerNorm, Linears, F.scaled_dot_product_attention",
    "reference": "the eager PVT math",
}
"""Route -> what it launches, in words (``python -m sra_kernels --explain`` prints it)."""


def _launches(route: str, linear: bool) -> tuple[tuple[Launch, ...], tuple[Launch, ...]]:
    """(forward, backward) launches of ``route``; ``linear`` adds the 7x7 pool and its backward."""
    pool = _POOL if linear else ()
    pool_bwd = (Launch("pool_bwd", "triton", "_adaptive_pool_bwd_kernel"),) if linear else ()
    projection_bwd = _ATTENTION_BACKWARD + (Launch("kv_bwd", _GEMM), Launch("q_bwd", _GEMM))
    if route == "reduce_attend":
        forward = (Launch("q", _GEMM), *pool, *_REDUCTION, Launch("kv", _GEMM),
                   Launch("attention", "triton", "_fwd_kernel"), Launch("proj", _GEMM))
        return forward, projection_bwd + _REDUCTION_BACKWARD + pool_bwd + _PARAMETER_GRADS
    if route == "attend":
        forward = (Launch("q", _GEMM), Launch("kv", _GEMM), Launch("attention", "triton", "_fwd_kernel"),
                   Launch("proj", _GEMM))
        return forward, (*_ATTENTION_BACKWARD, Launch("kv_bwd", _GEMM), Launch("q_bwd_into_dx", _GEMM),
                         *_PARAMETER_GRADS)
    if route == "reduce_project_attend":
        return (*pool, *_REDUCTION_KV, _PROJECTED), projection_bwd + _REDUCTION_BACKWARD + pool_bwd + _PARAMETER_GRADS
    if route == "project_attend_self":
        forward = (Launch("projected_self_attention", "triton", "_projected_fwd_kernel"),)
        return forward, ((Launch("kv_recompute", _GEMM),) + _ATTENTION_BACKWARD
                         + (Launch("q_bwd", _GEMM), Launch("kv_bwd_into_dx", _GEMM)) + _PARAMETER_GRADS)
    if route == "kv_project_attend":
        return (Launch("kv", _GEMM), _PROJECTED), projection_bwd + (Launch("dx_sum", "torch"),) + _PARAMETER_GRADS
    return (), ()  # sdpa, reference: PyTorch's own sequence (cost.py's "unfused" ops for the reference)


def _route(path: str, problem: Problem) -> str:
    reduces = problem.linear or problem.sr_ratio > 1
    if path == "cublas_projections":
        return "reduce_attend" if reduces else "attend"
    if path == "fused_projections":
        if reduces:
            return "reduce_project_attend"
        return "project_attend_self" if problem.tokens <= ONE_KERNEL_MAX_TOKENS else "kv_project_attend"
    return path


def make_plan(path: str, problem: Problem, deterministic: bool, reason: str) -> Plan:
    """The plan that runs ``problem`` on ``path`` (one of :data:`PATHS`; whether it may is :func:`plan_sra`'s
    business)."""
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    route = _route(path, problem)
    forward, backward = _launches(route, problem.linear)
    return Plan(path, route, forward, backward, deterministic, reason)


# --------------------------------------------------------------------------- what may run where
def _kernel_limits(dtype: torch.dtype, head_dim: int | None) -> str | None:
    if dtype not in KERNEL_DTYPES:
        return f"inputs must be fp32, fp16 or bf16 for backend 'triton', got {dtype}"
    if head_dim is not None and head_dim > KERNEL_MAX_HEAD_DIM:
        return f"head_dim (C // num_heads) must be <= {KERNEL_MAX_HEAD_DIM} for backend 'triton', got {head_dim}"
    return None


def kernels_refuse(problem: Problem) -> str | None:
    """Why our Triton kernels cannot take ``problem`` (None when they can)."""
    return _kernel_limits(problem.dtype, problem.channels // problem.heads)


def fused_projections_refuse(problem: Problem) -> str | None:
    """Why the fused-projection path cannot take ``problem`` (None when it can)."""
    if problem.channels > FUSED_PROJECTIONS_MAX_CHANNELS:
        return f"the fused-projection kernels take C <= {FUSED_PROJECTIONS_MAX_CHANNELS}, got C={problem.channels}"
    if problem.dtype not in FUSED_PROJECTIONS_DTYPES:
        return f"the fused-projection kernels run in fp16 / bf16, got {problem.dtype}"
    return kernels_refuse(problem)


def resolve_backend(backend: str, device: torch.device, defaults: Defaults = DEFAULTS) -> tuple[str, bool]:
    """(backend, named): ``auto`` becomes the default backend; ``named`` is True when the call (or the
    environment) named a backend. Raises for an unknown name or a triton backend that cannot run here."""
    check_backend_name(backend)
    source = "backend"
    if backend == "auto":
        backend, source = defaults.backend, defaults.source
    if backend == "auto":
        return backend, False
    if backend not in BACKENDS:
        raise ValueError(f"{source} must be one of {('auto',) + BACKENDS}, got {backend!r}")
    if backend == "triton":
        reason = triton_unavailable_reason(device)
        if reason is not None:
            raise RuntimeError(f"backend 'triton' cannot run here: {reason}")
    return backend, source == "backend"


Measure = Callable[[str], float]
"""Seconds one call of the problem takes on a path (what the autotuner times)."""


def plan_sra(problem: Problem, device: torch.device, backend: str = "auto", options: Options = Options(), *,
             dropout_p: float = 0.0, compiling: bool = False, jit_tracing: bool = False, onnx_export: bool = False,
             measure: Measure | None = None, defaults: Defaults = DEFAULTS,
             capability: tuple[int, int] | None = None) -> Plan:
    """The plan of one SRA call (see the module docstring).

    * attention dropout (``dropout_p > 0``) runs ``sdpa``, whose fused attention applies it;
    * ``reference`` / ``sdpa`` run as named; ``triton`` runs our kernels or raises a ValueError naming what
      they cannot take; the fused-projection path where ``options.fuse_projections`` asks for it, else
      what the table measured faster among the two triton paths, else ``cublas_projections``;
    * ``auto`` (the default backend unless ``SRA_KERNELS_BACKEND`` says otherwise): ``sdpa`` where our
      kernels cannot run; the fused-projection path where ``fuse_projections=True`` and it applies; else
      the autotuner's choice (``options.autotune``, given ``measure``: timed once per problem, then
      cached), else the measured table (:mod:`sra_kernels.policy`), else ``sdpa``.

    ``compiling``: the call is being traced by torch.compile (the table then compares against compiled
    PyTorch, and nothing is timed). ``jit_tracing``: ``torch.jit.trace`` is recording, which cannot record our
    kernels (``auto`` runs ``sdpa``; ``triton`` raises). ``capability``: the CUDA device's (major, minor), default
    read from it (``python -m sra_kernels --explain`` passes one to show another GPU's plan). ``onnx_export``: an
    ONNX exporter is tracing, whose graph must hold standard ops: ``reference`` runs as named, any other backend
    ``sdpa`` (exported as MatMul / Softmax, or Attention).
    """
    from . import autotune, policy  # the table and the tuner import this module's paths

    deterministic = options.deterministic
    if dropout_p > 0:
        return make_plan("sdpa", problem, deterministic, "attention dropout: sdpa's fused attention applies it")
    if onnx_export:  # before resolve_backend: a triton model exports on a machine that cannot run the kernels
        check_backend_name(backend)
        path = "reference" if (defaults.backend if backend == "auto" else backend) == "reference" else "sdpa"
        return make_plan(path, problem, deterministic, f"ONNX export: backend={backend!r} runs {path}")
    backend, named = resolve_backend(backend, device, defaults)
    if backend in ("reference", "sdpa"):
        return make_plan(backend, problem, deterministic, f"backend={backend!r}")
    if jit_tracing:
        if named:
            raise RuntimeError(JIT_TRACE_REFUSED)
        return make_plan("sdpa", problem, deterministic, f"auto: {JIT_TRACE_REFUSED}")
    refused = kernels_refuse(problem) or (None if backend == "triton" else _auto_refuses(device))
    if refused:
        if named:
            raise ValueError(refused)
        return make_plan("sdpa", problem, deterministic, f"auto: {refused}")
    fused_refused = fused_projections_refuse(problem)
    if options.fuse_projections and fused_refused is None:
        return make_plan("fused_projections", problem, deterministic, "fuse_projections=True")
    ours = ("cublas_projections",) if options.fuse_projections is False or fused_refused else TRITON_PATHS
    candidates = ours if backend == "triton" else ("sdpa",) + ours
    if len(candidates) == 1:
        return make_plan(candidates[0], problem, deterministic, _forced_reason(backend, options, fused_refused))
    if options.autotune:  # under torch.compile: the cache only, nothing is timed while tracing
        chosen = autotune.choose(problem, device, candidates, None if compiling else measure)
        if chosen is not None:
            return make_plan(chosen[0], problem, deterministic, chosen[1])
    if capability is None:
        capability = policy.device_capability(device)
    measured = policy.lookup(problem, capability, candidates, compiling)
    if measured is not None:
        return make_plan(measured[0], problem, deterministic, measured[1])
    if backend == "triton":
        return make_plan("cublas_projections", problem, deterministic,
                         "backend='triton': no measurement between its paths here, so the unfused projections")
    return make_plan("sdpa", problem, deterministic, f"auto: {policy.no_data_reason(problem, capability)}")


JIT_TRACE_REFUSED = ("torch.jit.trace cannot record the triton backend's kernels: use torch.compile or torch.export, "
                     "or backend='sdpa' for TorchScript")


def _auto_refuses(device: torch.device) -> str | None:
    """Why ``auto`` does not consider our kernels on ``device`` (they are for CUDA; the interpreter is for tests)."""
    if device.type != "cuda":
        return f"our kernels run on CUDA devices, not {device.type} (backend='triton' forces them)"
    return triton_unavailable_reason(device)


def _forced_reason(backend: str, options: Options, fused_refused: str | None) -> str:
    if options.fuse_projections is False:
        return f"backend={backend!r}, fuse_projections=False"
    if options.fuse_projections and fused_refused:
        return f"backend={backend!r}, fuse_projections=True, but {fused_refused}"
    return f"backend={backend!r}" + (f"; {fused_refused}" if fused_refused else "")


def building_block_backend(backend: str, device: torch.device, dtype: torch.dtype, head_dim: int | None = None,
                           defaults: Defaults = DEFAULTS) -> str:
    """The backend of a building-block call (``spatial_reduce``, ``reduced_kv_attention``): as named, or under
    ``auto`` our kernel on CUDA (they are the fused blocks themselves) and PyTorch's elsewhere. What the
    kernels cannot take (fp64, head_dim > 128) runs PyTorch's under ``auto`` and raises when named."""
    backend, named = resolve_backend(backend, device, defaults)
    if backend == "auto":
        backend = "triton" if device.type == "cuda" and triton_unavailable_reason(device) is None else "sdpa"
    if backend != "triton":
        return backend
    refused = _kernel_limits(dtype, head_dim)
    if refused and named:
        raise ValueError(refused)
    return "sdpa" if refused else "triton"
