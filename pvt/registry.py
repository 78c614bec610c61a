"""Model names -> the official configurations (PVT v1 / v2, MiT, SegFormer), and :func:`create_model`."""

from __future__ import annotations

import os

from torch import nn

from sra_kernels.shapes import MODEL_STAGES

from .checkpoints import load_checkpoint
from .models import MixVisionTransformer, PyramidVisionTransformer, PyramidVisionTransformerV2
from .segformer import SegFormer

_RATIOS_8844 = dict(mlp_ratios=(8, 8, 4, 4))
_RATIOS_4444 = dict(mlp_ratios=(4, 4, 4, 4))
_MIT = dict(**_RATIOS_4444, drop_path_rate=0.1)

_FAMILIES: dict[str, tuple[type[nn.Module], dict]] = {
    # PVT v1 (whai362/PVT classification/pvt.py)
    "pvt_tiny": (PyramidVisionTransformer, {**_RATIOS_8844, "patch_size": 4, "depths": (2, 2, 2, 2)}),
    "pvt_small": (PyramidVisionTransformer, {**_RATIOS_8844, "patch_size": 4, "depths": (3, 4, 6, 3)}),
    "pvt_medium": (PyramidVisionTransformer, {**_RATIOS_8844, "patch_size": 4, "depths": (3, 4, 18, 3)}),
    "pvt_large": (PyramidVisionTransformer, {**_RATIOS_8844, "patch_size": 4, "depths": (3, 8, 27, 3)}),
    # PVT v2 (classification/pvt_v2.py)
    "pvt_v2_b0": (PyramidVisionTransformerV2, {**_RATIOS_8844, "depths": (2, 2, 2, 2)}),
    "pvt_v2_b1": (PyramidVisionTransformerV2, {**_RATIOS_8844, "depths": (2, 2, 2, 2)}),
    "pvt_v2_b2": (PyramidVisionTransformerV2, {**_RATIOS_8844, "depths": (3, 4, 6, 3)}),
    "pvt_v2_b3": (PyramidVisionTransformerV2, {**_RATIOS_8844, "depths": (3, 4, 18, 3)}),
    "pvt_v2_b4": (PyramidVisionTransformerV2, {**_RATIOS_8844, "depths": (3, 8, 27, 3)}),
    "pvt_v2_b5": (PyramidVisionTransformerV2, {**_RATIOS_4444, "depths": (3, 6, 40, 3)}),
    "pvt_v2_b2_li": (PyramidVisionTransformerV2, {**_RATIOS_8844, "depths": (3, 4, 6, 3)}),
    # SegFormer MiT encoders (NVlabs/SegFormer mmseg/models/backbones/mix_transformer.py)
    "mit_b0": (MixVisionTransformer, {**_MIT, "depths": (2, 2, 2, 2)}),
    "mit_b1": (MixVisionTransformer, {**_MIT, "depths": (2, 2, 2, 2)}),
    "mit_b2": (MixVisionTransformer, {**_MIT, "depths": (3, 4, 6, 3)}),
    "mit_b3": (MixVisionTransformer, {**_MIT, "depths": (3, 4, 18, 3)}),
    "mit_b4": (MixVisionTransformer, {**_MIT, "depths": (3, 8, 27, 3)}),
    "mit_b5": (MixVisionTransformer, {**_MIT, "depths": (3, 6, 40, 3)}),
}


def _attention_config(name: str) -> dict:
    """The attention geometry of ``name`` from :data:`sra_kernels.shapes.MODEL_STAGES`, as constructor arguments."""
    stages = MODEL_STAGES[name]
    config = dict(embed_dims=stages.channels, num_heads=stages.heads, qkv_bias=True, sr_ratios=stages.sr_ratios)
    return {**config, "linear": True} if stages.linear else config


MODEL_CONFIGS: dict[str, tuple[type[nn.Module], dict]] = {
    name: (cls, {**_attention_config(name), **config}) for name, (cls, config) in _FAMILIES.items()}
"""Model name -> (class, constructor arguments): the official configurations."""
# SegFormer B0-B5 (NVlabs/SegFormer local_configs): the MiT encoder and a decoder 256 (B0, B1) or 768 wide
MODEL_CONFIGS.update({
    f"segformer_b{i}": (SegFormer, {**MODEL_CONFIGS[f"mit_b{i}"][1], "decoder_dim": 256 if i < 2 else 768})
    for i in range(6)})

DEFAULT_NUM_CLASSES = {SegFormer: 150}
"""Classes of a model built with ``num_classes=None``, by class: SegFormer's ADE20K; 1000 (ImageNet) otherwise."""


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`, sorted."""
    return sorted(MODEL_CONFIGS)


def create_model(name: str, num_classes: int | None = None, pretrained: str | os.PathLike | None = None,
                 backend: str = "auto", **overrides) -> nn.Module:
    """Build a model with its official configuration.

    Args:
        name: one of :func:`list_models`.
        num_classes: classifier outputs (0: no classifier; ignored by the MiT feature backbones); default 1000
            (ImageNet), 150 (ADE20K) for SegFormer.
        pretrained: path of a local checkpoint (official, timm or HF naming; see :func:`pvt.load_state_dict`).
        backend: attention backend of every block (auto | reference | sdpa | triton).
        overrides: any other constructor argument, e.g. ``img_size`` (PVT v1), ``drop_path_rate``,
            ``depths`` for a reduced model.
    """
    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    cls, config = MODEL_CONFIGS[name]
    if num_classes is None:
        num_classes = DEFAULT_NUM_CLASSES.get(cls, 1000)
    model = cls(**{**config, **overrides}, num_classes=num_classes, backend=backend)
    if pretrained is not None:
        load_checkpoint(model, pretrained)
    return model
