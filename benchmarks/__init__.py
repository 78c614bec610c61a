"""Benchmarks of sra-kernels (pytest-benchmark suites) and the timing tools they share.

Timing (:func:`measure`)
    CUDA: ``triton.testing.do_bench(return_mode="all")`` -- CUDA-event times of single calls after
    its warm-up, the L2 cache flushed before every call (outside the timed region), gradients reset
    between calls; the timed callables also rotate over ``ROTATE`` input buffers. CPU:
    ``time.perf_counter`` around single calls, at least ``CPU_MIN_ROUNDS`` calls and until
    ``CPU_BUDGET_S`` seconds have passed. Callers warm up (compile) before measuring.

Reporting to pytest-benchmark (:class:`ReplayClock`)
    The measured samples are replayed into ``benchmark.pedantic``: one round per sample, each round
    advancing the replay clock (the benchmarks' ``timer``) by exactly that sample, so pytest-benchmark's
    min / median / mean / stddev / rounds are the statistics of the device-timed calls and nothing
    else; the replayed rounds do no work.

GPU kernel time (:func:`kernel_ms`): torch.profiler's summed device time of the kernels of a few
    calls, reported beside the median as ``gpu_ms``: the median is what an eager caller waits, host
    launch overhead included; ``gpu_ms`` is the kernels alone.

Ceilings (:func:`measure_ceilings`): a large device-to-device copy (bytes read + written per second)
and a large square matmul per dtype (FLOP/s) on random data, timed the same way.
"""

from __future__ import annotations

import itertools
import os
import platform
import subprocess
import time
from dataclasses import dataclass

import torch

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
ROTATE = 4 if CUDA else 2
"""Input buffers each timed callable cycles through (caches must not flatter the numbers)."""
CPU_MIN_ROUNDS, CPU_BUDGET_S = 3, 0.3
CUDA_WARMUP_MS, CUDA_REP_MS = 25, 100


def device_name() -> str:
    if CUDA:
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def git_commit() -> str:
    """``$SRA_GIT_COMMIT`` when set (a copy without .git), else ``git rev-parse HEAD``."""
    if os.environ.get("SRA_GIT_COMMIT"):
        return os.environ["SRA_GIT_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_info() -> dict:
    """Device, versions and commit: recorded in every results file."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return {"device": device_name(), "capability": list(torch.cuda.get_device_capability()) if CUDA else None,
            "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
            "git_commit": git_commit()}


PROVIDER_OPTIONS = {
    "sra_kernels": dict(backend="triton", fuse_projections=False),
    "sra_kernels_projected": dict(backend="triton", fuse_projections=True),
    "auto": dict(backend="auto"),
    "sdpa": dict(backend="sdpa"),
    "reference": dict(backend="reference"),
}
"""Provider -> the attention options it runs with (``SpatialReductionAttention.configure``): ``sra_kernels`` is
our unfused-projection path, ``sra_kernels_projected`` the fused one, ``auto`` the default policy."""


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]


def synchronize() -> None:
    if CUDA:
        torch.cuda.synchronize()


def median(samples: list[float]) -> float:
    ordered = sorted(samples)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def measure(fn, grad_to_none=()) -> list[float]:
    """Seconds per call of an already warmed-up ``fn``; the grads of ``grad_to_none`` are reset between calls."""
    if CUDA:
        import triton.testing

        ms = triton.testing.do_bench(fn, warmup=CUDA_WARMUP_MS, rep=CUDA_REP_MS,
                                     grad_to_none=list(grad_to_none) or None, return_mode="all")
        return [t * 1e-3 for t in ms]
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < CPU_MIN_ROUNDS or time.perf_counter() - start < CPU_BUDGET_S:
        for t in grad_to_none:
            t.grad = None
        begin = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - begin)
    return samples


def peak_memory_mb(fn) -> float | None:
    """MB (1e6 bytes) of CUDA memory one call of ``fn`` allocates at its peak above what was allocated
    before it: outputs, saved activations, gradients, workspaces (None on CPU)."""
    if not CUDA:
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 1e6


def kernel_ms(fn, calls: int = 5) -> float | None:
    """GPU kernel time per call of an already warmed-up ``fn``: the summed device time of every kernel,
    copy and memset it launches (torch.profiler), without the host's launch gaps (None on CPU).

    Next to the event-timed median this separates the kernels' cost from the host's: when the host
    takes longer to enqueue a call than the GPU to run it, the median measures the host."""
    if not CUDA:
        return None
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return sum(event.self_device_time_total for event in prof.key_averages()) / calls / 1e3


def rotating(count: int):
    """A callable returning 0, 1, ..., count - 1, 0, 1, ... (the next input buffer to use)."""
    indices = itertools.cycle(range(count))
    return lambda: next(indices)


class ReplayClock:
    """A pytest-benchmark timer whose time advances only by replayed, already measured samples."""

    __name__ = "replay_clock"

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def replay(self, benchmark, samples: list[float]) -> None:
        """Run ``benchmark.pedantic`` with one round per sample, each lasting exactly that sample."""
        pending = iter(samples)

        def advance():
            self.now += next(pending)

        benchmark.pedantic(advance, rounds=len(samples), iterations=1, warmup_rounds=0)


REPLAY_CLOCK = ReplayClock()


@dataclass
class Ceilings:
    """Measured device ceilings: copy bandwidth (bytes read + written per second), matmul FLOP/s per dtype."""

    copy_bytes_per_s: float
    matmul_flops_per_s: dict[torch.dtype, float]

    def as_info(self) -> dict:
        return {"copy_GBps": round(self.copy_bytes_per_s / 1e9, 1),
                "matmul_TFLOPs": {dtype_name(d): round(r / 1e12, 3) for d, r in self.matmul_flops_per_s.items()}}


def measure_ceilings() -> Ceilings:
    """1 GiB copy and 8192^3 matmuls on CUDA; 64 MiB and 1024^3 (bf16: 512^3) on CPU."""
    copy_bytes = 2**30 if CUDA else 2**26
    src = torch.randn(copy_bytes // 4, device=DEVICE)
    dst = torch.empty_like(src)
    dst.copy_(src)
    copy_bw = 2 * copy_bytes / median(measure(lambda: dst.copy_(src)))
    del src, dst
    rates = {}
    for dtype, n in ((torch.bfloat16, 8192 if CUDA else 512), (torch.float32, 8192 if CUDA else 1024)):
        a = torch.randn(n, n, device=DEVICE, dtype=dtype)
        b = torch.randn(n, n, device=DEVICE, dtype=dtype)
        a @ b
        rates[dtype] = 2 * n**3 / median(measure(lambda: a @ b))
    return Ceilings(copy_bw, rates)


def roofline_info(cost, median_s: float, ceilings: Ceilings) -> dict:
    """Achieved rates of a call of median ``median_s`` seconds, against its ``SRACost`` (fused ideal:
    FLOPs in SDPA's convention and minimal bytes) and the measured ceilings for the cost's dtype."""
    flops, min_bytes = cost.fused.flops, cost.fused.bytes
    rate, bandwidth = ceilings.matmul_flops_per_s[cost.dtype], ceilings.copy_bytes_per_s
    floor_s = cost.fused.floor_seconds(rate, bandwidth)
    return dict(tflops=flops / median_s / 1e12, gbps=min_bytes / median_s / 1e9,
                pct_copy_bw=100 * min_bytes / median_s / bandwidth, pct_matmul=100 * flops / median_s / rate,
                floor_ms=floor_s * 1e3, pct_roofline=100 * floor_s / median_s)
