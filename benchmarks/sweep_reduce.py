"""Launch-config sweep of the spatial-reduction kernels on a GPU: data for ``_patch_gemm_config`` and
``_dgrad_config`` in ``ops/spatial_reduce.py``.

    python -m benchmarks.sweep_reduce OUT.jsonl [--budget-s 60]

For each strided-reduction stage of pvt_v2_b2 at 224x224 (batch 64) and 512x512 (batch 16), bf16,
times ``spatial_reduce_forward`` under the heuristic's patch-GEMM config and under alternatives (rows per
tile, K splits, warps, stages), and ``spatial_reduce_backward`` likewise for its data-gradient GEMM, each
checked against the heuristic's output. Timed as CUDA-graph replays (``triton.testing.do_bench_cudagraph``):
the kernels alone, without the host's launch overhead. One JSON line per (shape, pass, config), appended
as measured.
"""

from __future__ import annotations

import argparse
import itertools

import torch

from benchmarks import sweep
from benchmarks.sweep import graph_ms, relative_error
from benchmarks.sweep_attention import RESOLUTIONS
from sra_kernels.ops import spatial_reduce as sr_ops
from sra_kernels.ops.launch import cdiv
from sra_kernels.shapes import model_stages

CHOICES = {
    "fwd": {"BLOCK_M": (64, 128), "splits": (1, 2, 4, 8)},
    "bwd": {"BLOCK_M": (64, 128), "num_warps": (4, 8)},
}
"""The alternatives each pass sweeps (the rest as the heuristic has it): the forward's patch GEMM (tile height,
K splits), the backward's data-gradient GEMM: 12 configs a shape."""


def _gemm_config(changes: dict):
    """``_patch_gemm_config`` with ``changes`` applied (``splits``: the K loop in that many splits)."""
    original = sr_ops._patch_gemm_config

    def config(R, C, sr, elem_size):
        cfg, splits, steps_per_split = original(R, C, sr, elem_size)
        cfg = dict(cfg, **{k: v for k, v in changes.items() if k != "splits"})
        if "splits" in changes:
            steps = sr * sr * cdiv(C, cfg["BLOCK_K"])
            steps_per_split = cdiv(steps, changes["splits"])
            splits = cdiv(steps, steps_per_split)
        return cfg, splits, steps_per_split
    return config


def _heuristic(name: str, R: int, C: int, sr: int) -> dict:
    """The heuristic's choices of what ``name`` sweeps."""
    if name == "fwd":
        cfg, splits, _ = sr_ops._patch_gemm_config(R, C, sr, 2)
        return dict({k: cfg[k] for k in CHOICES[name] if k in cfg}, splits=splits)
    cfg = sr_ops._dgrad_config(R, C, sr, 2)
    return {k: cfg[k] for k in CHOICES[name]}


def _patched(name: str, changes: dict) -> tuple[str, object]:
    """(attribute of sr_ops, replacement) that makes pass ``name`` run with ``changes``."""
    if name == "fwd":
        return "_patch_gemm_config", _gemm_config(changes)
    original = sr_ops._dgrad_config
    return "_dgrad_config", lambda R, C, sr, elem_size: dict(original(R, C, sr, elem_size), **changes)


def sweep_shape(shape, write) -> None:
    B, C, sr = shape.batch, shape.channels, shape.sr_ratio
    H, W = shape.size
    R = B * (H // sr) * (W // sr)
    x = torch.randn(B, H * W, C, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(C, C, sr, sr, device="cuda", dtype=torch.bfloat16) * (C * sr * sr) ** -0.5
    bias, norm_w, norm_b = (torch.randn(C, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    args = (x, H, W, weight, bias, norm_w, norm_b, sr, False, 1e-5)
    y, *saved = sr_ops.spatial_reduce_forward(*args)
    grad_y = torch.randn_like(y)
    passes = {
        "fwd": lambda: sr_ops.spatial_reduce_forward(*args),
        "bwd": lambda: sr_ops.spatial_reduce_backward(grad_y, x, H, W, weight, bias, norm_w, norm_b, *saved,
                                                      sr, False, 1e-5),
    }
    key = {"B": B, "H": H, "W": W, "C": C, "sr": sr, "dtype": "bf16"}
    for name, fn in passes.items():
        want = fn()
        base = _heuristic(name, R, C, sr)
        write(dict(key, pass_=name, config=base, heuristic=True, ms=graph_ms(fn)))
        for values in itertools.product(*CHOICES[name].values()):
            changes = dict(zip(CHOICES[name], values))
            if changes == base:
                continue
            attribute, replacement = _patched(name, changes)
            original = getattr(sr_ops, attribute)
            setattr(sr_ops, attribute, replacement)
            try:
                error = relative_error(fn(), want)
                write(dict(key, pass_=name, config=changes, ms=graph_ms(fn), rel_error_vs_heuristic=error))
            except Exception as exc:  # noqa: BLE001 - a config that fails to compile is a result too
                write(dict(key, pass_=name, config=changes, error=repr(exc)[:300]))
            finally:
                setattr(sr_ops, attribute, original)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("--budget-s", type=float, default=60.0)
    args = parser.parse_args()
    shapes = [s for size, batch in RESOLUTIONS.items() for s in model_stages("pvt_v2_b2", size, batch)
              if s.sr_ratio > 1]
    sweep.run(args.out, shapes, sweep_shape, args.budget_s,
              label=lambda s: f"{s.label} B{s.batch} C{s.channels}")


if __name__ == "__main__":
    main()
