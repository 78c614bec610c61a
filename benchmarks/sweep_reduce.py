"""Launch-config sweep of the spatial-reduction kernels on a GPU: data for ``_row_config`` in
``ops/spatial_reduce.py``.

    python -m benchmarks.sweep_reduce OUT.jsonl [--budget-s 60]

For each strided-reduction stage of pvt_v2_b2 at 224x224 (batch 64) and 512x512 (batch 16), bf16,
times ``spatial_reduce_forward`` and ``spatial_reduce_backward`` under the heuristic's row config
and under alternatives (rows per program, warps, stages) of the forward kernel (``tile=16384``) or of
the backward's LayerNorm/input kernel (``tile=4096``), each checked against the heuristic's output.
Timed as CUDA-graph replays (``triton.testing.do_bench_cudagraph``): the kernels alone, without the
host's launch overhead. One JSON line per (shape, pass, config), appended as measured.
"""

from __future__ import annotations

import argparse
import itertools

import torch

from benchmarks import sweep
from benchmarks.sweep import graph_ms, relative_error
from benchmarks.sweep_attention import RESOLUTIONS
from sra_kernels.shapes import model_stages
from sra_kernels.ops import spatial_reduce as sr_ops

CHOICES = {"BLOCK_M": (16, 32, 64), "num_warps": (4, 8), "num_stages": (2, 3)}
PASS_TILE = {"fwd": 16384, "bwd": 4096}
"""The ``tile`` argument with which each pass asks ``_row_config`` for its row kernel."""


def sweep_shape(shape, write) -> None:
    B, C, sr = shape.batch, shape.channels, shape.sr_ratio
    H, W = shape.size
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
    original = sr_ops._row_config
    key = {"B": B, "H": H, "W": W, "C": C, "sr": sr, "dtype": "bf16"}
    for name, fn in passes.items():
        want = fn()
        base = original(C, 2, PASS_TILE[name])
        write(dict(key, pass_=name, config=base, heuristic=True, ms=graph_ms(fn)))
        for values in itertools.product(*CHOICES.values()):
            config = dict(base, **dict(zip(CHOICES, values)))
            if config == base:
                continue
            sr_ops._row_config = (lambda c, e, tile, config=config, tile_of_pass=PASS_TILE[name]:
                                  config if tile == tile_of_pass else original(c, e, tile))
            try:
                error = relative_error(fn(), want)
                write(dict(key, pass_=name, config=config, ms=graph_ms(fn), rel_error_vs_heuristic=error))
            except Exception as exc:  # noqa: BLE001 - a config that fails to compile is a result too
                write(dict(key, pass_=name, config=config, error=repr(exc)[:300]))
            finally:
                sr_ops._row_config = original


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
