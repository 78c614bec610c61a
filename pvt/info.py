"""Parameters, FLOPs and the per-stage attention shapes of a model, computed without real memory.

The model runs once on the ``meta`` device (shapes only) on the ``reference`` backend under
``torch.utils.flop_counter.FlopCounterMode``, so the attention matmuls are counted as PVT runs them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from .models import NUM_STAGES
from .registry import create_model


@dataclass
class StageShape:
    """Attention geometry of one stage: N queries on an H x W grid, M keys/values, C channels."""

    stage: int
    H: int
    W: int
    N: int
    M: int
    C: int
    heads: int
    sr_ratio: int
    linear: bool


@dataclass
class ModelInfo:
    name: str
    img_size: tuple[int, int]
    params: int
    flops: int
    stages: list[StageShape]


def _reduced_tokens(attn, N: int, H: int, W: int) -> int:
    """M: keys/values seen by a SpatialReductionAttention for N tokens on an H x W grid."""
    if attn.linear:
        size = attn.pool.output_size
        return size * size if isinstance(size, int) else size[0] * size[1]
    if attn.sr_ratio > 1:
        return (H // attn.sr_ratio) * (W // attn.sr_ratio)
    return N


def model_info(name: str, img_size: tuple[int, int] = (224, 224), num_classes: int | None = None,
               **overrides) -> ModelInfo:
    """Count parameters and forward FLOPs (batch 1) of ``name`` at input size ``img_size`` = (H, W).

    The model is the published one (PVT v1 keeps its 224x224 position embeddings and resizes them);
    ``num_classes`` defaults to :func:`pvt.create_model`'s (1000; SegFormer 150).
    """
    with torch.device("meta"):
        model = create_model(name, num_classes=num_classes, backend="reference", **overrides).eval()
        x = torch.empty(1, 3, *img_size)
    grids: dict[int, tuple[int, int]] = {}
    tokens: dict[int, torch.Tensor] = {}

    def record_grid(stage):
        def hook(patch_embed, args, output):
            grids[stage] = output[1]
        return hook

    def record_tokens(stage):
        def hook(attn, args):
            tokens[stage] = args[0]  # (B, N, C); N = H*W, + 1 with PVT v1's cls token
        return hook

    encoder = getattr(model, "backbone", model)  # SegFormer's MiT
    handles = []
    for i in range(1, NUM_STAGES + 1):
        handles.append(getattr(encoder, f"patch_embed{i}").register_forward_hook(record_grid(i)))
        handles.append(getattr(encoder, f"block{i}")[0].attn.register_forward_pre_hook(record_tokens(i)))
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    for handle in handles:
        handle.remove()
    stages = []
    for i in range(1, NUM_STAGES + 1):
        attn, (H, W) = getattr(encoder, f"block{i}")[0].attn, grids[i]
        _, N, C = tokens[i].shape
        stages.append(StageShape(i, H, W, N, _reduced_tokens(attn, N, H, W), C, attn.num_heads,
                                 attn.sr_ratio, attn.linear))
    params = sum(p.numel() for p in model.parameters())
    return ModelInfo(name, tuple(img_size), params, counter.get_total_flops(), stages)


def format_info(info: ModelInfo) -> str:
    """A human-readable report of :func:`model_info`."""
    H, W = info.img_size
    lines = [
        f"{info.name} at {H}x{W}",
        f"  parameters: {info.params / 1e6:.3f} M",
        f"  forward GFLOPs: {info.flops / 1e9:.3f} (= {info.flops / 2e9:.3f} GMACs; the PVT papers' 'GFLOPs' "
        f"count multiply-adds), FlopCounterMode on the reference backend, batch 1",
        "  stage  grid        N        M      C  heads  sr  ",
    ]
    for s in info.stages:
        kind = "linear (pool 7x7)" if s.linear else ""
        lines.append(f"  {s.stage:>5}  {f'{s.H}x{s.W}':<9} {s.N:>7}  {s.M:>7}  {s.C:>5}  {s.heads:>5}  {s.sr_ratio:>2}  {kind}")
    lines.append("  (N: query tokens = H*W, + the cls token in PVT v1's stage 4; M: reduced key/value tokens)")
    return "\n".join(lines)
