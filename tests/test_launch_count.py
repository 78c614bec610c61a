"""What a fwd+bwd of a reducing SRA stage launches on the triton backend (path cublas_projections): our Triton
kernels by name, and the torch kernels around them (GEMMs, copies, fills), counted with the Triton kernels
stubbed out on the CPU. A GPU-side launch costs ~3-5 us of device time and 5-25 us of host time in eager mode,
so the count is part of the op's cost: 20 now, ~47 before the reduction kernels v2, the key-parallel backward
and the one-op stage (ops/sra.py)."""

from __future__ import annotations

from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.test_host_overhead import stubbed_kernels
from sra_kernels import SpatialReductionAttention

TORCH_KERNELS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::copy_", "aten::fill_", "aten::zero_", "aten::sum",
                 "aten::add_", "aten::add", "aten::mul", "aten::stack", "aten::cat", "aten::clone", "aten::zeros",
                 "aten::ones", "aten::native_layer_norm", "aten::convolution"}
"""The aten ops that launch device kernels (views, allocations and metadata ops launch none); an op counts once,
at the innermost of these (e.g. an addmm's bias copy on the CPU, its one cuBLAS call on a GPU)."""


def _torch_kernels(prof) -> Counter:
    events = [e for e in prof.events() if e.name in TORCH_KERNELS]
    return Counter(e.name for e in events if not any(c.name in TORCH_KERNELS for c in e.cpu_children))


def test_reducing_stage_fwd_bwd_launches():
    module = SpatialReductionAttention(64, 1, qkv_bias=True, sr_ratio=8, backend="triton")
    module.configure(fuse_projections=False)
    x = torch.randn(2, 32 * 32, 64, requires_grad=True)
    grad = torch.ones_like(x)
    launched: list = []
    with stubbed_kernels(launched):
        module(x, 32, 32).sum().backward()  # plans made, lazy state settled
        module.zero_grad(set_to_none=True)
        x.grad = None
        launched.clear()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            module(x, 32, 32).backward(grad)
    assert Counter(launched) == Counter({
        "_patch_gemm_kernel": 1, "_sum_norm_kernel": 1, "_fwd_kernel": 1,  # forward
        # attention backward (one key block: query-parallel): dq and the q bias partials, then dK / dV into one
        # kv-shaped buffer and the kv bias partials
        "_bwd_kernel": 1, "_sum_partials_kernel": 1,
        "_norm_bwd_kernel": 1, "_patch_dgrad_kernel": 1, "_conv_weight_grad_kernel": 1, "_weight_grad_sum_kernel": 1,
        "_column_partials_kernel": 1,  # the out bias's partials
        "_finish_column_sums_kernel": 1,  # all six bias and norm-parameter gradients from their partials
    })
    torch_kernels = _torch_kernels(prof)
    # 3 projection GEMMs forward (addmm: counted at their bias copy on the CPU, one cuBLAS call on a GPU), 6
    # backward; no other copy (the channels_last conv weight is read in place, and the kv GEMMs read dK / dV as
    # the attention backward wrote them)
    assert torch_kernels == Counter({"aten::mm": 6, "aten::copy_": 3}), torch_kernels
    assert len(launched) + sum(torch_kernels.values()) == 20
