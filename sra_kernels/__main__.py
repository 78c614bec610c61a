"""``python -m sra_kernels``: versions, device, available backends and a quick self-check;
``python -m sra_kernels --explain MODEL ...``: the path each attention stage takes, and why
(:mod:`sra_kernels.explain`).

The self-check runs one small PVT stage (pvt_v2 stage 2 shape, scaled down on CPU) on every
available backend in fp32 and prints its largest error against the float64 reference and its time.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

from . import __version__, explain, reference
from .dispatch import available_backends, interpreter_enabled
from .options import ENV_BACKEND
from .functional import sra_attention


def _versions() -> list[tuple[str, str]]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return [
        ("sra_kernels", __version__),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("triton", triton_version),
        ("TRITON_INTERPRET", "1 (kernels run in Triton's CPU interpreter)" if interpreter_enabled() else "off"),
        (ENV_BACKEND, os.environ.get(ENV_BACKEND, "(unset)")),
    ]


def _stage_inputs(device: torch.device):
    """One PVTv2-b2 stage-2 attention (C=128, 2 heads, sr=4), 28x28 on CUDA, 12x12 on CPU."""
    side = 28 if device.type == "cuda" else 12
    B, C, heads, sr = 2, 128, 2, 4
    g = torch.Generator().manual_seed(0)

    def r(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(device)

    args = (r(B, side * side, C), (side, side), r(C, C, std=C ** -0.5), r(C, std=0.1), r(2 * C, C, std=C ** -0.5),
            r(2 * C, std=0.1), r(C, C, std=C ** -0.5), r(C, std=0.1), r(C, C, sr, sr, std=(C * sr * sr) ** -0.5),
            r(C, std=0.1), 1 + r(C, std=0.1), r(C, std=0.1))
    return args, dict(num_heads=heads, sr_ratio=sr)


def self_check(device: torch.device) -> list[tuple[str, float, float]]:
    """(backend, max abs error vs the float64 reference, milliseconds) for every backend here."""
    args64, kwargs = _stage_inputs(device)
    expected = reference.sra_attention(*args64, **kwargs)
    args = tuple(a.float() if isinstance(a, torch.Tensor) else a for a in args64)
    results = []
    for backend in available_backends(device):
        out = sra_attention(*args, **kwargs, backend=backend)  # warm-up (compiles kernels)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = sra_attention(*args, **kwargs, backend=backend)
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed_ms = (time.perf_counter() - start) * 1e3
        results.append((backend, (out.double() - expected).abs().max().item(), elapsed_ms))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sra_kernels", description=__doc__.split("\n\n")[0])
    explain.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.explain:
        return explain.main(args)
    for name, value in _versions():
        print(f"{name:>19}: {value}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"{'device':>19}: {device} ({name})")
    print(f"{'backends':>19}: {', '.join(available_backends(device))}")
    print("\nself-check: one PVT stage (C=128, 2 heads, sr=4), fp32 vs float64 reference")
    failed = False
    for backend, error, ms in self_check(device):
        ok = error < 1e-3
        failed |= not ok
        print(f"  {backend:>10}: max |error| {error:.2e}  {'ok' if ok else 'FAILED'}  {ms:8.2f} ms")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
