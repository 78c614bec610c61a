"""Argument checks of the public ops, run before any work.

Every failure raises ``TypeError`` (wrong kind of object) or ``ValueError`` (right kind, wrong
value) whose message names the argument, what was expected and what was given.
"""

from __future__ import annotations

import numbers

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
"""dtypes of x that the op accepts; the triton backend runs the first three."""

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
"""dtypes the Triton kernels take."""

KERNEL_MAX_HEAD_DIM = 128
"""Largest head_dim of the Triton attention kernels (PVT uses 64; larger tiles spill registers)."""

FUSED_PROJECTIONS_MAX_CHANNELS = 128
"""Widest x of the fused-projection kernels: one program keeps a (64, C) block of x and of the output on chip."""

FUSED_PROJECTIONS_DTYPES = (torch.float16, torch.bfloat16)
"""Where the fused-projection path runs: in fp32 the dots run on FMA units and its tiles spill
(tests/gpu_compile.py)."""

ONE_KERNEL_MAX_TOKENS = 64
"""sr = 1 over at most this many tokens: one block holds queries and keys, so k, v are projected in the kernel."""


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)} on {value.device}"
    return f"{value!r} ({type(value).__name__})"


def check_int(name: str, value, *, minimum: int, maximum: int | None = None) -> int:
    """An int (not a bool) in [minimum, maximum]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {_describe(value)}")
    value = int(value)
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def check_positive_float(name: str, value) -> float:
    """A finite real number > 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {_describe(value)}")
    if not (0 < float(value) < float("inf")):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return float(value)


def check_probability(name: str, value) -> float:
    """A real number in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {_describe(value)}")
    if not 0 <= float(value) < 1:
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return float(value)


def check_tokens(name: str, x, dtypes=SUPPORTED_DTYPES) -> torch.Tensor:
    """A 3-D floating-point tensor (B, L, C) of one of ``dtypes``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, N, C), got {_describe(x)}")
    if x.dim() != 3:
        raise ValueError(f"{name} must be 3-D (B, N, C), got shape {tuple(x.shape)}")
    if x.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name} must have dtype in ({names}), got {x.dtype}")
    if x.shape[-1] == 0:
        raise ValueError(f"{name} must have C >= 1 channels, got shape {tuple(x.shape)}")
    return x


def check_size(size, num_tokens: int) -> tuple[int, int]:
    """(H, W) of positive ints with H * W == N."""
    if not isinstance(size, (tuple, list, torch.Size)) or len(size) != 2:
        raise TypeError(f"size must be a pair (H, W), got {_describe(size)}")
    H = check_int("size[0] (H)", size[0], minimum=1)
    W = check_int("size[1] (W)", size[1], minimum=1)
    if H * W != num_tokens:
        raise ValueError(f"size (H, W) = ({H}, {W}) gives H*W = {H * W}, but x has N = {num_tokens} tokens")
    return H, W


def check_parameter(name: str, tensor, shape: tuple[int, ...], like: torch.Tensor, *, optional: bool):
    """A weight of the given shape (whose sizes are multiples of the channel count C of ``like``, (B, N, C)), dtype
    and device of ``like``; None allowed when optional. Under autocast any floating dtype passes: the op computes
    in autocast's dtype, as torch's Linear and Conv2d do."""
    if tensor is None:
        if optional:
            return None
        raise ValueError(f"{name} is required here (expected shape {shape}), got None")
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape}, got {_describe(tensor)}")
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} for x's C = {like.shape[-1]} channels (x has shape "
                         f"{tuple(like.shape)}), got {tuple(tensor.shape)}")
    if tensor.dtype != like.dtype and not (torch.is_autocast_enabled(like.device.type) and tensor.is_floating_point()):
        raise ValueError(f"{name} must have x's dtype {like.dtype}, got {tensor.dtype}")
    if tensor.device != like.device:
        raise ValueError(f"{name} must be on x's device {like.device}, got {tensor.device}")
    return tensor


def check_spatial_reduction_args(x, size, sr_weight, sr_bias, norm_weight, norm_bias, *, sr_ratio, linear, eps):
    """Checks of :func:`sra_kernels.spatial_reduce`'s arguments; returns (H, W, sr_ratio, eps)."""
    check_tokens("x", x)
    B, N, C = x.shape
    H, W = check_size(size, N)
    if not isinstance(linear, bool):
        raise TypeError(f"linear must be a bool, got {_describe(linear)}")
    # linear SRA pools to 7x7 whatever the grid: sr_ratio is unused there, so any ratio >= 1 passes
    sr_ratio = check_int("sr_ratio", sr_ratio, minimum=1)
    if not linear and sr_ratio > min(H, W):
        raise ValueError(f"sr_ratio must be at most min(H, W) = {min(H, W)}: the reduction's kernel and stride "
                         f"cannot exceed the image, size (H, W) = ({H}, {W}); got sr_ratio = {sr_ratio}")
    eps = check_positive_float("eps", eps)
    if linear or sr_ratio > 1:
        kernel = 1 if linear else sr_ratio
        check_parameter("sr_weight", sr_weight, (C, C, kernel, kernel), x, optional=False)
        check_parameter("sr_bias", sr_bias, (C,), x, optional=True)
        check_parameter("norm_weight", norm_weight, (C,), x, optional=True)
        check_parameter("norm_bias", norm_bias, (C,), x, optional=True)
    else:
        given = [name for name, t in (("sr_weight", sr_weight), ("sr_bias", sr_bias), ("norm_weight", norm_weight),
                                      ("norm_bias", norm_bias)) if t is not None]
        if given:
            raise ValueError(f"{', '.join(given)} must be None with sr_ratio 1 and linear=False (no reduction: keys "
                             "and values come from x itself), got a tensor")
    return H, W, sr_ratio, eps


def check_sra_args(x, size, q_weight, q_bias, kv_weight, kv_bias, proj_weight, proj_bias,
                   sr_weight, sr_bias, norm_weight, norm_bias, *, num_heads, sr_ratio, linear, eps, scale):
    """Checks of :func:`sra_kernels.sra_attention`'s arguments before any work is done."""
    H, W, sr_ratio, eps = check_spatial_reduction_args(
        x, size, sr_weight, sr_bias, norm_weight, norm_bias, sr_ratio=sr_ratio, linear=linear, eps=eps
    )
    C = x.shape[-1]
    num_heads = check_int("num_heads", num_heads, minimum=1)
    if C % num_heads:
        raise ValueError(f"num_heads must divide the channel count C = {C}, got num_heads = {num_heads}")
    check_parameter("q_weight", q_weight, (C, C), x, optional=False)
    check_parameter("q_bias", q_bias, (C,), x, optional=True)
    check_parameter("kv_weight", kv_weight, (2 * C, C), x, optional=False)
    check_parameter("kv_bias", kv_bias, (2 * C,), x, optional=True)
    check_parameter("proj_weight", proj_weight, (C, C), x, optional=False)
    check_parameter("proj_bias", proj_bias, (C,), x, optional=True)
    if scale is not None:
        scale = check_positive_float("scale", scale)
    return (H, W), num_heads, sr_ratio, eps, scale


def check_attention_args(q, k, v, scale):
    """Checks of :func:`sra_kernels.reduced_kv_attention`: q (B, N, h, d), k and v (B, M, h, d)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape (B, L, heads, head_dim), got {_describe(t)}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, L, heads, head_dim), got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name} must share q's dtype {q.dtype} and device {q.device}, got {t.dtype} on {t.device}")
    B, N, h, d = q.shape
    if k.shape[0] != B or k.shape[2:] != (h, d):
        raise ValueError(f"k must have shape (B={B}, M, heads={h}, head_dim={d}), got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if k.shape[1] == 0 and N > 0:
        raise ValueError("k and v must hold at least one key (M >= 1), got M = 0")
    if scale is not None:
        scale = check_positive_float("scale", scale)
    return scale
