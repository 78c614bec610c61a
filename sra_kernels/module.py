"""``SpatialReductionAttention``: PVT's Attention module on top of :func:`sra_attention`."""

from __future__ import annotations

import math

import torch
from torch import nn

from .functional import sra_attention
from .options import check_backend_name
from .reference import LINEAR_POOL_SIZE
from .validation import check_int


class SpatialReductionAttention(nn.Module):
    """Drop-in replacement of the official PVT v1/v2 ``Attention`` (and SegFormer's).

    Parameters keep the official names -- ``q``, ``kv``, ``proj``, ``sr``, ``norm`` (and the
    parameter-free ``pool``/``act`` in linear mode) -- so official and timm state dicts load with
    ``strict=True``. ``forward(x, H, W)`` maps tokens (B, N=H*W, C) to (B, N, C). The ``sr`` conv weight is
    kept ``torch.channels_last``, which the reduction kernels read in place.

    ``backend``, ``fuse_projections``, ``deterministic`` and ``autotune`` are :func:`sra_attention`'s options,
    kept as attributes (change them at any time; a torch.compile'd module recompiles for the new value).
    Attention dropout (``attn_drop > 0``) while training runs the ``sdpa`` path, whose fused attention
    applies it.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_scale: float | None = None,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, sr_ratio: int = 1, linear: bool = False,
                 norm_eps: float = 1e-5, backend: str = "auto", fuse_projections: bool | None = None,
                 deterministic: bool | None = None, autotune: bool | None = None):
        super().__init__()
        dim = check_int("dim", dim, minimum=1)
        num_heads = check_int("num_heads", num_heads, minimum=1)
        if dim % num_heads != 0:
            raise ValueError(f"num_heads must divide dim, got dim={dim}, num_heads={num_heads}")
        sr_ratio = check_int("sr_ratio", sr_ratio, minimum=1)
        if not isinstance(linear, bool):
            raise TypeError(f"linear must be a bool, got {linear!r}")
        self.configure(backend=backend, fuse_projections=fuse_projections, deterministic=deterministic,
                       autotune=autotune)
        self.dim = dim
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.linear = linear
        self.sr_ratio = sr_ratio
        self.norm_eps = norm_eps
        if linear:
            self.pool = nn.AdaptiveAvgPool2d(LINEAR_POOL_SIZE)
            self.sr = nn.Conv2d(dim, dim, kernel_size=1, stride=1)
            self.norm = nn.LayerNorm(dim, eps=norm_eps)
            self.act = nn.GELU()
        elif sr_ratio > 1:
            # channels_last: the layout the reduction kernels read in place (no per-call copy of the weight);
            # load_state_dict, optimizers and .to(dtype / device) keep it
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio).to(memory_format=torch.channels_last)
            self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.apply(self.init_weights)

    @staticmethod
    def init_weights(m: nn.Module) -> None:
        """The official PVTv2 initialisation of one module (use with ``module.apply``): Linear
        trunc_normal(std=.02) and bias 0; LayerNorm 1 / 0; Conv2d normal(0, sqrt(2 / fan_out)), bias 0."""
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            m.weight.data.normal_(0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                m.bias.data.zero_()

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """x (B, H*W, C) -> (B, H*W, C)."""
        reduces = self.linear or self.sr_ratio > 1
        sr = self.sr if reduces else None
        norm = self.norm if reduces else None
        args = (
            x, (H, W), self.q.weight, self.q.bias, self.kv.weight, self.kv.bias,
            self.proj.weight, self.proj.bias,
            None if sr is None else sr.weight, None if sr is None else sr.bias,
            None if norm is None else norm.weight, None if norm is None else norm.bias,
        )
        out = sra_attention(
            *args, num_heads=self.num_heads, sr_ratio=self.sr_ratio, linear=self.linear,
            eps=self.norm_eps if norm is None else norm.eps, scale=self.scale,
            dropout_p=self.attn_drop.p if self.training else 0.0, backend=self.backend,
            fuse_projections=self.fuse_projections, deterministic=self.deterministic, autotune=self.autotune)
        return self.proj_drop(out)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, sr_ratio={self.sr_ratio}, "
                f"linear={self.linear}, backend={self.backend!r}")

    def configure(self, **options) -> None:
        """Set any of ``backend``, ``fuse_projections``, ``deterministic``, ``autotune`` (see :func:`sra_attention`)."""
        for name, value in options.items():
            if name not in ATTENTION_OPTIONS:
                raise TypeError(f"unknown attention option {name!r}; options: {', '.join(ATTENTION_OPTIONS)}")
            if name == "backend":
                check_backend_name(value)
            elif value is not None and not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool or None, got {value!r}")
            setattr(self, name, value)


ATTENTION_OPTIONS = ("backend", "fuse_projections", "deterministic", "autotune")
"""What :meth:`SpatialReductionAttention.configure` sets."""
