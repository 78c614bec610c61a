"""Opt-in autotuning of the path, in the spirit of ``torch.backends.cudnn.benchmark``.

With ``autotune=True`` (or ``SRA_KERNELS_AUTOTUNE=1``) under ``backend="auto"``, the first call of a new
(shape, dtype, device, grad mode) times every candidate path on that call's own inputs (forward, and
forward + backward when a backward will follow; on detached copies, so no ``.grad`` is touched) and keeps
the fastest; every later call of the same key takes it without timing, so the choice is deterministic
and CUDA-graph safe from the second call on. A call made while a CUDA graph is being captured, or while
torch.compile traces, times nothing: it uses the cache when it holds the key, else the measured table.

The cache lives in memory, and in a JSON file when ``SRA_KERNELS_AUTOTUNE_CACHE`` names one (read at
import, written after every new choice): {key: path}, the key naming the device, the shape, the
compute dtype, the grad mode and the candidates.
"""

from __future__ import annotations

import json
import statistics
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

from .files import atomic_write_text
from .options import DEFAULTS

REPEATS = 5
"""Timed calls per candidate on the CPU (CUDA: ``triton.testing.do_bench``'s own count)."""


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    """Median seconds of ``fn()`` on ``device`` after a warm-up call (which also compiles kernels)."""
    fn()
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=5, rep=20) / 1e3
    samples = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def device_label(device: torch.device) -> str:
    """The device as the cache key names it: its CUDA name, or its type."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def cache_key(problem, device: torch.device, candidates: tuple[str, ...]) -> str:
    """One string per (device, problem, candidates): a :class:`sra_kernels.plan.Problem`'s fields in order."""
    fields = [str(value).replace("torch.", "") for value in problem]
    return "|".join([device_label(device), *fields, "+".join(candidates)])


class Autotuner:
    """The choices made so far ({cache key: path}), kept in ``cache_file`` too when it is given."""

    def __init__(self, cache_file: str | Path | None = None):
        self.cache_file = Path(cache_file) if cache_file else None
        self.choices: dict[str, str] = {}
        if self.cache_file is not None and self.cache_file.exists():
            try:
                cached = json.loads(self.cache_file.read_text())
            except (OSError, ValueError) as error:  # an unreadable cache costs a re-timing, never an import
                warnings.warn(f"autotune cache {self.cache_file} unreadable ({error}); starting empty", stacklevel=2)
                cached = {}
            self.choices.update({k: v for k, v in cached.items() if isinstance(v, str)} if isinstance(cached, dict)
                                else {})

    def choose(self, problem, device: torch.device, candidates: tuple[str, ...],
               measure: Callable[[str], float] | None) -> tuple[str, str] | None:
        """(path, reason) for ``problem``: cached, or timed now with ``measure(path) -> seconds`` when that is
        given and nothing is being captured; None when neither (the caller falls back to the table)."""
        key = cache_key(problem, device, candidates)
        if key in self.choices:
            return self.choices[key], "autotune cache"
        if measure is None or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            return None
        times = {path: measure(path) for path in candidates}
        best = min(times, key=times.get)
        self.choices[key] = best
        if self.cache_file is not None:
            self.cache_file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.cache_file, json.dumps(self.choices, indent=1, sort_keys=True) + "\n")
        timed = ", ".join(f"{path} {seconds * 1e3:.3f}" for path, seconds in times.items())
        return best, f"autotuned on this call's inputs: ms {timed}"


TUNER = Autotuner(DEFAULTS.autotune_cache)
"""The process-wide tuner ``backend="auto"`` consults."""


def choose(problem, device, candidates, measure):
    """:meth:`Autotuner.choose` of :data:`TUNER`."""
    return TUNER.choose(problem, device, candidates, measure)
