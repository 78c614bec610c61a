"""pytest wiring of the benchmarks: the replay timer, session ceilings and results, JSON hooks, summary.

See :mod:`benchmarks` for how calls are timed and how the samples reach pytest-benchmark.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field

import pytest

from benchmarks import (
    CUDA,
    REPLAY_CLOCK,
    Ceilings,
    device_name,
    git_commit,
    measure_ceilings,
    median,
    report,
    roofline_info,
    run_info,
)

CPU_NOTE = ("CPU run, a smoke run and not the performance result: op rows at 224x224 and batch 1, one pvt_v2_b0 "
            "model row; 512x512, 800x1333 and the GPU batch sizes are GPU rows; the triton provider runs on CUDA "
            "only; torch.compile runs one op row. CPU ceilings and timings are rough (bf16 matmuls are slow on "
            "most CPUs, timings move with the machine's load).")


@dataclass
class Results:
    """What this session measured or counted, for the JSON hooks and the terminal summary."""

    rows: list[dict] = field(default_factory=list)
    costs: dict[str, dict] = field(default_factory=dict)
    ceilings: Ceilings | None = None
    skips: Counter = field(default_factory=Counter)

    def skip(self, reason: str):
        """Skip the running benchmark, counting ``reason`` for the summary."""
        self.skips[reason] += 1
        pytest.skip(reason)


RESULTS = pytest.StashKey[Results]()
ROWS_FILE = pytest.StashKey[object]()


def pytest_addoption(parser):
    parser.addoption("--rows-jsonl", metavar="PATH", default=None,
                     help="also append every result row to PATH as one JSON line the moment it is measured "
                          "(first line: the run's device, versions and commit): a run cut short keeps its rows")


def pytest_configure(config):
    config.stash[RESULTS] = Results()
    path = config.getoption("--rows-jsonl", default=None)
    config.stash[ROWS_FILE] = None if path is None else open(path, "a", buffering=1)
    if path is not None:
        config.stash[ROWS_FILE].write(json.dumps({"machine_info": run_info()}) + "\n")


def pytest_unconfigure(config):
    rows_file = config.stash.get(ROWS_FILE, None)
    if rows_file is not None:
        rows_file.close()


def pytest_collection_modifyitems(config, items):
    """Every benchmark reports through the replay clock (see :mod:`benchmarks`)."""
    for item in items:
        if "benchmark" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.benchmark(timer=REPLAY_CLOCK))


@pytest.fixture(scope="session")
def results(request) -> Results:
    return request.config.stash[RESULTS]


@pytest.fixture(scope="session")
def ceilings(results) -> Ceilings:
    """Copy bandwidth and matmul rates of this device, measured once per session."""
    results.ceilings = measure_ceilings()
    return results.ceilings


@pytest.fixture
def record(benchmark, results, ceilings, request):
    """``record(case, provider, samples, cost=None, **info) -> row``: replay the samples into
    pytest-benchmark and fill its ``extra_info`` with ``info``, the median and, when ``cost`` (an
    ``SRACost``) is given, the achieved rates against the ceilings. ``case`` groups the providers."""

    def _record(case: str, provider: str, samples: list[float], cost=None, **info) -> dict:
        benchmark.group = case
        REPLAY_CLOCK.replay(benchmark, samples)
        row = benchmark.extra_info
        row.update(case=case, provider=provider, device=device_name(), median_ms=median(samples) * 1e3,
                   samples=len(samples), **info)
        if cost is not None:
            row.update(roofline_info(cost, median(samples), ceilings))
        results.rows.append(row)
        rows_file = request.config.stash[ROWS_FILE]
        if rows_file is not None:
            rows_file.write(json.dumps(row, default=str) + "\n")
            os.fsync(rows_file.fileno())
        return row

    return _record


def pytest_benchmark_update_machine_info(config, machine_info):
    from sra_kernels import available_backends

    machine_info.update(
        **run_info(), sra_kernels_backends=available_backends(),
        timing=("triton.testing.do_bench CUDA-event samples, L2 flushed, inputs rotated" if CUDA
                else "time.perf_counter samples after a warm-up call"),
    )
    if config.stash[RESULTS].ceilings is not None:
        machine_info.update(config.stash[RESULTS].ceilings.as_info())


def pytest_benchmark_update_commit_info(config, commit_info):
    if commit_info.get("id") in (None, "unknown", "unversioned"):
        commit_info["id"] = git_commit()


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Speedups need every provider of a case: compute them now, before the JSON is written."""
    report.add_speedups([b["extra_info"] for b in output_json["benchmarks"] if "case" in b["extra_info"]])


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, config):
    results = config.stash[RESULTS]
    if not results.costs and not results.rows:
        return
    report.add_speedups(results.rows)
    write = terminalreporter.write_line
    terminalreporter.write_sep("=", f"sra-kernels benchmarks on {device_name()}")
    if not CUDA:
        write(CPU_NOTE)
    if results.ceilings is not None:
        write(f"measured ceilings: {results.ceilings.as_info()}")
    if results.costs:
        write("\nSRA op, analytic cost per call at the GPU batch (sra_kernels/cost.py: FLOPs of matmuls and convs, "
              "multiply-add = 2; bytes of the fused ideal, of the triton backend today and of the eager sequence; "
              "scores = one (B, h, N, M) "
              "matrix):")
        write(report.cost_table(list(results.costs.values())))
    tables = {"op": ("op timings (median ms)", report.op_table), "model": ("model timings (median ms)",
                                                                           report.model_table),
              "host": ("host time per eager call (us; kernels stubbed out, CPU, tiny shapes)", report.host_table)}
    for kind, (title, table) in tables.items():
        if any(row["kind"] == kind for row in results.rows):
            write(f"\n{title}:")
            write(table(results.rows))
            for field, (what, _) in report.PER_PROVIDER_TABLES.items():
                if any(row["kind"] == kind and row.get(field) is not None for row in results.rows):
                    write(f"\n{kind} {what}:")
                    write(report.provider_table(results.rows, kind, field))
    for reason, count in sorted(results.skips.items()):
        write(f"skipped {count}: {reason}")
