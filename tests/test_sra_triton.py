"""The triton backend of the whole op: forward and every gradient against the float64 reference,
torch.library registration (opcheck, torch.compile, FLOP counting), saved memory, determinism and
a short training run."""

import pytest
import torch
from torch import nn

from sra_kernels import SpatialReductionAttention, reduced_kv_attention, spatial_reduce, sra_attention
from tests.accuracy import assert_within_reference_error

NAMES = ("out", "dx", "dq_weight", "dq_bias", "dkv_weight", "dkv_bias", "dproj_weight", "dproj_bias",
         "dsr_weight", "dsr_bias", "dnorm_weight", "dnorm_bias")


def _problem(B, H, W, C, sr, linear, device, dtype=torch.float64):
    """x and the ten weights of one SRA (None where the configuration has no conv/norm)."""
    k = 1 if linear else sr
    reduces = linear or sr > 1

    def r(*shape, std=1.0, mean=0.0):
        return (mean + std * torch.randn(*shape, dtype=torch.float64)).to(device=device, dtype=dtype)

    weights = [r(C, C, std=C ** -0.5), r(C, std=0.2), r(2 * C, C, std=C ** -0.5), r(2 * C, std=0.2),
               r(C, C, std=C ** -0.5), r(C, std=0.2)]
    weights += [r(C, C, k, k, std=(C * k * k) ** -0.5), r(C, std=0.2), r(C, mean=1.0, std=0.2), r(C, std=0.2)] \
        if reduces else [None] * 4
    return r(B, H * W, C), weights


def _run(x, weights, grad, size, heads, sr, linear, backend, dtype, **options):
    """(out, *grads) of sra_attention on ``backend`` (with ``options``) with every input cast to dtype."""
    leaves = [t.detach().to(dtype).requires_grad_() if t is not None else None for t in [x, *weights]]
    out = sra_attention(leaves[0], size, *leaves[1:], num_heads=heads, sr_ratio=sr, linear=linear, backend=backend,
                        **options)
    present = [t for t in leaves if t is not None]
    return (out, *torch.autograd.grad(out, present, grad.to(dtype)))


CASES = [  # B, H, W, C, heads, sr, linear
    (2, 9, 11, 32, 1, 2, False),
    (1, 13, 10, 64, 2, 4, False),
    (1, 17, 15, 40, 5, 8, False),
    (2, 6, 7, 32, 2, 1, False),
    (1, 9, 12, 64, 8, 1, True),
]


def _check_against_reference(B, H, W, C, heads, sr, linear, dtype, kernel_device, **options):
    """Output and every gradient of the triton backend (with ``options``) within the accuracy rule of the
    float64 reference."""
    x, weights = _problem(B, H, W, C, sr, linear, kernel_device)
    grad = torch.randn(B, H * W, C, dtype=torch.float64, device=kernel_device)
    x, weights = x.to(dtype).double(), [w.to(dtype).double() if w is not None else None for w in weights]
    args = (x, weights, grad, (H, W), heads, sr, linear)
    exact = _run(*args, "reference", torch.float64)
    peer = _run(*args, "reference" if kernel_device.type == "cpu" else "sdpa", dtype)
    got = _run(*args, "triton", dtype, **options)
    names = [n for n, w in zip(NAMES, [x, x, *weights]) if w is not None]
    for name, g, e, p in zip(names, got, exact, peer):
        assert g.dtype == dtype, name
        assert_within_reference_error(name, g, e, p, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,H,W,C,heads,sr,linear", CASES)
def test_forward_and_gradients_match_reference(B, H, W, C, heads, sr, linear, dtype, kernel_device):
    if dtype != torch.float32 and kernel_device.type == "cpu" and (B, C) != (1, 64):
        pytest.skip("low precision on the interpreter: two cases keep the suite fast")
    _check_against_reference(B, H, W, C, heads, sr, linear, dtype, kernel_device)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,H,W,C,heads,sr,linear", CASES + [(1, 9, 8, 32, 2, 1, False)])  # sr = 1: N <= 64, N > 64
def test_projected_path_matches_reference(B, H, W, C, heads, sr, linear, dtype, kernel_device, monkeypatch):
    """fuse_projections=True: q and out projections inside the attention kernel (C <= 128, 16-bit)."""
    from sra_kernels.ops import projected_attention

    if dtype == torch.float16 and kernel_device.type == "cpu":
        pytest.skip("fp16 on the interpreter: bf16 covers the path there")
    launches = []
    for name in ("projected_attention_forward", "projected_self_attention_forward"):
        forward = getattr(projected_attention, name)
        monkeypatch.setattr(projected_attention, name,
                            lambda *a, _f=forward, _n=name: launches.append((_n, a[-1])) or _f(*a))
    _check_against_reference(B, H, W, C, heads, sr, linear, dtype, kernel_device, fuse_projections=True)
    one_launch = not linear and sr == 1 and H * W <= 64  # k, v projected inside the kernel too
    kernel = "projected_self_attention_forward" if one_launch else "projected_attention_forward"
    assert launches and all(launch == (kernel, True) for launch in launches)  # saving q / o / lse for the backward


@pytest.fixture
def kernel_calls(monkeypatch):
    """A list that records (Triton kernel name, dtype of its first argument) of every kernel launch."""
    from sra_kernels.ops import attention

    calls = []
    kernel_class = type(attention._fwd_kernel)  # JITFunction natively, InterpretedFunction in the interpreter
    run = kernel_class.run
    monkeypatch.setattr(kernel_class, "run",
                        lambda self, *a, **k: calls.append((self.fn.__name__, a[0].dtype)) or run(self, *a, **k))
    return calls


def test_building_blocks_run_the_kernels(kernel_device, kernel_calls):
    """spatial_reduce / reduced_kv_attention on backend triton call the custom ops, and match."""
    x, weights = _problem(2, 10, 9, 32, 2, False, kernel_device, torch.float32)
    y = spatial_reduce(x, (10, 9), *weights[6:], sr_ratio=2, backend="triton")
    torch.testing.assert_close(y, spatial_reduce(x, (10, 9), *weights[6:], sr_ratio=2, backend="reference"))
    q, k, v = (torch.randn(2, n, 2, 16, device=kernel_device) for n in (90, 20, 20))
    o = reduced_kv_attention(q, k, v, backend="triton")
    torch.testing.assert_close(o, reduced_kv_attention(q, k, v, backend="reference"))
    torch.testing.assert_close(o, reduced_kv_attention(q, k, v, backend="sdpa"))
    assert [name for name, _ in kernel_calls] == ["_patch_gemm_kernel", "_sum_norm_kernel", "_fwd_kernel"]


def _op_samples(device):
    C, sr = 32, 2
    x, weights = _problem(2, 6, 5, C, sr, False, device, torch.float32)
    lin_x, lin_weights = _problem(1, 8, 9, C, 1, True, device, torch.float32)
    self_x, self_weights = _problem(2, 5, 4, C, 1, False, device, torch.float32)
    no_biases = [None if i % 2 else w for i, w in enumerate(self_weights[:6])]
    q, k, v = (torch.randn(2, n, 2, 16, device=device) for n in (30, 6, 6))
    return [
        (torch.ops.sra_kernels.spatial_reduce.default, (x, 6, 5, *weights[6:], sr, False, 1e-5)),
        (torch.ops.sra_kernels.spatial_reduce.default, (lin_x, 8, 9, *lin_weights[6:], 1, True, 1e-5)),
        (torch.ops.sra_kernels.sra.default, (x, 6, 5, *weights, sr, False, 1e-5, 2, 0.25, True)),
        (torch.ops.sra_kernels.sra.default, (lin_x, 8, 9, *lin_weights, 1, True, 1e-5, 2, 0.25, True)),
        (torch.ops.sra_kernels.sra.default, (self_x, 5, 4, *no_biases, *self_weights[6:], 1, False, 1e-5, 4, 0.3,
                                             True)),
        (torch.ops.sra_kernels.reduced_kv_attention.default, (q, k, v, 0.25, True)),
    ]


def test_opcheck(kernel_device):
    for op, args in _op_samples(kernel_device):
        args = tuple(a.requires_grad_() if isinstance(a, torch.Tensor) and a.dtype.is_floating_point else a
                     for a in args)
        torch.library.opcheck(op, args)


def test_opcheck_backward_ops(kernel_device):
    for op, args in _op_samples(kernel_device):
        outputs = op(*args)
        grad = torch.randn_like(outputs[0])
        if op is torch.ops.sra_kernels.sra.default:
            continue  # its backward is the backward ops checked here and in tests/test_column_sum.py
        if op is torch.ops.sra_kernels.reduced_kv_attention.default:
            q, k, v, scale, deterministic = args
            checks = [(torch.ops.sra_kernels.reduced_kv_attention_backward.default,
                       (grad, q, k, v, *outputs, scale, deterministic, partials)) for partials in (False, True)]
        else:
            x, H, W, sr_weight, sr_bias, norm_weight, norm_bias, sr, linear, eps = args
            q_weight = torch.randn(x.shape[-1], x.shape[-1], device=x.device)
            checks = [(torch.ops.sra_kernels.spatial_reduce_backward.default,
                       (grad, x, H, W, sr_weight, sr_bias, norm_weight, norm_bias, *outputs[1:], sr, linear, eps)),
                      (torch.ops.sra_kernels.project_and_reduce_backward.default,
                       (torch.randn_like(x), grad, x, H, W, q_weight, sr_weight, norm_weight, norm_bias, *outputs[1:],
                        sr, linear, eps))]
        for backward, backward_args in checks:
            torch.library.opcheck(backward, backward_args)


@pytest.mark.parametrize("save", [True, False])
def test_opcheck_projected_attention(save, kernel_device):
    C, heads = 32, 2
    x, weights = _problem(2, 6, 5, C, 2, False, kernel_device, torch.float32)
    kv = torch.randn(2, 7, 2, heads, C // heads, device=kernel_device)
    args = (x, weights[0], weights[1], kv[:, :, 0], kv[:, :, 1], weights[4], weights[5], 0.25, save, True)
    args = tuple(a.requires_grad_(save) if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(torch.ops.sra_kernels.projected_attention.default, args)


@pytest.mark.parametrize("save", [True, False])
def test_opcheck_projected_self_attention(save, kernel_device):
    C, heads = 32, 2
    x, weights = _problem(2, 6, 5, C, 1, False, kernel_device, torch.float32)
    args = (x, *weights[:6], heads, 0.25, save, True)
    args = tuple(a.requires_grad_(save) if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(torch.ops.sra_kernels.projected_self_attention.default, args)


@pytest.mark.parametrize("save", [True, False])
@pytest.mark.parametrize("linear,sr", [(False, 2), (True, 1)])
def test_opcheck_projected_sra(linear, sr, save, kernel_device):
    C, heads = 32, 2
    x, weights = _problem(2, 8, 9, C, sr, linear, kernel_device, torch.float32)
    args = (x, 8, 9, *weights, sr, linear, 1e-5, heads, 0.25, save, True)
    args = tuple(a.requires_grad_(save) if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(torch.ops.sra_kernels.projected_sra.default, args)


@pytest.mark.parametrize("linear,sr,H,W", [(False, 2, 8, 10), (True, 1, 8, 10), (False, 1, 8, 10), (False, 1, 7, 7)])
def test_compile_projected_path_fullgraph(linear, sr, H, W, kernel_device):
    """The fused-projection path traces as one graph too, gradients included (bf16 weights and input);
    7x7 with sr = 1 is the one-kernel path."""
    module = SpatialReductionAttention(32, 2, qkv_bias=True, sr_ratio=sr, linear=linear, backend="triton",
                                       fuse_projections=True)
    module = module.to(kernel_device, torch.bfloat16)
    backend = "inductor" if kernel_device.type == "cuda" else "aot_eager"
    compiled = torch.compile(module, fullgraph=True, backend=backend)
    x = torch.randn(2, H * W, 32, device=kernel_device, dtype=torch.bfloat16, requires_grad=True)
    out = compiled(x, H, W)
    eager = module(x, H, W)
    torch.testing.assert_close(out, eager)
    (gx,) = torch.autograd.grad(out.float().sum(), x)
    (ex,) = torch.autograd.grad(eager.float().sum(), x)
    torch.testing.assert_close(gx, ex)


@pytest.mark.parametrize("fuse_projections", [False, True])
@pytest.mark.parametrize("linear,sr", [(False, 2), (True, 1), (False, 1)])
def test_eager_fast_path_matches_registered_ops(linear, sr, fuse_projections, kernel_device, monkeypatch):
    """Eager calls skip the dispatcher (ops.registration.eager); forcing the registered ops gives identical bits
    (cublas_projections in fp32; the fused-projection path in bf16, one kernel when sr = 1 over 30 tokens)."""
    from sra_kernels.ops import registration

    dtype = torch.bfloat16 if fuse_projections else torch.float32
    B, H, W, C, heads = 2, 6, 5, 32, 2
    x, weights = _problem(B, H, W, C, sr, linear, kernel_device, torch.float32)
    grad = torch.randn(B, H * W, C, device=kernel_device)
    assert registration.eager(x)
    fast = _run(x, weights, grad, (H, W), heads, sr, linear, "triton", dtype, fuse_projections=fuse_projections)
    monkeypatch.setattr(registration, "eager", lambda x: False)
    registered = _run(x, weights, grad, (H, W), heads, sr, linear, "triton", dtype, fuse_projections=fuse_projections)
    for a, b in zip(fast, registered):
        assert torch.equal(a, b)


@pytest.mark.parametrize("linear,sr", [(False, 2), (True, 1), (False, 1)])
def test_compile_fullgraph_no_graph_break(linear, sr, kernel_device):
    """The module compiles as one graph (aot_eager on the interpreter; inductor on CUDA), grads included."""
    module = SpatialReductionAttention(32, 2, qkv_bias=True, sr_ratio=sr, linear=linear, backend="triton")
    module = module.to(kernel_device)
    backend = "inductor" if kernel_device.type == "cuda" else "aot_eager"
    compiled = torch.compile(module, fullgraph=True, backend=backend)
    x = torch.randn(2, 8 * 10, 32, device=kernel_device, requires_grad=True)
    out = compiled(x, 8, 10)
    eager = module(x, 8, 10)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    (gx,) = torch.autograd.grad(out.sum(), x)
    (ex,) = torch.autograd.grad(eager.sum(), x)
    torch.testing.assert_close(gx, ex, rtol=1e-4, atol=1e-5)


def test_compile_fullgraph_reference_backend():
    module = SpatialReductionAttention(32, 2, qkv_bias=True, sr_ratio=2, backend="reference")
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 80, 32)
    torch.testing.assert_close(compiled(x, 8, 10), module(x, 8, 10))


@pytest.mark.parametrize("fuse_projections", [False, True])
@pytest.mark.parametrize("linear,sr,H,W", [(False, 2, 14, 14), (True, 1, 14, 14), (False, 1, 14, 14), (False, 1, 7, 7)])
def test_flop_counter_counts_fused_ops(linear, sr, H, W, fuse_projections, kernel_device):
    """FlopCounterMode sees the reference's FLOPs on the triton path (cublas_projections in fp32, the fused-projection
    path in bf16): the same forward, and the same forward+backward plus the attention backward's recompute
    of q k^T (2 B h N M d) and, on the one-kernel sr = 1 path, the backward's recompute of k, v (4 B N C^2)."""
    from torch.utils.flop_counter import FlopCounterMode

    B, C, heads = 2, 32, 2
    dtype = torch.bfloat16 if fuse_projections else torch.float32
    x, weights = _problem(B, H, W, C, sr, linear, kernel_device, dtype)
    leaves = [t.requires_grad_() if t is not None else None for t in (x, *weights)]
    flops = {}
    for backend in ("reference", "triton"):
        with FlopCounterMode(display=False) as counter:
            out = sra_attention(leaves[0], (H, W), *leaves[1:], num_heads=heads, sr_ratio=sr, linear=linear,
                                backend=backend, fuse_projections=fuse_projections)
        forward = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            out.sum().backward()
        flops[backend] = (forward, counter.get_total_flops())
    M = 49 if linear else (H // sr) * (W // sr)
    kv_recompute = 4 * B * H * W * C * C if fuse_projections and (linear, sr, H * W) == (False, 1, 49) else 0
    assert flops["triton"][0] == flops["reference"][0] > 0
    assert flops["triton"][1] == flops["reference"][1] + 2 * B * heads * (H * W) * M * (C // heads) + kv_recompute


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saved_tensors_are_small(dtype, kernel_device):
    """No N x M attention matrix and no fp32 copy of low-precision activations is kept for backward."""
    B, H, W, C, heads, sr = 1, 32, 32, 16, 1, 2  # N = 1024, M = 256: the score matrix is 16x the size of x
    x, weights = _problem(B, H, W, C, sr, False, kernel_device, dtype)
    x.requires_grad_()
    weights = [w.requires_grad_() for w in weights]
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        sra_attention(x, (H, W), *weights, num_heads=heads, sr_ratio=sr, backend="triton")
    N, M = H * W, (H // sr) * (W // sr)
    for t in saved.values():
        if t.numel() >= N:
            assert t.dtype == dtype or t.shape == (B, heads, N), f"fp32 copy saved: {t.dtype} {tuple(t.shape)}"
    activations = sum(t.untyped_storage().nbytes() for t in saved.values() if t.numel() >= M * C)
    # x, q and the attention output (B, N, C) + the log-sum-exp (B, h, N) + M-sized tensors (kv, reduced, z)
    bound = 3 * x.nbytes + 4 * B * heads * N + 6 * B * M * C * x.element_size()
    assert activations <= bound < B * heads * N * M * x.element_size()


def test_default_backward_is_bit_identical(kernel_device):
    x, weights = _problem(2, 12, 12, 32, 4, False, kernel_device, torch.float32)
    grad = torch.randn(2, 144, 32, device=kernel_device, dtype=torch.float64)
    first = _run(x, weights, grad, (12, 12), 2, 4, False, "triton", torch.float32)
    second = _run(x, weights, grad, (12, 12), 2, 4, False, "triton", torch.float32)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), name


class _TinyBlock(nn.Module):
    """A PVT-like block: pre-norm SRA + MLP with residuals, and a linear head."""

    def __init__(self, backend, dim=32, heads=2, sr=2):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = SpatialReductionAttention(dim, heads, qkv_bias=True, sr_ratio=sr, backend=backend)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, 4)

    def forward(self, x, H, W):
        x = x + self.attn(self.norm1(x), H, W)
        x = x + self.mlp(self.norm2(x))
        return self.head(x.mean(1))


def test_training_follows_reference_loss_curve(kernel_device):
    torch.manual_seed(0)
    data = torch.randn(8, 64, 32, device=kernel_device)
    labels = torch.randint(0, 4, (8,), device=kernel_device)
    curves = {}
    for backend in ("reference", "triton"):
        torch.manual_seed(1)
        model = _TinyBlock(backend).to(kernel_device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses = []
        for _ in range(6):
            loss = nn.functional.cross_entropy(model(data, 8, 8), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        curves[backend] = torch.tensor(losses)
    assert curves["triton"][-1] < curves["triton"][0]
    torch.testing.assert_close(curves["triton"], curves["reference"], rtol=1e-3, atol=1e-4)


def test_conv_weight_stays_channels_last(kernel_device, monkeypatch):
    """The module's sr conv weight is channels_last through load_state_dict (of a standard-layout state dict),
    .to(dtype), a training step and patching a host module; the kernels read it with no relayout copy and give
    the standard-layout weight's output and gradients bit for bit, its gradient channels_last too."""
    from sra_kernels import fused

    torch.manual_seed(0)
    module = SpatialReductionAttention(32, 2, qkv_bias=True, sr_ratio=2, backend="triton").to(kernel_device)
    state = {name: t.contiguous() for name, t in module.state_dict().items()}
    assert not state["sr.weight"].is_contiguous(memory_format=torch.channels_last)
    module.load_state_dict(state)
    assert module.sr.weight.is_contiguous(memory_format=torch.channels_last)
    assert module.to(torch.float16).sr.weight.is_contiguous(memory_format=torch.channels_last)
    module.float()
    copied = []
    relayout = fused.tap_major_layout

    def recording(w, dtype=None):
        out = relayout(w, dtype)
        copied.append(out.data_ptr() != w.data_ptr())
        return out

    monkeypatch.setattr(fused, "tap_major_layout", recording)
    x = torch.randn(2, 64, 32, device=kernel_device, requires_grad=True)
    grad = torch.randn(2, 64, 32, device=kernel_device)
    names = [name for name, _ in module.named_parameters()]

    def run():
        out = module(x, 8, 8)
        return (out, *torch.autograd.grad(out, (x, *module.parameters()), grad))

    in_place = run()
    module.sr.weight.data = module.sr.weight.data.contiguous()  # the same values, standard layout: copied
    standard = run()
    for a, b in zip(in_place, standard):
        assert torch.equal(a, b)
    assert copied == [False, True]
    assert in_place[2 + names.index("sr.weight")].is_contiguous(memory_format=torch.channels_last)
    assert standard[2 + names.index("sr.weight")].is_contiguous()
    module.sr.weight.data = module.sr.weight.data.contiguous(memory_format=torch.channels_last)
    module(x, 8, 8).sum().backward()
    torch.optim.AdamW(module.parameters()).step()  # in-place updates keep the parameter's layout
    assert module.sr.weight.is_contiguous(memory_format=torch.channels_last)
    assert module.sr.weight.grad.is_contiguous(memory_format=torch.channels_last)


def test_autocast_runs_kernels_in_low_precision(kernel_device, kernel_calls):
    """Under bf16 autocast the fused ops get bf16 inputs (as autocast casts Conv2d) and match sdpa."""
    module = SpatialReductionAttention(32, 2, qkv_bias=True, sr_ratio=2).to(kernel_device)
    x = torch.randn(2, 80, 32, device=kernel_device)
    outputs = {}
    for backend in ("triton", "sdpa"):
        module.backend = backend
        with torch.autocast(kernel_device.type, dtype=torch.bfloat16):
            outputs[backend] = module(x, 8, 10)
    assert outputs["triton"].dtype == outputs["sdpa"].dtype == torch.bfloat16
    assert kernel_calls == [("_patch_gemm_kernel", torch.bfloat16), ("_sum_norm_kernel", torch.float32),
                            ("_fwd_kernel", torch.bfloat16)]
    torch.testing.assert_close(outputs["triton"].float(), outputs["sdpa"].float(), rtol=0.05, atol=0.05)


@pytest.fixture
def planned(monkeypatch):
    """A list that records the plan of every call the triton backend runs."""
    from sra_kernels import fused

    plans = []
    run = fused.sra_attention_triton
    monkeypatch.setattr(fused, "sra_attention_triton", lambda *a, **k: plans.append(k["plan"]) or run(*a, **k))
    return plans


@pytest.fixture
def launched(monkeypatch):
    """(Triton kernel names, torch Linear weight shapes) of every launch from here on."""
    from sra_kernels.ops import attention

    launches, gemms = [], []
    kernel_class = type(attention._fwd_kernel)  # JITFunction natively, InterpretedFunction in the interpreter
    run = kernel_class.run
    monkeypatch.setattr(kernel_class, "run", lambda self, *a, **k: launches.append(self.fn.__name__) or run(self, *a, **k))
    linear_fn = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda *a: gemms.append(a[1].shape) or linear_fn(*a))
    return launches, gemms


def _assert_launches_follow(plan, launches, gemms):
    """The forward launched exactly the plan's Triton kernels and cuBLAS GEMMs, one launch per entry, and the
    cost model's launches of the path are the plan's."""
    assert sorted(launches) == sorted(launch.kernel for launch in plan.forward if launch.kind == "triton")
    assert len(gemms) == sum(launch.kind == "gemm" for launch in plan.forward)


@pytest.mark.parametrize("linear,sr", [(False, 2), (True, 1), (False, 1)])
def test_forward_launches_are_the_plans(linear, sr, kernel_device, planned, launched):
    """An inference forward on backend triton launches exactly what its plan lists, which is what
    ``sra_kernels.cost`` prices for the cublas_projections path."""
    from sra_kernels.cost import path_ops
    from sra_kernels.shapes import SRAShape

    B, H, W, C, heads = 2, 9, 8, 32, 2
    module = SpatialReductionAttention(C, heads, qkv_bias=True, sr_ratio=sr, linear=linear, backend="triton")
    with torch.no_grad():
        module.to(kernel_device)(torch.randn(B, H * W, C, device=kernel_device), H, W)
    (plan,) = planned
    assert plan.path == "cublas_projections"
    _assert_launches_follow(plan, *launched)
    assert len(launched[1]) == 3  # q, kv and out projections
    ops = path_ops("cublas_projections", SRAShape(B, H, W, C, heads, sr, linear), torch.float32, "forward")
    assert [name for name, _, _ in ops] == [launch.name for launch in plan.forward]


@pytest.mark.parametrize("linear,sr,H,W", [(False, 2, 9, 8), (True, 1, 9, 8), (False, 1, 9, 8), (False, 1, 7, 7)])
def test_projected_forward_launches(linear, sr, H, W, kernel_device, planned, launched):
    """With the projections fused, an inference forward launches exactly what its plan lists: the reduction
    kernel with the kv projection in its epilogue (after the pool kernel in linear mode) and the
    projected-attention kernel; with sr = 1 a kv GEMM and that kernel, or that kernel alone over <= 64
    tokens. No biases: zeros stand in."""
    B, C, heads = 2, 32, 2
    module = SpatialReductionAttention(C, heads, qkv_bias=False, sr_ratio=sr, linear=linear, backend="triton",
                                       fuse_projections=True)
    module = module.to(kernel_device, torch.bfloat16)
    x = torch.randn(B, H * W, C, device=kernel_device, dtype=torch.bfloat16)
    with torch.no_grad():
        out = module(x, H, W)
    (plan,) = planned
    launches, gemms = launched
    assert plan.path == "fused_projections"
    _assert_launches_follow(plan, launches, gemms)
    assert gemms == ([(2 * C, C)] if (linear, sr, H * W) == (False, 1, 72) else [])
    assert plan.route == {(False, 2): "reduce_project_attend", (True, 1): "reduce_project_attend",
                          (False, 1): "project_attend_self" if H * W <= 64 else "kv_project_attend"}[(linear, sr)]
    module.backend = "sdpa"
    with torch.no_grad():
        want = module(x, H, W)
    torch.testing.assert_close(out, want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("registered", [False, True])
@pytest.mark.parametrize("fuse_projections", [False, True])
def test_double_backward_is_refused_clearly(fuse_projections, registered, kernel_device, monkeypatch):
    """create_graph=True through our ops (e.g. a gradient penalty) raises an error that names
    backend='reference', in the eager fast path and through the registered ops alike, instead of silently
    returning wrong or missing second-order gradients; the reference computes them."""
    from sra_kernels.ops import registration

    if registered:
        monkeypatch.setattr(registration, "eager", lambda x: False)
    dtype = torch.bfloat16 if fuse_projections else torch.float32
    module = SpatialReductionAttention(16, 2, qkv_bias=True, sr_ratio=2, backend="triton",
                                       fuse_projections=fuse_projections).to(kernel_device, dtype)
    x = torch.randn(2, 36, 16, device=kernel_device, dtype=dtype, requires_grad=True)
    for inputs in ([x], [x, *module.parameters()]):
        with pytest.raises(RuntimeError, match="no double backward .* backend='reference'"):
            torch.autograd.grad(module(x, 6, 6).float().square().sum(), inputs, create_graph=True)
    module.backend = "reference"
    (g,) = torch.autograd.grad(module(x, 6, 6).float().square().sum(), x, create_graph=True)
    g.float().square().sum().backward()
    assert module.kv.weight.grad is not None and module.sr.weight.grad is not None


def test_double_backward_under_torch_compile_raises(kernel_device):
    """Compiled, PyTorch itself refuses the second backward (AOTAutograd has none): an error, not a wrong gradient."""
    torch._dynamo.reset()
    module = SpatialReductionAttention(16, 2, qkv_bias=True, sr_ratio=2, backend="triton").to(kernel_device)
    backend = "inductor" if kernel_device.type == "cuda" else "aot_eager"
    compiled = torch.compile(module, fullgraph=True, backend=backend)
    x = torch.randn(2, 36, 16, device=kernel_device, requires_grad=True)
    (g,) = torch.autograd.grad(compiled(x, 6, 6).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.square().sum().backward()
    torch._dynamo.reset()


def test_backward_materialises_no_zero_gradients(kernel_device):
    """Autograd gets told not to zero-fill gradients for the outputs nothing differentiates (LayerNorm statistics,
    saved tensors, the log-sum-exp), and dk, dv come as one kv-shaped buffer: a reducing stage's backward makes no
    zero fill (it made 7) and no stack or cat of dk and dv."""
    from torch.profiler import ProfilerActivity, profile

    module = SpatialReductionAttention(32, 2, qkv_bias=True, sr_ratio=2, backend="triton").to(kernel_device)
    x = torch.randn(2, 64, 32, device=kernel_device, requires_grad=True)
    out = module(x, 8, 8)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out.backward(torch.ones_like(out))
    names = [event.name for event in prof.events()]
    assert names.count("aten::zeros") == names.count("aten::stack") == names.count("aten::cat") == 0
    assert x.grad is not None and all(p.grad is not None for p in module.parameters())
