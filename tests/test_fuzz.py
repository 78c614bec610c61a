"""Hypothesis fuzzing of the triton backend over random SRA shapes: forward and dx against the
float64 reference, fp32 on the cublas_projections path and bf16 on the fused-projection path (the
interpreter on CPU; natively on CUDA)."""

from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sra_kernels import fused, sra_attention
from tests.accuracy import assert_within_reference_error
from tests.conftest import KERNEL_DEVICES

pytestmark = pytest.mark.skipif(not KERNEL_DEVICES, reason="Triton kernels need CUDA or TRITON_INTERPRET=1")


@st.composite
def sra_shapes(draw):
    """(B, H, W, C, heads, sr, linear): any grid, heads dividing C, head_dim 8..40, sr up to min(H, W)."""
    H, W = draw(st.integers(1, 16)), draw(st.integers(1, 16))
    heads = draw(st.sampled_from([1, 2, 3, 5, 8]))
    head_dim = draw(st.sampled_from([8, 16, 20, 32, 40]))
    linear = draw(st.booleans())
    sr = 1 if linear else draw(st.integers(1, min(H, W, 8)))
    return draw(st.integers(1, 2)), H, W, heads * head_dim, heads, sr, linear


@settings(max_examples=8, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(shape=sra_shapes())
def test_random_shapes_match_reference(shape):
    assert _check_against_reference(shape, torch.float32) == "cublas_projections"


@settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(shape=sra_shapes().filter(lambda shape: shape[3] <= 128))
def test_random_shapes_match_reference_with_fused_projections(shape):
    """fuse_projections=True in bf16: the fused-projection path (C <= 128), one kernel for sr = 1 over <= 64
    tokens."""
    assert _check_against_reference(shape, torch.bfloat16, fuse_projections=True) == "fused_projections"


def _check_against_reference(shape, dtype, **options):
    """Output and dx of the triton backend in ``dtype`` (with ``options``) within the accuracy rule of the
    float64 reference; returns the path the triton call took."""
    B, H, W, C, heads, sr, linear = shape
    device = torch.device(KERNEL_DEVICES[0])
    g = torch.Generator().manual_seed(hash(shape) % 2**31)

    def r(*size, std=1.0):
        return (torch.randn(*size, generator=g, dtype=torch.float64) * std).to(device)

    k = 1 if linear else sr
    reduces = linear or sr > 1
    weights = [r(C, C, std=C ** -0.5), r(C, std=0.2), r(2 * C, C, std=C ** -0.5), r(2 * C, std=0.2),
               r(C, C, std=C ** -0.5), r(C, std=0.2)]
    weights += [r(C, C, k, k, std=(C * k * k) ** -0.5), r(C, std=0.2), 1 + r(C, std=0.2), r(C, std=0.2)] \
        if reduces else [None] * 4
    x = r(B, H * W, C)
    grad = r(B, H * W, C)
    x, grad, weights = x.to(dtype).double(), grad.to(dtype).double(), \
        [w.to(dtype).double() if w is not None else None for w in weights]  # representable in dtype
    results, plans = {}, []
    run = fused.sra_attention_triton
    for backend, run_dtype in (("reference", torch.float64), ("reference", dtype), ("triton", dtype)):
        xi = x.to(run_dtype).requires_grad_()
        with mock.patch.object(fused, "sra_attention_triton", lambda *a, **k: plans.append(k["plan"]) or run(*a, **k)):
            out = sra_attention(xi, (H, W), *[w.to(run_dtype) if w is not None else None for w in weights],
                                num_heads=heads, sr_ratio=sr, linear=linear, backend=backend,
                                **(options if backend == "triton" else {}))
        (dx,) = torch.autograd.grad(out, xi, grad.to(run_dtype))
        results[backend, run_dtype] = (out, dx)
    exact, peer, got = results["reference", torch.float64], results["reference", dtype], results["triton", dtype]
    for name, g_, e, p in zip(("out", "dx"), got, exact, peer):
        assert_within_reference_error(f"{name} at {shape}", g_, e, p, dtype)
    (plan,) = plans
    return plan.path
