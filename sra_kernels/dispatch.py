"""Backend choice for the SRA op: ``reference``, ``sdpa`` or ``triton``.

* ``reference`` -- the exact PVT math (:mod:`sra_kernels.reference`), the ground truth;
* ``sdpa`` -- the same math in its fastest pure-PyTorch form (Conv2d + LayerNorm +
  ``F.scaled_dot_product_attention``, as timm runs it);
* ``triton`` -- our fused kernels: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.

``auto`` resolves to ``$SRA_KERNELS_BACKEND`` when set, else ``triton`` for CUDA tensors (when
Triton is importable) and ``sdpa`` otherwise.
"""

from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("reference", "sdpa", "triton")
ENV_VAR = "SRA_KERNELS_BACKEND"


def interpreter_enabled() -> bool:
    """True when Triton kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
"""Looked up once: torch.compile (2.11) breaks the graph on ``find_spec``."""


def triton_unavailable_reason(device: torch.device) -> str | None:
    """Why the triton backend cannot run on ``device`` (None when it can)."""
    if not TRITON_INSTALLED:
        return "Triton is not installed (pip install triton; Linux only)"
    if device.type == "cuda" or (device.type == "cpu" and interpreter_enabled()):
        return None
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


def resolve_backend(backend: str, device: torch.device) -> str:
    """Turn a requested backend (or ``auto``) into one that runs on ``device``, or raise."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, one of {('auto',) + BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get(ENV_VAR, "").strip() or "auto"
        if backend == "auto":
            if device.type == "cuda" and TRITON_INSTALLED:
                return "triton"
            return "sdpa"
        source = f"the environment variable {ENV_VAR}"
    else:
        source = "backend"
    if backend not in BACKENDS:
        raise ValueError(f"{source} must be one of {('auto',) + BACKENDS}, got {backend!r}")
    if backend == "triton":
        reason = triton_unavailable_reason(device)
        if reason is not None:
            raise RuntimeError(f"backend 'triton' cannot run here: {reason}")
    return backend
