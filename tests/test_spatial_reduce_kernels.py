"""The Triton spatial-reduction kernels (ops/spatial_reduce.py), forward and backward, against the float64 reference.

Each case draws fresh random inputs, runs the kernels directly (every kernel-written buffer poisoned with NaN
first), and compares the output and all five gradients with torch.autograd on
:func:`sra_kernels.reference.spatial_reduction` in float64. The kernel's error must be at most 2x the error of
the same-dtype PyTorch reference, plus a small floor (both errors relative to the largest reference value).
"""

from __future__ import annotations

import pytest
import torch

from sra_kernels import reference
from sra_kernels.ops import spatial_reduce as sr_ops
from tests.accuracy import assert_within_reference_error
from tests.conftest import nan_empty

EPS = 1e-5

NAMES = ("y", "dx", "d_sr_weight", "d_sr_bias", "d_norm_weight", "d_norm_bias")


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    """Every kernel-written buffer starts full of NaN: an element left unwritten shows up."""
    monkeypatch.setattr(sr_ops, "_alloc", nan_empty)


def _problem(B, H, W, C, sr, linear, dtype, device):
    """Random inputs (x, sr_weight, sr_bias, norm_weight, norm_bias) and grad_y, rounded to dtype, on device."""
    k = 1 if linear else sr
    Hr, Wr = sr_ops.reduced_size(H, W, sr, linear)
    tensors = (
        torch.randn(B, H * W, C, dtype=torch.float64),
        torch.randn(C, C, k, k, dtype=torch.float64) / (C * k * k) ** 0.5,
        0.5 * torch.randn(C, dtype=torch.float64),
        1.0 + 0.5 * torch.randn(C, dtype=torch.float64),
        0.5 * torch.randn(C, dtype=torch.float64),
        torch.randn(B, Hr * Wr, C, dtype=torch.float64),
    )
    *inputs, grad = (t.to(device=device, dtype=dtype) for t in tensors)
    return inputs, grad


def _kernels(inputs, grad, H, W, sr, linear):
    """(y, saved tensors, gradients) from the Triton launchers."""
    x, *params = inputs
    y, *saved = sr_ops.spatial_reduce_forward(x, H, W, *params, sr, linear, EPS)
    grads = sr_ops.spatial_reduce_backward(grad, x, H, W, *params, *saved, sr, linear, EPS)
    return y, saved, grads


def _torch(inputs, grad, H, W, sr, linear, dtype):
    """(y, *gradients) of the PyTorch reference run in dtype."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in inputs]
    y = reference.spatial_reduction(
        leaves[0], (H, W), *leaves[1:], sr_ratio=sr, linear=linear, eps=EPS
    )
    return (y, *torch.autograd.grad(y, leaves, grad.to(dtype)))


def _check(B, H, W, C, sr, linear, dtype, device):
    inputs, grad = _problem(B, H, W, C, sr, linear, dtype, device)
    y, (z, mean, rstd, pooled), grads = _kernels(inputs, grad, H, W, sr, linear)
    exact = _torch(inputs, grad, H, W, sr, linear, torch.float64)
    same_dtype = _torch(inputs, grad, H, W, sr, linear, dtype)
    for name, got, want, peer, like in zip(NAMES, (y, *grads), exact, same_dtype, (y, *inputs)):
        assert got.dtype == like.dtype, name
        assert_within_reference_error(name, got, want, peer, dtype)
    assert z.dtype == dtype and mean.dtype == rstd.dtype == torch.float32 and pooled.dtype == dtype
    assert pooled.shape == (B, 49 if linear else 0, C)
    x64, w64, b64 = (t.double() for t in inputs[:3])
    ulp = torch.finfo(dtype).eps  # saved activations are rounded to dtype (truncated in the interpreter)
    if linear:  # the conv reads the pooled tokens rounded to dtype, as PyTorch's does
        pooled64 = reference.image_to_tokens(
            torch.nn.functional.adaptive_avg_pool2d(reference.tokens_to_image(x64, (H, W)), 7)
        )
        torch.testing.assert_close(pooled.double(), pooled64, rtol=ulp, atol=1e-6)
        z64 = torch.nn.functional.linear(pooled.double(), w64.flatten(1), b64)
    else:
        image = torch.nn.functional.conv2d(reference.tokens_to_image(x64, (H, W)), w64, b64, stride=sr)
        z64 = reference.image_to_tokens(image)
    torch.testing.assert_close(z.double(), z64, rtol=ulp, atol=1e-5 * z64.abs().max().item())
    torch.testing.assert_close(mean.double(), z64.mean(-1), rtol=0, atol=1e-5 * z64.abs().max().item())
    rstd64 = (z64.var(-1, unbiased=False) + EPS).rsqrt()
    torch.testing.assert_close(rstd.double(), rstd64, rtol=1e-5, atol=0)


STRIDED_CASES = [  # B, H, W, C, sr
    (1, 9, 11, 32, 2),
    (2, 9, 11, 64, 4),
    (1, 17, 15, 32, 8),
    (2, 8, 8, 96, 2),
    (1, 6, 10, 80, 2),
    (1, 5, 4, 160, 2),
    (1, 10, 8, 40, 3),  # odd ratio, C not a multiple of the channel chunk
    (3, 12, 12, 32, 2),  # 108 reduced tokens: row tiles that span images
]
LINEAR_CASES = [  # B, H, W, C
    (1, 7, 7, 32),
    (2, 9, 12, 64),
    (1, 5, 6, 96),
    (1, 15, 15, 80),
    (1, 3, 2, 32),
    (1, 1, 9, 16),  # H = 1: row 0 lies in all 7 cells
]
LOW_PRECISION_CASES = [  # B, H, W, C, sr, linear
    (2, 9, 11, 32, 2, False),
    (1, 17, 15, 32, 8, False),
    (1, 9, 12, 32, 1, True),
    (1, 5, 6, 48, 1, True),
    (1, 6, 4, 160, 2, False),  # 3 column tiles of 64 (the last one part padding), as at C = 320
]


@pytest.mark.parametrize("B,H,W,C,sr", STRIDED_CASES)
def test_strided_matches_reference(B, H, W, C, sr, kernel_device):
    _check(B, H, W, C, sr, False, torch.float32, kernel_device)


@pytest.mark.parametrize("B,H,W,C", LINEAR_CASES)
def test_linear_matches_reference(B, H, W, C, kernel_device):
    _check(B, H, W, C, 1, True, torch.float32, kernel_device)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("B,H,W,C,sr,linear", LOW_PRECISION_CASES)
def test_low_precision_matches_reference(B, H, W, C, sr, linear, dtype, kernel_device):
    _check(B, H, W, C, sr, linear, dtype, kernel_device)


def test_unread_tokens_get_exactly_zero_gradient(kernel_device):
    B, H, W, C, sr = 2, 9, 11, 32, 4  # the conv reads rows 0..7 and columns 0..7
    inputs, grad = _problem(B, H, W, C, sr, False, torch.float32, kernel_device)
    dx = _kernels(inputs, grad, H, W, sr, False)[2][0].view(B, H, W, C)
    assert (dx[:, 8:] == 0).all() and (dx[:, :, 8:] == 0).all()
    assert (dx[:, :8, :8] != 0).all()


@pytest.mark.parametrize("linear", [False, True], ids=["strided", "linear"])
def test_non_contiguous_inputs(linear, kernel_device):
    """x as a channel-strided view, or x and grad_y as transposed tensors: the same results (bit-identical
    in the interpreter; natively the compiler may vectorise contiguous loads and reorder fp32 sums)."""
    B, H, W, C, sr = 2, 9, 11, 32, 2
    inputs, grad = _problem(B, H, W, C, sr, linear, torch.float32, kernel_device)
    x = inputs[0]
    wide = torch.zeros(B, H * W, 2 * C, device=kernel_device)
    wide[..., ::2] = x

    def transposed(t):
        return t.transpose(1, 2).contiguous().transpose(1, 2)

    expected = _kernels(inputs, grad, H, W, sr, linear)
    for view, grad_view in ((wide[..., ::2], grad), (transposed(x), transposed(grad))):
        assert not view.is_contiguous()
        got = _kernels([view, *inputs[1:]], grad_view, H, W, sr, linear)
        for a, b in zip((got[0], *got[1], *got[2]), (expected[0], *expected[1], *expected[2])):
            if kernel_device.type == "cpu":
                assert torch.equal(a, b)
            elif b.numel():  # H200: a conv-weight-grad entry of 0.015 moved by 1.4e-6 (largest entry ~30)
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


@pytest.mark.parametrize("linear", [False, True], ids=["strided", "linear"])
def test_backward_is_deterministic(linear, kernel_device):
    B, H, W, C, sr = 2, 9, 11, 32, 4
    inputs, grad = _problem(B, H, W, C, sr, linear, torch.float32, kernel_device)
    first, second = (_kernels(inputs, grad, H, W, sr, linear)[2] for _ in range(2))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("linear", [False, True], ids=["strided", "linear"])
def test_empty_batch_launches_nothing(linear, monkeypatch, kernel_device):
    for name in dir(sr_ops):
        if name.endswith("_kernel"):
            monkeypatch.setattr(sr_ops, name, None)  # subscripting None raises: any launch fails
    H, W, C, sr = 9, 11, 32, 2
    inputs, grad = _problem(0, H, W, C, sr, linear, torch.float32, kernel_device)
    y, saved, grads = _kernels(inputs, grad, H, W, sr, linear)
    assert y.shape == (0, 49 if linear else 20, C)
    for g, like in zip(grads, inputs):
        assert g.shape == like.shape and g.dtype == like.dtype and (g == 0).all()


@pytest.mark.parametrize("block_m, steps_per_split", [(128, 12), (64, 5), (128, 5)])
def test_tile_heights_and_k_splits(block_m, steps_per_split, monkeypatch, kernel_device):
    """The patch GEMM and the data-gradient GEMM at both tile heights the heuristics pick (128 rows only at
    sizes too big for the interpreter), and the patch GEMM's 12 K steps (C = 48: 3 chunks of 16 x 4 taps) in
    one split or in splits of 5, 5 and 2, against the reference."""
    gemm_config, dgrad_config = sr_ops._patch_gemm_config, sr_ops._dgrad_config

    def forced_gemm(R, C, sr, elem_size):
        cfg, _, _ = gemm_config(R, C, sr, elem_size)
        assert sr * sr * -(-C // cfg["BLOCK_K"]) == 12
        return dict(cfg, BLOCK_M=block_m), -(-12 // steps_per_split), steps_per_split

    monkeypatch.setattr(sr_ops, "_patch_gemm_config", forced_gemm)
    monkeypatch.setattr(sr_ops, "_dgrad_config", lambda *args: dict(dgrad_config(*args), BLOCK_M=block_m))
    _check(3, 12, 12, 48, 2, False, torch.bfloat16, kernel_device)


@pytest.mark.parametrize("layout", ["tap_major", "channels_last"])
def test_weight_layouts_are_read_in_place(layout, kernel_device):
    """A tap_major_layout or a channels_last conv weight reaches the kernels without a copy, forward and backward,
    and gives the standard-layout weight's results bit for bit; the weight gradient comes back in the layout
    AccumulateGrad keeps: (C_out, C_in, k, k) contiguous for a tap-major copy (its autograd maps it back from
    there), channels_last for a channels_last weight."""
    B, H, W, C, sr = 2, 9, 11, 32, 2
    inputs, grad = _problem(B, H, W, C, sr, False, torch.float32, kernel_device)
    if layout == "tap_major":
        weight = sr_ops.tap_major_layout(inputs[1])
        assert not weight.is_contiguous() and not weight.is_contiguous(memory_format=torch.channels_last)
    else:
        weight = inputs[1].contiguous(memory_format=torch.channels_last)
    assert torch.equal(weight, inputs[1])
    assert sr_ops.tap_major_layout(weight).data_ptr() == weight.data_ptr()
    assert sr_ops._tap_major(weight).data_ptr() == weight.data_ptr()
    assert sr_ops.tap_major_layout(weight, torch.bfloat16).stride() == weight.stride()  # cast, layout kept
    standard = _kernels(inputs, grad, H, W, sr, False)
    in_place = _kernels([inputs[0], weight, *inputs[2:]], grad, H, W, sr, False)
    for a, b in zip((standard[0], *standard[2]), (in_place[0], *in_place[2])):
        assert torch.equal(a, b)
    d_weight = in_place[2][1]
    assert d_weight.is_contiguous(memory_format=torch.contiguous_format if layout == "tap_major"
                                  else torch.channels_last)


def test_identity_ratio_is_rejected():
    inputs, _ = _problem(1, 4, 4, 16, 1, False, torch.float32, "cpu")
    with pytest.raises(ValueError, match="sr_ratio"):
        sr_ops.spatial_reduce_forward(inputs[0], 4, 4, *inputs[1:], 1, False, EPS)


NATIVE_CASES = [  # B, H, W, C, sr, linear: PVT stages at 224x224 and odd high-resolution shapes
    (8, 56, 56, 64, 8, False),
    (8, 28, 28, 128, 4, False),
    (8, 14, 14, 320, 2, False),
    (2, 130, 97, 64, 8, False),
    (2, 33, 50, 512, 2, False),
    (8, 56, 56, 64, 1, True),
    (4, 28, 28, 128, 1, True),
    (2, 33, 41, 320, 1, True),
    (2, 6, 5, 512, 1, True),
]


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="native sweep needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("B,H,W,C,sr,linear", NATIVE_CASES)
def test_native_sweep(B, H, W, C, sr, linear, dtype):
    _check(B, H, W, C, sr, linear, dtype, torch.device("cuda"))


@pytest.mark.parametrize("linear,sr", [(False, 4), (True, 1)])
def test_backward_accumulates_into_given_dx(linear, sr, kernel_device):
    """project_and_reduce_backward: the reduction's gradient is added in place to the q path's dx (grad_q @ W_q,
    here grad_q with an identity W_q; tokens the conv never reads keep it unchanged); its weight gradient and its
    norm / conv-bias partials, once finished, are the standalone backward's bit for bit."""
    from sra_kernels.ops.column_sum import finish_column_sums

    B, H, W, C = 2, 9, 11, 32
    inputs, grad = _problem(B, H, W, C, sr, linear, torch.float32, kernel_device)
    y, saved, (dx, d_weight, *param_grads) = _kernels(inputs, grad, H, W, sr, linear)
    x, weight, bias, norm_weight, norm_bias = inputs
    other = torch.randn_like(x)
    eye = torch.eye(C, device=x.device)
    dx_acc, d_weight_acc, norm_part = sr_ops.project_and_reduce_backward(
        other, grad, x, H, W, eye, weight, norm_weight, norm_bias, *saved, sr, linear, EPS)
    torch.testing.assert_close(dx_acc, other + dx, rtol=1e-6, atol=1e-6)
    assert torch.equal(d_weight_acc, d_weight)
    finished = [torch.empty(C, device=x.device) for _ in range(3)]
    finish_column_sums(list(norm_part), finished)
    for a, b in zip(finished, (param_grads[1], param_grads[2], param_grads[0])):  # gamma, beta, conv bias
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("B,H,W,C,sr,linear", [(2, 9, 11, 32, 2, False), (1, 10, 13, 40, 4, False),
                                                (1, 9, 12, 64, 1, True), (1, 16, 16, 128, 8, False)])
def test_kv_projection_epilogue(B, H, W, C, sr, linear, dtype, kernel_device):
    """reduce_and_project_kv: the same reduction outputs bit for bit, plus kv = y W_kv^T + b_kv within the
    accuracy rule of a same-dtype torch Linear on the kernel's own y (2C columns in BLOCK_C chunks)."""
    if C > sr_ops.kv_max_channels(dtype):
        pytest.skip(f"the kv epilogue takes C <= {sr_ops.kv_max_channels(dtype)} in {dtype}")
    inputs, _ = _problem(B, H, W, C, sr, linear, dtype, kernel_device)
    kv_weight = (torch.randn(2 * C, C, dtype=torch.float64) / C ** 0.5).to(kernel_device, dtype)
    kv_bias = (0.5 * torch.randn(2 * C, dtype=torch.float64)).to(kernel_device, dtype)
    x, *params = inputs
    kv, *reduced = sr_ops.reduce_and_project_kv(x, H, W, *params, sr, linear, EPS, kv_weight, kv_bias)
    for got, want in zip(reduced, sr_ops.spatial_reduce_forward(x, H, W, *params, sr, linear, EPS)):
        assert torch.equal(got, want)
    y = reduced[0]
    exact = torch.nn.functional.linear(y.double(), kv_weight.double(), kv_bias.double())
    peer = torch.nn.functional.linear(y.float(), kv_weight.float(), kv_bias.float()).to(dtype)
    assert_within_reference_error("kv", kv, exact, peer, dtype)
    with pytest.raises(ValueError, match="C <= "):
        wide = torch.zeros(1, 4, 160, device=kernel_device, dtype=dtype)
        sr_ops.reduce_and_project_kv(wide, 2, 2, torch.zeros(160, 160, 2, 2, device=kernel_device, dtype=dtype),
                                     *(torch.zeros(160, device=kernel_device, dtype=dtype),) * 3, 2, False, EPS,
                                     torch.zeros(320, 160, device=kernel_device, dtype=dtype),
                                     torch.zeros(320, device=kernel_device, dtype=dtype))
