"""Offsets past 2^31 elements and CUDA's grid limits.

The ops take inputs with any strides, so a small tensor can hold an element 2^31 or more elements past its
base (e.g. a channel-major view): every offset the kernels compute must then be int64, index and stride alike.
The huge-stride checks run each op on views whose last element along one dimension lies >= 2^31 elements
in (over a mostly untouched storage: a few GiB of address space, a few pages of memory) and compare it with
the same op on contiguous copies. An int32 product wraps and reads (or writes) outside the storage, which can
segfault, so the checks run in a subprocess, and a new one resumes after a check that kills it. The grid
checks record the grids the launchers pass at a 4096x4096 image on meta tensors: y and z must stay <= 65,535.
"""

import functools
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
from triton.runtime.jit import KernelInterface

from sra_kernels.ops import attention, column_sum, projected_attention, spatial_reduce

ROOT = Path(__file__).resolve().parents[1]
REACH = 2 ** 31
"""Where the last element of a spread dimension lies, in elements from the view's first."""


def spread(t: torch.Tensor, dim: int) -> torch.Tensor:
    """A view equal to ``t`` whose index shape[dim] - 1 along ``dim`` lies >= REACH elements in; the other
    dimensions are packed (row-major) below that stride."""
    n = t.shape[dim]
    inner = t.numel() // n
    stride = max(inner, -(-REACH // (n - 1)))
    strides, step = [0] * t.dim(), 1
    for i in reversed(range(t.dim())):
        if i != dim:
            strides[i], step = step, step * t.shape[i]
    strides[dim] = stride
    view = torch.empty((n - 1) * stride + inner, dtype=t.dtype, device=t.device).as_strided(t.shape, strides)
    return view.copy_(t)


def _same(got, want):
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def _check_attention(device, M, k_dim):
    """Forward and backward with q, v, o, dO spread along head_dim and k along ``k_dim`` (1: keys, 3: head_dim)."""
    B, N, H, D, scale = 1, 40, 2, 16, 0.25
    q, k, v, do = (torch.randn(B, L, H, D, dtype=torch.float16, device=device) for L in (N, M, M, N))
    o, lse = attention.attention_forward(q, k, v, scale)
    wide = [spread(q, 3), spread(k, k_dim), spread(v, 3)]
    _same(attention.attention_forward(*wide, scale), (o, lse))
    want = attention.attention_backward(do, q, k, v, o, lse, scale)
    _same(attention.attention_backward(spread(do, 3), *wide, spread(o, 3), lse, scale), want)


def _check_projected(device):
    """The fused-projection forward with x spread along channels, k along heads (hh * stride) and v along head_dim."""
    B, N, M, C, heads = 1, 40, 24, 32, 4
    x = torch.randn(B, N, C, dtype=torch.float16, device=device)
    k, v = (torch.randn(B, M, heads, C // heads, dtype=torch.float16, device=device) for _ in range(2))
    wq, wp = (torch.randn(C, C, dtype=torch.float16, device=device) * C ** -0.5 for _ in range(2))
    bq, bp = (torch.randn(C, dtype=torch.float16, device=device) for _ in range(2))

    def forward(x, k, v):
        return projected_attention.projected_attention_forward(x, wq, bq, k, v, wp, bp, 0.35, True)

    _same(forward(spread(x, 2), spread(k, 2), spread(v, 3)), forward(x, k, v))


def _check_spatial(device, linear):
    """The reduction's forward and backward with x and grad_y spread along channels."""
    B, H, W, C = 1, 8, 8, 16
    sr = 1 if linear else 2
    x = torch.randn(B, H * W, C, dtype=torch.float16, device=device)
    weights = (torch.randn(C, C, sr, sr, dtype=torch.float16, device=device) * C ** -0.5,
               *(torch.randn(C, dtype=torch.float16, device=device) for _ in range(3)))
    geometry = (sr, linear, 1e-5)
    y, *saved = spatial_reduce.spatial_reduce_forward(x, H, W, *weights, *geometry)
    _same(spatial_reduce.spatial_reduce_forward(spread(x, 2), H, W, *weights, *geometry), (y, *saved))
    gy = torch.randn_like(y)
    want = spatial_reduce.spatial_reduce_backward(gy, x, H, W, *weights, *saved, *geometry)
    _same(spatial_reduce.spatial_reduce_backward(spread(gy, 2), spread(x, 2), H, W, *weights, *saved, *geometry),
          want)


CHECKS = {
    "attention_single_kv": lambda device: _check_attention(device, 16, 1),
    "attention_key_loop": lambda device: _check_attention(device, 300, 3),
    "projected_attention": _check_projected,
    "spatial_reduce_strided": lambda device: _check_spatial(device, False),
    "spatial_reduce_linear": lambda device: _check_spatial(device, True),
}


MARK = "@large-offsets"


def run(checks: list[str], device: str) -> None:
    """The checks in turn, in the subprocess: a line "MARK [check, null]" as each starts, "MARK [check, error]"
    ("" if it passed) as it ends."""
    torch.set_num_threads(1)
    for check in checks:
        print(MARK, json.dumps([check, None]), flush=True)
        torch.manual_seed(0)
        try:
            CHECKS[check](torch.device(device))
            error = ""
        except Exception:  # noqa: BLE001 -- reported to the test
            error = traceback.format_exc()
        print(MARK, json.dumps([check, error]), flush=True)


@functools.lru_cache(maxsize=None)
def _outcomes(device: str) -> dict[str, str]:
    """check -> "" (passed) or why not, from as few subprocesses as it takes: one, unless a check kills its
    subprocess; then the checks after it run in the next."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH")))))
    outcomes, pending = {}, sorted(CHECKS)
    while pending:
        done = subprocess.run([sys.executable, "-X", "faulthandler", "-c", f"from tests.test_large_offsets import run; "
                               f"run({pending!r}, {device!r})"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        started = None
        for line in done.stdout.splitlines():
            if line.startswith(MARK):
                check, error = json.loads(line[len(MARK):])
                started = check if error is None else None
                if error is not None:
                    outcomes[check] = error
        died = f"its subprocess died, exit status {done.returncode} (-11: segfault)\n{done.stderr[-4000:]}"
        if started is None:  # died before any check began, or ran them all
            outcomes.update({check: died for check in pending if check not in outcomes})
        else:
            outcomes[started] = died
        pending = [check for check in pending if check not in outcomes]
    return outcomes


@pytest.mark.parametrize("check", sorted(CHECKS))
def test_offsets_past_2_31(check, kernel_device):
    if kernel_device.type == "cuda" and torch.cuda.mem_get_info()[0] < 24 * 2 ** 30:
        pytest.skip("the spread views take up to 20 GiB on a GPU")
    error = _outcomes(kernel_device.type)[check]
    assert not error, error


# ----------------------------------------------------------------------------------------------------------
# Grid limits
# ----------------------------------------------------------------------------------------------------------

GRID_X_MAX, GRID_YZ_MAX = 2 ** 31 - 1, 65_535


@pytest.fixture
def grids(monkeypatch):
    """Every ``*_kernel`` of the op modules replaced by a stub recording (kernel name, grid); plans for a 132-SM
    GPU, meta tensors accepted."""
    recorded = []

    class Stub:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            recorded.append((self.name, tuple(grid)))
            return lambda *args, **kwargs: None

    for module in (attention, column_sum, projected_attention, spatial_reduce):
        for name, fn in list(vars(module).items()):
            if name.endswith("_kernel") and isinstance(fn, KernelInterface):
                monkeypatch.setattr(module, name, Stub(name))
    monkeypatch.setattr(attention, "_num_sms", lambda device: 132)
    monkeypatch.setattr(projected_attention, "_num_sms", lambda device: 132)
    monkeypatch.setattr(attention, "_check_launchable", lambda q: None)
    attention._plan.cache_clear()
    projected_attention._plan.cache_clear()
    yield recorded
    attention._plan.cache_clear()
    projected_attention._plan.cache_clear()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grids_fit_cuda_limits_at_4096x4096(grids, dtype):
    """PVT stage 1 of a 4096x4096 image (N = 2^24 tokens, C = 64): every launch of the three launchers."""
    meta = dict(device="meta", dtype=dtype)
    B, side, C, heads = 1, 4096, 64, 1
    N = side * side
    x = torch.empty(B, N, C, **meta)
    for M in (49, (side // 8) ** 2):  # linear SRA's 7x7 keys, sr = 8
        q, k = torch.empty(B, N, heads, C, **meta), torch.empty(B, M, heads, C, **meta)
        o, lse = attention.attention_forward(q, k, k, 0.125)
        for deterministic in (True, False):
            attention.attention_backward(torch.empty_like(o), q, k, k, o, lse, 0.125, deterministic)
        wc, bc = torch.empty(C, C, **meta), torch.empty(C, **meta)
        projected_attention.projected_attention_forward(x, wc, bc, k, k, wc, bc, 0.125, True)
    for sr, linear in ((8, False), (1, True)):
        weights = (torch.empty(C, C, sr, sr, **meta), *(torch.empty(C, **meta) for _ in range(3)))
        y, *saved = spatial_reduce.spatial_reduce_forward(x, side, side, *weights, sr, linear, 1e-5)
        spatial_reduce.spatial_reduce_backward(torch.empty_like(y), x, side, side, *weights, *saved, sr, linear, 1e-5)
    assert {name for name, _ in grids} >= {"_fwd_kernel", "_bwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel",
                                           "_projected_fwd_kernel", "_adaptive_pool_kernel", "_patch_gemm_kernel",
                                           "_sum_norm_kernel", "_norm_bwd_kernel",
                                           "_patch_dgrad_kernel", "_conv_weight_grad_kernel", "_weight_grad_sum_kernel",
                                           "_finish_column_sums_kernel",
                                           "_adaptive_pool_bwd_kernel"}
    over = sorted({(name, grid) for name, grid in grids
                   if not (1 <= len(grid) <= 3 and 1 <= grid[0] <= GRID_X_MAX
                           and all(1 <= g <= GRID_YZ_MAX for g in grid[1:]))})
    assert not over, over
