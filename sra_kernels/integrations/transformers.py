"""Hugging Face transformers' SegFormer and PVTv2 (4.x and 5.x) on :func:`sra_kernels.sra_attention`.

Each module keeps its separate key / value Linears (their (2C, C) concatenation is built per call) and returns
what the host returns: a tuple holding the (B, N, C) output (SegFormer 5.x: with ``None`` for the attention
weights). ``output_attentions=True`` raises a ValueError: the probabilities are never materialised.

* SegFormer 4.x: ``SegformerAttention`` = ``SegformerEfficientSelfAttention`` (``.self``: query, key, value,
  sr, layer_norm, attention-probability dropout) + ``SegformerSelfOutput`` (``.output``: dense, dropout);
* SegFormer 5.x: ``SegformerAttention`` (q_proj, k_proj, v_proj, o_proj, sequence_reduction); the block
  applies the hidden dropout;
* PVTv2: ``PvtV2SelfAttention`` (query, key, value, proj, spatial_reduction, layer_norm; linear attention).
"""

from __future__ import annotations

from torch import nn

from ._patching import cat_linears, check_options, nothing_found, patch_instances, refuse_attention_output, run_sra

SEGFORMER_MODULE = "transformers.models.segformer.modeling_segformer"
PVT_V2_MODULE = "transformers.models.pvt_v2.modeling_pvt_v2"


def _segformer_4_forward(self, hidden_states, height, width, output_attentions=False):
    """hidden_states (B, N, C), N = height * width -> ((B, N, C),), as 4.x ``SegformerAttention``."""
    if output_attentions:
        raise refuse_attention_output()
    attn = self.self
    sr = attn.sr if attn.sr_ratio > 1 else None
    out = run_sra(self, hidden_states, (height, width), attn.query, cat_linears(attn.key, attn.value),
                  self.output.dense, sr, None if sr is None else attn.layer_norm,
                  num_heads=attn.num_attention_heads, linear=False, scale=None, attn_drop=attn.dropout.p)
    return (self.output.dropout(out),)


def _segformer_5_forward(self, hidden_states, height, width, attention_mask=None, **kwargs):
    """hidden_states (B, N, C), N = height * width -> ((B, N, C), None), as 5.x ``SegformerAttention``."""
    if kwargs.get("output_attentions", self.config.output_attentions):
        raise refuse_attention_output()
    if attention_mask is not None:
        raise ValueError("the patched SegformerAttention takes no attention_mask")
    reduction = self.sequence_reduction if self.sequence_reduction_ratio > 1 else None
    out = run_sra(self, hidden_states, (height, width), self.q_proj, cat_linears(self.k_proj, self.v_proj),
                  self.o_proj, None if reduction is None else reduction.sequence_reduction,
                  None if reduction is None else reduction.layer_norm, num_heads=self.num_attention_heads,
                  linear=False, scale=self.scaling, attn_drop=self.attention_dropout)
    return out, None


def _pvt_v2_forward(self, hidden_states, height, width, output_attentions=False):
    """hidden_states (B, N, C), N = height * width -> ((B, N, C),), as ``PvtV2SelfAttention``."""
    if output_attentions:
        raise refuse_attention_output()
    reduces = self.linear_attention or self.spatial_reduction_ratio > 1
    out = run_sra(self, hidden_states, (height, width), self.query, cat_linears(self.key, self.value), self.proj,
                  self.spatial_reduction if reduces else None, self.layer_norm if reduces else None,
                  num_heads=self.num_attention_heads, linear=self.linear_attention, scale=None,
                  attn_drop=self.attn_drop.p)
    return (self.proj_drop(out),)


def patch_segformer(model: nn.Module, options: dict) -> list[str]:
    """Patch every ``SegformerAttention`` of ``model`` (either layout) with checked ``options``."""
    from transformers.models.segformer import modeling_segformer

    def forward_of(module):
        return _segformer_4_forward if hasattr(module, "self") else _segformer_5_forward

    return patch_instances(model, (modeling_segformer.SegformerAttention,), forward_of, options)


def patch_pvt_v2(model: nn.Module, options: dict) -> list[str]:
    """Patch every ``PvtV2SelfAttention`` of ``model`` with checked ``options``."""
    from transformers.models.pvt_v2 import modeling_pvt_v2

    return patch_instances(model, (modeling_pvt_v2.PvtV2SelfAttention,), lambda module: _pvt_v2_forward, options)


def patch_hf_segformer(model: nn.Module, *, backend: str = "auto", fuse_projections: bool | None = None,
                       deterministic: bool | None = None, autotune: bool | None = None) -> list[str]:
    """Run every ``SegformerAttention`` of a Hugging Face SegFormer model (``SegformerModel``,
    ``SegformerForSemanticSegmentation``, ...) on :func:`sra_kernels.sra_attention`, with its options.

    Parameter names stay HF's, so ``save_pretrained`` / ``from_pretrained`` round-trip. Returns the patched
    modules' names; raises ValueError where there is none.
    """
    names = patch_segformer(model, check_options(backend, fuse_projections, deterministic, autotune))
    if not names:
        raise nothing_found(model, "SegformerAttention")
    return names


def patch_hf_pvt_v2(model: nn.Module, *, backend: str = "auto", fuse_projections: bool | None = None,
                    deterministic: bool | None = None, autotune: bool | None = None) -> list[str]:
    """Run every ``PvtV2SelfAttention`` of a Hugging Face PVTv2 model (``PvtV2Model``,
    ``PvtV2ForImageClassification``, ``PvtV2Backbone``) on :func:`sra_kernels.sra_attention`, with its options.

    Parameter names stay HF's. Returns the patched modules' names; raises ValueError where there is none.
    """
    names = patch_pvt_v2(model, check_options(backend, fuse_projections, deterministic, autotune))
    if not names:
        raise nothing_found(model, "PvtV2SelfAttention")
    return names
