"""benchmarks.report: speedups across providers, Markdown tables and the PNG chart from benchmark JSON."""

import json

import pytest

pytest.importorskip("matplotlib")
from benchmarks import report  # noqa: E402

OP_KEY = dict(kind="op", models="pvt_v2_b2", resolution="224x224", stage=1, grid="56x56", batch=64, N=3136, M=49,
              C=64, heads=1, sr_ratio=8, linear=False, dtype="bf16", mode="fwd", gflop=7.5, min_mb=79.2,
              unfused_mb=302.0, scores_mb=19.7, peak_mem_mb=None)
MODEL_KEY = dict(kind="model", model="pvt_v2_b0", image="224x224", batch=64, precision="fp32", mode="infer",
                 peak_mem_mb=100.0)


def _bench(provider: str, median_s: float, **info) -> dict:
    """One benchmark entry as pytest-benchmark writes it (only the fields report.py reads)."""
    extra = dict(info, provider=provider, median_ms=median_s * 1e3)
    extra["case"] = f"{extra['kind']} case"
    if extra["kind"] == "model":
        extra["images_per_s"] = extra["batch"] / median_s
    return {"name": f"test[{provider}]", "stats": {"median": median_s}, "extra_info": extra}


@pytest.fixture
def run_json(tmp_path):
    benchmarks = [
        _bench("reference", 4e-3, **OP_KEY), _bench("sdpa", 2e-3, **OP_KEY),
        _bench("sra_kernels", 1e-3, **OP_KEY, tflops=7.5, gbps=79.2, pct_roofline=40.0),
        _bench("reference", 0.3, **MODEL_KEY), _bench("sdpa", 0.1, **MODEL_KEY),
        {"name": "test_unrelated", "stats": {"median": 1.0}, "extra_info": {}},
    ]
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"machine_info": {"device": "NVIDIA H100", "torch": "2.11"},
                                "benchmarks": benchmarks}))
    return path


def test_add_speedups_within_a_case():
    rows = [dict(case="a", provider="x", median_ms=2.0), dict(case="a", provider="y", median_ms=1.0),
            dict(case="b", provider="x", median_ms=5.0)]
    report.add_speedups(rows)
    assert rows[0]["speedup_over"] == {"y": 0.5}
    assert rows[1]["speedup_over"] == {"x": 2.0}
    assert rows[2]["speedup_over"] == {}


def test_report_renders_tables_and_chart(run_json, tmp_path, capsys):
    out = tmp_path / "out"
    assert report.main([str(run_json), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "- device: NVIDIA H100" in text
    op_header = next(line for line in text.splitlines() if line.startswith("| image"))
    assert "sra_kernels vs reference" in op_header and "sra_kernels vs sdpa" in op_header
    op_row = next(line for line in text.splitlines() if line.startswith("| 224x224"))
    assert "| 4 | 2 |" in op_row  # speedups of sra_kernels over reference and sdpa
    model_row = next(line for line in text.splitlines() if line.startswith("| pvt_v2_b0") and "infer" in line)
    assert "| 3 |" in model_row  # sdpa over reference
    assert "Models: peak memory" in text and "SRA op: peak memory" not in text  # op rows have no CUDA peak
    assert (out / "speedups.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote" in capsys.readouterr().out


def test_report_without_rows_fails(tmp_path):
    path = tmp_path / "empty.json"
    path.write_text(json.dumps({"benchmarks": []}))
    assert report.main([str(path)]) == 1


def test_campaign_rows_feed_the_report_and_the_policy_table(tmp_path):
    """The JSON lines of ``--rows-jsonl`` (what benchmarks/campaign.sh writes as it measures): the report reads
    them, and the policy table takes their GPU rows with the device's compute capability."""
    from benchmarks import policy_table

    machine = {"device": "GPU X", "capability": [9, 0], "torch": "t", "triton": "tr", "git_commit": "abc1234"}
    rows = [dict(OP_KEY, case="op case", provider=provider, median_ms=ms, gpu_ms=ms / 2)
            for provider, ms in (("sdpa", 2.0), ("sra_kernels", 1.0), ("auto", 1.0))]
    path = tmp_path / "ops.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in [{"machine_info": machine}, *rows]) + "\n")
    found, read_machine = report.read_rows(path)
    assert read_machine == machine and [r["provider"] for r in found] == ["sdpa", "sra_kernels", "auto"]
    (table_row,) = policy_table.build([tmp_path])["rows"]
    assert table_row["capability"] == [9, 0] and table_row["gpu_ms"] == {"sdpa": 1.0, "cublas_projections": 0.5}
    (tmp_path / "empty.json").write_text("")  # a file a cut-short run left: passed over
    assert len(policy_table.build([tmp_path])["rows"]) == 1


def test_rows_jsonl_option_writes_each_row_as_it_is_measured(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "rows.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "pytest", "benchmarks/test_host_overhead.py", "-q", "-p",
                           "no:cacheprovider", "-k", "sr1 and fwd and not bwd", f"--rows-jsonl={out}"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows, machine = report.read_rows(out)
    assert "device" in machine and {r["provider"] for r in rows} == {"sra_kernels", "sdpa"}
    assert all(r["kind"] == "host" for r in rows)
