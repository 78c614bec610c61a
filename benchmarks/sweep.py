"""What the launch-config sweeps share: CUDA-graph timing, the error against the heuristic's output, and
the JSON-lines run over shapes within a time budget (``sweep_attention.py``, ``sweep_reduce.py``)."""

from __future__ import annotations

import json
import time

import triton.testing

from benchmarks import run_info


def graph_ms(fn) -> float:
    """Median ms of CUDA-graph replays of ``fn``: the kernels alone (eager timing of calls this short
    measures the host's launch overhead, as the first H200 run of the attention sweep showed)."""
    return triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median")


def relative_error(got, want) -> float:
    """Largest relative L2 error over the non-empty tensor pairs of ``got`` and ``want``."""
    return max(((g.double() - w.double()).norm() / w.double().norm().clamp_min(1e-30)).item()
               for g, w in zip(got, want) if w.numel())


def run(out_path: str, shapes, sweep_shape, budget_s: float, label=str) -> None:
    """Append ``{"run_info": ...}`` then ``sweep_shape(shape, write)``'s rows to ``out_path`` (one JSON line
    each, flushed as written); shapes reached after ``budget_s`` seconds get a skipped row instead."""
    start = time.monotonic()
    with open(out_path, "a") as out:
        def write(row: dict) -> None:
            out.write(json.dumps(row) + "\n")
            out.flush()

        write({"run_info": run_info()})
        for shape in shapes:
            if time.monotonic() - start > budget_s:
                write({"skipped_shape": label(shape), "reason": f"--budget-s {budget_s} spent"})
                continue
            sweep_shape(shape, write)
            print(f"swept {label(shape)} at {time.monotonic() - start:.0f} s", flush=True)
