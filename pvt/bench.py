"""Throughput (images/s) and peak memory of one model on several attention backends, side by side."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from sra_kernels import available_backends

from .progress import ProgressBar
from .registry import create_model

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class BenchResult:
    backend: str
    images_per_s: float | None = None
    ms_per_step: float | None = None
    peak_mib: float | None = None  # CUDA only
    error: str | None = None  # "OOM", "unavailable here", ...


def _loss(out) -> torch.Tensor:
    """A scalar from logits (B, classes) or from a list of stage maps (MiT)."""
    if isinstance(out, (list, tuple)):
        return sum(o.float().mean() for o in out)
    return out.float().mean()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_model(name: str, batch: int, img_size: tuple[int, int] = (224, 224), dtype: str = "fp32",
                train: bool = False, backends: list[str] | None = None, steps: int = 20, warmup: int = 5,
                device: str | torch.device | None = None, progress: bool = True) -> list[BenchResult]:
    """Time ``steps`` forward (or forward+backward with ``train``) passes per backend after ``warmup``.

    The model (and input) is cast to ``dtype`` as a whole; every backend runs the same weights. ``auto`` (the
    default policy, :mod:`sra_kernels.plan`) runs everywhere; by default it is timed too on CUDA, where it is
    more than ``sdpa``.
    """
    device = torch.device(device) if device is not None else default_device()
    runnable = available_backends(device) + ["auto"]
    backends = backends or (runnable if device.type == "cuda" else runnable[:-1])
    model = create_model(name, backend=runnable[0]).to(device=device, dtype=DTYPES[dtype])
    model.train(train)
    x = torch.randn(batch, 3, *img_size, device=device, dtype=DTYPES[dtype])

    def step():
        if train:
            _loss(model(x)).backward()
            model.zero_grad(set_to_none=True)
        else:
            with torch.no_grad():
                model(x)

    results = []
    for backend in backends:
        if backend not in runnable:
            results.append(BenchResult(backend, error="unavailable here"))
            continue
        model.configure_attention(backend=backend)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        try:
            with ProgressBar(warmup + steps, desc=f"{backend:>9}", enabled=progress) as bar:
                for _ in range(warmup):
                    step()
                    bar.update(phase="warmup")
                _sync(device)
                start = time.perf_counter()
                for _ in range(steps):
                    step()
                    bar.update(phase="timed")
                _sync(device)
                elapsed = time.perf_counter() - start
        except torch.cuda.OutOfMemoryError:
            model.zero_grad(set_to_none=True)
            results.append(BenchResult(backend, error="OOM"))
            continue
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        results.append(BenchResult(backend, batch * steps / elapsed, 1e3 * elapsed / steps, peak))
    return results


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def format_results(name: str, batch: int, img_size, dtype: str, train: bool, device: torch.device,
                   results: list[BenchResult]) -> str:
    """The results as a table, with the speed-up over ``reference`` when it ran."""
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    mode = "forward+backward" if train else "forward"
    lines = [f"{name} {img_size[0]}x{img_size[1]} batch {batch} {dtype} {mode} on {where} (torch {torch.__version__})",
             f"{'backend':>10} {'images/s':>10} {'ms/step':>9} {'peak MiB':>9} {'vs reference':>13}"]
    ref = next((r.images_per_s for r in results if r.backend == "reference" and r.images_per_s), None)
    for r in results:
        if r.error:
            lines.append(f"{r.backend:>10} {r.error:>10}")
            continue
        peak = f"{r.peak_mib:9.0f}" if r.peak_mib is not None else f"{'n/a':>9}"
        speedup = f"{r.images_per_s / ref:12.2f}x" if ref else f"{'':>13}"
        lines.append(f"{r.backend:>10} {r.images_per_s:10.1f} {r.ms_per_step:9.2f} {peak} {speedup}")
    return "\n".join(lines)
