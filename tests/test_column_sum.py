"""The deterministic column sum (ops/column_sum.py) and the ``linear`` op whose bias gradient it sums."""

from __future__ import annotations

import pytest
import torch
from torch.library import opcheck

from sra_kernels.ops import column_sum as cs_ops
from sra_kernels.ops.column_sum import column_sum, sum_partials
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


def test_sum_partials_checks_its_outputs(kernel_device):
    with pytest.raises(ValueError, match="2 partial blocks for 1 outputs"):
        sum_partials(torch.zeros(2, 4, 8, device=kernel_device), torch.empty(8, device=kernel_device))


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
