"""Triton short-KV attention kernels (sra_kernels.ops.attention) against the float64 reference.

On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, small shapes); with CUDA they run
natively, and the `slow` sweep adds PVT-sized shapes. Every kernel output and scratch buffer (the bias-gradient
partials too) is allocated NaN-filled (see `poison_buffers`), so an element a kernel fails to write shows up.
"""

import pytest
import torch

from sra_kernels.ops import attention
from sra_kernels.reference import reduced_kv_attention
from tests.accuracy import FLOOR, assert_within_reference_error
from tests.conftest import CUDA, INTERPRETER, nan_empty

DEVICE = torch.device("cuda" if CUDA else "cpu")
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
pytestmark = pytest.mark.skipif(not (CUDA or INTERPRETER), reason="Triton kernels need CUDA or TRITON_INTERPRET=1")


@pytest.fixture(autouse=True)
def poison_buffers(monkeypatch):
    """Allocate every buffer the kernels must fully overwrite (outputs, partials, delta) as NaN."""
    monkeypatch.setattr(attention, "_empty", nan_empty)


def make_inputs(B, N, M, h, d, dtype, seed=0):
    """q, k, v: column views of (B, L, 2, h, d) projections (as PVT's q / kv Linears give); dO (B, N, h, d)."""
    g = torch.Generator().manual_seed(seed)
    qx = torch.randn(B, N, 2, h, d, generator=g).to(DEVICE, dtype)
    kv = torch.randn(B, M, 2, h, d, generator=g).to(DEVICE, dtype)
    do = torch.randn(B, N, h, d, generator=g).to(DEVICE, dtype)
    return qx[:, :, 1], kv[:, :, 0], kv[:, :, 1], do


def reference(q, k, v, do, scale, dtype):
    """(o, dq, dk, dv) of the PyTorch reference, computed in ``dtype`` through autograd."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    o = reduced_kv_attention(*leaves, scale)
    o.backward(do.to(dtype))
    return (o.detach(), *(t.grad for t in leaves))


def reference_lse(q, k, scale):
    """(B, h, N) float64 log-sum-exp of the scaled scores."""
    return torch.logsumexp(torch.einsum("bnhd,bmhd->bhnm", q.double(), k.double()) * scale, dim=-1)


def column_sums(grads):
    """(q bias gradient (h*d,), kv bias gradient (2*h*d,)) in float64 of (o, dq, dk, dv)."""
    _, dq, dk, dv = (t.double() for t in grads)
    return dq.flatten(0, 1).flatten(1).sum(0), torch.cat((dk.flatten(2), dv.flatten(2)), 2).flatten(0, 1).sum(0)


def check_case(B, N, M, h, d, dtype, deterministic=True, inputs=None):
    """Forward and backward (with bias partials) against the float64 reference, within 2x the same-dtype error."""
    q, k, v, do = inputs if inputs is not None else make_inputs(B, N, M, h, d, dtype)
    scale = d**-0.5
    o, lse = attention.attention_forward(q, k, v, scale)
    dq, dkv, q_part, kv_part = attention.attention_backward(do, q, k, v, o, lse, scale, deterministic, True)
    assert o.is_contiguous() and lse.shape == (B, h, N) and lse.dtype == torch.float32
    assert dq.is_contiguous() and dkv.is_contiguous() and dkv.shape == (B, M, 2, h, d)
    assert not lse.isnan().any()
    torch.testing.assert_close(lse.double(), reference_lse(q, k, scale), rtol=1e-5, atol=1e-4)
    exact = reference(q, k, v, do, scale, torch.float64)
    same_dtype = reference(q, k, v, do, scale, dtype)
    for name, out, ex, ref in zip(("o", "dq", "dk", "dv"), (o, dq, dkv[:, :, 0], dkv[:, :, 1]), exact, same_dtype):
        assert out.dtype == dtype, name
        assert_within_reference_error(name, out, ex, ref, dtype)
    plan = attention._plan(N, M, d, B * h, dtype, DEVICE, backward=True)
    assert q_part.shape == (B * plan.num_programs, h * d) and kv_part.shape[1] == 2 * h * d
    for name, part, out, ex, ref in zip(("q bias", "kv bias"), (q_part, kv_part), (dq, dkv),
                                        column_sums(exact), column_sums(same_dtype)):
        assert part.dtype == torch.float32 and not part.isnan().any(), name
        got = part.double().sum(0)
        assert_within_reference_error(name, got, ex, ref, dtype)
        # The fp32 sums before rounding: within one rounding of each summed element of the kernel's own output.
        rounded = out.double().reshape(-1, got.numel())
        bound = torch.finfo(dtype).eps * rounded.abs().sum(0) + 1e-5 * (1 + rounded.abs().sum(0).max())
        assert ((got - rounded.sum(0)).abs() <= bound).all(), name


# (B, N, M, heads, head_dim, dtype). Block sizes depend on dtype and head_dim (see attention._plan):
# M = 300 (and 130 backward, or with head_dim 128 or fp32) runs the key-block loops; N = 200 with
# B * heads <= 2 makes programs stride over several query blocks and the backward sum several partials.
CASES = [
    (1, 1, 1, 1, 64, F32),
    (2, 17, 7, 2, 32, F32),
    (1, 200, 49, 1, 64, F32),
    (2, 17, 100, 8, 20, F32),
    (1, 70, 49, 1, 64, BF16),
    (1, 200, 50, 5, 40, BF16),
    (1, 200, 300, 2, 64, BF16),
    (2, 70, 1, 8, 32, BF16),
    (2, 200, 49, 1, 64, F16),
    (2, 70, 130, 1, 64, F16),
    (1, 70, 130, 2, 128, F16),
]


@pytest.mark.parametrize("B,N,M,h,d,dtype", CASES)
def test_matches_reference(B, N, M, h, d, dtype):
    check_case(B, N, M, h, d, dtype)


@pytest.fixture
def sm_count(monkeypatch):
    """Set the SM count the launch plans see (plans re-made around the test)."""
    def set_count(count):
        monkeypatch.setattr(attention, "_num_sms", lambda device: count)
        attention._plan.cache_clear()
    yield set_count
    attention._plan.cache_clear()


@pytest.mark.parametrize("parallel", ["queries", "keys"])
@pytest.mark.parametrize("B,N,M,h,d,dtype", [(1, 200, 300, 2, 64, BF16), (2, 17, 100, 8, 20, F32)])
def test_looped_keys_backward_both_ways(B, N, M, h, d, dtype, parallel, sm_count):
    """Keys looped: query-parallel with dK/dV partials when the key blocks would not fill the GPU, else
    key-parallel (dQ and delta, then dK/dV per key block): both match the reference."""
    sm_count(1 if parallel == "keys" else 10**6)
    assert attention._plan(N, M, d, B * h, dtype, DEVICE, backward=True).key_parallel == (parallel == "keys")
    check_case(B, N, M, h, d, dtype)


@pytest.mark.parametrize("B,N,M,h,d,dtype", [(1, 200, 49, 1, 64, BF16), (1, 70, 100, 2, 40, F32)])
def test_atomic_dkv_matches_reference(B, N, M, h, d, dtype, sm_count):
    sm_count(10**6)  # query-parallel: the atomics add its programs' dK/dV
    check_case(B, N, M, h, d, dtype, deterministic=False)


# Each way to the dKV buffer and bias partials: (M, SM count forcing the parallelisation, deterministic). N = 45, M not
# multiples of any block, 3 heads, head_dim 24 / 40 padded to 32 / 64: tails everywhere.
WAYS = {
    "one key block": (23, 10**6, True),
    "queries, keys looped": (150, 10**6, True),
    "keys": (150, 1, True),
    "atomic, one key block": (23, 10**6, False),
    "atomic, keys looped": (150, 10**6, False),
}


@pytest.mark.parametrize("d", [24, 40])
@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("way", WAYS)
def test_dkv_and_bias_partials_every_way(way, dtype, d, sm_count):
    M, sms, deterministic = WAYS[way]
    sm_count(sms)
    plan = attention._plan(45, M, d, 2 * 3, dtype, DEVICE, backward=True)
    assert plan.single_kv == way.endswith("one key block") and plan.key_parallel == (way == "keys")
    check_case(2, 45, M, 3, d, dtype, deterministic)


@pytest.mark.parametrize("way", ["one key block", "queries, keys looped", "keys"])
def test_bias_partial_rows(way, sm_count):
    """q_part row b * P + p sums the query blocks p, p + P, ... of batch b (program p's, P programs per head);
    kv_part rows sum BLOCK_R-row tiles of dkv (B*M, 2*h*d), key-parallel key block j of batch b at row
    b * cdiv(M, BLOCK_M) + j."""
    B, N, h, d, dtype = 2, 45, 3, 24, F32
    M, sms, _ = WAYS[way]
    sm_count(sms)
    plan = attention._plan(N, M, d, B * h, dtype, DEVICE, backward=True)
    q, k, v, do = make_inputs(B, N, M, h, d, dtype)
    o, lse = attention.attention_forward(q, k, v, d**-0.5)
    dq, dkv, q_part, kv_part = attention.attention_backward(do, q, k, v, o, lse, d**-0.5, True, True)

    def block_sums(x, rows):  # x (G, L, C) -> (G * cdiv(L, rows), C): sums of row blocks of each group
        G, L, C = x.shape
        padded = torch.cat((x.double(), x.new_zeros(G, -L % rows, C, dtype=torch.float64)), 1)
        return padded.view(G, -1, rows, C).sum(2).flatten(0, 1)

    query_blocks = block_sums(dq.view(B, N, h * d), plan.block_n).view(B, -1, h * d)
    P = plan.num_programs
    assert 1 <= P <= query_blocks.shape[1]
    want = torch.stack([query_blocks[:, p::P].sum(1) for p in range(P)], 1).flatten(0, 1)
    torch.testing.assert_close(q_part.double(), want, rtol=1e-5, atol=1e-5)
    if plan.key_parallel:
        want = block_sums(dkv.view(B, M, 2 * h * d), plan.block_m)
    else:
        want = block_sums(dkv.view(1, B * M, 2 * h * d), attention._sum_blocks(2 * h * d)[0])
    torch.testing.assert_close(kv_part.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("way", ["one key block", "keys", "atomic, keys looped"])
def test_bias_partials_off_leaves_the_gradients_alone(way, sm_count):
    """bias_partials=False: (0, h*d) and (0, 2*h*d) partials, and dq, dkv bit-identical to those with partials."""
    M, sms, deterministic = WAYS[way]
    sm_count(sms)
    B, N, h, d = 2, 45, 3, 40
    q, k, v, do = make_inputs(B, N, M, h, d, BF16)
    o, lse = attention.attention_forward(q, k, v, d**-0.5)
    dq, dkv, q_part, kv_part = attention.attention_backward(do, q, k, v, o, lse, d**-0.5, deterministic)
    assert q_part.shape == (0, h * d) and kv_part.shape == (0, 2 * h * d)
    assert q_part.dtype == kv_part.dtype == torch.float32
    with_partials = attention.attention_backward(do, q, k, v, o, lse, d**-0.5, deterministic, True)
    assert torch.equal(dq, with_partials[0]) and torch.equal(dkv, with_partials[1])


def test_general_strides():
    """Non-unit last-dim strides for q, k, v and a transposed dO are read in place."""
    B, N, M, h, d = 2, 40, 20, 2, 32
    q, k, v, _ = make_inputs(B, N, M, h, 2 * d, BF16)
    do = torch.randn(B, h, N, d, device=DEVICE).to(BF16).transpose(1, 2)
    check_case(B, N, M, h, d, BF16, inputs=(q[..., ::2], k[..., 1::2], v[..., ::2], do))


@pytest.mark.parametrize("M,dtype", [(49, BF16), (300, F32)])
@pytest.mark.parametrize("operand", ["q", "k", "v"])
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, in the interpreter, on NaN arithmetic
def test_nan_propagates(M, dtype, operand):
    """A NaN input gives NaN exactly where the reference has NaN (q: its row; k: its head; v: one column)."""
    B, N, h, d = 2, 40, 2, 32
    q, k, v, _ = make_inputs(B, N, M, h, d, dtype)
    {"q": q, "k": k, "v": v}[operand][1, 3 % M, 1, 5] = float("nan")
    o, lse = attention.attention_forward(q, k, v, d**-0.5)
    expected = reduced_kv_attention(q.double(), k.double(), v.double(), d**-0.5)
    assert expected.isnan().any()
    assert torch.equal(o.isnan(), expected.isnan())
    assert torch.equal(lse.isnan(), reference_lse(q, k, d**-0.5).isnan())
    finite = ~expected.isnan()
    torch.testing.assert_close(o[finite].double(), expected[finite], rtol=0, atol=FLOOR[dtype] * 4)


@pytest.mark.parametrize("M,sms", [(49, None), (150, 10**6), (150, 1)])
def test_backward_is_deterministic(M, sms, sm_count):
    """Several dK/dV partials, reduced in a fixed order, and the bias partials (one key block, looped keys
    query-parallel and key-parallel): two runs agree bit for bit."""
    if sms is not None:
        sm_count(sms)
    B, N, h, d = 1, (20000 if DEVICE.type == "cuda" else 300), 1, 64
    plan = attention._plan(N, M, d, B * h, BF16, DEVICE, backward=True)
    assert plan.num_programs > 1 and plan.key_parallel == (sms == 1)
    q, k, v, do = make_inputs(B, N, M, h, d, BF16)
    o, lse = attention.attention_forward(q, k, v, d**-0.5)
    first = attention.attention_backward(do, q, k, v, o, lse, d**-0.5, True, True)
    second = attention.attention_backward(do, q, k, v, o, lse, d**-0.5, True, True)
    assert first[2].shape[0] > 1 and first[3].shape[0] > 1
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_empty_inputs_launch_nothing(monkeypatch):
    for kernel in ("_fwd_kernel", "_bwd_kernel", "_sum_partials_kernel", "_bwd_dq_kernel",
                   "_bwd_dkdv_kernel"):
        monkeypatch.setattr(attention, kernel, None)  # a launch would raise TypeError
    for B, N in ((0, 5), (2, 0)):
        q, k, v, do = make_inputs(B, N, 7, 2, 32, F32)
        o, lse = attention.attention_forward(q, k, v, 0.2)
        assert o.shape == (B, N, 2, 32) and lse.shape == (B, 2, N)
        dq, dkv, q_part, kv_part = attention.attention_backward(do, q, k, v, o, lse, 0.2, True, True)
        assert dq.shape == q.shape and dkv.shape == (B, 7, 2, 2, 32)
        assert not dq.any() and not dkv.any()
        assert q_part.shape[1:] == (64,) and kv_part.shape[1:] == (128,)
        assert not q_part.sum(0).any() and not kv_part.sum(0).any()


def test_backward_op_fake_matches(sm_count):
    """The registered backward op's fake gives the kernels' shapes, partial rows included (query- and
    key-parallel)."""
    for sms in (10**6, 1):
        sm_count(sms)
        q, k, v, do = make_inputs(2, 45, 150, 3, 24, BF16)
        o, lse = attention.attention_forward(q, k, v, 0.2)
        for bias_partials in (False, True):
            args = (do, q, k, v, o, lse, 0.2, True, bias_partials)
            torch.library.opcheck(attention.reduced_kv_attention_backward_op, args)


def test_rejects_what_the_kernels_cannot_run():
    q, k, v, _ = make_inputs(1, 4, 3, 1, 16, torch.float64)
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        attention.attention_forward(q, k, v, 0.25)
    q, k, v, _ = make_inputs(1, 4, 3, 1, 160, F32)
    with pytest.raises(ValueError, match="head_dim <= 128"):
        attention.attention_forward(q, k, v, 0.25)


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="PVT-sized shapes run natively on CUDA only")
@pytest.mark.parametrize("dtype", [BF16, F16, F32])
@pytest.mark.parametrize(
    "B,N,M,h,d",
    [
        (8, 3136, 49, 1, 64),  # pvt_v2 stage 1 at 224x224
        (8, 784, 49, 2, 64),
        (8, 196, 49, 5, 64),
        (8, 49, 49, 8, 64),  # stage 4: sr = 1, N = M
        (2, 16384, 256, 1, 64),  # stage 1 at 512x512
        (1, 16384, 1024, 2, 64),  # stage 2 at 1024x1024: key loop
        (2, 4096, 1024, 5, 64),
        (2, 3136, 49, 2, 40),
        (2, 3136, 100, 2, 128),
        (1, 5000, 777, 3, 20),
    ],
)
@pytest.mark.parametrize("deterministic", [True, False])
def test_pvt_shapes_cuda(B, N, M, h, d, dtype, deterministic):
    check_case(B, N, M, h, d, dtype, deterministic)
