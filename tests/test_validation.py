"""Every validation rule raises an error that names the argument; odd-but-valid inputs work."""

import pytest
import torch

from sra_kernels import sra_attention

B, H, W, C, HEADS, SR = 2, 8, 6, 16, 2, 2


def _args(dtype=torch.float32, sr=SR, linear=False, device="cpu"):
    def r(*shape):
        return torch.randn(*shape, dtype=dtype, device=device)

    k = 1 if linear else sr
    return dict(
        x=r(B, H * W, C), size=(H, W),
        q_weight=r(C, C), q_bias=r(C), kv_weight=r(2 * C, C), kv_bias=r(2 * C),
        proj_weight=r(C, C), proj_bias=r(C),
        sr_weight=r(C, C, k, k), sr_bias=r(C), norm_weight=r(C), norm_bias=r(C),
        num_heads=HEADS, sr_ratio=sr, linear=linear,
    )


def _call(**overrides):
    kwargs = _args()
    kwargs.update(overrides)
    return sra_attention(**kwargs, backend="reference")


def _raises(error, match, **overrides):
    with pytest.raises(error, match=match):
        _call(**overrides)


def test_valid_call_runs():
    assert _call().shape == (B, H * W, C)


@pytest.mark.parametrize("x,error,match", [
    ([[1.0]], TypeError, "x must be a torch.Tensor"),
    (torch.randn(H * W, C), ValueError, r"x must be 3-D"),
    (torch.ones(B, H * W, C, dtype=torch.int32), ValueError, "x must have dtype"),
    (torch.randn(B, H * W, C, dtype=torch.complex64), ValueError, "x must have dtype"),
])
def test_bad_x(x, error, match):
    _raises(error, match, x=x)


@pytest.mark.parametrize("size,error,match", [
    ((H, W + 1), ValueError, r"size \(H, W\) = \(8, 7\).*N = 48"),
    ((H * W,), TypeError, "size must be a pair"),
    (48, TypeError, "size must be a pair"),
    ((8.0, 6), TypeError, r"size\[0\] \(H\) must be an int"),
    ((0, 6), ValueError, r"size\[0\] \(H\) must be >= 1"),
])
def test_bad_size(size, error, match):
    _raises(error, match, size=size)


@pytest.mark.parametrize("name,shape", [
    ("q_weight", (C, C + 1)), ("q_bias", (C + 1,)), ("kv_weight", (C, C)), ("kv_bias", (C,)),
    ("proj_weight", (2 * C, C)), ("proj_bias", (2 * C,)), ("sr_weight", (C, C, 3, 3)),
    ("sr_bias", (C - 1,)), ("norm_weight", (1,)), ("norm_bias", (C, 1)),
])
def test_weight_shape_must_match_channels(name, shape):
    _raises(ValueError, f"{name} must have shape .* for x's C = {C} channels", **{name: torch.randn(*shape)})


def test_channel_mismatch_names_x():
    """x with other channels than the weights: the message gives x's C and shape next to the weight's."""
    x = torch.randn(B, H * W, C // 2)
    _raises(ValueError, rf"sr_weight must have shape \({C // 2}, {C // 2}, {SR}, {SR}\) for x's C = {C // 2} "
                        rf"channels \(x has shape \({B}, {H * W}, {C // 2}\)\), got \({C}, {C}, {SR}, {SR}\)", x=x)


@pytest.mark.parametrize("name", ["q_weight", "kv_bias", "sr_weight", "norm_bias"])
def test_weight_dtype_must_match_x(name):
    bad = _args()[name].double()
    _raises(ValueError, f"{name} must have x's dtype torch.float32, got torch.float64", **{name: bad})


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_autocast_takes_weights_of_another_dtype(backend):
    """Under autocast x can arrive in bf16 with fp32 weights (a PVT block on CPU): the op casts, as
    torch's Linear and Conv2d do, and matches its fp32 result to bf16 rounding."""
    kwargs = {k: v * C ** -0.5 if k.endswith("weight") else v for k, v in _args().items()}  # moderate scores
    want = sra_attention(**kwargs, backend=backend)
    kwargs["x"] = kwargs["x"].bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = sra_attention(**kwargs, backend=backend)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=5e-2, atol=5e-2)


def test_weight_device_must_match_x():
    bad = _args()["q_weight"].to("meta")
    _raises(ValueError, "q_weight must be on x's device cpu, got meta", q_weight=bad)


@pytest.mark.parametrize("name", ["q_weight", "kv_weight", "proj_weight"])
def test_projection_weights_are_required(name):
    _raises(ValueError, f"{name} is required", **{name: None})


def test_weight_must_be_tensor():
    _raises(TypeError, "kv_weight must be a torch.Tensor", kv_weight=[[0.0]])


def test_reduction_needs_conv_weight():
    _raises(ValueError, "sr_weight is required", sr_weight=None)


@pytest.mark.parametrize("heads,error,match", [
    (3, ValueError, "num_heads must divide the channel count C = 16, got num_heads = 3"),
    (0, ValueError, "num_heads must be >= 1"),
    (2.0, TypeError, "num_heads must be an int"),
    (True, TypeError, "num_heads must be an int"),
])
def test_bad_num_heads(heads, error, match):
    _raises(error, match, num_heads=heads)


@pytest.mark.parametrize("sr,error,match", [
    (0, ValueError, r"sr_ratio must be >= 1, got 0"),
    (7, ValueError, r"sr_ratio must be at most min\(H, W\) = 6: .* size \(H, W\) = \(8, 6\); got sr_ratio = 7"),
    (2.5, TypeError, "sr_ratio must be an int"),
])
def test_bad_sr_ratio(sr, error, match):
    _raises(error, match, sr_ratio=sr)


@pytest.mark.parametrize("eps,error", [(0.0, ValueError), (-1e-5, ValueError), (float("nan"), ValueError), ("1e-5", TypeError)])
def test_bad_eps(eps, error):
    _raises(error, "eps must be", eps=eps)


@pytest.mark.parametrize("scale,error", [(0.0, ValueError), (float("inf"), ValueError), ("x", TypeError)])
def test_bad_scale(scale, error):
    _raises(error, "scale must be", scale=scale)


def test_bad_linear_flag():
    _raises(TypeError, "linear must be a bool", linear=1)


def test_bad_backend():
    kwargs = _args()
    with pytest.raises(ValueError, match="backend must be one of"):
        sra_attention(**kwargs, backend="cuda")


def _environment_defaults(monkeypatch, **environ):
    """Defaults as if sra_kernels had been imported with ``environ``."""
    from sra_kernels import options

    monkeypatch.setattr(options, "DEFAULTS", options.from_environment(environ))


def test_bad_backend_from_environment(monkeypatch):
    _environment_defaults(monkeypatch, SRA_KERNELS_BACKEND="fast")
    with pytest.raises(ValueError, match="SRA_KERNELS_BACKEND must be one of"):
        sra_attention(**_args())


def test_environment_chooses_backend(monkeypatch):
    """auto follows SRA_KERNELS_BACKEND: 'reference' gives the eager math, bit for bit."""
    kwargs = _args()
    _environment_defaults(monkeypatch, SRA_KERNELS_BACKEND="reference")
    torch.testing.assert_close(sra_attention(**kwargs), sra_attention(**kwargs, backend="reference"), rtol=0, atol=0)


def test_environment_is_read_once(monkeypatch):
    """Setting a variable after import changes nothing: the defaults were read when sra_kernels was imported."""
    from sra_kernels import options

    before = options.DEFAULTS
    monkeypatch.setenv("SRA_KERNELS_BACKEND", "fast")
    monkeypatch.setenv("SRA_KERNELS_ATOMIC_BACKWARD", "1")
    sra_attention(**_args())  # no error: the environment is not read per call
    assert options.DEFAULTS is before


def test_environment_flags():
    from sra_kernels.options import Options, from_environment

    assert from_environment({}).options == Options(None, True, False)
    defaults = from_environment({"SRA_KERNELS_FUSE_PROJECTIONS": "0", "SRA_KERNELS_ATOMIC_BACKWARD": "1",
                                 "SRA_KERNELS_AUTOTUNE": "1", "SRA_KERNELS_AUTOTUNE_CACHE": "/tmp/c.json"})
    assert defaults.options == Options(False, False, True) and defaults.autotune_cache == "/tmp/c.json"
    with pytest.raises(ValueError, match="SRA_KERNELS_FUSE_PROJECTIONS must be 0 or 1, got 'yes'"):
        from_environment({"SRA_KERNELS_FUSE_PROJECTIONS": "yes"})


@pytest.mark.parametrize("name, value, error", [
    ("fuse_projections", "yes", TypeError), ("deterministic", 1, TypeError), ("autotune", "1", TypeError),
    ("dropout_p", 1.0, ValueError), ("dropout_p", "0.1", TypeError),
])
def test_bad_options(name, value, error):
    with pytest.raises(error, match=name):
        sra_attention(**_args(), **{name: value})


def _interpreted_kernels(monkeypatch):
    """As if sra_kernels had been imported under TRITON_INTERPRET=1 (the calls below fail before any kernel)."""
    from sra_kernels import dispatch

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(dispatch, "KERNELS_INTERPRETED", True)


def test_triton_on_cpu_without_interpreter_says_how(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        sra_attention(**_args(), backend="triton")


def test_triton_rejects_float64(monkeypatch):
    _interpreted_kernels(monkeypatch)
    with pytest.raises(ValueError, match="fp32, fp16 or bf16 for backend 'triton'"):
        sra_attention(**_args(dtype=torch.float64), backend="triton")


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
@pytest.mark.parametrize("linear", [False, True])
def test_empty_batch_returns_empty(backend, linear):
    kwargs = _args(linear=linear)
    kwargs["x"] = kwargs["x"][:0]
    out = sra_attention(**kwargs, backend=backend)
    assert out.shape == (0, H * W, C)


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_non_contiguous_inputs(backend):
    kwargs = _args(dtype=torch.float64)
    expected = sra_attention(**kwargs, backend="reference")
    kwargs["x"] = kwargs["x"].transpose(0, 1).contiguous().transpose(0, 1)
    kwargs["q_weight"] = kwargs["q_weight"].T.contiguous().T
    assert not kwargs["x"].is_contiguous() and not kwargs["q_weight"].is_contiguous()
    torch.testing.assert_close(sra_attention(**kwargs, backend=backend), expected)


def _wide_call(backend):
    """A valid call with one head of 160 channels (beyond the kernels' head_dim limit), fixed inputs."""
    c = 160
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    return sra_attention(r(1, 16, c), (4, 4), r(c, c), None, r(2 * c, c), None, r(c, c), None,
                         num_heads=1, backend=backend)


def test_triton_rejects_large_head_dim(monkeypatch):
    _interpreted_kernels(monkeypatch)
    with pytest.raises(ValueError, match=r"head_dim \(C // num_heads\) must be <= 128 .*, got 160"):
        _wide_call("triton")


def test_auto_falls_back_to_sdpa_where_kernels_cannot_run(monkeypatch):
    """auto (here resolving to triton through the environment) runs sdpa for head_dim > 128 and fp64."""
    _interpreted_kernels(monkeypatch)
    _environment_defaults(monkeypatch, SRA_KERNELS_BACKEND="triton")
    torch.testing.assert_close(_wide_call("auto"), _wide_call("sdpa"), rtol=0, atol=0)
    kwargs = _args(dtype=torch.float64)
    torch.testing.assert_close(sra_attention(**kwargs), sra_attention(**kwargs, backend="sdpa"), rtol=0, atol=0)


def test_interpreter_switched_on_after_import_says_so(monkeypatch):
    from sra_kernels import dispatch

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(dispatch, "KERNELS_INTERPRETED", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1 was set after sra_kernels was imported"):
        sra_attention(**_args(), backend="triton")


def test_linear_mode_takes_grids_smaller_than_its_sr_ratio():
    """Linear SRA pools to 7x7 whatever the grid, so sr_ratio (PVTv2-li keeps the stage's 8) is unused."""
    kwargs = _args(linear=True)
    kwargs.update(x=kwargs["x"][:, :16], size=(4, 4), sr_ratio=8)
    out = sra_attention(**kwargs, backend="reference")
    torch.testing.assert_close(sra_attention(**kwargs, backend="sdpa"), out)
    assert out.shape == (B, 16, C)


def test_linear_model_runs_on_small_images():
    pvt = pytest.importorskip("pvt")
    model = pvt.create_model("pvt_v2_b2_li", num_classes=10, depths=(1, 1, 1, 1), backend="sdpa").eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 28, 28)).shape == (1, 10)
    from sra_kernels.shapes import model_stages

    assert [s.reduced_tokens for s in model_stages("pvt_v2_b2_li", 28)] == [49] * 4


def test_reduction_weights_are_refused_without_a_reduction():
    kwargs = _args(sr=1)
    with pytest.raises(ValueError, match="sr_weight, sr_bias, norm_weight, norm_bias must be None with sr_ratio 1"):
        sra_attention(**kwargs, backend="reference")
    kwargs.update(sr_weight=None, sr_bias=None, norm_weight=None, norm_bias=None)
    assert sra_attention(**kwargs, backend="reference").shape == (B, H * W, C)


def test_zero_channels_are_refused():
    with pytest.raises(ValueError, match="x must have C >= 1 channels"):
        sra_attention(torch.randn(1, 4, 0), (2, 2), torch.randn(0, 0), None, torch.randn(0, 0), None,
                      torch.randn(0, 0), None, num_heads=1)


def test_reference_building_block_is_contiguous():
    from sra_kernels import reduced_kv_attention

    q, k, v = torch.randn(2, 10, 2, 8), torch.randn(2, 3, 2, 8), torch.randn(2, 3, 2, 8)
    for backend in ("reference", "sdpa"):
        out = reduced_kv_attention(q, k, v, backend=backend)
        assert out.is_contiguous() and out.view(2, 10, 16).shape == (2, 10, 16)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(num_heads=0), ValueError, "num_heads must be >= 1, got 0"),
    (dict(sr_ratio=2.5), TypeError, "sr_ratio must be an int"),
    (dict(dim=0), ValueError, "dim must be >= 1"),
    (dict(backend="bogus"), ValueError, "backend must be one of"),
    (dict(fuse_projections="yes"), TypeError, "fuse_projections must be a bool or None"),
    (dict(linear=1), TypeError, "linear must be a bool"),
])
def test_module_constructor_errors(kwargs, error, match):
    from sra_kernels import SpatialReductionAttention

    with pytest.raises(error, match=match):
        SpatialReductionAttention(**{"dim": 16, "num_heads": 2, **kwargs})


def test_models_refuse_a_bogus_backend_when_built():
    pvt = pytest.importorskip("pvt")
    with pytest.raises(ValueError, match="backend must be one of"):
        pvt.create_model("pvt_v2_b0", depths=(1, 1, 1, 1), backend="bogus")


def test_atomic_backward_under_deterministic_algorithms():
    """deterministic=False contradicts torch.use_deterministic_algorithms(True): an error, or with warn_only a
    warning and the deterministic backward."""
    from sra_kernels import options

    previous, previous_warn = torch.are_deterministic_algorithms_enabled(), \
        torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        with pytest.raises(RuntimeError, match="contradicts torch.use_deterministic_algorithms"):
            sra_attention(**_args(), deterministic=False)
        torch.use_deterministic_algorithms(True, warn_only=True)
        with pytest.warns(UserWarning, match="running the deterministic backward"):
            assert options.resolve(None, False, None, options.DEFAULTS).deterministic
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn)
    assert not options.resolve(None, False, None, options.DEFAULTS).deterministic


def test_jit_trace_of_our_kernels_says_what_to_use(monkeypatch):
    """torch.jit.trace cannot record Triton launches: naming backend='triton' raises a clear error, and auto
    (here resolving to triton through the environment) traces the sdpa path."""
    from sra_kernels import SpatialReductionAttention

    _interpreted_kernels(monkeypatch)
    module = SpatialReductionAttention(C, HEADS, sr_ratio=SR, backend="triton").eval().requires_grad_(False)
    x = torch.randn(B, H * W, C)
    with pytest.raises(RuntimeError, match="torch.jit.trace cannot record the triton backend"):
        torch.jit.trace(lambda t: module(t, H, W), (x,))
    _environment_defaults(monkeypatch, SRA_KERNELS_BACKEND="triton")
    module.backend = "auto"
    traced = torch.jit.trace(lambda t: module(t, H, W), (x,))
    module.backend = "sdpa"
    torch.testing.assert_close(traced(x), module(x, H, W))
