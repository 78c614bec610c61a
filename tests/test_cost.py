"""sra_kernels.cost: FLOPs against torch's FlopCounterMode, bytes against hand counts, PVT stage shapes.

FlopCounterMode counts matrix products and convolutions only (no LayerNorm, softmax, GELU, pooling
or bias), which is exactly what cost.py counts as FLOPs, so the totals must agree to the FLOP.
"""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from sra_kernels import SpatialReductionAttention
from sra_kernels.cost import MODES, Cost, attention_cost, spatial_reduce_cost, sra_attention_cost
from sra_kernels.shapes import SRAShape, model_stages

aten = torch.ops.aten

# sr > 1 with floor-cropped grids, sr = 1, linear (N above and below 49), PVT v1's cls-token stage
SHAPES = [
    SRAShape(2, 9, 7, 32, 2, sr_ratio=2),
    SRAShape(1, 17, 13, 64, 8, sr_ratio=4),
    SRAShape(2, 8, 8, 32, 1, sr_ratio=1),
    SRAShape(2, 9, 11, 40, 5, sr_ratio=2, linear=True),
    SRAShape(1, 5, 6, 16, 2, linear=True),
    SRAShape(2, 3, 3, 32, 4, cls_token=True),
]


def _counted(shape: SRAShape) -> tuple[int, int]:
    """(forward, backward) FLOPs FlopCounterMode counts on the reference backend, x and weights trained."""
    module = SpatialReductionAttention(shape.channels, shape.heads, qkv_bias=True, sr_ratio=shape.sr_ratio,
                                       linear=shape.linear, backend="reference")
    x = torch.randn(shape.batch, shape.tokens, shape.channels, requires_grad=True)
    with FlopCounterMode(display=False) as forward:
        out = module(x, *shape.size)
    with FlopCounterMode(display=False) as backward:
        out.backward(torch.randn_like(out))
    assert x.grad is not None and module.q.weight.grad is not None
    return forward.get_total_flops(), backward.get_total_flops()


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_flops_match_flop_counter_on_reference(shape):
    forward, backward = _counted(shape)
    assert sra_attention_cost(shape, torch.float32, "forward").unfused.flops == forward
    assert sra_attention_cost(shape, torch.float32, "backward").unfused.flops == backward
    assert sra_attention_cost(shape, torch.float32, "forward+backward").unfused.flops == forward + backward
    # the fused op follows SDPA: its attention backward recomputes q k^T (2 * B * N * M * C more)
    recompute = 2 * shape.batch * shape.tokens * shape.reduced_tokens * shape.channels
    assert sra_attention_cost(shape, torch.float32, "forward").fused.flops == forward
    assert sra_attention_cost(shape, torch.float32, "forward+backward").fused.flops == forward + backward + recompute


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_attention_flops_match_torch_sdpa_formulas(shape):
    B, h, N, M, d = shape.batch, shape.heads, shape.tokens, shape.reduced_tokens, shape.head_dim
    q, kv = (B, h, N, d), (B, h, M, d)
    sdpa_forward = flop_registry[aten._scaled_dot_product_efficient_attention](q, kv, kv)
    sdpa_backward = flop_registry[aten._scaled_dot_product_efficient_attention_backward](q, q, kv, kv)
    assert attention_cost(shape, torch.bfloat16, "forward").flops == sdpa_forward == 4 * B * h * N * M * d
    assert attention_cost(shape, torch.bfloat16, "backward").flops == sdpa_backward == 10 * B * h * N * M * d


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_spatial_reduce_flops_are_the_conv(shape):
    forward = spatial_reduce_cost(shape, torch.float32, "forward")
    if not shape.reduces:
        assert forward == Cost()
        return
    weight = torch.randn(shape.channels, shape.channels, shape.kernel, shape.kernel, requires_grad=True)
    image = torch.randn(shape.batch, shape.channels, *((7, 7) if shape.linear else shape.size), requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        out = torch.nn.functional.conv2d(image, weight, stride=shape.kernel)
    assert out.shape[2] * out.shape[3] == shape.reduced_tokens
    assert forward.flops == counter.get_total_flops()
    assert spatial_reduce_cost(shape, torch.float32, "backward").flops == 2 * forward.flops


def test_fused_forward_bytes_by_hand():
    """B=2, 8x8, C=16, 2 heads, sr=2, bf16: x has 2048 elements, the conv patches 2048, K/V 1024, weights
    2160 (q 272, kv 544, proj 272, sr 1040, norm 32). Reads x twice, weights and K/V once; writes K/V and
    the output once."""
    cost = sra_attention_cost(SRAShape(2, 8, 8, 16, 2, sr_ratio=2), torch.bfloat16, "forward")
    assert cost.fused == Cost(cost.fused.flops, (2048 + 2048 + 2160 + 1024) * 2, (1024 + 2048) * 2)
    assert cost.score_matrix_bytes == 2 * 2 * 64 * 16 * 2


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_unfused_sequence_materialises_scores(shape):
    costs = {mode: sra_attention_cost(shape, torch.bfloat16, mode) for mode in MODES}
    ops = dict(costs["forward"].unfused_ops)
    for name in ("scores", "scale", "softmax"):
        assert ops[name].bytes_written == costs["forward"].score_matrix_bytes
    assert costs["forward+backward"].unfused == costs["forward"].unfused + costs["backward"].unfused
    for cost in costs.values():
        assert cost.unfused == sum((c for _, c in cost.unfused_ops), Cost())
        assert cost.fused.bytes < cost.unfused.bytes
    # a training forward also writes what backward reads
    assert costs["forward+backward"].fused.bytes > costs["forward"].fused.bytes + costs["backward"].fused.bytes


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_inference_bytes_scale_with_the_element_size(shape):
    bf16 = sra_attention_cost(shape, torch.bfloat16, "forward")
    fp32 = sra_attention_cost(shape, torch.float32, "forward")
    assert fp32.fused.bytes == 2 * bf16.fused.bytes
    assert fp32.fused.flops == bf16.fused.flops


def test_fused_op_costs_add_up_in_training():
    shape = SHAPES[0]
    for op in (spatial_reduce_cost, attention_cost):
        step = op(shape, torch.bfloat16, "forward+backward")
        forward, backward = op(shape, torch.bfloat16, "forward"), op(shape, torch.bfloat16, "backward")
        assert step.flops == forward.flops + backward.flops
        assert step.bytes_read == forward.bytes_read + backward.bytes_read
        assert step.bytes_written > forward.bytes_written + backward.bytes_written  # saved for backward


def test_floor_seconds_is_the_larger_bound():
    cost = Cost(flops=10**12, bytes_read=10**9, bytes_written=10**9)
    assert cost.floor_seconds(1e15, 1e12) == pytest.approx(2e-3)
    assert cost.floor_seconds(1e14, 1e13) == pytest.approx(1e-2)


def test_model_stages_pvt_v2_b2_and_pvt_small():
    grids = lambda model, size: [s.label for s in model_stages(model, size)]  # noqa: E731
    assert grids("pvt_v2_b2", 224) == grids("pvt_small", 224)[:3] + ["7x7"] == ["56x56", "28x28", "14x14", "7x7"]
    assert grids("pvt_small", 224)[3] == "7x7+cls"
    assert grids("pvt_v2_b2", (800, 1333)) == ["200x334", "100x167", "50x84", "25x42"]  # overlapping: ceil
    assert grids("pvt_small", (800, 1333)) == ["200x333", "100x166", "50x83", "25x41+cls"]  # patches: floor
    stages = model_stages("pvt_v2_b2", (512, 512), batch=16)
    assert [(s.batch, s.channels, s.heads, s.sr_ratio, s.reduced_tokens) for s in stages] == [
        (16, 64, 1, 8, 256), (16, 128, 2, 4, 256), (16, 320, 5, 2, 256), (16, 512, 8, 1, 256)]
    cls_stage = model_stages("pvt_small", 224)[3]
    assert (cls_stage.tokens, cls_stage.reduced_tokens, cls_stage.size) == (50, 50, (1, 50))
    assert all(s.linear and s.reduced_tokens == 49 for s in model_stages("pvt_v2_b2_li", 512))
    assert model_stages("pvt_v2_b0", 224)[0].channels == 32


@pytest.mark.parametrize("model", ["pvt_v2_b2", "pvt_small"])
def test_model_stages_match_the_pvt_models(model):
    """The analytic stage list equals what the built model's attentions see (traced on the meta device)."""
    info = pytest.importorskip("pvt.info", reason="the pvt package is not importable")
    traced = info.model_info(model, (800, 1333)).stages
    ours = model_stages(model, (800, 1333))
    assert [(s.H, s.W, s.N, s.M, s.C, s.heads, s.sr_ratio, s.linear) for s in traced] == [
        (s.height, s.width, s.tokens, s.reduced_tokens, s.channels, s.heads, s.sr_ratio, s.linear) for s in ours]


@pytest.mark.parametrize("call, message", [
    (lambda: sra_attention_cost(SHAPES[0], torch.float32, "inference"), "mode must be one of"),
    (lambda: SRAShape(1, 8, 8, 30, 4), "heads must divide channels"),
    (lambda: SRAShape(1, 8, 8, 32, 2, sr_ratio=2, cls_token=True), "cls token needs sr_ratio 1"),
    (lambda: SRAShape(1, 4, 8, 32, 2, sr_ratio=8), "exceeds the 4x8 token grid"),
    (lambda: SRAShape(0, 4, 8, 32, 2), "batch must be an int >= 1"),
    (lambda: model_stages("pvt_v3", 224), "unknown model 'pvt_v3'"),
])
def test_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_triton_path_bytes_by_hand():
    """B=2, 8x8 tokens, C=32, sr=2 (M=16), bf16 forward, launch by launch (elements x 2 bytes):
    q GEMM reads x, W, b (4096 + 1024 + 32) and writes 4096 (the conv weight is read in place: channels_last);
    the reduction's patch GEMM reads the patches and weight (4096 + 4096) and writes its fp32 sums (4096 bytes),
    its LayerNorm kernel reads them, the conv bias, LN weight and bias (96) and writes y and z (2 x 1024) +
    mean/rstd (256 bytes); kv GEMM 1024 + 2048 + 64 / 2048; attention reads q, k, v
    (4096 + 2048) and writes o (4096) + the log-sum-exp (512 bytes); proj like q."""
    shape = SRAShape(2, 8, 8, 32, 1, sr_ratio=2)
    cost = sra_attention_cost(shape, torch.bfloat16, "forward")
    read = (5152 + 8288 + 3136 + 6144 + 5152) * 2 + 4096
    written = (4096 + 2048 + 2048 + 4096 + 4096) * 2 + 256 + 512 + 4096
    assert cost.cublas_projections == Cost(cost.unfused.flops, read, written)
    assert [name for name, _, _ in cost.cublas_projections_ops] == ["q", "reduce", "reduce_norm", "kv", "attention",
                                                                     "proj"]
    # fused projections, inference: the reduction also reads W_kv, b_kv (2048 + 64) and writes kv (2048);
    # one kernel reads x, k, v and both weights + biases (4096 + 2048 + 2112) and writes the output (4096)
    read = (8288 + 2112 + 8256) * 2 + 4096
    written = (2048 + 2048 + 4096) * 2 + 256 + 4096
    assert cost.fused_projections == Cost(cost.unfused.flops, read, written)
    assert [name for name, _, _ in cost.fused_projections_ops] == ["reduce", "reduce_norm_kv", "projected_attention"]


def test_one_kernel_self_attention_bytes_by_hand():
    """sr = 1 over 7x7 = 49 <= 64 tokens, B=2, C=32, bf16: the fused-projection path is one kernel that reads
    x (3136) and the q, kv and proj weights + biases (4 x 1056) and writes the output (3136); training's
    backward first recomputes k, v by a GEMM. 9x8 = 72 tokens take the kv GEMM first."""
    shape = SRAShape(2, 7, 7, 32, 2)
    cost = sra_attention_cost(shape, torch.bfloat16, "forward")
    assert cost.fused_projections == Cost(cost.unfused.flops, (3136 + 4224) * 2, 3136 * 2)
    assert [name for name, _, _ in cost.fused_projections_ops] == ["projected_self_attention"]
    assert cost.fused_projections.bytes < cost.fused.bytes  # below the no-recompute floor: k, v never leave the chip
    training = sra_attention_cost(shape, torch.bfloat16, "forward+backward").fused_projections_ops
    assert [name for name, _, _ in training][:3] == ["projected_self_attention", "kv_recompute", "proj_bwd"]
    longer = sra_attention_cost(SRAShape(2, 9, 8, 32, 2), torch.bfloat16, "forward").fused_projections_ops
    assert [name for name, _, _ in longer] == ["kv", "projected_attention"]


@pytest.mark.parametrize("model", ["pvt_v2_b2", "pvt_small"])
@pytest.mark.parametrize("mode", MODES)
def test_triton_path_lies_between_the_floor_and_eager(model, mode):
    """Every PVT stage at 224x224 and 512x512: fused floor < cublas_projections < eager sequence; the
    fused-projection path (C <= 128) between the floor and cublas_projections, near the floor in inference."""
    for size, batch in ((224, 64), (512, 16)):
        for shape in model_stages(model, size, batch):
            cost = sra_attention_cost(shape, torch.bfloat16, mode)
            assert cost.fused.bytes < cost.cublas_projections.bytes < cost.unfused.bytes, (shape, mode)
            if shape.channels > 128:
                continue  # the fused-projection path runs for C <= 128 only
            assert cost.fused.bytes <= cost.fused_projections.bytes, (shape, mode)
            if mode == "forward":  # inference: within 25% of the floor, at most 60% of cublas_projections' bytes
                assert cost.fused_projections.bytes <= min(1.25 * cost.fused.bytes, 0.6 * cost.cublas_projections.bytes), shape
            elif mode == "forward+backward":  # training: the forward's savings, less q and o saved for the backward
                assert cost.fused_projections.bytes < 0.95 * cost.cublas_projections.bytes, shape
