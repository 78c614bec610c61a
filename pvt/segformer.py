"""SegFormer (Xie et al., 2021): the MiT encoder and the all-MLP decode head, with the official names.

State-dict keys are those of the official mmseg code (NVlabs/SegFormer): ``backbone.`` + the MiT keys of
:class:`pvt.models.MixVisionTransformer`, ``decode_head.linear_c{i}.proj``, ``decode_head.linear_fuse.conv``
/ ``.bn`` and ``decode_head.linear_pred``. Hugging Face ``SegformerForSemanticSegmentation`` state dicts
load through :func:`pvt.load_state_dict`.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .layers import init_weights
from .models import MixVisionTransformer


class MLP(nn.Module):
    """Per-stage linear embedding: map (B, C, H, W) -> (B, D, H, W) through one Linear ``proj``."""

    def __init__(self, in_dim: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Linear(in_dim, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvBNReLU(nn.Module):
    """mmcv's ConvModule as SegFormer uses it: 1x1 Conv2d (no bias) ``conv``, BatchNorm2d ``bn``, ReLU."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.activate = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.bn(self.conv(x)))


class SegFormerHead(nn.Module):
    """The all-MLP decoder: each stage map -> D channels (``linear_c{i}``), bilinear upsampling to stage 1's
    grid, concatenation from stage 4 down to stage 1, ``linear_fuse`` (1x1 conv + BN + ReLU), dropout and the
    1x1 classifier ``linear_pred`` (absent with ``num_classes=0``: the fused (B, D, H_1, W_1) map is returned).

    forward: four maps (B, C_i, H_i, W_i) -> (B, num_classes, H_1, W_1).
    """

    def __init__(self, in_channels, embed_dim: int, num_classes: int, dropout: float = 0.1):
        super().__init__()
        for i, channels in enumerate(in_channels):
            setattr(self, f"linear_c{i + 1}", MLP(channels, embed_dim))
        self.linear_fuse = ConvBNReLU(embed_dim * len(in_channels), embed_dim)
        self.dropout = nn.Dropout(dropout)
        self.linear_pred = nn.Conv2d(embed_dim, num_classes, kernel_size=1) if num_classes > 0 else nn.Identity()

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        size = features[0].shape[2:]
        maps = [getattr(self, f"linear_c{i + 1}")(x) for i, x in enumerate(features)]
        maps = [maps[0]] + [F.interpolate(x, size=size, mode="bilinear", align_corners=False) for x in maps[1:]]
        return self.linear_pred(self.dropout(self.linear_fuse(torch.cat(maps[::-1], dim=1))))


class SegFormer(nn.Module):
    """SegFormer: a :class:`~pvt.models.MixVisionTransformer` ``backbone`` and a :class:`SegFormerHead`
    ``decode_head`` of width ``decoder_dim`` (256 for B0/B1, 768 for B2-B5 in the official configurations).

    ``forward(x)``: (B, 3, H, W) -> logits (B, num_classes, ceil(H / 4), ceil(W / 4)), at stage 1's
    resolution as the official model (upsample them to the image size for per-pixel labels).
    ``forward_features(x)``: the backbone's four stage maps. Other arguments go to the backbone.
    """

    def __init__(self, num_classes: int = 150, decoder_dim: int = 256, decoder_dropout: float = 0.1,
                 backend: str = "auto", **backbone_kwargs):
        super().__init__()
        self.num_classes = num_classes
        self.backbone = MixVisionTransformer(backend=backend, **backbone_kwargs)
        self.decode_head = SegFormerHead(self.backbone.embed_dims, decoder_dim, num_classes, decoder_dropout)
        self.decode_head.apply(partial(init_weights, conv_fan_out=True))

    @property
    def backend(self) -> str:
        return self.backbone.backend

    def configure_attention(self, **options) -> None:
        """See :meth:`pvt.models.PyramidVisionTransformerV2.configure_attention`."""
        self.backbone.configure_attention(**options)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint the encoder's blocks (see :meth:`pvt.models.PyramidVisionTransformerV2.set_grad_checkpointing`;
        the decode head, a few wide maps, keeps its activations)."""
        self.backbone.set_grad_checkpointing(enable)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) -> [(B, C_i, H_i, W_i)] for i = 1..4."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> logits (B, num_classes, H_1, W_1), H_1 = ceil(H / 4)."""
        return self.decode_head(self.forward_features(x))
