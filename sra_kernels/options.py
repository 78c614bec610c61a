"""The options of an SRA call, and their defaults, read from the environment once at import.

Every option is an argument of :func:`sra_kernels.sra_attention` and of
:class:`sra_kernels.SpatialReductionAttention`; ``None`` there means the default below. The
environment sets the defaults only, and only when ``sra_kernels`` is imported: nothing reads it
inside a call, so a traced (``torch.compile``) call sees exactly the arguments it was given.

| variable | default of | values |
|---|---|---|
| ``SRA_KERNELS_BACKEND`` | ``backend`` | auto, reference, sdpa, triton |
| ``SRA_KERNELS_FUSE_PROJECTIONS`` | ``fuse_projections`` | 1 (on where it applies), 0 (off); unset: the policy |
| ``SRA_KERNELS_ATOMIC_BACKWARD`` | ``deterministic`` | 1: fp32 atomics (not bit-reproducible); unset, 0: fixed order |
| ``SRA_KERNELS_AUTOTUNE`` | ``autotune`` | 1: time the candidate paths on the first call of each shape |
| ``SRA_KERNELS_AUTOTUNE_CACHE`` | the autotune cache file | a JSON path; unset: in memory only |
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import NamedTuple

import torch

BACKENDS = ("reference", "sdpa", "triton")
"""What ``backend=`` may name besides ``auto``."""

ENV_BACKEND = "SRA_KERNELS_BACKEND"
ENV_FUSE_PROJECTIONS = "SRA_KERNELS_FUSE_PROJECTIONS"
ENV_ATOMIC_BACKWARD = "SRA_KERNELS_ATOMIC_BACKWARD"
ENV_AUTOTUNE = "SRA_KERNELS_AUTOTUNE"
ENV_AUTOTUNE_CACHE = "SRA_KERNELS_AUTOTUNE_CACHE"


class Options(NamedTuple):
    """How a call may run, beyond its backend.

    fuse_projections: True runs the fused-projection path wherever it applies (C <= 128, fp16 / bf16),
        False never; None lets the policy choose (see :mod:`sra_kernels.plan`).
    deterministic: the attention backward sums its dK/dV partials in a fixed order (bit-reproducible);
        False adds them with fp32 atomics (less memory, order-dependent rounding).
    autotune: time the candidate paths on the first call of each new (shape, dtype, device, grad mode)
        and keep the fastest (see :mod:`sra_kernels.autotune`).
    """

    fuse_projections: bool | None = None
    deterministic: bool = True
    autotune: bool = False


class Defaults(NamedTuple):
    """The defaults of the call arguments; ``backend`` as given (checked where it is used)."""

    backend: str = "auto"
    options: Options = Options()
    autotune_cache: str | None = None
    source: str = "built-in"
    """Where ``backend`` came from, for error messages."""


def check_backend_name(backend) -> str:
    """``backend`` if it is ``auto`` or one of :data:`BACKENDS`, else a TypeError / ValueError naming it."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, one of {('auto',) + BACKENDS}, got {backend!r}")
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
    return backend


def _flag(environ: Mapping[str, str], name: str) -> bool | None:
    value = environ.get(name, "").strip()
    if value == "":
        return None
    if value not in ("0", "1"):
        raise ValueError(f"the environment variable {name} must be 0 or 1, got {value!r}")
    return value == "1"


def from_environment(environ: Mapping[str, str] = os.environ) -> Defaults:
    """The defaults that ``environ`` sets (see the module docstring)."""
    backend = environ.get(ENV_BACKEND, "").strip()
    atomic = _flag(environ, ENV_ATOMIC_BACKWARD)
    options = Options(fuse_projections=_flag(environ, ENV_FUSE_PROJECTIONS), deterministic=not atomic,
                      autotune=bool(_flag(environ, ENV_AUTOTUNE)))
    return Defaults(backend or "auto", options, environ.get(ENV_AUTOTUNE_CACHE) or None,
                    f"the environment variable {ENV_BACKEND}" if backend else "built-in")


DEFAULTS = from_environment()
"""Read once, when sra_kernels is imported."""


def resolve(fuse_projections: bool | None, deterministic: bool | None, autotune: bool | None,
            defaults: Defaults) -> Options:
    """The call's options: each argument, or its default where it is None."""
    for name, value in (("fuse_projections", fuse_projections), ("deterministic", deterministic),
                        ("autotune", autotune)):
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool or None, got {value!r} ({type(value).__name__})")
    base = defaults.options
    deterministic = base.deterministic if deterministic is None else deterministic
    if not deterministic and torch.are_deterministic_algorithms_enabled():
        deterministic = _deterministic_anyway()
    return Options(base.fuse_projections if fuse_projections is None else fuse_projections, deterministic,
                   base.autotune if autotune is None else autotune)


def _deterministic_anyway() -> bool:
    """deterministic=False (or SRA_KERNELS_ATOMIC_BACKWARD=1) under ``torch.use_deterministic_algorithms(True)``:
    an error, as PyTorch raises for its own nondeterministic ops; with ``warn_only=True`` a warning, and the
    deterministic backward runs."""
    message = ("deterministic=False (fp32-atomic dK/dV, or SRA_KERNELS_ATOMIC_BACKWARD=1) contradicts "
               "torch.use_deterministic_algorithms(True): pass deterministic=True (the default)")
    if not torch.is_deterministic_algorithms_warn_only_enabled():
        raise RuntimeError(message)
    warnings.warn(message + "; running the deterministic backward", stacklevel=4)
    return True
