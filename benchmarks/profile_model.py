"""Where a whole-model training step's time goes, by module: the per-step time split of torch.profiler.

    python -m benchmarks.profile_model OUT.txt [--model pvt_v2_b2] [--img-size 512] [--batch 16]
        [--backend auto [sdpa ...]] [--steps 5] [--json OUT.json] [--device cuda|cpu]

Per backend: builds the model, runs warm-up training steps (forward, loss, backward, AdamW step; bf16 autocast on
CUDA, fp32 on CPU), times ``--steps`` steps, profiles ``--steps`` more and writes a markdown table of the GPU
kernel time (CUDA) or CPU self time (CPU) per step by module category, forward and backward apart, to OUT.txt
(one section per backend, overwritten) and ``--json``.

Attribution. Forward: forward hooks open a ``record_function`` range around each outermost module of a category
(a LayerNorm inside an attention counts as attention); an op's time goes to the range around it. Backward: the
profiler records the autograd sequence number of every forward op and of every backward node, so each node's ops
go to the module whose forward op created that node. Limits: ops outside those modules (residual adds, drop path,
token reshapes, classifier head, loss), their backward and the gradient accumulation into the weights count as
"the rest"; eager models only (no torch.compile); kernels the profiler links to no op of a step are left out of
the table (reported as unlinked); on a CPU the op times include the profiler's own per-op overhead.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn
from torch._C._profiler import RecordScope
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

from pvt import create_model
from pvt.layers import Mlp, _ConvEmbed
from pvt.segformer import SegFormerHead
from sra_kernels import SpatialReductionAttention

WARMUP_STEPS = 3
PREFIX = "sra_profile::"
EVALUATE = "autograd::engine::evaluate_function: "
CATEGORIES = {
    "attention": "attention (SpatialReductionAttention)",
    "mlp": "Mix-FFN / Mlp (fc1, dwconv, GELU, fc2)",
    "norm": "LayerNorm (block and stage norms)",
    "patch_embed": "patch embeddings",
    "decode_head": "decode head (SegFormer)",
    "optimizer": "optimizer (AdamW step, zero_grad)",
    "other": "the rest (residuals, drop path, head, loss, ...)",
}
MODULE_CATEGORIES = ((SpatialReductionAttention, "attention"), (Mlp, "mlp"), (_ConvEmbed, "patch_embed"),
                     (SegFormerHead, "decode_head"), (nn.LayerNorm, "norm"))
PHASES = {"forward": ("fwd", "other"), "backward": ("bwd", "other"), "optimizer": ("optimizer", "optimizer")}
"""Step range -> the (phase, category) of the ops under it that no module range or backward node claims."""


def module_category(module: nn.Module) -> str | None:
    """The category of ``module`` (a key of :data:`CATEGORIES`), None for the containers."""
    return next((category for cls, category in MODULE_CATEGORIES if isinstance(module, cls)), None)


def tag_modules(model: nn.Module) -> list:
    """Put a ``record_function`` range around the forward of every outermost categorized module; returns the
    hook handles."""
    handles = []

    def visit(module: nn.Module) -> None:
        category = module_category(module)
        if category is None:
            for child in module.children():
                visit(child)
            return
        ranges = []
        handles.append(module.register_forward_pre_hook(
            lambda *_: ranges.append(record_function(PREFIX + category).__enter__())))
        handles.append(module.register_forward_hook(
            lambda *_: ranges.pop().__exit__(None, None, None), always_call=True))

    visit(model)
    return handles


def _loss(out, target: torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy of logits (classifier, SegFormer) on random labels; the sum of means of MiT's stage maps."""
    if isinstance(out, (list, tuple)):
        return sum(o.float().mean() for o in out)
    return F.cross_entropy(out.float(), target)


def training_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor):
    """A callable running one training step inside the ``PREFIX`` forward / backward / optimizer ranges."""
    targets = []

    def step() -> None:
        with record_function(PREFIX + "forward"), torch.autocast(x.device.type, torch.bfloat16,
                                                                  enabled=x.device.type == "cuda"):
            out = model(x)
            if not targets and torch.is_tensor(out):
                targets.append(torch.randint(out.shape[1], (out.shape[0],) + out.shape[2:], device=x.device))
            loss = _loss(out, targets[0] if targets else None)
        with record_function(PREFIX + "backward"):
            loss.backward()
        with record_function(PREFIX + "optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return step


def split_events(events, device_time: bool) -> tuple[dict, float]:
    """(phase, category) -> microseconds of the profiled ``events``, and the microseconds of device kernels
    linked to no op of a step. ``device_time``: kernel time; else CPU self time."""
    cpu = [e for e in events if e.device_type == DeviceType.CPU and not e.is_async]
    annotations = {e.name for e in cpu if e.scope == int(RecordScope.USER_SCOPE)}  # also their GPU-side spans
    backward = int(RecordScope.BACKWARD_FUNCTION)
    seq_categories: dict[int, tuple[float, str]] = {}
    memo: dict[int, tuple[str, str] | None] = {}

    def classify(e) -> tuple[str, str] | None:
        if id(e) not in memo:
            memo[id(e)] = _classify(e)
        return memo[id(e)]

    def _classify(e) -> tuple[str, str] | None:
        if e.scope == backward:
            return "bwd", seq_categories.get(e.sequence_nr, (0.0, "other"))[1]
        if e.name.startswith(EVALUATE):
            node = next((c for c in e.cpu_children if c.scope == backward), None)
            return classify(node) if node is not None else ("bwd", "other")
        parent = classify(e.cpu_parent) if e.cpu_parent is not None else None
        if not e.name.startswith(PREFIX):
            return parent
        tag = e.name[len(PREFIX):]
        if tag in PHASES:
            return PHASES[tag]
        return (parent[0], tag if parent[1] == "other" else parent[1]) if parent else None

    for e in cpu:  # forward ops: the module of the last op of each sequence number, the one creating its node
        if e.sequence_nr >= 0 and e.scope != backward and not e.name.startswith(EVALUATE):
            key = classify(e)
            start = e.time_range.start
            if key and key[0] == "fwd" and start >= seq_categories.get(e.sequence_nr, (-1.0, ""))[0]:
                seq_categories[e.sequence_nr] = (start, key[1])
    memo.clear()

    split: dict[tuple[str, str], float] = defaultdict(float)
    for e in cpu:
        if device_time:
            amount = sum(k.duration for k in e.kernels if k.name not in annotations)
        else:
            amount = e.self_cpu_time_total
        key = classify(e) if amount else None
        if key:
            split[key] += amount
    if not device_time:
        return dict(split), 0.0
    kernels = sum(e.time_range.elapsed_us() for e in events
                  if e.device_type != DeviceType.CPU and e.name not in annotations)
    return dict(split), max(kernels - sum(split.values()), 0.0)


def profile_backend(model: nn.Module, x: torch.Tensor, backend: str, steps: int) -> dict:
    """Warm up, time and profile ``steps`` training steps of ``model`` on ``backend``; returns the split."""
    device = x.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    model.configure_attention(backend=backend)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step = training_step(model, optimizer, x)
    for _ in range(WARMUP_STEPS):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    wall_ms = 1e3 * (time.perf_counter() - start) / steps
    handles = tag_modules(model)
    try:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(steps):
                step()
            sync()
    finally:
        for handle in handles:
            handle.remove()
    split, unlinked = split_events(prof.events(), device_time=device.type == "cuda")
    total = sum(split.values())
    categories = {}
    for category in CATEGORIES:
        fwd, bwd = split.get(("fwd", category), 0.0), split.get(("bwd", category), 0.0)
        whole = fwd + bwd + split.get(("optimizer", category), 0.0)
        categories[category] = {"fwd_ms": fwd / steps / 1e3, "bwd_ms": bwd / steps / 1e3,
                                "total_ms": whole / steps / 1e3, "share": whole / total if total else 0.0}
    return {"backend": backend, "wall_ms_per_step": wall_ms, "time": "gpu" if device.type == "cuda" else "cpu",
            "total_ms_per_step": total / steps / 1e3, "unlinked_ms_per_step": unlinked / steps / 1e3,
            "attention_share": categories["attention"]["share"], "categories": categories}


def format_split(title: str, result: dict) -> str:
    """The markdown section of one backend's split."""
    kind = "GPU kernel time" if result["time"] == "gpu" else "CPU self time"
    lines = [f"## {title}", "",
             f"wall time {result['wall_ms_per_step']:.2f} ms/step (unprofiled); {kind} "
             f"{result['total_ms_per_step']:.2f} ms/step, split below", "",
             "| category | fwd ms | bwd ms | total ms | % of step |", "|---|---:|---:|---:|---:|"]
    for category, label in CATEGORIES.items():
        row = result["categories"][category]
        if row["total_ms"] or category == "attention":
            fwd, bwd = ("", "") if category == "optimizer" else (f"{row['fwd_ms']:.2f}", f"{row['bwd_ms']:.2f}")
            lines.append(f"| {label} | {fwd} | {bwd} | {row['total_ms']:.2f} | {100 * row['share']:.1f} |")
    lines.append(f"| **total** | | | {result['total_ms_per_step']:.2f} | 100.0 |")
    lines += ["", f"attention share: {100 * result['attention_share']:.1f} % of the {kind} per step"]
    if result["unlinked_ms_per_step"] > 0.005:
        lines.append(f"kernels linked to no step op (not in the table): {result['unlinked_ms_per_step']:.2f} ms/step")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("--model", default="pvt_v2_b2")
    parser.add_argument("--img-size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--backend", nargs="+", default=["auto"], help="one section per backend")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--json")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    device = torch.device(args.device)
    torch.manual_seed(0)
    size = (args.img_size, args.img_size)
    model = create_model(args.model, img_size=size).to(device).train()
    x = torch.randn(args.batch, 3, *size, device=device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    precision = "bf16 autocast" if device.type == "cuda" else "fp32"
    results = []
    with open(args.out, "w") as out:
        for backend in args.backend:
            title = (f"{args.model} {size[0]}x{size[1]} batch {args.batch}, backend {backend}, {precision}: "
                     f"{args.steps} training steps on {where} (torch {torch.__version__})")
            try:
                result = profile_backend(model, x, backend, args.steps)
            except torch.cuda.OutOfMemoryError:
                model.zero_grad(set_to_none=True)
                out.write(f"## {title}\n\nOOM\n\n")
                continue
            results.append({"model": args.model, "img_size": args.img_size, "batch": args.batch,
                            "steps": args.steps, "device": where, "torch": torch.__version__, **result})
            out.write(format_split(title, result) + "\n")
            out.flush()
            print(f"profiled {title}: attention {100 * result['attention_share']:.1f} %", flush=True)
            if args.json:
                with open(args.json, "w") as file:
                    json.dump(results, file, indent=1)


if __name__ == "__main__":
    main()
