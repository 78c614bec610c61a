"""sra_kernels.plan, .policy and .autotune: which path a call takes, from what, and that it is honoured.

The plans are made for a CUDA device of a given compute capability (no GPU needed: planning reads no
tensor); the measured table is the committed one, regenerated here from the committed results.
"""

import json

import pytest
import torch

from sra_kernels import SpatialReductionAttention, autotune, functional, fused, policy, sra_attention
from sra_kernels.options import Options
from sra_kernels.plan import Problem, fused_projections_refuse, make_plan, plan_sra
from sra_kernels.shapes import model_stages

CUDA = torch.device("cuda")
H200 = (9, 0)
BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32


def _problem(C=64, heads=1, sr=8, B=16, N=16384, M=256, dtype=BF16, backward=False, linear=False):
    return Problem(B, N, M, C, heads, sr, linear, dtype, backward)


def _stage_paths(model, size, batch, backward=False, **kwargs):
    return [plan_sra(Problem.of_shape(shape, BF16, backward), CUDA, capability=H200, **kwargs).path
            for shape in model_stages(model, size, batch)]


def test_the_fused_projection_path_is_for_16_bit_and_narrow_x():
    assert fused_projections_refuse(_problem(C=128)) is None and fused_projections_refuse(_problem(dtype=F16)) is None
    assert "C <= 128" in fused_projections_refuse(_problem(C=160, heads=5))
    assert "fp16 / bf16" in fused_projections_refuse(_problem(dtype=F32))


@pytest.mark.parametrize("path, sr, linear, N, route, forward", [
    ("cublas_projections", 8, False, 4096, "reduce_attend", ["q", "reduce", "reduce_norm", "kv", "attention", "proj"]),
    ("cublas_projections", 1, True, 4096, "reduce_attend", ["q", "pool", "reduce", "reduce_norm", "kv", "attention",
                                                             "proj"]),
    ("cublas_projections", 1, False, 49, "attend", ["q", "kv", "attention", "proj"]),
    ("fused_projections", 4, False, 4096, "reduce_project_attend", ["reduce", "reduce_norm_kv", "projected_attention"]),
    ("fused_projections", 1, False, 64, "project_attend_self", ["projected_self_attention"]),
    ("fused_projections", 1, False, 65, "kv_project_attend", ["kv", "projected_attention"]),
    ("sdpa", 8, False, 4096, "sdpa", []),
])
def test_routes_and_their_launches(path, sr, linear, N, route, forward):
    plan = make_plan(path, _problem(sr=sr, linear=linear, N=N, M=N if sr == 1 and not linear else 49), True, "test")
    assert (plan.route, [launch.name for launch in plan.forward]) == (route, forward)
    assert all((launch.kind == "triton") == (launch.kernel is not None) for launch in plan.forward + plan.backward)
    assert plan.backend == ("triton" if path != "sdpa" else "sdpa")
    with pytest.raises(ValueError, match="path must be one of"):
        make_plan("triton", _problem(), True, "test")


def test_auto_follows_the_measured_table_on_an_h200():
    """The committed H200 results: ours is faster only at stage 1 of 512x512 B16 (fwd and fwd+bwd), and at
    stages 1, 2 and 4 of 224x224 B64; sdpa everywhere else."""
    ours, sdpa = "cublas_projections", "sdpa"
    for backward in (False, True):
        assert _stage_paths("pvt_v2_b2", 512, 16, backward=backward) == [ours, sdpa, sdpa, sdpa]
        assert _stage_paths("pvt_v2_b2", 224, 64, backward=backward) == [ours, ours, sdpa, ours]
    # under torch.compile the number to beat is compiled PyTorch's; 224 px rows have none, so sdpa
    assert _stage_paths("pvt_v2_b2", 512, 16, compiling=True, backward=True) == [ours, sdpa, sdpa, sdpa]
    assert _stage_paths("pvt_v2_b2", 224, 64, compiling=True) == [sdpa] * 4
    plan = plan_sra(Problem.of_shape(model_stages("pvt_v2_b2", 512, 16)[0], BF16, False), CUDA, capability=H200)
    assert plan.reason.startswith("measured on NVIDIA H200") and "cublas_projections 0.148" in plan.reason


def test_auto_without_data_runs_sdpa_and_says_why():
    plan = plan_sra(_problem(), CUDA, capability=(8, 0))
    assert plan.path == "sdpa" and "no measurements on sm_80" in plan.reason
    far = plan_sra(_problem(N=65536 * 4, B=2, M=4096), CUDA, capability=H200)  # M 16x the measured 256
    assert far.path == "sdpa" and "no measurement within 4x of this shape" in far.reason
    assert plan_sra(_problem(dtype=F32), CUDA, capability=H200).path == "sdpa"  # fp32: not measured
    assert plan_sra(_problem(dtype=F16), CUDA, capability=H200).path == "cublas_projections"  # fp16 = bf16's rows


def test_named_backends_and_what_the_kernels_refuse():
    assert plan_sra(_problem(), CUDA, "sdpa").path == "sdpa"
    assert plan_sra(_problem(), CUDA, "reference").path == "reference"
    assert plan_sra(_problem(), CUDA, "triton", capability=(8, 0)).path == "cublas_projections"
    assert plan_sra(_problem(), CUDA, "triton", Options(fuse_projections=True)).path == "fused_projections"
    assert plan_sra(_problem(dtype=F32), CUDA, "triton", Options(fuse_projections=True)).path == "cublas_projections"
    with pytest.raises(ValueError, match="head_dim"):
        plan_sra(_problem(C=256, heads=1), CUDA, "triton")
    assert plan_sra(_problem(C=256, heads=1), CUDA, capability=H200).path == "sdpa"  # auto falls back
    assert plan_sra(_problem(), CUDA, "triton", dropout_p=0.1).path == "sdpa"
    assert plan_sra(_problem(), torch.device("cpu")).path == "sdpa"


def test_fuse_projections_true_is_honoured_under_auto():
    plan = plan_sra(_problem(C=128, heads=2, sr=4, N=4096), CUDA, options=Options(fuse_projections=True),
                    capability=H200)
    assert (plan.path, plan.reason) == ("fused_projections", "fuse_projections=True")
    # where it does not apply, the measured choice stands
    assert plan_sra(_problem(C=320, heads=5, sr=2, N=1024), CUDA, options=Options(fuse_projections=True),
                    capability=H200).path == "sdpa"


ROW = policy.Row("GPU X", (9, 0), Problem(16, 4096, 256, 128, 2, 4, False, BF16, False),
                 (("cublas_projections", 1.0), ("sdpa", 2.0), ("fused_projections", 0.5)), "test")


def test_table_rows_reach_a_factor_of_four_and_the_nearest_wins():
    problem = _problem(C=128, heads=2, sr=4, N=4096)
    other = ROW._replace(problem=ROW.problem._replace(tokens=8192), gpu_ms=(("cublas_projections", 3.0), ("sdpa", 2.0)))
    assert policy.nearest_row(problem, (9, 0), (other, ROW)) is ROW
    assert policy.nearest_row(problem._replace(tokens=4096 * 4), (9, 0), (ROW,)) is ROW
    assert policy.nearest_row(problem._replace(tokens=4096 * 5), (9, 0), (ROW,)) is None
    assert policy.nearest_row(problem._replace(reduced_tokens=49), (9, 0), (ROW,)) is None
    assert policy.nearest_row(problem._replace(backward=True), (9, 0), (ROW,)) is None
    assert policy.nearest_row(problem, (8, 0), (ROW,)) is None
    assert policy.nearest_row(problem._replace(heads=4), (9, 0), (ROW,)) is None


def test_the_fastest_measured_candidate_wins_and_pytorch_must_be_measured():
    assert policy.choose(ROW, ("sdpa", "cublas_projections", "fused_projections"), False) == "fused_projections"
    assert policy.choose(ROW, ("sdpa", "cublas_projections"), False) == "cublas_projections"
    unmeasured = ROW._replace(gpu_ms=(("sdpa", 2.0), ("cublas_projections", 1.0)))
    assert policy.choose(unmeasured, ("sdpa", "cublas_projections", "fused_projections"), False) == "cublas_projections"
    assert policy.choose(ROW, ("sdpa", "cublas_projections"), True) is None  # no compiled number
    assert policy.choose(ROW._replace(gpu_ms=ROW.gpu_ms + (("compiled", 0.9),)), ("sdpa", "cublas_projections"),
                         True) == "sdpa"


def test_committed_table_is_generated_from_the_committed_results():
    from benchmarks import policy_table

    dirs = sorted(p for p in policy_table.RESULTS.iterdir() if p.is_dir())
    assert policy_table.dumps(policy_table.build(dirs)) == policy.TABLE_FILE.read_text()
    assert len(policy.ROWS) == len(json.loads(policy.TABLE_FILE.read_text())["rows"]) > 0


def test_autotuner_times_once_then_caches(tmp_path):
    problem, timed = _problem(), []
    speeds = {"sdpa": 3e-3, "cublas_projections": 1e-3, "fused_projections": 2e-3}
    tuner = autotune.Autotuner(tmp_path / "cache.json")
    candidates = tuple(speeds)
    chosen = tuner.choose(problem, torch.device("cpu"), candidates, lambda path: timed.append(path) or speeds[path])
    assert chosen[0] == "cublas_projections" and "autotuned" in chosen[1] and timed == list(candidates)
    assert tuner.choose(problem, torch.device("cpu"), candidates, lambda path: 1 / 0) == (
        "cublas_projections", "autotune cache")
    reloaded = autotune.Autotuner(tmp_path / "cache.json")
    assert reloaded.choose(problem, torch.device("cpu"), candidates, None) == ("cublas_projections", "autotune cache")
    assert autotune.Autotuner().choose(problem, torch.device("cpu"), candidates, None) is None  # nothing to time with
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable"):
        assert autotune.Autotuner(tmp_path / "broken.json").choices == {}


def _sra_inputs(device, dtype=BF16, B=2, H=6, W=5, C=32, sr=2):
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return (torch.randn(*shape, generator=g) * 0.2).to(device, dtype)

    return (r(B, H * W, C), (H, W), r(C, C), r(C), r(2 * C, C), r(2 * C), r(C, C), r(C), r(C, C, sr, sr), r(C),
            1 + r(C), r(C)), dict(num_heads=2, sr_ratio=sr)


def test_autotune_through_the_op_runs_every_candidate_and_keeps_the_fastest(kernel_device, monkeypatch):
    """backend='triton' (both our paths are candidates here) with autotune=True and a stubbed timer: the first
    call runs each candidate on the real inputs, forward and backward; later calls time nothing."""
    monkeypatch.setattr(autotune, "TUNER", autotune.Autotuner())
    monkeypatch.setattr(functional, "_PLANS", {})
    fake_seconds = iter([2.0, 1.0])  # cublas_projections, then fused_projections
    timed = []

    def fake_time_call(fn, device):
        fn()
        timed.append(device)
        return next(fake_seconds)

    monkeypatch.setattr(autotune, "time_call", fake_time_call)
    args, kwargs = _sra_inputs(kernel_device)
    x = args[0].clone().requires_grad_()
    out = sra_attention(x, *args[1:], **kwargs, backend="triton", autotune=True)
    (plan,) = functional._PLANS.values()
    assert plan.path == "fused_projections" and plan.reason.startswith("autotuned") and len(timed) == 2
    assert x.grad is None  # the timed backward ran on detached copies
    again = sra_attention(x, *args[1:], **kwargs, backend="triton", autotune=True)
    assert len(timed) == 2 and torch.equal(out, again)
    want = sra_attention(x, *args[1:], **kwargs, backend="triton", fuse_projections=True)
    assert torch.equal(out, want)


def test_dropout_in_the_functional_op_runs_sdpa():
    args, kwargs = _sra_inputs("cpu", F32)
    torch.manual_seed(1)
    out = sra_attention(*args, **kwargs, dropout_p=0.5)
    torch.manual_seed(1)
    from sra_kernels.torch_sdpa import sra_attention_sdpa

    assert torch.equal(out, sra_attention_sdpa(*args, **kwargs, dropout_p=0.5))
    assert not torch.equal(out, sra_attention(*args, **kwargs))


@pytest.fixture
def fresh_dynamo():
    """Dynamo's caches emptied before and after: this test's recompiles count against no other test's limit."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_changing_an_option_under_torch_compile_is_honoured(kernel_device, monkeypatch, fresh_dynamo):
    """deterministic is an op argument: a compiled module recompiles for the new value, and its backward runs
    the atomic reduction only when asked (the option is read at trace time, never from the environment)."""
    from sra_kernels.ops import attention

    seen = []
    kernel_class = type(attention._bwd_kernel)
    run = kernel_class.run
    monkeypatch.setattr(kernel_class, "run", lambda self, *a, **k: (
        self.fn.__name__ == "_bwd_kernel" and seen.append(not k["ATOMIC"])) or run(self, *a, **k))
    module = SpatialReductionAttention(32, 2, qkv_bias=True, sr_ratio=2, backend="triton").to(kernel_device)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 80, 32, device=kernel_device, requires_grad=True)
    compiled(x, 8, 10).sum().backward()
    module.deterministic = False
    compiled(x, 8, 10).sum().backward()
    module.deterministic = True
    compiled(x, 8, 10).sum().backward()
    assert seen == [True, False, True]


def test_explain_prints_every_stage(capsys):
    from sra_kernels.__main__ import main

    assert main(["--explain", "pvt_v2_b2", "--img-size", "512", "512", "--batch", "16", "--capability", "9.0"]) == 0
    out = capsys.readouterr().out
    assert out.count("stage ") == 4 and out.count("path    sdpa") == 3
    assert "path    cublas_projections: q GEMM, reduction kernel" in out and "runs    q, reduce, reduce_norm" in out
    assert "measured on NVIDIA H200" in out



def test_planning_traces_without_a_graph_break(fresh_dynamo):
    """What torch.compile traces on a GPU: the auto decision with its table lookup, in one graph."""

    def step(x):
        problem = Problem(x.shape[0], 16384, 256, 64, 1, 8, False, torch.bfloat16, False)
        plan = plan_sra(problem, CUDA, compiling=True, capability=H200)
        return x * 2 if plan.path == "cublas_projections" else x * 3

    compiled = torch.compile(step, fullgraph=True, backend="eager")
    assert torch.equal(compiled(torch.ones(16)), torch.full((16,), 2.0))


def test_autotune_cache_is_read_while_torch_compile_traces(kernel_device, monkeypatch, fresh_dynamo):
    """Under torch.compile the choice is made at trace time from the cache (nothing is timed while tracing)."""
    args, kwargs = _sra_inputs(kernel_device)
    problem = functional._problem(args[0], args[1], functional.SRAWeights(*args[2:]), 2, 2, False)
    tuner = autotune.Autotuner()
    tuner.choices[autotune.cache_key(problem, kernel_device, ("cublas_projections", "fused_projections"))] = \
        "fused_projections"
    monkeypatch.setattr(autotune, "TUNER", tuner)
    monkeypatch.setattr(autotune, "time_call", lambda fn, device: 1 / 0)  # timing would fail the test
    planned = []
    run = fused.sra_attention_triton
    monkeypatch.setattr(fused, "sra_attention_triton", lambda *a, **k: planned.append(k["plan"]) or run(*a, **k))

    def call(x):
        return sra_attention(x, *args[1:], **kwargs, backend="triton", autotune=True)

    torch.compile(call, fullgraph=True, backend="aot_eager")(args[0])
    assert [(plan.path, plan.reason) for plan in planned] == [("fused_projections", "autotune cache")]
