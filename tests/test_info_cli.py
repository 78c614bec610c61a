"""``python -m sra_kernels``: versions, backends and a passing self-check of every backend here."""

import os
import subprocess
import sys
from pathlib import Path

from sra_kernels import available_backends

ROOT = Path(__file__).resolve().parents[1]


def test_python_m_sra_kernels_self_checks_every_backend():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-m", "sra_kernels"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    versions, self_check = result.stdout.split("self-check:")
    assert "torch: " in versions and "triton: " in versions and "device: " in versions
    for backend in available_backends():
        line = next(line for line in self_check.splitlines() if line.strip().startswith(f"{backend}:"))
        assert "max |error|" in line and "ok" in line and "FAILED" not in line
