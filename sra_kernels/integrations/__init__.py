"""Run the attention of existing timm and Hugging Face models on :func:`sra_kernels.sra_attention`.

``patch(model)`` binds a new forward on each attention module it recognises (as Liger-Kernel's
``_apply_liger_kernel_to_instance`` does): classes, parameters and state-dict keys stay the host's, so
checkpoints, optimizers and ``save_pretrained`` / ``from_pretrained`` are unaffected; ``unpatch(model)`` restores
the original forwards. timm and transformers are imported only by the family functions that need them.

* timm: ``timm.models.pvt_v2.Attention`` (every ``pvt_v2_*``, linear ``pvt_v2_b2_li`` included);
* transformers 4.x / 5.x: ``SegformerAttention`` and ``PvtV2SelfAttention``.

Attention-probability dropout (training) runs the ``sdpa`` path, whose fused attention applies it; the output
dropout is the host's own module.
"""

from __future__ import annotations

import sys

from torch import nn

from . import timm as _timm, transformers as _transformers
from ._patching import check_options, nothing_found, unpatch
from .timm import patch_timm_pvt_v2
from .transformers import patch_hf_pvt_v2, patch_hf_segformer

_FAMILIES = (
    (_timm.HOST_MODULE, _timm.patch),
    (_transformers.SEGFORMER_MODULE, _transformers.patch_segformer),
    (_transformers.PVT_V2_MODULE, _transformers.patch_pvt_v2),
)
"""(the module defining the host classes, its patcher): a model can hold instances of those classes only once
that module is imported, so the dispatch imports nothing."""


def patch(model: nn.Module, *, backend: str = "auto", fuse_projections: bool | None = None,
          deterministic: bool | None = None, autotune: bool | None = None) -> list[str]:
    """Run every attention module of ``model`` that this package recognises on :func:`sra_attention`.

    Args:
        model: a timm PVTv2 or a Hugging Face SegFormer / PVTv2 model (or any module holding their attention).
        backend, fuse_projections, deterministic, autotune: :func:`sra_kernels.sra_attention`'s options;
            patching again replaces them.

    Returns:
        The qualified names of the patched modules.

    Raises:
        ValueError: ``model`` holds no recognised attention module.
    """
    options = check_options(backend, fuse_projections, deterministic, autotune)
    names = []
    for host_module, patch_family in _FAMILIES:
        if host_module in sys.modules:
            names += patch_family(model, options)
    if not names:
        raise nothing_found(model, "timm pvt_v2 / Hugging Face SegFormer or PVTv2 attention")
    return names


__all__ = ["patch", "unpatch", "patch_timm_pvt_v2", "patch_hf_segformer", "patch_hf_pvt_v2"]
