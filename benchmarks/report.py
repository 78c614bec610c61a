"""Markdown tables and a speedup chart from the benchmarks' pytest-benchmark JSON.

    python -m benchmarks.report RUN.json [MORE.json ...] [--out DIR]

writes ``DIR/report.md`` and ``DIR/speedups.png`` (DIR defaults to the first JSON file's folder) and
prints the Markdown. Several files (e.g. one run per provider) are merged; speedups are recomputed
across all of them. The tables here also make the terminal summary of ``pytest benchmarks/``.

Rows are the ``extra_info`` dicts the benchmarks write: ``kind`` ("op", "model" or "host"), ``case`` (the
shape key shared by all providers), ``provider``, ``median_ms``, ``peak_mem_mb`` and kind-specific
fields (see ``_fields`` in benchmarks/test_op_bench.py and the ``record`` calls of both suites).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

from sra_kernels.files import atomic_open, atomic_write_text

PROVIDERS = ("auto", "sra_kernels", "sra_kernels_projected", "compiled", "sdpa", "reference")
"""Column order; ``auto`` is the default policy, ``sra_kernels`` our triton backend's unfused-projection path."""

SUBJECTS = ("auto", "sra_kernels", "sdpa")
"""The provider whose speedups the tables show: the first of these present in the data."""

BASELINE = "reference"
"""The chart plots every provider's speedup over this one."""


def add_speedups(rows: list[dict]) -> None:
    """Set ``row["speedup_over"] = {other provider: other median / this median}`` within each case."""
    medians: dict[str, dict[str, float]] = defaultdict(dict)
    for row in rows:
        medians[row["case"]][row["provider"]] = row["median_ms"]
    for row in rows:
        row["speedup_over"] = {provider: ms / row["median_ms"]
                               for provider, ms in sorted(medians[row["case"]].items())
                               if provider != row["provider"]}


def read_rows(path: Path) -> tuple[list[dict], dict]:
    """(rows, machine_info) of one results file: pytest-benchmark JSON, or the JSON lines of ``--rows-jsonl``
    (a machine_info line, then one row a line)."""
    if path.suffix == ".jsonl":
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        machine = next((line["machine_info"] for line in lines if "machine_info" in line), {})
        return [line for line in lines if "case" in line and "provider" in line], machine
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        return [], {}
    rows = []
    for bench in data.get("benchmarks", []):
        info = dict(bench.get("extra_info", {}))
        if "case" in info and "provider" in info:
            info.setdefault("median_ms", bench["stats"]["median"] * 1e3)
            rows.append(info)
    return rows, data.get("machine_info", {})


def load(paths) -> tuple[list[dict], list[dict]]:
    """(rows of every benchmark of ours in ``paths``, machine_info of each file)."""
    rows, machines = [], []
    for path in paths:
        found, machine = read_rows(Path(path))
        rows += found
        machines.append(machine)
    add_speedups(rows)
    return rows, machines


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:.0f}"
    return str(value)


def markdown_table(headers: list[str], lines: list[list]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(_fmt(v) for v in line) + " |" for line in lines]
    return "\n".join(out)


def _cases(rows: list[dict], kind: str) -> dict[str, dict[str, dict]]:
    """case -> provider -> row, cases in first-seen order."""
    cases: dict[str, dict[str, dict]] = {}
    for row in rows:
        if row["kind"] == kind:
            cases.setdefault(row["case"], {})[row["provider"]] = row
    return cases


def _present(cases) -> tuple[list[str], str | None]:
    providers = {p for by_provider in cases.values() for p in by_provider}
    ordered = [p for p in PROVIDERS if p in providers] + sorted(providers - set(PROVIDERS))
    subject = next((p for p in SUBJECTS if p in providers), None)
    return ordered, subject


def _speedup_columns(subject, providers) -> list[str]:
    return [f"{subject} vs {p}" for p in providers if p != subject] if subject else []


def _speedups(by_provider, subject, providers) -> list:
    row = by_provider.get(subject)
    return [None if row is None else row["speedup_over"].get(p) for p in providers if p != subject] if subject else []


def _per_provider(by_provider, providers, key: str) -> list:
    return [by_provider[p].get(key) if p in by_provider else None for p in providers]


_OP_KEY_HEADERS = ["image", "stage", "B", "N", "M", "C", "h", "sr", "dtype", "mode"]
_MODEL_KEY_HEADERS = ["model", "image", "B", "precision", "mode", "execution"]


def _op_key(row: dict) -> list:
    return [row["resolution"], f"s{row['stage']} {row['grid']}", row["batch"], row["N"], row["M"], row["C"],
            row["heads"], row["sr_ratio"], row["dtype"], row["mode"]]


def _model_key(row: dict) -> list:
    return [row["model"], row["image"], row["batch"], row["precision"], row["mode"], row.get("execution", "eager")]


def cost_table(rows: list[dict]) -> str:
    """Analytic FLOPs and bytes of op cases (rows need the op key fields and the cost fields): the fused
    floor, the fused_projections path (where it runs: C <= 128, 16-bit), the cublas_projections path, and
    the eager sequence."""
    lines = [_op_key(r) + [r["gflop"], r["min_mb"], r.get("projected_mb"), r.get("triton_mb"), r["unfused_mb"],
                           r["scores_mb"], r["gflop"] * 1e3 / r["min_mb"]] for r in rows]
    return markdown_table(_OP_KEY_HEADERS + ["GFLOP", "min MB (fused)", "MB fused_projections",
                                             "MB cublas_projections", "MB unfused (eager)", "scores MB",
                                             "FLOP/byte (fused)"], lines)


def op_table(rows: list[dict]) -> str:
    """Median ms per provider, the subject's speedups, its achieved rates and share of the roofline floor."""
    cases = _cases(rows, "op")
    providers, subject = _present(cases)
    headers = (_OP_KEY_HEADERS + ["GFLOP", "min MB"] + [f"{p} ms" for p in providers]
               + _speedup_columns(subject, providers)
               + ([f"{subject} TFLOP/s", f"{subject} GB/s", f"{subject} % roofline"] if subject else []))
    lines = []
    for by_provider in cases.values():
        first = next(iter(by_provider.values()))
        line = _op_key(first) + [first["gflop"], first["min_mb"]] + _per_provider(by_provider, providers, "median_ms")
        line += _speedups(by_provider, subject, providers)
        if subject:
            line += [by_provider.get(subject, {}).get(k) for k in ("tflops", "gbps", "pct_roofline")]
        lines.append(line)
    return markdown_table(headers, lines)


def model_table(rows: list[dict]) -> str:
    """Median ms per step and images/s per provider, with the subject's speedups."""
    cases = _cases(rows, "model")
    providers, subject = _present(cases)
    headers = (_MODEL_KEY_HEADERS + [f"{p} ms" for p in providers] + [f"{p} img/s" for p in providers]
               + _speedup_columns(subject, providers))
    lines = []
    for by_provider in cases.values():
        line = _model_key(next(iter(by_provider.values())))
        line += _per_provider(by_provider, providers, "median_ms")
        line += _per_provider(by_provider, providers, "images_per_s")
        line += _speedups(by_provider, subject, providers)
        lines.append(line)
    return markdown_table(headers, lines)


def host_table(rows: list[dict]) -> str:
    """Host microseconds per eager call (device work stubbed out) per provider, with the subject's ratios."""
    cases = _cases(rows, "host")
    providers, subject = _present(cases)
    headers = ["shape", "mode"] + [f"{p} us" for p in providers] + _speedup_columns(subject, providers)
    lines = []
    for by_provider in cases.values():
        first = next(iter(by_provider.values()))
        line = [first["shape"], first["mode"]]
        line += [None if ms is None else ms * 1e3 for ms in _per_provider(by_provider, providers, "median_ms")]
        lines.append(line + _speedups(by_provider, subject, providers))
    return markdown_table(headers, lines)


PER_PROVIDER_TABLES = {
    "peak_mem_mb": ("peak memory (MB above the inputs)", "peak MB"),
    "gpu_ms": ("GPU kernel ms per call (torch.profiler; the median above adds the host's launch gaps)", "GPU ms"),
}
"""Row field -> (table title, column suffix) of the per-provider tables."""


def provider_table(rows: list[dict], kind: str, field: str) -> str:
    """``field`` (a key of ``PER_PROVIDER_TABLES``) per provider; op rows also show the eager score matrix size."""
    cases = _cases(rows, kind)
    providers, _ = _present(cases)
    headers = (_OP_KEY_HEADERS + ["scores MB"]) if kind == "op" else _MODEL_KEY_HEADERS
    lines = []
    for by_provider in cases.values():
        first = next(iter(by_provider.values()))
        key = (_op_key(first) + [first["scores_mb"]]) if kind == "op" else _model_key(first)
        lines.append(key + _per_provider(by_provider, providers, field))
    suffix = PER_PROVIDER_TABLES[field][1]
    return markdown_table(headers + [f"{p} {suffix}" for p in providers], lines)


def machine_lines(machine: dict) -> list[str]:
    keys = ("device", "torch", "triton", "cuda", "git_commit", "timing", "copy_GBps", "matmul_TFLOPs")
    return [f"- {k}: {machine[k]}" for k in keys if k in machine]


def markdown(rows: list[dict], machines: list[dict]) -> str:
    parts = ["# sra-kernels benchmarks", ""]
    for i, machine in enumerate(machines):
        parts += [f"Run {i + 1}:", *machine_lines(machine), ""]
    for kind, title, table in (("op", "SRA op: median ms per provider", op_table),
                               ("model", "Models: median ms per step", model_table),
                               ("host", "Host time: us per eager call, device work stubbed out", host_table)):
        if any(r["kind"] == kind for r in rows):
            parts += [f"## {title}", "", table(rows), ""]
        for field, (what, _) in PER_PROVIDER_TABLES.items():
            if any(r["kind"] == kind and r.get(field) is not None for r in rows):
                parts += [f"## {title.split(':')[0]}: {what}", "", provider_table(rows, kind, field), ""]
    return "\n".join(parts)


def _chart_label(row: dict) -> str:
    if row["kind"] == "op":
        return f"{row['resolution']} s{row['stage']} {row['grid']} B{row['batch']}"
    return f"{row['model']} {row['image']} B{row['batch']}"


def speedup_chart(rows: list[dict], path: Path) -> None:
    """One panel per (kind, dtype/precision, mode): every provider's speedup over ``BASELINE`` per shape,
    as a bar from 1 (the baseline) up or down to the speedup, on a log axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    panels: dict[str, dict[str, dict[str, dict]]] = {}
    for row in sorted(rows, key=lambda r: r["kind"] != "op"):  # op panels first, then models
        if BASELINE not in row["speedup_over"] and row["provider"] != BASELINE:
            continue
        title = f"{row['kind']} {row.get('dtype') or row.get('precision')} {row['mode']}"
        panels.setdefault(title, {}).setdefault(row["case"], {})[row["provider"]] = row
    if not panels:
        panels = {"no case has the reference provider": {}}
    most = max(len(cases) * len({p for c in cases.values() for p in c}) for cases in panels.values())
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6.0, 0.25 * most), 3.2 * len(panels)), squeeze=False)
    for ax, (title, cases) in zip(axes[:, 0], panels.items()):
        providers = [p for p in PROVIDERS if p != BASELINE and any(p in c for c in cases.values())]
        bar = 0.8 / max(1, len(providers))
        for j, provider in enumerate(providers):
            xs, ys = [], []
            for i, by_provider in enumerate(cases.values()):
                row = by_provider.get(provider)
                if row is not None:
                    xs.append(i + (j - (len(providers) - 1) / 2) * bar)
                    ys.append(row["speedup_over"][BASELINE])
            ax.bar(xs, [y - 1.0 for y in ys], bar, bottom=1.0, label=provider, color=f"C{PROVIDERS.index(provider)}")
        ax.axhline(1.0, color="black", linewidth=0.6)
        ax.set_yscale("log")
        low, high = ax.get_ylim()
        ax.set_ylim(min(low, 0.6), max(high, 1.6))  # always a few labelled ticks around the baseline
        ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 1.5, 2.0, 3.0, 5.0, 7.0), numticks=30))
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_ylabel(f"speedup over {BASELINE}")
        ax.set_title(title)
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels([_chart_label(next(iter(c.values()))) for c in cases.values()], rotation=30,
                           ha="right", fontsize=7)
        if providers:
            ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_open(path) as file:
        fig.savefig(file, format=path.suffix[1:] or None, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", type=Path, help="pytest-benchmark JSON file(s) from benchmarks/")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the first JSON's folder)")
    args = parser.parse_args(argv)
    rows, machines = load(args.json)
    if not rows:
        print(f"no sra-kernels benchmark rows in {', '.join(map(str, args.json))}", file=sys.stderr)
        return 1
    out = args.out or args.json[0].parent
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(rows, machines)
    atomic_write_text(out / "report.md", text + "\n")
    speedup_chart(rows, out / "speedups.png")
    print(text)
    print(f"\nwrote {out / 'report.md'} and {out / 'speedups.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
