"""The reference equals the official PVT Attention; the module loads its state dict strictly."""

import itertools

import pytest
import torch

from sra_kernels import SpatialReductionAttention, reference
from tests.official_pvt import OfficialAttention

# (B, H, W, C, heads, sr, linear): H, W include non-multiples of sr and of the 7x7 linear pool.
SHAPES = [
    (1, 8, 8, 32, 1, 1, False),
    (2, 8, 8, 32, 2, 2, False),
    (2, 9, 11, 40, 5, 2, False),
    (1, 17, 13, 64, 8, 4, False),
    (2, 16, 16, 64, 2, 8, False),
    (1, 19, 23, 80, 5, 8, False),
    (2, 7, 7, 32, 1, 1, True),
    (1, 9, 12, 40, 5, 4, True),
    (2, 5, 6, 64, 8, 1, True),
    (1, 15, 15, 16, 2, 2, True),
]


def _random_official(C, heads, sr, linear, qkv_bias=True):
    """An official Attention with every weight random (biases and norm affine included)."""
    module = OfficialAttention(C, heads, qkv_bias=qkv_bias, sr_ratio=sr, linear=linear).double()
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * p.shape[-1] ** -0.5)
    return module


def _weights(module):
    reduces = module.linear or module.sr_ratio > 1
    return (
        module.q.weight, module.q.bias, module.kv.weight, module.kv.bias,
        module.proj.weight, module.proj.bias,
        module.sr.weight if reduces else None, module.sr.bias if reduces else None,
        module.norm.weight if reduces else None, module.norm.bias if reduces else None,
    )


@pytest.mark.parametrize("B,H,W,C,heads,sr,linear", SHAPES)
def test_reference_equals_official(B, H, W, C, heads, sr, linear):
    official = _random_official(C, heads, sr, linear)
    x = torch.randn(B, H * W, C, dtype=torch.float64)
    expected = official(x, H, W)
    got = reference.sra_attention(x, (H, W), *_weights(official), num_heads=heads, sr_ratio=sr, linear=linear)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("heads,sr", list(itertools.product([1, 2, 5, 8], [1, 2, 4, 8])))
def test_reference_equals_official_heads_and_ratios(heads, sr):
    C, H, W = 8 * heads, 17, 19
    official = _random_official(C, heads, sr, False)
    x = torch.randn(2, H * W, C, dtype=torch.float64)
    got = reference.sra_attention(x, (H, W), *_weights(official), num_heads=heads, sr_ratio=sr)
    torch.testing.assert_close(got, official(x, H, W), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("B,H,W,C,heads,sr,linear", SHAPES)
@pytest.mark.parametrize("backend", ["reference", "sdpa"])
@pytest.mark.parametrize("qkv_bias", [True, False])
def test_module_loads_official_state_dict(B, H, W, C, heads, sr, linear, backend, qkv_bias):
    official = _random_official(C, heads, sr, linear, qkv_bias)
    module = SpatialReductionAttention(C, heads, qkv_bias=qkv_bias, sr_ratio=sr, linear=linear, backend=backend).double()
    module.load_state_dict(official.state_dict(), strict=True)
    official.load_state_dict(module.state_dict(), strict=True)
    x = torch.randn(B, H * W, C, dtype=torch.float64)
    torch.testing.assert_close(module(x, H, W), official(x, H, W), rtol=1e-10, atol=1e-10)


def test_module_qk_scale_and_dropout_follow_official():
    official = _random_official(32, 2, 2, False)
    official.scale = 0.37
    module = SpatialReductionAttention(32, 2, qkv_bias=True, qk_scale=0.37, sr_ratio=2, attn_drop=0.5).double()
    module.load_state_dict(official.state_dict())
    x = torch.randn(2, 64, 32, dtype=torch.float64)
    module.eval()
    torch.testing.assert_close(module(x, 8, 8), official(x, 8, 8), rtol=1e-10, atol=1e-10)
    module.train()
    torch.manual_seed(1)
    a = module(x, 8, 8)
    torch.manual_seed(2)
    b = module(x, 8, 8)
    assert not torch.allclose(a, b), "attention dropout while training must be active"


@pytest.mark.parametrize("linear,sr", [(False, 1), (False, 2), (True, 1)])
def test_reference_gradcheck(linear, sr):
    official = _random_official(8, 2, sr, linear)
    H, W = 9, 7
    x = torch.randn(1, H * W, 8, dtype=torch.float64, requires_grad=True)
    weights = [w.detach().clone().requires_grad_() if w is not None else None for w in _weights(official)]

    present = [i for i, w in enumerate(weights) if w is not None]

    def fn(x, *present_weights):
        full = [None] * len(weights)
        for i, w in zip(present, present_weights):
            full[i] = w
        return reference.sra_attention(x, (H, W), *full, num_heads=2, sr_ratio=sr, linear=linear)

    assert torch.autograd.gradcheck(fn, [x] + [weights[i] for i in present])


def test_sub_steps_compose_to_reference():
    official = _random_official(40, 5, 4, False)
    H, W = 13, 9
    x = torch.randn(2, H * W, 40, dtype=torch.float64)
    ws = _weights(official)
    reduced = reference.spatial_reduction(x, (H, W), *ws[6:], sr_ratio=4)
    assert reduced.shape == (2, (H // 4) * (W // 4), 40)
    q = (x @ ws[0].T + ws[1]).view(2, H * W, 5, 8)
    k, v = (reduced @ ws[2].T + ws[3]).view(2, -1, 2, 5, 8).unbind(2)
    out = reference.reduced_kv_attention(q, k, v).reshape(2, H * W, 40) @ ws[4].T + ws[5]
    torch.testing.assert_close(out, official(x, H, W), rtol=1e-12, atol=1e-12)
