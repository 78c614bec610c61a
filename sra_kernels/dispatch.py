"""Which backends run where: ``reference`` and ``sdpa`` everywhere; ``triton`` (our fused kernels) on CUDA
tensors, or on CPU tensors under ``TRITON_INTERPRET=1``. Which one a call takes is :mod:`sra_kernels.plan`'s
business."""

from __future__ import annotations

import importlib.util
import os

import torch


def interpreter_enabled() -> bool:
    """True when Triton kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
"""Looked up once: torch.compile (2.11) breaks the graph on ``find_spec``."""

KERNELS_INTERPRETED = interpreter_enabled()
"""Whether the kernels were made for Triton's interpreter: ``TRITON_INTERPRET`` when sra_kernels was imported
(``@triton.jit`` reads it when the kernels are defined)."""


def triton_unavailable_reason(device: torch.device) -> str | None:
    """Why the triton backend cannot run on ``device`` (None when it can)."""
    if not TRITON_INSTALLED:
        return "Triton is not installed (pip install triton; Linux only)"
    if device.type == "cuda" or (device.type == "cpu" and interpreter_enabled() and KERNELS_INTERPRETED):
        return None
    if device.type == "cpu" and interpreter_enabled():
        return ("TRITON_INTERPRET=1 was set after sra_kernels was imported, so its kernels were built for GPUs: "
                "set it before the import (slow; meant for tests), or move the tensors to a CUDA device")
    if device.type == "cpu":
        return ("the triton backend runs CPU tensors only in Triton's interpreter: set TRITON_INTERPRET=1 "
                "before importing sra_kernels (slow; meant for tests), or move the tensors to a CUDA device")
    return f"the triton backend supports CUDA devices (and CPU under TRITON_INTERPRET=1), got {device.type}"


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """The backends that run on ``device`` (default: CUDA when present, else CPU)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    backends = ["reference", "sdpa"]
    if triton_unavailable_reason(device) is None:
        backends.append("triton")
    return backends
