#!/usr/bin/env bash
# The two commands of README, set-up included, on a fresh Linux machine with Python >= 3.10:
#
#   bash run.sh bench [PYTEST ARGS]   # the main job: python -m pytest benchmarks/ (the report)
#   bash run.sh test  [PYTEST ARGS]   # the tests, what CI runs: TRITON_INTERPRET=1 python -m pytest tests -q
#
# Both make ./.venv on first use: torch (the CPU build, torch==2.13.0, where nvidia-smi finds no GPU, so that pip
# fetches no CUDA wheels), then this package with its test and bench extras. Later runs reuse it. The tests run the
# kernels in Triton's CPU interpreter without a GPU, natively with one.
set -euo pipefail
cd "$(dirname "$0")"

if [ $# -lt 1 ] || { [ "$1" != bench ] && [ "$1" != test ]; }; then
    echo "usage: bash run.sh {bench|test} [pytest args]" >&2
    exit 2
fi
job=$1
shift

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
    .venv/bin/python -m pip install --quiet --upgrade pip
    if nvidia-smi -L > /dev/null 2>&1; then
        .venv/bin/python -m pip install --quiet torch
    else
        .venv/bin/python -m pip install --quiet torch==2.13.0
    fi
    .venv/bin/python -m pip install --quiet -e ".[test,bench]"
fi
. .venv/bin/activate
python -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__)"

if [ "$job" = bench ]; then
    python -m pytest benchmarks/ "$@"
elif nvidia-smi -L > /dev/null 2>&1; then
    python -m pytest tests -q "$@"
else
    TRITON_INTERPRET=1 python -m pytest tests -q "$@"
fi
