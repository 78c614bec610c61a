"""PVT v1, PVT v2 and SegFormer's Mix Transformer (MiT), with the official module names.

State-dict keys are those of the official code (whai362/PVT classification/pvt.py and pvt_v2.py,
NVlabs/SegFormer mix_transformer.py): ``patch_embed{i}``, ``block{i}.{j}``, ``norm{i}`` (v2, MiT)
or ``norm`` (v1), ``pos_embed{i}`` and ``cls_token`` (v1), ``head``.

* ``forward_features(x)``: (B, 3, H, W) -> four stage maps (B, C_i, H_i, W_i), like the official
  detection / segmentation backbones (PVT v1's is the detection one: no cls token, no final norm).
* ``forward(x)``: (B, 3, H, W) -> logits (B, num_classes); MiT returns the stage maps, as SegFormer.
* ``set_grad_checkpointing(True)`` (timm's name): every block recomputes its activations in the backward
  instead of keeping them (``torch.utils.checkpoint``, non-reentrant): less training memory, one more forward.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from sra_kernels import SpatialReductionAttention

from .layers import (
    BLOCK_NORM_EPS, NORM_EPS, Block, OverlapPatchEmbed, PatchEmbed, init_weights, resize_pos_embed, tokens_to_map,
)

NUM_STAGES = 4


def _pair(size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


class _PyramidBase(nn.Module):
    """What every family shares: the four stages of blocks with the stochastic-depth schedule."""

    def _make_blocks(self, *, embed_dims, num_heads, mlp_ratios, depths, sr_ratios, drop_path_rate,
                     **block_kwargs) -> None:
        """Set ``block{i}`` (i = 1..4) to ModuleLists; drop path grows as linspace(0, rate, sum(depths))."""
        if not all(len(v) == NUM_STAGES for v in (embed_dims, num_heads, mlp_ratios, depths, sr_ratios)):
            raise ValueError("embed_dims, num_heads, mlp_ratios, depths and sr_ratios need one value per stage (4)")
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        cur = 0
        for i in range(NUM_STAGES):
            setattr(self, f"block{i + 1}", nn.ModuleList(
                Block(embed_dims[i], num_heads[i], mlp_ratios[i], drop_path=dpr[cur + j], sr_ratio=sr_ratios[i],
                      **block_kwargs)
                for j in range(depths[i])))
            cur += depths[i]
        self.embed_dims = tuple(embed_dims)
        self.depths = tuple(depths)
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward instead of saving them (while gradients are
        recorded): the saved activations of a training step shrink to each block's input, at the cost of a
        second forward of every block. Outputs and gradients are unchanged (dropout and drop path replay the
        same random numbers)."""
        self.grad_checkpointing = bool(enable)

    def _blocks(self, i: int, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """Stage i's (0-based) blocks over tokens (B, N, C) of an H x W grid, checkpointed when enabled."""
        checkpointing = self.grad_checkpointing and torch.is_grad_enabled()
        for blk in getattr(self, f"block{i + 1}"):
            x = checkpoint(blk, x, H, W, use_reentrant=False) if checkpointing else blk(x, H, W)
        return x

    def configure_attention(self, **options) -> None:
        """Set options of every attention: ``backend`` (auto | reference | sdpa | triton), ``fuse_projections``,
        ``deterministic``, ``autotune`` (see :func:`sra_kernels.sra_attention`)."""
        for module in self.modules():
            if isinstance(module, SpatialReductionAttention):
                module.configure(**options)
        self.backend = options.get("backend", self.backend)


class PyramidVisionTransformer(_PyramidBase):
    """PVT v1: non-overlapping patch embeddings, learned position embeddings per stage, cls token in stage 4.

    Position embeddings live on the grid of ``img_size`` and are resized bilinearly for other input
    sizes; a classifier reads the cls token after the final norm.
    """

    def __init__(self, img_size=224, patch_size: int = 4, in_chans: int = 3, num_classes: int = 1000,
                 embed_dims=(64, 128, 256, 512), num_heads=(1, 2, 4, 8), mlp_ratios=(4, 4, 4, 4),
                 qkv_bias: bool = False, qk_scale: float | None = None, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0, depths=(3, 4, 6, 3),
                 sr_ratios=(8, 4, 2, 1), backend: str = "auto"):
        super().__init__()
        if sr_ratios[-1] != 1:
            raise ValueError(f"PVT v1's last stage holds the cls token and needs sr_ratio 1, got {sr_ratios[-1]}")
        img_size = _pair(img_size)
        self.num_classes = num_classes
        self.backend = backend
        for i in range(NUM_STAGES):
            stage_size = img_size if i == 0 else (img_size[0] // 2 ** (i + 1), img_size[1] // 2 ** (i + 1))
            patch_embed = PatchEmbed(stage_size, patch_size if i == 0 else 2,
                                     in_chans if i == 0 else embed_dims[i - 1], embed_dims[i])
            extra = 1 if i == NUM_STAGES - 1 else 0
            setattr(self, f"patch_embed{i + 1}", patch_embed)
            setattr(self, f"pos_embed{i + 1}", nn.Parameter(torch.zeros(1, patch_embed.num_patches + extra,
                                                                        embed_dims[i])))
            setattr(self, f"pos_drop{i + 1}", nn.Dropout(drop_rate))
        self._make_blocks(embed_dims=embed_dims, num_heads=num_heads, mlp_ratios=mlp_ratios, depths=depths,
                          sr_ratios=sr_ratios, drop_path_rate=drop_path_rate, qkv_bias=qkv_bias,
                          qk_scale=qk_scale, drop=drop_rate, attn_drop=attn_drop_rate, dwconv=False,
                          backend=backend)
        self.norm = nn.LayerNorm(embed_dims[-1], eps=BLOCK_NORM_EPS)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dims[-1]))
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()

        for i in range(NUM_STAGES):
            nn.init.trunc_normal_(getattr(self, f"pos_embed{i + 1}"), std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(partial(init_weights, conv_fan_out=False))

    def _stage(self, i: int, x: torch.Tensor, with_cls: bool = False) -> tuple[torch.Tensor, tuple[int, int]]:
        """Stage i (0-based): map (B, C_in, H_in, W_in) -> tokens (B, [1 +] H*W, C_i), (H, W)."""
        patch_embed = getattr(self, f"patch_embed{i + 1}")
        pos_embed = getattr(self, f"pos_embed{i + 1}")
        x, size = patch_embed(x)
        if i == NUM_STAGES - 1:
            cls_pos, pos_embed = pos_embed[:, :1], pos_embed[:, 1:]
        pos_embed = resize_pos_embed(pos_embed, patch_embed.grid, size)
        block_size = size
        if with_cls:
            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
            pos_embed = torch.cat((cls_pos, pos_embed), dim=1)
            # The cls token makes N = H*W + 1: that stage has sr_ratio 1 and a plain Mlp, so nothing
            # reads the grid and the attention sees the tokens as a 1 x N sequence.
            block_size = (1, x.shape[1])
        x = getattr(self, f"pos_drop{i + 1}")(x + pos_embed)
        return self._blocks(i, x, *block_size), size

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) -> [(B, C_i, H_i, W_i)] for i = 1..4, as the official detection backbone."""
        outs = []
        for i in range(NUM_STAGES):
            x = tokens_to_map(*self._stage(i, x))
            outs.append(x)
        return outs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> logits (B, num_classes) from the cls token after the final norm."""
        for i in range(NUM_STAGES - 1):
            x = tokens_to_map(*self._stage(i, x))
        x, _ = self._stage(NUM_STAGES - 1, x, with_cls=True)
        return self.head(self.norm(x)[:, 0])


class PyramidVisionTransformerV2(_PyramidBase):
    """PVT v2: overlapping patch embeddings (7x7/4, then 3x3/2), no position embeddings, DWConv in
    every Mlp, a LayerNorm after each stage; ``linear=True`` gives the linear SRA (b2_li).
    The classifier reads the mean of the final stage's tokens. ``img_size`` is accepted and unused,
    as in the official code: any input size works. The LayerNorm eps default to the official ones:
    ``norm_eps`` (block and stage norms) 1e-6, ``patch_norm_eps`` and ``sr_norm_eps`` (the attention's) 1e-5;
    other sources use others (see :func:`pvt.checkpoints.hf_norm_eps`)."""

    def __init__(self, img_size=None, in_chans: int = 3, num_classes: int = 1000, embed_dims=(64, 128, 256, 512),
                 num_heads=(1, 2, 4, 8), mlp_ratios=(4, 4, 4, 4), qkv_bias: bool = False,
                 qk_scale: float | None = None, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, depths=(3, 4, 6, 3), sr_ratios=(8, 4, 2, 1), linear: bool = False,
                 backend: str = "auto", norm_eps: float = BLOCK_NORM_EPS, patch_norm_eps: float = NORM_EPS,
                 sr_norm_eps: float = NORM_EPS):
        super().__init__()
        del img_size
        self.num_classes = num_classes
        self.backend = backend
        for i in range(NUM_STAGES):
            setattr(self, f"patch_embed{i + 1}", OverlapPatchEmbed(
                7 if i == 0 else 3, 4 if i == 0 else 2, in_chans if i == 0 else embed_dims[i - 1], embed_dims[i],
                norm_eps=patch_norm_eps))
            setattr(self, f"norm{i + 1}", nn.LayerNorm(embed_dims[i], eps=norm_eps))
        self._make_blocks(embed_dims=embed_dims, num_heads=num_heads, mlp_ratios=mlp_ratios, depths=depths,
                          sr_ratios=sr_ratios, drop_path_rate=drop_path_rate, qkv_bias=qkv_bias,
                          qk_scale=qk_scale, drop=drop_rate, attn_drop=attn_drop_rate, linear=linear,
                          dwconv=True, backend=backend, norm_eps=norm_eps, sr_norm_eps=sr_norm_eps)
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(partial(init_weights, conv_fan_out=True))

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) -> [(B, C_i, H_i, W_i)] for i = 1..4, each after its stage norm."""
        outs = []
        for i in range(NUM_STAGES):
            x, (H, W) = getattr(self, f"patch_embed{i + 1}")(x)
            x = self._blocks(i, x, H, W)
            x = tokens_to_map(getattr(self, f"norm{i + 1}")(x), (H, W))
            outs.append(x)
        return outs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> logits (B, num_classes) from the mean over the final stage's tokens."""
        return self.head(self.forward_features(x)[-1].mean(dim=(2, 3)))


class MixVisionTransformer(PyramidVisionTransformerV2):
    """SegFormer's MiT encoder: PVT v2's blocks without a classifier; forward returns the stage maps."""

    def __init__(self, num_classes: int = 0, **kwargs):
        del num_classes  # a feature backbone: SegFormer's MiT has no classifier
        super().__init__(num_classes=0, **kwargs)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) -> [(B, C_i, H_i, W_i)] for i = 1..4."""
        return self.forward_features(x)
