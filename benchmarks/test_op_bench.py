"""SRA op benchmarks: every attention stage of pvt_v2_b2 and pvt_small, providers side by side.

GPU shapes: 224x224 at batch 64, 512x512 at batch 16, 800x1333 at batch 2; a stage both models share
(same grid, channels, heads, sr) is timed once and its ``extra_info["models"]`` names both. Modes:
``fwd`` (inference, under no_grad) and ``fwd+bwd`` (x and every weight get gradients); bf16 and fp32.
Providers, each a ``SpatialReductionAttention`` with random weights: ``sra_kernels`` (backend triton,
path ``cublas_projections``), ``sra_kernels_projected`` (backend triton, ``fuse_projections=True``: rows
where the plan takes ``fused_projections``, C <= 128 in bf16), ``auto`` (the default: the measured policy
of :mod:`sra_kernels.plan`; its rows record the path taken), ``reference`` (PVT's eager math), ``sdpa``
(conv + LayerNorm + SDPA, as timm), ``compiled``
(``torch.compile`` of the sdpa module, mode ``$SRA_BENCH_COMPILE_MODE`` or "default", static shapes;
dynamo is reset for every row, so each row compiles its own graph). The ``sra_kernels*`` and
``compiled`` rows first check their forward output against eager sdpa.

CPU: the 224x224 shapes at batch 1, no triton provider, one compiled row (see the skip reasons).
Select rows with ``-k``, e.g. ``-k "bf16 and fwd and not compiled"``.
"""

from __future__ import annotations

import copy
import dataclasses
import os

import pytest
import torch

from benchmarks import (
    CUDA,
    DEVICE,
    PROVIDER_OPTIONS,
    ROTATE,
    dtype_name,
    kernel_ms,
    measure,
    peak_memory_mb,
    rotating,
    synchronize,
)
from sra_kernels import SpatialReductionAttention
from sra_kernels.cost import SRACost, sra_attention_cost
from sra_kernels.options import Options
from sra_kernels.plan import Plan, Problem, plan_sra
from sra_kernels.shapes import SRAShape, model_stages

RESOLUTIONS = {"224x224": ((224, 224), 64), "512x512": ((512, 512), 16), "800x1333": ((800, 1333), 2)}
"""name -> (image size, GPU batch)."""
MODELS = ("pvt_v2_b2", "pvt_small")
DTYPES = (torch.bfloat16, torch.float32)
MODES = {"fwd": "forward", "fwd+bwd": "forward+backward"}
PROVIDERS = ("sra_kernels", "sra_kernels_projected", "auto", "compiled", "sdpa", "reference")
ATTENTION_OPTIONS = {**PROVIDER_OPTIONS, "compiled": dict(backend="sdpa")}
"""Provider -> the module's attention options; ``compiled`` is torch.compile of the sdpa module."""
COMPILE_MODE = os.environ.get("SRA_BENCH_COMPILE_MODE", "default")
CHECK_TOLERANCE = {torch.bfloat16: 3e-2, torch.float32: 1e-3}
"""Largest relative L2 error of a checked provider's forward output against eager sdpa."""

CPU_RESOLUTIONS, CPU_BATCH = ("224x224",), 1
CPU_COMPILED_ROW = ("224x224-s4-7x7", torch.float32, "fwd")


@dataclasses.dataclass(frozen=True)
class StageCase:
    resolution: str
    stage: int
    shape: SRAShape
    """At the GPU batch."""
    models: tuple[str, ...]

    @property
    def id(self) -> str:
        return f"{self.resolution}-s{self.stage}-{self.shape.label}"


def _stage_cases() -> list[StageCase]:
    models: dict[tuple, tuple[str, ...]] = {}
    for resolution, (size, batch) in RESOLUTIONS.items():
        for model in MODELS:
            for stage, shape in enumerate(model_stages(model, size, batch), start=1):
                key = (resolution, stage, shape)
                models[key] = models.get(key, ()) + (model,)
    return [StageCase(*key, names) for key, names in models.items()]


CASES = _stage_cases()


def _gpu_plan(shape: SRAShape, dtype: torch.dtype, mode: str, provider: str) -> Plan:
    """The plan a CUDA call of ``provider`` makes (this GPU's, or with no GPU here any GPU's without data)."""
    options = ATTENTION_OPTIONS[provider]
    return plan_sra(Problem.of_shape(shape, dtype, mode == "fwd+bwd"), torch.device("cuda"), options["backend"],
                    Options(fuse_projections=options.get("fuse_projections")))


def _skip_reason(case: StageCase, dtype: torch.dtype, mode: str, provider: str) -> str | None:
    if provider == "sra_kernels_projected":
        plan = _gpu_plan(case.shape, dtype, mode, provider)
        if plan.path != "fused_projections":
            return f"sra_kernels_projected: the plan runs {plan.path} here ({plan.reason})"
    if CUDA:
        return None
    if provider == "auto":
        return "auto runs sdpa off CUDA: the sdpa row is that measurement"
    if provider.startswith("sra_kernels"):
        return "sra_kernels (triton) runs on CUDA only here: TRITON_INTERPRET is for tests, far too slow to time"
    if case.resolution not in CPU_RESOLUTIONS:
        return f"GPU-only shape: on CPU only {', '.join(CPU_RESOLUTIONS)} runs, at batch {CPU_BATCH}"
    if provider == "compiled" and (case.id, dtype, mode) != CPU_COMPILED_ROW:
        return "torch.compile costs ~30 s a row on CPU: the CPU run compiles only 224x224-s4-7x7 fp32 fwd"
    return None


def _fields(case: StageCase, shape: SRAShape, dtype: torch.dtype, mode: str, cost: SRACost) -> dict:
    """The case's key fields and analytic cost, for the JSON and the tables."""
    return dict(kind="op", models=", ".join(case.models), resolution=case.resolution, stage=case.stage,
                grid=shape.label, batch=shape.batch, N=shape.tokens, M=shape.reduced_tokens, C=shape.channels,
                heads=shape.heads, sr_ratio=shape.sr_ratio, linear=shape.linear, dtype=dtype_name(dtype), mode=mode,
                gflop=cost.fused.flops / 1e9, min_mb=cost.fused.bytes / 1e6,
                triton_mb=cost.cublas_projections.bytes / 1e6,
                projected_mb=(cost.fused_projections.bytes / 1e6
                              if _gpu_plan(shape, dtype, mode, "sra_kernels_projected").path == "fused_projections"
                              else None),
                unfused_mb=cost.unfused.bytes / 1e6, scores_mb=cost.score_matrix_bytes / 1e6)


def _module(shape: SRAShape, dtype: torch.dtype, provider: str) -> SpatialReductionAttention:
    torch.manual_seed(0)
    module = SpatialReductionAttention(shape.channels, shape.heads, qkv_bias=True, sr_ratio=shape.sr_ratio,
                                       linear=shape.linear, **ATTENTION_OPTIONS[provider])
    return module.to(DEVICE, dtype)


def _check_forward(out: torch.Tensor, module: SpatialReductionAttention, x: torch.Tensor, size) -> None:
    """The timed provider computes the op: its output ``out`` matches eager sdpa on the same weights."""
    eager = copy.deepcopy(module)
    eager.backend = "sdpa"
    with torch.no_grad():
        want = eager(x, *size).double()
    error = ((out.detach().double() - want).norm() / want.norm()).item()
    assert error <= CHECK_TOLERANCE[x.dtype], f"forward differs from eager sdpa: relative L2 error {error:.2e}"


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_sra_op(case, dtype, mode, provider, results, record):
    gpu_cost = sra_attention_cost(case.shape, dtype, MODES[mode])
    results.costs.setdefault(f"{case.id} {dtype_name(dtype)} {mode}",
                             _fields(case, case.shape, dtype, mode, gpu_cost))
    reason = _skip_reason(case, dtype, mode, provider)
    if reason:
        results.skip(reason)
    shape = case.shape if CUDA else dataclasses.replace(case.shape, batch=CPU_BATCH)
    module = _module(shape, dtype, provider)
    run = module
    if provider == "compiled":
        torch._dynamo.reset()
        run = torch.compile(module, mode=COMPILE_MODE, dynamic=False)
    train = mode == "fwd+bwd"
    B, N, C = shape.batch, shape.tokens, shape.channels
    xs = [torch.randn(B, N, C, device=DEVICE, dtype=dtype, requires_grad=train) for _ in range(ROTATE)]
    dys = [torch.randn(B, N, C, device=DEVICE, dtype=dtype) for _ in range(ROTATE)] if train else []
    next_index = rotating(ROTATE)

    def call():
        i = next_index()
        with torch.set_grad_enabled(train):
            out = run(xs[i], *shape.size)
        if train:
            out.backward(dys[i])
        return out

    grads = xs + list(module.parameters()) if train else []
    out = call()  # warm-up: compiles kernels / graphs; checked below
    if provider not in ("sdpa", "reference"):
        _check_forward(out, module, xs[0].detach(), shape.size)
    del out
    synchronize()
    for t in grads:
        t.grad = None
    peak = peak_memory_mb(call)
    gpu_ms = kernel_ms(call)
    samples = measure(call, grads)
    cost = sra_attention_cost(shape, dtype, MODES[mode])
    record(f"{case.id} B{shape.batch} {dtype_name(dtype)} {mode}", provider, samples, cost=cost,
           peak_mem_mb=peak, gpu_ms=gpu_ms, compile_mode=COMPILE_MODE if provider == "compiled" else None,
           path="sdpa" if provider == "compiled" else _gpu_plan(shape, dtype, mode, provider).path,
           **_fields(case, shape, dtype, mode, cost))
