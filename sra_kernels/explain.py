"""``python -m sra_kernels --explain MODEL``: the path each attention stage of a model takes, and why.

    python -m sra_kernels --explain pvt_v2_b2 --img-size 512 512 --batch 16 --dtype bf16 [--train]
        [--compile] [--backend auto] [--fuse-projections auto|on|off] [--capability 9.0]

Plans are made as a call would make them (:func:`sra_kernels.plan.plan_sra`): on this machine's CUDA
device, or, with ``--capability``, on a CUDA device of that compute capability (to see an H200's plan
from a laptop). Autotuning is not run here: where ``autotune=True`` would time, the table's choice shows.
"""

from __future__ import annotations

import argparse

import torch

from .options import BACKENDS, DEFAULTS, Options
from .plan import ROUTES, Plan, Problem, plan_sra
from .shapes import MODEL_STAGES, SRAShape, model_stages

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def explain(model: str, image_size: tuple[int, int], batch: int, dtype: torch.dtype, *, train: bool = False,
            compiling: bool = False, backend: str = "auto", options: Options = DEFAULTS.options,
            device: torch.device | None = None, capability: tuple[int, int] | None = None
            ) -> list[tuple[int, SRAShape, Plan]]:
    """(stage, shape, plan) of every attention stage of ``model`` on (batch, 3, *image_size) images."""
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() or capability else "cpu")
    return [(stage, shape, plan_sra(Problem.of_shape(shape, dtype, train), device, backend, options,
                                    compiling=compiling, capability=capability))
            for stage, shape in enumerate(model_stages(model, image_size, batch), start=1)]


def format_plans(rows: list[tuple[int, SRAShape, Plan]]) -> str:
    """One block per stage: its shape, path, launches and the reason."""
    lines = []
    for stage, shape, plan in rows:
        geometry = (f"stage {stage}: {shape.label} N={shape.tokens} M={shape.reduced_tokens} C={shape.channels} "
                    f"heads={shape.heads} sr={shape.sr_ratio}{' linear' if shape.linear else ''}")
        launches = ", ".join(launch.name for launch in plan.forward) or "PyTorch's ops"
        lines += [geometry, f"  path    {plan.path}: {ROUTES[plan.route]}", f"  runs    {launches}",
                  f"  why     {plan.reason}"]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--explain", metavar="MODEL", choices=sorted(MODEL_STAGES),
                        help="print the path each attention stage of MODEL takes, and why")
    parser.add_argument("--img-size", nargs=2, type=int, default=(224, 224), metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--train", action="store_true", help="a backward follows (training)")
    parser.add_argument("--compile", action="store_true", help="the calls are traced by torch.compile")
    parser.add_argument("--backend", choices=("auto",) + BACKENDS, default="auto")
    parser.add_argument("--fuse-projections", choices=("auto", "on", "off"), default="auto")
    parser.add_argument("--capability", metavar="MAJOR.MINOR",
                        help="plan for a CUDA device of this compute capability (e.g. 9.0 for H100 / H200)")


def main(args: argparse.Namespace) -> int:
    capability = tuple(int(part) for part in args.capability.split(".")) if args.capability else None
    fuse = {"auto": DEFAULTS.options.fuse_projections, "on": True, "off": False}[args.fuse_projections]
    options = DEFAULTS.options._replace(fuse_projections=fuse)
    rows = explain(args.explain, tuple(args.img_size), args.batch, DTYPES[args.dtype], train=args.train,
                   compiling=args.compile, backend=args.backend, options=options, capability=capability)
    device = "cuda" if torch.cuda.is_available() or capability else "cpu"
    where = (f"sm_{capability[0]}{capability[1]}" if capability
             else torch.cuda.get_device_name() if device == "cuda" else "cpu")
    print(f"{args.explain} at {args.img_size[0]}x{args.img_size[1]}, batch {args.batch}, {args.dtype}, "
          f"{'training' if args.train else 'inference'}{', torch.compile' if args.compile else ', eager'}, "
          f"backend={args.backend!r}, on {where}")
    print(format_plans(rows))
    return 0
