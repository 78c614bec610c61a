"""``SRAWeights``: the ten parameters of one SRA call, grouped, as the triton backend passes them around."""

from __future__ import annotations

from typing import NamedTuple

import torch


class SRAWeights(NamedTuple):
    """PVT's order and names (``attn.q``, ``attn.kv``, ``attn.proj``, ``attn.sr``, ``attn.norm``): q (C, C) and
    (C,), kv (2C, C) and (2C,), proj (C, C) and (C,), the reduction conv (C, C, k, k) and (C,), its LayerNorm
    (C,) and (C,). Biases may be None; the conv and norm are None when the attention does not reduce."""

    q_weight: torch.Tensor
    q_bias: torch.Tensor | None
    kv_weight: torch.Tensor
    kv_bias: torch.Tensor | None
    proj_weight: torch.Tensor
    proj_bias: torch.Tensor | None
    sr_weight: torch.Tensor | None = None
    sr_bias: torch.Tensor | None = None
    norm_weight: torch.Tensor | None = None
    norm_bias: torch.Tensor | None = None

    def to(self, dtype: torch.dtype) -> SRAWeights:
        """Every present parameter cast to ``dtype`` (as autocast casts a Linear's or Conv2d's)."""
        return SRAWeights(*(t if t is None else t.to(dtype) for t in self))

    def projections_filled(self, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(q_weight, q_bias, kv_weight, kv_bias, proj_weight, proj_bias), absent biases as zeros (like ``like``),
        as the fused-projection kernels take them."""
        C = self.q_weight.shape[-1]
        return (self.q_weight, like.new_zeros(C) if self.q_bias is None else self.q_bias,
                self.kv_weight, like.new_zeros(2 * C) if self.kv_bias is None else self.kv_bias,
                self.proj_weight, like.new_zeros(C) if self.proj_bias is None else self.proj_bias)

    def reduction_filled(self, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(sr_weight, sr_bias, norm_weight, norm_bias) as the reduction kernels take them
        (:func:`filled_reduction`)."""
        return (self.sr_weight, *filled_reduction(like, self.sr_bias, self.norm_weight, self.norm_bias))

    @property
    def projections(self) -> tuple[torch.Tensor, ...]:
        """(q_weight, q_bias, kv_weight, kv_bias, proj_weight, proj_bias)."""
        return self[:6]

    @property
    def reduction(self) -> tuple[torch.Tensor, ...]:
        """(sr_weight, sr_bias, norm_weight, norm_bias)."""
        return self[6:]


def filled_reduction(like: torch.Tensor, sr_bias, norm_weight, norm_bias) -> tuple[torch.Tensor, ...]:
    """The optional conv / norm parameters of tokens ``like`` (B, N, C) as the kernels take them: zeros / ones
    where None."""
    C = like.shape[-1]
    return (like.new_zeros(C) if sr_bias is None else sr_bias, like.new_ones(C) if norm_weight is None else norm_weight,
            like.new_zeros(C) if norm_bias is None else norm_bias)
