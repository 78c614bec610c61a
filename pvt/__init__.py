"""PVT v1 / v2, SegFormer's MiT and SegFormer models whose every attention runs on sra_kernels.

* :func:`create_model` / :func:`list_models` -- the official configurations by name;
* :func:`load_state_dict` / :func:`load_checkpoint` -- official, timm and Hugging Face checkpoints;
* the model classes, for custom configurations.

``python -m pvt info | bench | train`` (see :mod:`pvt.cli`).
"""

from .checkpoints import load_checkpoint, load_state_dict
from .models import MixVisionTransformer, PyramidVisionTransformer, PyramidVisionTransformerV2
from .registry import create_model, list_models
from .segformer import SegFormer

__all__ = [
    "create_model", "list_models", "load_state_dict", "load_checkpoint",
    "PyramidVisionTransformer", "PyramidVisionTransformerV2", "MixVisionTransformer", "SegFormer",
]
