#!/usr/bin/env bash
# The one command for a GPU machine: tests, benchmarks (raw JSON) and the report, all into OUTDIR.
#
#   benchmarks/gpu.sh OUTDIR [pytest arguments for the benchmark run, e.g. -k "not compiled"]
#
# Runs from a plain checkout: PYTHONPATH=., nothing installed, nothing fetched (needs torch, triton,
# pytest, pytest-benchmark and matplotlib already there). Writes OUTDIR/env.txt (nvidia-smi and
# `python -m sra_kernels`), tests.log, bench.log, bench.json (pytest-benchmark's raw JSON with device,
# versions and commit), report.md and speedups.png; with SRA_BENCH_SWEEPS=1 also sweep_attention.jsonl and
# sweep_reduce.jsonl (launch-config sweeps, CUDA-graph timed). Tests run on 8 workers when pytest-xdist is there.
#   SRA_GIT_COMMIT=...        the commit to record when the copy has no .git
#   SRA_BENCH_SKIP_TESTS=1    skip the test step (e.g. for the second half of a split run)
#   SRA_BENCH_COMPILE_MODE=.. torch.compile mode of the `compiled` provider (default "default")
# Exit status: 1 when the tests, the benchmarks or the report failed; every step runs regardless.
set -u -o pipefail

if [ $# -lt 1 ]; then
    echo "usage: $0 OUTDIR [pytest arguments for the benchmark run]" >&2
    exit 2
fi
source "$(dirname "$0")/gpu_env.sh" "$1"
shift

status=0
if [ "${SRA_BENCH_SKIP_TESTS:-0}" != 1 ]; then
    workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
    python3 -m pytest tests -q -rfE $workers 2>&1 | tee "$out/tests.log" || status=1
fi
python3 -m pytest benchmarks -q --benchmark-json="$out/bench.json" --benchmark-columns=min,median,iqr,rounds \
    "$@" 2>&1 | tee "$out/bench.log" || status=1
python3 -m benchmarks.report "$out/bench.json" --out "$out" > "$out/report.log" 2>&1 || status=1
if [ "${SRA_BENCH_SWEEPS:-0}" = 1 ]; then
    python3 -m benchmarks.sweep_attention "$out/sweep_attention.jsonl" 2>&1 | tee "$out/sweeps.log" || status=1
    python3 -m benchmarks.sweep_reduce "$out/sweep_reduce.jsonl" 2>&1 | tee -a "$out/sweeps.log" || status=1
fi
echo "gpu.sh: wrote $out (tests, benchmarks, report); status $status"
exit $status
