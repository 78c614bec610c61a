"""Generate ``sra_kernels/policy_table.json``, the measured table of ``backend="auto"``, from committed GPU results.

    python -m benchmarks.policy_table [RESULTS_DIR ...] [--out sra_kernels/policy_table.json]

Reads the op rows of every results file of ``benchmarks/test_op_bench.py`` (pytest-benchmark JSON, e.g.
``bench.json``, or the ``--rows-jsonl`` JSON lines ``benchmarks/campaign.sh`` writes) under the results
directories (default: every folder of ``benchmarks/results``, oldest first, so a newer run of the same row
replaces an older one) and writes one row per measured (device, dtype, mode, shape) with the GPU ms per call
(``gpu_ms``) of each provider, named by the path it ran:

| provider | path |
|---|---|
| ``sra_kernels`` | ``cublas_projections`` (backend triton, unfused projections) |
| ``sra_kernels_projected`` | ``fused_projections`` |
| ``sdpa`` | ``sdpa`` |
| ``compiled`` | ``compiled`` (torch.compile of the sdpa path: PyTorch's number under torch.compile) |

Rows of the ``auto`` provider (the policy's own outcome) and rows without ``gpu_ms`` are left out.
See :mod:`sra_kernels.policy` for how a call finds its row.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.report import read_rows

from sra_kernels.files import atomic_write_text

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
OUT = ROOT / "sra_kernels" / "policy_table.json"

PROVIDER_PATHS = {"sra_kernels": "cublas_projections", "sra_kernels_projected": "fused_projections",
                  "sdpa": "sdpa", "compiled": "compiled"}
DTYPE_CLASSES = {"bf16": "16-bit", "fp16": "16-bit", "fp32": "float32"}
KNOWN_CAPABILITIES = {"NVIDIA H200": (9, 0), "NVIDIA H100 80GB HBM3": (9, 0), "NVIDIA A100-SXM4-80GB": (8, 0)}
"""For results files that predate ``capability`` in their machine info."""


def _shown(path: Path) -> str:
    """``path`` relative to the repository when it lies inside it (as the committed table names its sources)."""
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)


def _rows_of(path: Path) -> list[dict]:
    try:
        found, machine = read_rows(path)
    except ValueError:  # not JSON (e.g. an empty file left by a run that was cut short)
        return []
    measured = [(PROVIDER_PATHS[info["provider"]], info) for info in found if info.get("kind") == "op"
                and info.get("provider") in PROVIDER_PATHS and info.get("gpu_ms") is not None]
    if not measured:
        return []  # not a benchmark results file, or no op rows with GPU times in it (e.g. a CPU run)
    device = machine["device"]
    capability = machine.get("capability") or KNOWN_CAPABILITIES.get(device)
    if capability is None:
        raise SystemExit(f"{path}: unknown compute capability of {device!r}: add it to KNOWN_CAPABILITIES")
    source = f"{_shown(path)} @ {machine.get('git_commit', 'unknown')[:7]}, " \
             f"torch {machine.get('torch')}, triton {machine.get('triton')}"
    return [dict(device=device, capability=list(capability), dtype_class=DTYPE_CLASSES[info["dtype"]],
                 backward=info["mode"] != "fwd", batch=info["batch"], tokens=info["N"], reduced_tokens=info["M"],
                 channels=info["C"], heads=info["heads"], sr_ratio=info["sr_ratio"], linear=info["linear"],
                 path=path_name, gpu_ms=round(info["gpu_ms"], 5), source=source)
            for path_name, info in measured]


def build(result_dirs: list[Path]) -> dict:
    """The table of every results file under ``result_dirs`` (later directories win a shared row)."""
    merged: dict[tuple, dict] = {}
    sources = []
    for directory in result_dirs:
        for path in sorted([*directory.rglob("*.json"), *directory.rglob("*.jsonl")]):
            rows = _rows_of(path)
            if rows:
                sources.append(_shown(path))
            for row in rows:
                key = (tuple(row["capability"]), row["dtype_class"], row["backward"], row["batch"], row["tokens"],
                       row["reduced_tokens"], row["channels"], row["heads"], row["sr_ratio"], row["linear"])
                entry = merged.setdefault(key, {k: v for k, v in row.items() if k not in ("path", "gpu_ms")}
                                          | {"gpu_ms": {}})
                entry["gpu_ms"][row["path"]] = row["gpu_ms"]
                entry["source"] = row["source"]
    rows = [merged[key] for key in sorted(merged, key=str)]
    return {"generated_by": "python -m benchmarks.policy_table", "sources": sources, "rows": rows}


def dumps(table: dict) -> str:
    """The table as JSON with one row a line (readable diffs when a new run changes a row)."""
    head = {k: v for k, v in table.items() if k != "rows"}
    rows = ",\n".join("  " + json.dumps(row) for row in table["rows"])
    return json.dumps(head, indent=1)[:-2] + ',\n "rows": [\n' + rows + "\n ]\n}\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="*", type=Path, help="results directories (default: all, oldest first)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    dirs = [d.resolve() for d in args.results] or sorted(p for p in RESULTS.iterdir() if p.is_dir())
    table = build(dirs)
    atomic_write_text(args.out, dumps(table))
    print(f"{args.out}: {len(table['rows'])} rows from {', '.join(table['sources'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
