"""Host time of an eager SRA call: what Python, the dispatcher and autograd cost when the device work is taken away.

At PVT sizes every provider's eager call is host-bound on a GPU (benchmarks/results/2026-11-26-h200), and this
is the part our code controls. The call runs on the CPU at a tiny shape (batch 1, 8x8 tokens, 16 channels: at 64
the CPU copy of the conv weight into tap-major order alone took 100 us, device work on a GPU), where the CPU math
of ``sdpa`` and of the torch ops around our kernels is negligible next to the host work; our Triton launches are
stubbed out (each ``*_kernel[grid](...)`` returns at once, the launcher's own work and allocations stay). Rows:
``sra_kernels`` (backend triton, path cublas_projections) and ``sdpa``, forward (no_grad) and forward+backward,
for a reducing stage and an sr = 1 stage. Timed with ``time.perf_counter`` on the CPU even where CUDA is present.
"""

from __future__ import annotations

import contextlib
import time

import pytest
import torch

from sra_kernels import SpatialReductionAttention, dispatch
from sra_kernels.ops import attention, column_sum, projected_attention, spatial_reduce

CASES = {"C16 h1 sr4 8x8": (16, 1, 4), "C16 h2 sr1 8x8": (16, 2, 1)}
"""case -> (channels, heads, sr_ratio) of a batch-1, 8x8-token call."""
PROVIDERS = {"sra_kernels": dict(backend="triton", fuse_projections=False), "sdpa": dict(backend="sdpa")}
MODES = ("fwd", "fwd+bwd")
ROUNDS, WARMUP = 200, 20


class _NoLaunch:
    """Stands in for Triton kernel ``name``: ``kernel[grid](*args, **kwargs)`` does nothing but append the name
    to ``launched`` (when given)."""

    def __init__(self, name: str, launched: list | None):
        self.name, self.launched = name, launched

    def __getitem__(self, grid):
        if self.launched is None:
            return lambda *args, **kwargs: None
        return lambda *args, **kwargs: self.launched.append(self.name)


@contextlib.contextmanager
def stubbed_kernels(launched: list | None = None):
    """Every Triton kernel of the op modules a no-op (recording its name in ``launched`` when given), and CPU
    tensors accepted by the triton backend."""
    modules = (attention, column_sum, projected_attention, spatial_reduce)
    patches = {(module, name): _NoLaunch(name, launched) for module in modules for name, value in vars(module).items()
               if name.endswith("_kernel") and hasattr(value, "run")}
    patches.update({(attention, "INTERPRETED"): True, (projected_attention, "INTERPRETED"): True,
                    (dispatch, "KERNELS_INTERPRETED"): True, (dispatch, "interpreter_enabled"): lambda: True})
    saved = {key: getattr(*key) for key in patches}
    for (module, name), value in patches.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for (module, name), value in saved.items():
            setattr(module, name, value)


def _host_seconds(fn) -> list[float]:
    for _ in range(WARMUP):
        fn()
    samples = []
    for _ in range(ROUNDS):
        begin = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - begin)
    return samples


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES)
def test_host_time(case, mode, provider, record):
    C, heads, sr = CASES[case]
    torch.manual_seed(0)
    module = SpatialReductionAttention(C, heads, qkv_bias=True, sr_ratio=sr, **PROVIDERS[provider])
    x = torch.randn(1, 64, C, requires_grad=mode == "fwd+bwd")
    grad = torch.randn(1, 64, C)

    def call():
        with torch.set_grad_enabled(mode == "fwd+bwd"):
            out = module(x, 8, 8)
        if mode == "fwd+bwd":
            out.backward(grad)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as on a GPU host: no CPU thread pool spinning up for the tiny torch ops
    try:
        with stubbed_kernels() if provider == "sra_kernels" else contextlib.nullcontext():
            samples = _host_seconds(call)
    finally:
        torch.set_num_threads(threads)
    record(f"{case} {mode}", provider, samples, kind="host", shape=case, mode=mode)
