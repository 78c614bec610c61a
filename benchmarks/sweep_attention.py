"""Launch-plan sweep of the attention kernels on a GPU: data for the heuristic in ``ops/attention.py``.

    python -m benchmarks.sweep_attention OUT.jsonl [--models pvt_v2_b2] [--sizes 224 512] [--budget-s 120]

For each attention stage of the models at 224x224 (batch 64) and 512x512 (batch 16), bf16, times the
forward and the backward (dQ, dK, dV) under the heuristic's own plan and under a grid of alternative
plans (query block, warps, stages, programs per SM), by substituting ``ops.attention._plan``. Every
alternative is first checked against the heuristic's output. One JSON line per (shape, pass, plan)
with the median ms of CUDA-graph replays, appended as it is measured, so a run cut short
keeps what it measured; ``--budget-s`` stops starting new shapes after that many seconds.
"""

from __future__ import annotations

import argparse
import itertools

import torch
import triton

from benchmarks import sweep
from benchmarks.sweep import graph_ms, relative_error
from sra_kernels.shapes import model_stages
from sra_kernels.ops import attention

RESOLUTIONS = {224: 64, 512: 16}
"""image size -> batch."""
FWD_CHOICES = {"block_n": (64, 128), "num_warps": (4, 8), "num_stages": (2, 3), "per_sm": (4, 8, 0)}
BWD_CHOICES = {"block_n": (32, 64, 128), "num_warps": (4,), "num_stages": (1, 2), "per_sm": (2, 4, 8)}
"""per_sm 0 means one program per query block (no persistence)."""


def _variants(base: attention._Plan, choices: dict, N: int, batch_heads: int, sms: int):
    for block_n, num_warps, num_stages, per_sm in itertools.product(*choices.values()):
        programs = triton.cdiv(N, block_n)
        if per_sm:
            programs = max(1, min(programs, triton.cdiv(per_sm * sms, batch_heads)))
        yield base._replace(block_n=block_n, num_warps=num_warps, num_stages=num_stages,
                                  num_programs=programs), per_sm


def _with_plan(plan, fn):
    original = attention._plan
    attention._plan = lambda *args, **kwargs: plan
    try:
        return fn()
    finally:
        attention._plan = original


def sweep_shape(shape: tuple[int, int, int, int, int], write) -> None:
    """Rows of every plan of one (B, N, M, heads, head_dim) shape, forward and backward."""
    B, N, M, h, d = shape
    q, k, v, do = (torch.randn(B, n, h, d, device="cuda", dtype=torch.bfloat16) for n in (N, M, M, N))
    scale = d**-0.5
    o, lse = attention.attention_forward(q, k, v, scale)
    grads = attention.attention_backward(do, q, k, v, o, lse, scale)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    passes = {
        "fwd": (lambda: attention.attention_forward(q, k, v, scale), FWD_CHOICES, False, (o,)),
        "bwd": (lambda: attention.attention_backward(do, q, k, v, o, lse, scale), BWD_CHOICES, True, grads),
    }
    for name, (fn, choices, backward, want) in passes.items():
        base = attention._plan(N, M, d, B * h, q.dtype, q.device, backward=backward)
        key = {"B": B, "N": N, "M": M, "heads": h, "head_dim": d, "dtype": "bf16", "pass_": name}
        write(dict(key, plan=base._asdict(), per_sm="heuristic", ms=graph_ms(fn)))
        for plan, per_sm in _variants(base, choices, N, B * h, sms):
            if plan == base:
                continue
            try:
                error = relative_error(_with_plan(plan, fn)[:len(want)], want)
                ms = _with_plan(plan, lambda: graph_ms(fn))
                write(dict(key, plan=plan._asdict(), per_sm=per_sm, ms=ms, rel_error_vs_heuristic=error))
            except Exception as exc:  # noqa: BLE001 - a plan that fails to compile is a result too
                write(dict(key, plan=plan._asdict(), per_sm=per_sm, error=repr(exc)[:300]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("--models", nargs="+", default=["pvt_v2_b2"])
    parser.add_argument("--sizes", nargs="+", type=int, default=list(RESOLUTIONS), choices=list(RESOLUTIONS))
    parser.add_argument("--budget-s", type=float, default=120.0)
    args = parser.parse_args()
    shapes = {(s.batch, s.tokens, s.reduced_tokens, s.heads, s.channels // s.heads)
              for model in args.models for size in args.sizes
              for s in model_stages(model, size, RESOLUTIONS[size])}
    sweep.run(args.out, sorted(shapes, key=lambda s: -s[1]), sweep_shape, args.budget_s,
              label=lambda s: "B,N,M,h,d=" + ",".join(map(str, s)))

if __name__ == "__main__":
    main()
