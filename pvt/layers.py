"""Building blocks of PVT v1/v2 and SegFormer MiT, with the official parameter names.

Tokens are (B, N, C) with N = H * W in row-major order; stage maps are (B, C, H, W). Every
attention is :class:`sra_kernels.SpatialReductionAttention`.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from sra_kernels import SpatialReductionAttention

BLOCK_NORM_EPS = 1e-6
"""eps of the block and stage LayerNorms (``partial(nn.LayerNorm, eps=1e-6)`` in the official code).
The patch-embedding LayerNorm and the attention's ``norm`` stay at PyTorch's default 1e-5 (:data:`NORM_EPS`)."""
NORM_EPS = 1e-5
"""eps of the official patch-embedding and spatial-reduction LayerNorms (``nn.LayerNorm``'s default)."""


def init_weights(module: nn.Module, *, conv_fan_out: bool) -> None:
    """The official initialisation of one module (use with ``model.apply``).

    Linear: trunc_normal(std=.02), bias 0; LayerNorm: weight 1, bias 0; Conv2d: normal(0,
    sqrt(2 / fan_out)), bias 0 when ``conv_fan_out`` (PVT v2, MiT), else PyTorch's default (PVT v1).
    """
    if isinstance(module, nn.Conv2d) and not conv_fan_out:
        module.reset_parameters()
    else:
        SpatialReductionAttention.init_weights(module)


def tokens_to_map(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Tokens (B, H*W, C) -> contiguous map (B, C, H, W)."""
    B, _, C = x.shape
    return x.reshape(B, size[0], size[1], C).permute(0, 3, 1, 2).contiguous()


def resize_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """PVT v1's position-embedding resize: (1, gh*gw, C) on grid (gh, gw) -> (1, H*W, C).

    Bilinear, align_corners=False, as the official ``_get_pos_embed``; returned as is when the
    grid already has the requested size.
    """
    if tuple(grid) == tuple(size):
        return pos_embed
    C = pos_embed.shape[-1]
    image = pos_embed.reshape(1, grid[0], grid[1], C).permute(0, 3, 1, 2)
    image = F.interpolate(image, size=tuple(size), mode="bilinear", align_corners=False)
    return image.reshape(1, C, size[0] * size[1]).permute(0, 2, 1)


class DropPath(nn.Module):
    """Stochastic depth: zero whole samples with probability ``drop_prob`` while training."""

    def __init__(self, drop_prob: float):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask.div_(keep) if keep > 0.0 else x * mask

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


class _ConvEmbed(nn.Module):
    """A conv ``proj`` then a LayerNorm ``norm`` over the flattened tokens (the official names)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, C_in, H_in, W_in) -> tokens (B, H*W, C) and (H, W)."""
        x = self.proj(x)
        size = (x.shape[2], x.shape[3])
        if torch.jit.is_tracing():  # it records sizes as tensors; the attention takes ints: a fixed grid
            size = (int(size[0]), int(size[1]))
        return self.norm(x.flatten(2).transpose(1, 2)), size


class PatchEmbed(_ConvEmbed):
    """PVT v1's non-overlapping patch embedding: Conv2d(kernel=stride=patch) + LayerNorm.

    ``grid`` = img_size // patch_size is the token grid its position embedding is stored on.
    forward: (B, C_in, H_in, W_in) -> tokens (B, H*W, C), (H, W) with H = H_in // patch (floor).
    """

    def __init__(self, img_size: tuple[int, int], patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.grid = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.num_patches = self.grid[0] * self.grid[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)


class OverlapPatchEmbed(_ConvEmbed):
    """PVT v2 / MiT overlapping patch embedding: Conv2d(patch, stride, padding=patch // 2) + LayerNorm.

    forward: (B, C_in, H_in, W_in) -> tokens (B, H*W, C), (H, W) with H = ceil(H_in / stride)
    for odd patch sizes, so any input size works.
    """

    def __init__(self, patch_size: int, stride: int, in_chans: int, embed_dim: int, norm_eps: float = NORM_EPS):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride,
                              padding=patch_size // 2)
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)


class DWConv(nn.Module):
    """Depth-wise 3x3 conv on tokens: (B, H*W, C) -> (B, H*W, C)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        B, N, C = x.shape
        x = self.dwconv(x.transpose(1, 2).reshape(B, C, H, W))
        return x.flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    """fc1 -> [ReLU if linear] -> [DWConv if dwconv] -> GELU -> drop -> fc2 -> drop.

    v1: dwconv=False; v2 / MiT: dwconv=True; v2 linear (b2_li): also linear=True.
    forward: (B, H*W, C) -> (B, H*W, C); H and W are used by the DWConv only.
    """

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0,
                 dwconv: bool = True, linear: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.relu = nn.ReLU(inplace=True) if linear else None
        self.dwconv = DWConv(hidden_features) if dwconv else None
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        x = self.fc1(x)
        if self.relu is not None:
            x = self.relu(x)
        if self.dwconv is not None:
            x = self.dwconv(x, H, W)
        x = self.drop(self.act(x))
        return self.drop(self.fc2(x))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)).

    forward(x (B, N, C), H, W) -> (B, N, C); N = H * W (see the cls-token note in PVT v1).
    ``norm_eps``: norm1 and norm2; ``sr_norm_eps``: the attention's reduction LayerNorm.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool = True,
                 qk_scale: float | None = None, drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0, sr_ratio: int = 1, linear: bool = False, dwconv: bool = True,
                 backend: str = "auto", norm_eps: float = BLOCK_NORM_EPS, sr_norm_eps: float = NORM_EPS):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = SpatialReductionAttention(
            dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale, attn_drop=attn_drop,
            proj_drop=drop, sr_ratio=sr_ratio, linear=linear, norm_eps=sr_norm_eps, backend=backend)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop, dwconv=dwconv, linear=linear)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), H, W))
        return x + self.drop_path(self.mlp(self.norm2(x), H, W))
