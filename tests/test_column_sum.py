"""The deterministic column sum (ops/column_sum.py) and the ``linear`` op whose bias gradient it sums."""

from __future__ import annotations

import pytest
import torch
from torch.library import opcheck

from sra_kernels.ops import column_sum as cs_ops
from sra_kernels.ops.column_sum import column_partials, column_sum, finish_column_sums, finish_column_sums_call
from sra_kernels.ops.linear import biased_linear
from tests.accuracy import assert_within_reference_error
from tests.conftest import nan_empty


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(cs_ops, "_alloc", nan_empty)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("R, C", [(1, 1), (70, 320), (3000, 64), (129, 40)])
def test_column_sum_matches_float64(R, C, dtype, kernel_device):
    x = torch.randn(R, C, dtype=torch.float64)
    got = column_sum(x.to(device=kernel_device, dtype=dtype), dtype)
    assert got.dtype == dtype and got.shape == (C,)
    assert_within_reference_error("sum", got.cpu(), x.sum(0), x.to(dtype).sum(0), dtype)


def test_column_sum_reads_strided_rows_and_is_deterministic(kernel_device):
    x = torch.randn(300, 96, device=kernel_device)[:, 16:80]  # rows 96 apart, columns contiguous
    first, second = column_sum(x, torch.float32), column_sum(x, torch.float32)
    assert torch.equal(first, second)
    torch.testing.assert_close(first.double(), x.double().sum(0), rtol=1e-6, atol=1e-4)


def test_one_launch_finishes_six_groups_of_any_shape(kernel_device):
    """Six partial sets of different row counts and widths (one wider than a column block, one of one row) sum
    into outputs of their own dtypes, each within the float64 rule, bit-identical on a rerun."""
    shapes = [(1, 8), (7, 320), (33, 64), (100, 40), (2, 130), (64, 16)]
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float32, torch.bfloat16, torch.float32]
    parts = [torch.randn(r, c, dtype=torch.float64) for r, c in shapes]
    like = [torch.empty(0, dtype=d, device=kernel_device) for d in dtypes]
    launched = [p.to(device=kernel_device, dtype=torch.float32) for p in parts]
    first = finish_column_sums_call(launched, like)
    second = finish_column_sums_call(launched, like)
    for got, again, part, dtype in zip(first, second, parts, dtypes):
        assert got.dtype == dtype and torch.equal(got, again)
        exact = part.to(torch.float32).double().sum(0)
        assert_within_reference_error("sum", got.cpu(), exact, part.to(torch.float32).sum(0).to(dtype), dtype)


def test_partials_of_many_rows_finish_to_the_column_sum(kernel_device):
    x = torch.randn(5000, 24, dtype=torch.float64)
    part = column_partials(x.float().to(kernel_device))
    assert 1 < part.shape[0] < 5000 and part.shape[1] == 24
    out = torch.empty(24, device=kernel_device)
    finish_column_sums([part], [out])
    torch.testing.assert_close(out.double().cpu(), x.float().double().sum(0), rtol=1e-6, atol=1e-4)


def test_finish_checks_its_groups(kernel_device):
    part, out = torch.zeros(4, 8, device=kernel_device), torch.empty(8, device=kernel_device)
    with pytest.raises(ValueError, match="2 partial sets for 1 outputs"):
        finish_column_sums([part, part], [out])
    with pytest.raises(ValueError, match="7 partial sets"):
        finish_column_sums([part] * 7, [out] * 7)
    with pytest.raises(ValueError, match="cannot finish"):
        finish_column_sums([part.double()], [out])
    with pytest.raises(ValueError, match="cannot finish"):
        finish_column_sums([part], [torch.empty(9, device=kernel_device)])


def test_linear_gradients_match_torch(kernel_device):
    x = torch.randn(2, 50, 32, device=kernel_device, requires_grad=True)
    w = torch.randn(16, 32, device=kernel_device, requires_grad=True)
    b = torch.randn(16, device=kernel_device, requires_grad=True)
    y = biased_linear(x, w, b)
    g = torch.randn_like(y)
    want_y = torch.nn.functional.linear(x, w, b)
    torch.testing.assert_close(y, want_y)
    for got, want in zip(torch.autograd.grad(y, (x, w, b), g), torch.autograd.grad(want_y, (x, w, b), g)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_ops_pass_opcheck(kernel_device):
    x = torch.randn(3, 7, 8, device=kernel_device, requires_grad=True)
    w = torch.randn(5, 8, device=kernel_device, requires_grad=True)
    b = torch.randn(5, device=kernel_device, requires_grad=True)
    opcheck(torch.ops.sra_kernels.linear.default, (x, w, b))
    opcheck(torch.ops.sra_kernels.column_sum.default, (torch.randn(30, 8, device=kernel_device), torch.float32))
    opcheck(torch.ops.sra_kernels.finish_column_sums.default,
            ([torch.randn(3, 8, device=kernel_device), torch.randn(5, 16, device=kernel_device)],
             [torch.empty(0, device=kernel_device), torch.empty(0, dtype=torch.bfloat16, device=kernel_device)]))
