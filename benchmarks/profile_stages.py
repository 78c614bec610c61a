"""Where the time goes: torch.profiler kernel tables of the SRA op per stage, on a GPU.

    python -m benchmarks.profile_stages OUT.txt [--model pvt_v2_b2] [--image 512] [--batch 16]

For each attention stage of the model (bf16), profiles a few forward+backward calls of the
``triton`` and ``sdpa`` backends after a warm-up and appends the per-kernel CUDA time table (self CUDA
time, calls) to OUT.txt: the kernels each path launches and their share of the step.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from sra_kernels import SpatialReductionAttention
from sra_kernels.shapes import model_stages

CALLS = 5


def profile_stage(shape, backend: str) -> str:
    torch.manual_seed(0)
    module = SpatialReductionAttention(shape.channels, shape.heads, qkv_bias=True, sr_ratio=shape.sr_ratio,
                                       linear=shape.linear, backend=backend).to("cuda", torch.bfloat16)
    x = torch.randn(shape.batch, shape.tokens, shape.channels, device="cuda", dtype=torch.bfloat16,
                    requires_grad=True)
    dy = torch.randn_like(x)

    def step():
        module(x, *shape.size).backward(dy)

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(CALLS):
            step()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=70)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("--model", default="pvt_v2_b2")
    parser.add_argument("--image", type=int, default=512)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("profiles GPU kernels: needs a CUDA device")
    with open(args.out, "a") as out:
        for stage, shape in enumerate(model_stages(args.model, args.image, args.batch), start=1):
            for backend in ("triton", "sdpa"):
                title = (f"{args.model} {args.image}x{args.image} stage {stage} {shape.label} B{shape.batch} bf16 "
                         f"{backend}: {CALLS} forward+backward calls")
                out.write(f"\n## {title}\n{profile_stage(shape, backend)}\n")
                out.flush()
                print(f"profiled {title}", flush=True)


if __name__ == "__main__":
    main()
