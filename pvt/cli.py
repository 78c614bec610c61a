"""``python -m pvt``: info (parameters, FLOPs, attention shapes), bench (images/s per backend), train (digits).

Examples::

    python -m pvt info pvt_v2_b2 --img-size 512 512
    python -m pvt bench pvt_v2_b2 --batch 64 --dtype bf16 --train --backends sdpa triton
    python -m pvt bench mit_b2 --preset segmentation --dtype bf16 --compile none default reduce-overhead --plot b2.png
    python -m pvt train pvt_v2_b0 --epochs 5 --img-size 32 32 --save digits.pt
    python -m pvt train pvt_v2_b0 --compile default --bf16   # on a GPU
    python -m pvt bench pvt_v2_b2 --preset segmentation-1024 --dtype bf16 --train --grad-checkpointing
    torchrun --standalone --nproc_per_node=2 -m pvt train pvt_v2_b0 --epochs 1
"""

from __future__ import annotations

import argparse
import importlib

from .bench import COMPILE_MODES, PRESETS
from .registry import list_models


def _int_at_least(minimum: int):
    """An argparse ``type``: an integer >= ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


POSITIVE = _int_at_least(1)
NON_NEGATIVE = _int_at_least(0)


def _device(text: str):
    """An argparse ``type``: a torch.device that exists here (``cuda:N`` needs N + 1 visible GPUs)."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r} (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: no such CUDA device here ({torch.cuda.device_count()} visible)")
    return device


def _check_img_size(parser: argparse.ArgumentParser, model: str, img_size: tuple[int, int]) -> None:
    """Exit with a usage error when ``model`` cannot run at ``img_size`` (a shapes-only pass on the meta device)."""
    import torch

    from .registry import create_model

    try:
        with torch.device("meta"), torch.no_grad():
            create_model(model, num_classes=0, backend="reference").eval()(torch.empty(1, 3, *img_size))
    except (ValueError, RuntimeError) as error:
        parser.error(f"--img-size {img_size[0]} {img_size[1]} is too small for {model}: {error}")


def _compile_backend_argument(command: argparse.ArgumentParser) -> None:
    command.add_argument("--compile-backend", default="inductor", metavar="NAME",
                         help="torch.compile's backend (default inductor; aot_eager traces forward and backward "
                              "without generating code, e.g. to check on a CPU that a model compiles)")


def _check_compile(args, modes: list[str]) -> None:
    """--compile reduce-overhead is inductor's CUDA graphs: it needs --compile-backend inductor and, to train, a GPU
    (bench marks its rows off CUDA "CUDA only")."""
    if "reduce-overhead" not in modes:
        return
    if args.compile_backend != "inductor":
        args.usage.error(f"--compile reduce-overhead needs --compile-backend inductor, got {args.compile_backend}")
    if args.command == "train":
        import torch

        if not torch.cuda.is_available():
            args.usage.error("--compile reduce-overhead replays CUDA graphs: it needs a GPU")


def _check_plot(args) -> None:
    """--plot needs matplotlib: a usage error before the benchmark runs, not after."""
    if args.plot is None:
        return
    try:
        importlib.import_module("matplotlib")
    except ImportError:
        args.usage.error("--plot needs matplotlib (pip install matplotlib)")


def _bench_sizes(args) -> tuple[tuple[int, int], int]:
    """(img_size, batch) of ``bench``: --img-size and --batch, else the --preset's; --batch or --preset is needed."""
    size, batch = PRESETS[args.preset] if args.preset else ((224, 224), None)
    batch = args.batch or batch
    if batch is None:
        args.usage.error("--batch or --preset is required")
    return tuple(args.img_size or size), batch


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pvt", description=__doc__.replace("``", ""),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    models = dict(choices=list_models(), metavar="MODEL", help="one of: " + ", ".join(list_models()))

    info = commands.add_parser("info", help="parameters, GFLOPs and per-stage N, M, C, heads")
    info.add_argument("model", **models)
    info.add_argument("--img-size", type=POSITIVE, nargs=2, default=(224, 224), metavar=("H", "W"))
    info.add_argument("--num-classes", type=NON_NEGATIVE, help="default: 1000, 150 (ADE20K) for segformer_*")

    bench = commands.add_parser("bench", help="images/s, step time and peak memory per backend and compile mode")
    bench.add_argument("model", **models)
    bench.add_argument("--batch", type=POSITIVE, help="required without --preset")
    bench.add_argument("--img-size", type=POSITIVE, nargs=2, metavar=("H", "W"), help="default: 224 224")
    bench.add_argument("--preset", choices=PRESETS, help="H x W and batch: " + ", ".join(
        f"{name} {size[0]}x{size[1]} B{batch}" for name, (size, batch) in PRESETS.items())
        + " (--img-size and --batch override them)")
    bench.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    bench.add_argument("--train", action="store_true", help="time forward+backward instead of forward")
    bench.add_argument("--grad-checkpointing", action="store_true",
                       help="with --train: every block recomputes its activations in the backward (less memory)")
    bench.add_argument("--backends", nargs="+", choices=("auto", "reference", "sdpa", "triton"),
                       help="default: every backend that runs here")
    bench.add_argument("--steps", type=POSITIVE, default=20, help="timed steps per backend and compile mode")
    bench.add_argument("--warmup", type=NON_NEGATIVE, default=5,
                       help="untimed steps first (at least 1 to compile, 3 for reduce-overhead)")
    bench.add_argument("--device", type=_device, help="default: cuda when present, else cpu")
    bench.add_argument("--compile", nargs="+", choices=COMPILE_MODES, default=["none"], metavar="MODE",
                       help="torch.compile modes timed side by side: none (eager, the default), default, "
                            "reduce-overhead (CUDA graphs: CUDA only)")
    _compile_backend_argument(bench)
    bench.add_argument("--plot", metavar="FILE", help="also a bar chart of images/s per backend and mode (matplotlib)")
    bench.add_argument("--no-progress", action="store_true", help="no progress bar")

    train = commands.add_parser("train", help="a short training run on scikit-learn's digits (torchrun-ready)")
    train.add_argument("model", **models)
    train.add_argument("--epochs", type=POSITIVE, default=3)
    train.add_argument("--batch-size", type=POSITIVE, default=64, help="per process")
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--weight-decay", type=float, default=0.05)
    train.add_argument("--img-size", type=POSITIVE, nargs=2, default=(32, 32), metavar=("H", "W"))
    train.add_argument("--backend", choices=("auto", "reference", "sdpa", "triton"), default="auto")
    train.add_argument("--compile", choices=COMPILE_MODES, default="none",
                       help="torch.compile the model: none (eager, the default), default, reduce-overhead "
                            "(CUDA graphs: CUDA only); evaluation stays eager")
    _compile_backend_argument(train)
    train.add_argument("--bf16", action="store_true",
                       help="bf16 autocast of forward and loss (fp32 weights and optimizer): for GPUs; "
                            "CPU autocast runs too, slowly")
    train.add_argument("--grad-checkpointing", action="store_true",
                       help="every block recomputes its activations in the backward: less memory, more time")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--subset", type=POSITIVE, metavar="N",
                       help="train on N of the 1437 training images (quick runs)")
    train.add_argument("--save", metavar="PATH", help="checkpoint written after every epoch")
    train.add_argument("--resume", metavar="PATH", help="continue from a --save checkpoint")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    for command in (info, bench, train):
        command.set_defaults(usage=command)  # usage errors found after parsing name the command's own usage
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.command == "bench":
        img_size, batch = _bench_sizes(args)
        _check_plot(args)
        if args.grad_checkpointing and not args.train:
            args.usage.error("--grad-checkpointing goes with --train (it changes only the backward)")
    else:
        img_size = tuple(args.img_size)
    if args.command in ("bench", "train"):
        _check_compile(args, args.compile if args.command == "bench" else [args.compile])
    _check_img_size(args.usage, args.model, img_size)
    if args.command == "info":
        from .info import format_info, model_info

        print(format_info(model_info(args.model, img_size, num_classes=args.num_classes)))
    elif args.command == "bench":
        from .bench import bench_model, default_device, format_results, plot_results

        device = args.device or default_device()
        results = bench_model(args.model, batch, img_size, args.dtype, args.train, args.backends, args.steps,
                              args.warmup, device, not args.no_progress, args.compile, args.compile_backend,
                              args.grad_checkpointing)
        table = format_results(args.model, batch, img_size, args.dtype, args.train, device, results,
                               args.grad_checkpointing)
        print(table)
        if args.plot:
            plot_results(results, args.plot, table.splitlines()[0])
    else:
        from .train import TrainConfig, prepare_save_folder, train

        if args.save:
            try:
                prepare_save_folder(args.save)
            except ValueError as error:
                args.usage.error(f"--save: {error}")
        train(TrainConfig(model=args.model, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                          weight_decay=args.weight_decay, img_size=img_size, backend=args.backend,
                          seed=args.seed, subset=args.subset, save=args.save, resume=args.resume,
                          progress=not args.no_progress, compile=args.compile,
                          compile_backend=args.compile_backend, bf16=args.bf16,
                          grad_checkpointing=args.grad_checkpointing))
