"""sra-kernels: fused Triton kernels for PVT's spatial-reduction attention.

Public API:

* :func:`sra_attention` -- the whole SRA op, x (B, N, C) -> (B, N, C);
* :class:`SpatialReductionAttention` -- PVT's ``Attention`` module on that op;
* :func:`spatial_reduce` and :func:`reduced_kv_attention` -- the fused building blocks;
* :func:`available_backends` -- the backends that run here.
"""

from .dispatch import available_backends
from .functional import reduced_kv_attention, spatial_reduce, sra_attention
from .module import SpatialReductionAttention

__all__ = ["available_backends", "sra_attention", "SpatialReductionAttention", "spatial_reduce",
           "reduced_kv_attention"]
__version__ = "0.1.0"
