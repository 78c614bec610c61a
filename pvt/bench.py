"""Throughput (images/s), time per step and peak memory of one model on several attention backends and
torch.compile modes, side by side."""

from __future__ import annotations

import textwrap
import time
from dataclasses import dataclass

import torch

from sra_kernels import available_backends

from .progress import ProgressBar
from .registry import create_model

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
COMPILE_MODES = ("none", "default", "reduce-overhead")
"""How the model runs: eagerly, ``torch.compile(model)``, or ``torch.compile(model, mode="reduce-overhead")``
(inductor's CUDA graphs: CUDA only)."""
COMPILE_WARMUP = {"none": 0, "default": 1, "reduce-overhead": 3}
"""Untimed calls each mode needs at least: compiling; then recording the CUDA graphs and a first replay."""
PRESETS = {"classification": ((224, 224), 64), "segmentation": ((512, 512), 16),
           "segmentation-1024": ((1024, 1024), 2), "detection": ((800, 1333), 2)}
"""Preset -> ((H, W), batch): ImageNet classification, ADE20K-style segmentation crops at 512 and 1024, and
COCO detection's 800x1333 (mmdet's (1333, 800) as width x height)."""
PROFILED_STEPS = 3
"""Steps profiled for the GPU kernel time after the timed ones (CUDA)."""


@dataclass
class BenchResult:
    backend: str
    compile: str = "none"
    images_per_s: float | None = None
    ms_per_step: float | None = None  # wall time
    gpu_ms_per_step: float | None = None  # CUDA only: summed kernel time (torch.profiler)
    peak_mib: float | None = None  # CUDA only
    compile_s: float | None = None  # compiled modes: the first call, which compiles
    error: str | None = None  # "OOM", "unavailable here", ...


def _loss(out) -> torch.Tensor:
    """A scalar from logits (B, classes) or from a list of stage maps (MiT)."""
    if isinstance(out, (list, tuple)):
        return sum(o.float().mean() for o in out)
    return out.float().mean()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _kernel_ms(step, device: torch.device) -> float:
    """GPU kernel time per step: the summed device time of every kernel, copy and memset of a few steps."""
    from torch.profiler import ProfilerActivity, profile

    _sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(PROFILED_STEPS):
            step()
        _sync(device)
    return sum(event.self_device_time_total for event in prof.key_averages()) / PROFILED_STEPS / 1e3


def bench_model(name: str, batch: int, img_size: tuple[int, int] = (224, 224), dtype: str = "fp32",
                train: bool = False, backends: list[str] | None = None, steps: int = 20, warmup: int = 5,
                device: str | torch.device | None = None, progress: bool = True,
                compile_modes: list[str] | None = None, compile_backend: str = "inductor",
                grad_checkpointing: bool = False) -> list[BenchResult]:
    """Time ``steps`` forward (or forward+backward with ``train``) passes per compile mode and backend after
    ``warmup`` (compiled modes take at least :data:`COMPILE_WARMUP`).

    The model (and input) is cast to ``dtype`` as a whole; every backend runs the same weights. ``auto`` (the
    default policy, :mod:`sra_kernels.plan`) runs everywhere; by default it is timed too on CUDA, where it is
    more than ``sdpa``. ``compile_modes`` (default ``["none"]``): see :data:`COMPILE_MODES`; each compiled
    (mode, backend) compiles afresh with ``compile_backend`` (``aot_eager``: traced, no code generated).
    ``grad_checkpointing``: the model's blocks recompute their activations in the backward (training memory
    for time; see ``set_grad_checkpointing``).
    """
    device = torch.device(device) if device is not None else default_device()
    runnable = available_backends(device) + ["auto"]
    backends = backends or (runnable if device.type == "cuda" else runnable[:-1])
    model = create_model(name, backend=runnable[0]).to(device=device, dtype=DTYPES[dtype])
    model.train(train)
    model.set_grad_checkpointing(grad_checkpointing)
    x = torch.randn(batch, 3, *img_size, device=device, dtype=DTYPES[dtype])

    results = []
    for mode in compile_modes or ["none"]:
        for backend in backends:
            if backend not in runnable:
                results.append(BenchResult(backend, mode, error="unavailable here"))
            elif mode == "reduce-overhead" and device.type != "cuda":
                results.append(BenchResult(backend, mode, error="CUDA only"))
            else:
                model.configure_attention(backend=backend)
                results.append(_bench_one(model, x, train, mode, compile_backend, steps, warmup, progress))
    return results


def _bench_one(model, x: torch.Tensor, train: bool, mode: str, compile_backend: str, steps: int, warmup: int,
               progress: bool) -> BenchResult:
    """One (compile mode, backend) row: warm-up (compiling first), timed steps, then the profiled ones."""
    device, backend = x.device, model.backend
    run = model
    if mode != "none":
        torch._dynamo.reset()  # every row compiles afresh: its compile time is its own, no recompile limit is near
        run = torch.compile(model, mode=mode if compile_backend == "inductor" else None, backend=compile_backend)

    def step():
        if mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        if train:
            _loss(run(x)).backward()
            model.zero_grad(set_to_none=True)
        else:
            with torch.no_grad():
                run(x)

    compile_s = None
    warmup = max(warmup, COMPILE_WARMUP[mode])
    if device.type == "cuda":
        torch.cuda.empty_cache()
    try:
        with ProgressBar(warmup + steps, desc=f"{backend:>9} {mode}", enabled=progress) as bar:
            for i in range(warmup):
                start = time.perf_counter()
                step()
                _sync(device)
                if i == 0 and mode != "none":
                    compile_s = time.perf_counter() - start
                bar.update(phase="warmup")
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            for _ in range(steps):
                step()
                bar.update(phase="timed")
            _sync(device)
            elapsed = time.perf_counter() - start
        gpu_ms = _kernel_ms(step, device) if device.type == "cuda" else None
    except torch.cuda.OutOfMemoryError:
        model.zero_grad(set_to_none=True)
        return BenchResult(backend, mode, error="OOM")
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    batch = x.shape[0]
    return BenchResult(backend, mode, batch * steps / elapsed, 1e3 * elapsed / steps, gpu_ms, peak, compile_s)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _cell(value: float | None, width: int, precision: int) -> str:
    return f"{value:{width}.{precision}f}" if value is not None else f"{'n/a':>{width}}"


def format_results(name: str, batch: int, img_size, dtype: str, train: bool, device: torch.device,
                   results: list[BenchResult], grad_checkpointing: bool = False) -> str:
    """The results as a table, with the speed-up over the first ``reference`` row measured (eager by default)."""
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    mode = ("forward+backward" + (" (grad checkpointing)" if grad_checkpointing else "")) if train else "forward"
    lines = [f"{name} {img_size[0]}x{img_size[1]} batch {batch} {dtype} {mode} on {where} (torch {torch.__version__})",
             f"{'backend':>10} {'compile':>15} {'images/s':>10} {'ms/step':>9} {'GPU ms':>8} {'peak MiB':>9} "
             f"{'compile s':>9} {'vs reference':>13}"]
    ref = next((r for r in results if r.backend == "reference" and r.images_per_s), None)
    for r in results:
        if r.error:
            lines.append(f"{r.backend:>10} {r.compile:>15} {r.error:>10}")
            continue
        speedup = f"{r.images_per_s / ref.images_per_s:12.2f}x" if ref else f"{'':>13}"
        lines.append(f"{r.backend:>10} {r.compile:>15} {r.images_per_s:10.1f} {r.ms_per_step:9.2f} "
                     f"{_cell(r.gpu_ms_per_step, 8, 2)} {_cell(r.peak_mib, 9, 0)} {_cell(r.compile_s, 9, 1)} {speedup}")
    if ref:
        lines.append(f"vs reference: images/s over reference with compile {ref.compile}; GPU ms: summed kernel time "
                     "per step (torch.profiler), ms/step: wall time")
    return "\n".join(lines)


def plot_results(results: list[BenchResult], path: str, title: str) -> None:
    """A bar chart of images/s per backend, one bar per compile mode, written to ``path`` (matplotlib; the format
    from the suffix). Rows without a measurement (errors) have no bar, modes without any no legend entry."""
    from matplotlib.figure import Figure

    measured = [r for r in results if r.images_per_s]
    backends = list(dict.fromkeys(r.backend for r in results))
    modes = list(dict.fromkeys(r.compile for r in measured))
    width = 0.8 / max(len(modes), 1)
    figure = Figure(figsize=(3 + 1.2 * len(backends), 4), layout="constrained")
    axes = figure.subplots()
    for i, mode in enumerate(modes):
        rows = [r for r in measured if r.compile == mode]
        offset = (i - (len(modes) - 1) / 2) * width
        bars = axes.bar([backends.index(r.backend) + offset for r in rows], [r.images_per_s for r in rows], width,
                        label=f"compile {mode}")
        axes.bar_label(bars, fmt="%.1f", fontsize=7)
    axes.set_xticks(range(len(backends)), backends)
    axes.set_ylabel("images/s")
    axes.set_title("\n".join(textwrap.wrap(title, 60)), fontsize=8)
    if modes:
        axes.legend(fontsize=8)
    figure.savefig(path)
