"""The projected-attention kernel (sra_kernels.ops.projected_attention): q projection, short-KV attention
and out projection in one launch (and, for self attention over <= 64 tokens, the k / v projection too), against the float64 reference, with every output NaN-poisoned first.

On CPU in Triton's interpreter at small shapes; natively larger when CUDA is present. The gradients of
the path (the cublas_projections backward on what this kernel saves) are tested through the whole op in
tests/test_sra_triton.py.
"""

import pytest
import torch

from sra_kernels.ops import projected_attention
from tests.accuracy import assert_within_reference_error
from tests.conftest import CUDA, INTERPRETER, nan_empty

DEVICE = torch.device("cuda" if CUDA else "cpu")
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
pytestmark = pytest.mark.skipif(not (CUDA or INTERPRETER), reason="Triton kernels need CUDA or TRITON_INTERPRET=1")


@pytest.fixture(autouse=True)
def poison_buffers(monkeypatch):
    monkeypatch.setattr(projected_attention, "_empty", nan_empty)


def make_inputs(B, N, M, C, heads, dtype, seed=0):
    """x (B, N, C) (a channel-strided view), W_q, b_q, k, v (halves of a (B, M, 2, h, d) projection), W_p, b_p."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, std=1.0):
        return (std * torch.randn(*shape, generator=g, dtype=torch.float64)).to(DEVICE, dtype)

    x = r(B, N, 2 * C)[..., ::2]
    kv = r(B, M, 2, heads, C // heads)
    return x, r(C, C, std=C ** -0.5), r(C, std=0.2), kv[:, :, 0], kv[:, :, 1], r(C, C, std=C ** -0.5), r(C, std=0.2)


def reference(x, w_q, b_q, k, v, w_p, b_p, scale, dtype):
    """(out, q, o, lse) in ``dtype`` (lse in float64 regardless), as the unfused path computes them."""
    x, w_q, b_q, k, v, w_p, b_p = (t.to(dtype) for t in (x, w_q, b_q, k, v, w_p, b_p))
    B, N, C = x.shape
    heads, d = k.shape[2], k.shape[3]
    q = (x @ w_q.T + b_q).view(B, N, heads, d)
    scores = torch.einsum("bnhd,bmhd->bhnm", q, k) * scale
    o = torch.einsum("bhnm,bmhd->bnhd", scores.softmax(-1), v).reshape(B, N, C)
    return o @ w_p.T + b_p, q.reshape(B, N, C), o, torch.logsumexp(scores.double(), -1)


# (B, N, M, C, heads, dtype): N = 200 > 64 strides programs over several query blocks; M = 100 loops
# over key blocks; head_dim 8 (C = 40, 5 heads) and 128 (C = 128, 1 head) are the extremes.
CASES = [
    (2, 70, 20, 32, 2, F32),
    (1, 200, 49, 64, 1, F32),
    (1, 33, 100, 40, 5, F32),
    (2, 65, 49, 64, 1, BF16),
    (1, 200, 100, 128, 2, BF16),
    (1, 30, 7, 128, 1, F16),
    (1, 1, 1, 16, 1, F16),
]


@pytest.mark.parametrize("B,N,M,C,heads,dtype", CASES)
def test_matches_reference(B, N, M, C, heads, dtype):
    inputs = make_inputs(B, N, M, C, heads, dtype)
    scale = (C // heads) ** -0.5
    out, q, o, lse = projected_attention.projected_attention_forward(*inputs, scale, save=True)
    exact = reference(*inputs, scale, torch.float64)
    peer = reference(*inputs, scale, dtype)
    for name, got, ex, pe in zip(("out", "q", "o"), (out, q, o), exact, peer):
        assert got.dtype == dtype and got.is_contiguous(), name
        assert_within_reference_error(name, got, ex, pe, dtype)
    assert lse.shape == (B, heads, N) and lse.dtype == F32
    torch.testing.assert_close(lse.double(), exact[3], rtol=1e-5, atol=1e-4 if dtype == F32 else 2e-2)
    inference = projected_attention.projected_attention_forward(*inputs, scale, save=False)
    assert torch.equal(inference[0], out) and inference[1].numel() == inference[3].numel() == 0


def self_attention_reference(x, w_q, b_q, w_kv, b_kv, w_p, b_p, heads, scale, dtype):
    """``reference`` with k, v = halves of x W_kv^T + b_kv rounded to ``dtype``, as the sr = 1 Linear makes them."""
    B, N, C = x.shape
    kv = (x.to(dtype) @ w_kv.to(dtype).T + b_kv.to(dtype)).view(B, N, 2, heads, C // heads)
    return reference(x, w_q, b_q, kv[:, :, 0], kv[:, :, 1], w_p, b_p, scale, dtype)


# (B, N, C, heads, dtype): N <= 64, one block of queries and keys; N = 64 fills it, 33 and 1 leave tails.
SELF_CASES = [
    (2, 42, 32, 2, F32),
    (1, 33, 40, 5, F32),
    (2, 64, 64, 1, BF16),
    (1, 49, 128, 2, F16),
    (1, 1, 16, 1, BF16),
]


@pytest.mark.parametrize("B,N,C,heads,dtype", SELF_CASES)
def test_self_attention_matches_reference(B, N, C, heads, dtype):
    x, w_q, b_q, _, _, w_p, b_p = make_inputs(B, N, 1, C, heads, dtype)
    g = torch.Generator().manual_seed(1)
    w_kv = (C ** -0.5 * torch.randn(2 * C, C, generator=g, dtype=torch.float64)).to(DEVICE, dtype)
    b_kv = (0.2 * torch.randn(2 * C, generator=g, dtype=torch.float64)).to(DEVICE, dtype)
    inputs = (x, w_q, b_q, w_kv, b_kv, w_p, b_p)
    scale = (C // heads) ** -0.5
    out, q, o, lse = projected_attention.projected_self_attention_forward(*inputs, heads, scale, save=True)
    exact = self_attention_reference(*inputs, heads, scale, torch.float64)
    peer = self_attention_reference(*inputs, heads, scale, dtype)
    for name, got, ex, pe in zip(("out", "q", "o"), (out, q, o), exact, peer):
        assert got.dtype == dtype and got.is_contiguous(), name
        assert_within_reference_error(name, got, ex, pe, dtype)
    assert lse.shape == (B, heads, N) and lse.dtype == F32
    torch.testing.assert_close(lse.double(), exact[3], rtol=1e-5, atol=1e-4 if dtype == F32 else 2e-2)
    inference = projected_attention.projected_self_attention_forward(*inputs, heads, scale, save=False)
    assert torch.equal(inference[0], out) and inference[1].numel() == inference[3].numel() == 0


def test_self_attention_takes_one_block_of_tokens_and_narrow_fp32():
    x, w_q, b_q, _, _, w_p, b_p = make_inputs(1, 65, 1, 32, 2, F32)
    w_kv, b_kv = torch.cat((w_q, w_p)), torch.cat((b_q, b_p))
    with pytest.raises(ValueError, match="N <= 64"):
        projected_attention.projected_self_attention_forward(x, w_q, b_q, w_kv, b_kv, w_p, b_p, 2, 0.25, save=False)
    x, w_q, b_q, _, _, w_p, b_p = make_inputs(1, 49, 1, 128, 2, F32)
    w_kv, b_kv = torch.cat((w_q, w_p)), torch.cat((b_q, b_p))
    with pytest.raises(ValueError, match="C <= 64 in torch.float32"):
        projected_attention.projected_self_attention_forward(x, w_q, b_q, w_kv, b_kv, w_p, b_p, 2, 0.25, save=False)


def test_bad_input_raises():
    x, w_q, b_q, k, v, w_p, b_p = make_inputs(1, 4, 3, 256, 2, F32)
    with pytest.raises(ValueError, match="C <= 128"):
        projected_attention.projected_attention_forward(x, w_q, b_q, k, v, w_p, b_p, 0.1, save=False)
