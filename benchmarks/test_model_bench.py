"""Whole-model benchmarks: pvt_v2_b0, pvt_v2_b2, SegFormer's mit_b2 and pvt_small, every attention backend side
by side.

``infer``: a forward pass under no_grad (images/s = batch / median). ``train``: forward, cross-entropy
on random labels (mit_b2, a feature backbone: the sum of its stage maps' means), backward and an AdamW step
(step time and images/s). Precisions: ``bf16-autocast``
(fp32 weights, ``torch.autocast`` bf16) and ``fp32``. Peak memory is the CUDA peak above the inputs.
Providers (attention options of every block, :meth:`configure_attention`): ``sra_kernels`` (backend
triton, unfused projections), ``sra_kernels_projected`` (backend triton, ``fuse_projections=True``: the
stages whose plan takes the fused path, C <= 128 in bf16), ``auto`` (the default policy), ``sdpa``,
``reference``.

Executions: ``eager``, ``compiled`` (``torch.compile`` of the model) and ``graphs`` (CUDA-graph replay through
``torch.compile(mode="reduce-overhead")``); each row records wall time (median), GPU kernel time
(``gpu_ms``) and peak memory.

GPU: 224x224 images at batch 64, 512x512 at batch 16 and, for the segmentation backbones pvt_v2_b2 and mit_b2,
1024x1024 at batch 2; a row that runs out of GPU memory (``reference`` materialises the scores) is skipped as
such. CPU: one smoke configuration only (pvt_v2_b0, 64x64, batch 1, fp32, eager, reference and sdpa, infer and
train); every other row is GPU-only and skipped with its reason.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchmarks import (
    CUDA,
    DEVICE,
    PROVIDER_OPTIONS,
    ROTATE,
    kernel_ms,
    measure,
    peak_memory_mb,
    rotating,
    synchronize,
)
from sra_kernels.options import Options
from sra_kernels.plan import Problem, plan_sra
from sra_kernels.shapes import model_stages

pvt = pytest.importorskip("pvt", reason="the pvt models package is not importable (yet)")

MODELS = ("pvt_v2_b0", "pvt_v2_b2", "mit_b2", "pvt_small")
PRECISIONS = ("bf16-autocast", "fp32")
MODES = ("infer", "train")
EXECUTIONS = {"eager": None, "compiled": "default", "graphs": "reduce-overhead"}
"""How the model runs: eagerly, under ``torch.compile`` (mode default), or CUDA-graph replayed
(``torch.compile(mode="reduce-overhead")``: inductor's CUDA graphs; the optimizer step stays eager)."""
GPU_SIZES = {"224x224": (224, 64), "512x512": (512, 16), "1024x1024": (1024, 2)}
"""name -> (image side, batch) on CUDA: classification size and segmentation crops (``python -m pvt bench``'s
presets classification, segmentation and segmentation-1024)."""
LARGE_IMAGE_MODELS = ("pvt_v2_b2", "mit_b2")
"""The models with 1024x1024 rows."""
CPU_SMOKE = ("pvt_v2_b0", "fp32")
CPU_IMAGE, CPU_BATCH = 64, 1
NUM_CLASSES = 1000


def _fuses_a_stage(model: str, precision: str, mode: str) -> bool:
    """Whether any attention stage of ``model`` takes the fused-projection path with fuse_projections=True."""
    dtype = torch.bfloat16 if precision == "bf16-autocast" else torch.float32
    return any(plan_sra(Problem.of_shape(shape, dtype, mode == "train"), torch.device("cuda"), "triton",
                        Options(fuse_projections=True)).path == "fused_projections"
               for shape in model_stages(model, *GPU_SIZES["224x224"]))


def _skip_reason(model: str, size: str, precision: str, mode: str, provider: str, execution: str) -> str | None:
    if size == "1024x1024" and model not in LARGE_IMAGE_MODELS:
        return f"1024x1024 rows: the segmentation backbones {' and '.join(LARGE_IMAGE_MODELS)} only"
    if provider == "sra_kernels_projected" and not _fuses_a_stage(model, precision, mode):
        return "sra_kernels_projected: no stage takes the fused-projection path here (it runs C <= 128 in fp16 / bf16)"
    if CUDA:
        return None
    if execution != "eager":
        return "compiled and CUDA-graph model rows are GPU rows (compiling a whole model costs minutes on a CPU)"
    if size != "224x224":
        return "GPU-only size: the CPU smoke row runs one small image"
    if provider == "auto":
        return "auto runs sdpa off CUDA: the sdpa row is that measurement"
    if provider.startswith("sra_kernels"):
        return "sra_kernels (triton) runs on CUDA only here: TRITON_INTERPRET is for tests, far too slow to time"
    if (model, precision) != CPU_SMOKE:
        return (f"GPU-only model row: the CPU run keeps one smoke configuration ({CPU_SMOKE[0]}, "
                f"{CPU_IMAGE}x{CPU_IMAGE}, batch {CPU_BATCH}, {CPU_SMOKE[1]})")
    return None


def _autocast(precision: str):
    return torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=precision == "bf16-autocast")


def _training_loss(out, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits; of a feature backbone's stage maps (MiT) the sum of their means."""
    if isinstance(out, (list, tuple)):
        return sum(o.float().mean() for o in out)
    return F.cross_entropy(out, labels)


@pytest.mark.parametrize("execution", EXECUTIONS)
@pytest.mark.parametrize("provider", PROVIDER_OPTIONS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("size", GPU_SIZES)
@pytest.mark.parametrize("model", MODELS)
def test_model(model, size, precision, mode, provider, execution, results, record):
    reason = _skip_reason(model, size, precision, mode, provider, execution)
    if reason:
        results.skip(reason)
    image, batch = GPU_SIZES[size] if CUDA else (CPU_IMAGE, CPU_BATCH)
    torch.manual_seed(0)
    net = pvt.create_model(model, num_classes=NUM_CLASSES).to(DEVICE)
    net.configure_attention(**PROVIDER_OPTIONS[provider])
    run = net
    if EXECUTIONS[execution] is not None:
        torch._dynamo.reset()
        run = torch.compile(net, mode=EXECUTIONS[execution])
    images = [torch.randn(batch, 3, image, image, device=DEVICE) for _ in range(ROTATE)]
    labels = [torch.randint(0, NUM_CLASSES, (batch,), device=DEVICE) for _ in range(ROTATE)]
    next_index = rotating(ROTATE)
    if mode == "infer":
        net.eval()

        def step():
            with torch.no_grad(), _autocast(precision):
                run(images[next_index()])
    else:
        net.train()
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-5)

        def step():
            i = next_index()
            with _autocast(precision):
                loss = _training_loss(run(images[i]), labels[i])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    try:
        for _ in range(1 if run is net else 3):  # warm-up: kernels compiled, optimizer state, CUDA graphs recorded
            step()
        synchronize()
        peak = peak_memory_mb(step)
        gpu_ms = kernel_ms(step)
        samples = measure(step)
    except torch.cuda.OutOfMemoryError:
        results.skip("out of GPU memory (the reference backend materialises every N x M score matrix)")
    row = record(f"{model} {image}x{image} B{batch} {precision} {mode} {execution}", provider, samples,
                 kind="model", model=model, image=f"{image}x{image}", batch=batch, precision=precision, mode=mode,
                 execution=execution, peak_mem_mb=peak, gpu_ms=gpu_ms)
    row["images_per_s"] = batch / (row["median_ms"] / 1e3)
