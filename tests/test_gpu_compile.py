"""Every kernel launch compiled offline for sm_80 and sm_90 (tests/gpu_compile.py): it must compile and fit
the GPU's shared memory and registers, and fp16/bf16 launches must not spill much.

The interpreter forgives what a real compile rejects, so this compiles the launches natively, in a
subprocess without TRITON_INTERPRET (under the interpreter @triton.jit gives interpreted functions). No GPU
is needed: only triton's nvidia backend and the ptxas / cuobjdump bundled in the triton wheel (else: skip).
Run ``python -m tests.gpu_compile`` for the per-launch table (``--full`` for every shape and dtype).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sra_kernels.ops import attention, column_sum, projected_attention, spatial_reduce
from tests.gpu_compile import EXIT_SKIP, format_table

ROOT = Path(__file__).resolve().parents[1]

SHARED_PER_BLOCK = {80: 163 * 1024, 90: 227 * 1024}
"""Opt-in shared memory per block: A100 163 KB (of 164 KB per SM), H100 227 KB (of 228 KB per SM).
Triton refuses to launch a kernel needing more. (sm_86 / sm_89 parts have 99 KB: not checked.)"""

REGISTERS_PER_BLOCK = 64 * 1024
"""32-bit registers one block may use on sm_80 and sm_90: registers per thread x threads must fit."""

SPILL_LIMIT_16BIT = 512
"""Most stack (spill) bytes per thread allowed to an fp16/bf16 launch. At 8 warps that is 128 KB of local
memory per block, about all the L1 an A100 has left beside the shared-memory tiles (192 KB in all), so
beyond it spill traffic goes to L2 and a memory-bound kernel slows down; a tile config that spills so much
is a heuristic bug. The plans spill at most ~220 bytes today (sm_80, head_dim 40). fp32 launches (fp32 dots
on FMA units hold whole tiles in registers) are only reported."""


def _compile_report(*args: str) -> list[dict]:
    """Report rows of ``python -m tests.gpu_compile --json *args`` (one per distinct launch and arch), printed."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(ROOT), env.get("PYTHONPATH"))))
    done = subprocess.run([sys.executable, "-m", "tests.gpu_compile", "--json", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    if done.returncode == EXIT_SKIP:
        pytest.skip(done.stderr.strip().splitlines()[-1])
    assert done.returncode in (0, 1) and done.stdout, done.stderr[-4000:]
    rows = json.loads(done.stdout)
    print(format_table(rows))
    return rows


@pytest.fixture(scope="module")
def report() -> list[dict]:
    """Every launcher branch at one shape per PVT stage and head-dim regime, sm_80 and sm_90."""
    return _compile_report()


@pytest.fixture(scope="module")
def pvt_report() -> list[dict]:
    """The hot launches of pvt_v2_b2 at its real shapes (512x512 B16, 224x224 B64 and detection's 800x1333 B2:
    67k queries against 1,025 keys at stage 1; bf16) on sm_90."""
    return _compile_report("--pvt", "--arch", "90", "--input", "512", "512", "16", "--input", "224", "224", "64",
                           "--input", "800", "1333", "2")


def _compiled(report):
    return [r for r in report if r["ok"]]


def test_every_launch_compiles(report):
    failed = [r for r in report if not r["ok"]]
    assert not failed, "\n" + format_table(failed)


def test_every_kernel_is_covered(report):
    modules = (attention, column_sum, projected_attention, spatial_reduce)
    kernels = {name for module in modules for name in vars(module) if name.endswith("_kernel")}
    for arch in SHARED_PER_BLOCK:
        assert {r["kernel"] for r in report if r["arch"] == arch} == kernels, f"sm_{arch}"


def test_shared_memory_fits(report):
    over = [r for r in _compiled(report) if r["shared"] > SHARED_PER_BLOCK[r["arch"]]]
    assert not over, "\n" + format_table(over)


def test_registers_fit(report):
    over = [r for r in _compiled(report) if r["registers"] * 32 * r["num_warps"] > REGISTERS_PER_BLOCK]
    assert not over, "\n" + format_table(over)


def test_16bit_launches_barely_spill(report):
    spilling = [r for r in _compiled(report) if r["spill"]]
    print("launches that spill:\n" + format_table(spilling))
    over = [r for r in spilling if r["dtype"] in ("float16", "bfloat16") and r["spill"] > SPILL_LIMIT_16BIT]
    assert not over, "\n" + format_table(over)


def test_attention_forward_neither_spills_nor_leaves_wgmma_on_hopper(report):
    """K is loaded transposed (no per-query-block shared-memory rewrite) and longer key sets loop over 64-key
    blocks: no spill at any head_dim and key count of the cases, on sm_90 in 16-bit, and wgmma throughout."""
    rows = [r for r in _compiled(report) if r["kernel"] == "_fwd_kernel" and r["arch"] == 90
            and r["dtype"] in ("float16", "bfloat16")]
    assert rows and all(r["spill"] == 0 and r["mma"] == "wgmma" for r in rows), "\n" + format_table(rows)


GEMM_KERNELS = ("_fwd_kernel", "_projected_fwd_kernel", "_bwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel",
                "_patch_gemm_kernel", "_patch_dgrad_kernel", "_conv_weight_grad_kernel")
"""The hot kernels whose every launch multiplies tiles on the tensor cores."""


def test_pvt_hot_launches_are_clean_on_hopper(pvt_report):
    """At every pvt_v2_b2 shape on sm_90: no launch spills or runs sm_80-style mma.sync tiles (a tile under 64
    rows), and every GEMM kernel's launch is on wgmma."""
    rows = _compiled(pvt_report)
    assert {r["kernel"] for r in rows} >= set(GEMM_KERNELS)
    dirty = [r for r in rows if r["spill"] or r["mma"] == "mma.sync"
             or (r["kernel"] in GEMM_KERNELS and r["mma"] != "wgmma")]
    assert not dirty, "\n" + format_table(dirty)


@pytest.fixture(scope="module")
def pvt_report_sm80() -> list[dict]:
    """The hot launches of pvt_v2_b2 at its real shapes on sm_80 (the plans see an sm_80 GPU)."""
    return _compile_report("--pvt", "--arch", "80")


def test_pvt_forward_launches_do_not_spill_on_ampere(pvt_report_sm80):
    """At every pvt_v2_b2 shape on sm_80 the forward kernels (attention, fused projections) spill nothing: their
    plans take 32-row query blocks (attention, 256 whole keys) or 8 warps (fused projections, C <= 64) there."""
    rows = [r for r in _compiled(pvt_report_sm80) if r["kernel"] in ("_fwd_kernel", "_projected_fwd_kernel")]
    assert rows and not [r for r in rows if r["spill"]], "\n" + format_table([r for r in rows if r["spill"]])

