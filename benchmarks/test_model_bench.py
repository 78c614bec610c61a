"""Whole-model benchmarks: pvt_v2_b0, pvt_v2_b2 and pvt_small, every attention backend side by side.

``infer``: a forward pass under no_grad (images/s = batch / median). ``train``: forward, cross-entropy
on random labels, backward and an AdamW step (step time and images/s). Precisions: ``bf16-autocast``
(fp32 weights, ``torch.autocast`` bf16) and ``fp32``. Peak memory is the CUDA peak above the inputs.
Providers: ``sra_kernels`` (backend triton), ``sra_kernels_projected`` (backend triton with
``SRA_KERNELS_FUSE_PROJECTIONS=1``, bf16 autocast only: the stages with C <= 128 fuse their projections),
``sdpa``, ``reference`` (``pvt.create_model(backend=...)``).

GPU: 224x224 images at batch 64. CPU: one smoke configuration only (pvt_v2_b0, 64x64, batch 1, fp32,
reference and sdpa); every other row is GPU-only and skipped with its reason.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchmarks import (
    CUDA,
    DEVICE,
    ROTATE,
    kernel_ms,
    measure,
    peak_memory_mb,
    rotating,
    synchronize,
)
from sra_kernels.fused import FUSE_PROJECTIONS_ENV_VAR

pvt = pytest.importorskip("pvt", reason="the pvt models package is not importable (yet)")

MODELS = ("pvt_v2_b0", "pvt_v2_b2", "pvt_small")
PRECISIONS = ("bf16-autocast", "fp32")
MODES = ("infer", "train")
PROVIDERS = {"sra_kernels": "triton", "sra_kernels_projected": "triton", "sdpa": "sdpa", "reference": "reference"}
GPU_IMAGE, GPU_BATCH = 224, 64
CPU_SMOKE = ("pvt_v2_b0", "fp32")
CPU_IMAGE, CPU_BATCH = 64, 1
NUM_CLASSES = 1000


def _skip_reason(model: str, precision: str, provider: str) -> str | None:
    if provider == "sra_kernels_projected" and precision != "bf16-autocast":
        return "sra_kernels_projected: the fused-projection path runs in fp16 / bf16 only"
    if CUDA:
        return None
    if provider.startswith("sra_kernels"):
        return "sra_kernels (triton) runs on CUDA only here: TRITON_INTERPRET is for tests, far too slow to time"
    if (model, precision) != CPU_SMOKE:
        return (f"GPU-only model row: the CPU run keeps one smoke configuration ({CPU_SMOKE[0]}, "
                f"{CPU_IMAGE}x{CPU_IMAGE}, batch {CPU_BATCH}, {CPU_SMOKE[1]})")
    return None


def _autocast(precision: str):
    return torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=precision == "bf16-autocast")


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("model", MODELS)
def test_model(model, precision, mode, provider, results, record, monkeypatch):
    reason = _skip_reason(model, precision, provider)
    if reason:
        results.skip(reason)
    if provider == "sra_kernels_projected":
        monkeypatch.setenv(FUSE_PROJECTIONS_ENV_VAR, "1")
    image, batch = (GPU_IMAGE, GPU_BATCH) if CUDA else (CPU_IMAGE, CPU_BATCH)
    torch.manual_seed(0)
    net = pvt.create_model(model, num_classes=NUM_CLASSES, backend=PROVIDERS[provider]).to(DEVICE)
    images = [torch.randn(batch, 3, image, image, device=DEVICE) for _ in range(ROTATE)]
    labels = [torch.randint(0, NUM_CLASSES, (batch,), device=DEVICE) for _ in range(ROTATE)]
    next_index = rotating(ROTATE)
    if mode == "infer":
        net.eval()

        def step():
            with torch.no_grad(), _autocast(precision):
                net(images[next_index()])
    else:
        net.train()
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-5)

        def step():
            i = next_index()
            with _autocast(precision):
                loss = F.cross_entropy(net(images[i]), labels[i])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: kernels compiled, optimizer state allocated
    synchronize()
    peak = peak_memory_mb(step)
    gpu_ms = kernel_ms(step)
    samples = measure(step)
    row = record(f"{model} {image}x{image} B{batch} {precision} {mode}", provider, samples, kind="model",
                 model=model, image=f"{image}x{image}", batch=batch, precision=precision, mode=mode,
                 peak_mem_mb=peak, gpu_ms=gpu_ms)
    row["images_per_s"] = batch / (row["median_ms"] / 1e3)
