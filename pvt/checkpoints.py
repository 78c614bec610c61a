"""Load official PVT / SegFormer, timm ``pvt_v2`` and Hugging Face SegFormer / PVTv2 state dicts into our models.

Our keys are the official ones (``patch_embed{i}``, ``block{i}.{j}``, ``norm{i}``,
``mlp.dwconv.dwconv``, ``pos_embed{i}``, ``cls_token``, ``head``; SegFormer: ``backbone.`` and
``decode_head.``, as mmseg). timm's pvt_v2 keys (``patch_embed`` stem, ``stages.{i-1}.downsample``,
``stages.{i-1}.blocks.{j}``, ``stages.{i-1}.norm``, ``mlp.dwconv``) are mapped back, the inverse of timm's
``_checkpoint_filter_fn``. Hugging Face's (``SegformerForSemanticSegmentation``, ``SegformerModel``,
``SegformerForImageClassification``, ``PvtV2Model``, ``PvtV2ForImageClassification``; the hub files' names and
those of transformers 5) are mapped too, their separate key and value Linears concatenated into ``kv``.

HF's models compute their LayerNorms with other eps than the official code, which trained the published
weights: the official ones (our default) reproduce the original models; :func:`hf_norm_eps` gives the
constructor arguments that reproduce HF's outputs exactly.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping

import torch
from torch import nn

from .layers import NORM_EPS, resize_pos_embed

_TIMM_TO_OFFICIAL = (
    (re.compile(r"^patch_embed\."), lambda m: "patch_embed1."),
    (re.compile(r"^stages\.(\d+)\.downsample\."), lambda m: f"patch_embed{int(m.group(1)) + 1}."),
    (re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\."), lambda m: f"block{int(m.group(1)) + 1}.{m.group(2)}."),
    (re.compile(r"^stages\.(\d+)\.norm\."), lambda m: f"norm{int(m.group(1)) + 1}."),
    (re.compile(r"\.mlp\.dwconv\."), lambda m: ".mlp.dwconv.dwconv."),
)
_POS_EMBED = re.compile(r"^pos_embed(\d+)$")

_HF_KEYS = re.compile(r"^(?:segformer\.|pvt_v2\.|encoder\.|stages\.\d+\.patch_embeddings\.)")
"""Keys only HF's models have: their task models' prefixes, ``encoder.`` (hub files, PvtV2), transformers 5's
SegformerModel ``stages``."""
_HF_ENCODER = re.compile(
    r"^(?:segformer\.|pvt_v2\.)?(?:encoder\.)?(?=(?:stages|layers|patch_embeddings|block|layer_norm)\.\d)")
"""An HF encoder key; the match is the prefix to drop (the head's keys do not match)."""


def _stage(template: str):
    """A regex replacement: ``template`` formatted with the 1-based stage number (group 1) and any other groups."""
    return lambda m: template.format(int(m.group(1)) + 1, *m.groups()[1:])


_HF_TO_OFFICIAL = (
    # stage i - 1 of transformers 5 SegFormer / PvtV2 (stages, layers), of the hub files' SegFormer
    (re.compile(r"^(?:stages|layers)\.(\d+)\.patch_embeddings?\."), _stage("patch_embed{}.")),
    (re.compile(r"^patch_embeddings\.(\d+)\."), _stage("patch_embed{}.")),
    (re.compile(r"^(?:stages|layers)\.(\d+)\.blocks\.(\d+)\."), _stage("block{}.{}.")),
    (re.compile(r"^block\.(\d+)\.(\d+)\."), _stage("block{}.{}.")),
    (re.compile(r"^(?:stages|layers)\.(\d+)\.layer_norm\."), _stage("norm{}.")),
    (re.compile(r"^layer_norm\.(\d+)\."), _stage("norm{}.")),
    # inside a stage
    (re.compile(r"^(patch_embed\d+)\.layer_norm\."), lambda m: f"{m.group(1)}.norm."),
    (re.compile(r"\.(?:layer_norm_1|layernorm_before)\."), lambda m: ".norm1."),
    (re.compile(r"\.(?:layer_norm_2|layernorm_after)\."), lambda m: ".norm2."),
    (re.compile(r"\.attention\.(?:self\.)?(?:query|q_proj)\."), lambda m: ".attn.q."),
    (re.compile(r"\.attention\.(?:self\.)?(?:key|k_proj)\."), lambda m: ".attn.k."),
    (re.compile(r"\.attention\.(?:self\.)?(?:value|v_proj)\."), lambda m: ".attn.v."),
    (re.compile(r"\.attention\.(?:output\.dense|o_proj|proj)\."), lambda m: ".attn.proj."),
    (re.compile(r"\.attention\.(?:self\.sr|sequence_reduction\.sequence_reduction|spatial_reduction)\."),
     lambda m: ".attn.sr."),
    (re.compile(r"\.attention\.(?:self\.|sequence_reduction\.)?layer_norm\."), lambda m: ".attn.norm."),
    (re.compile(r"\.mlp\.dense([12])\."), lambda m: f".mlp.fc{m.group(1)}."),
)
_HF_HEAD_TO_OFFICIAL = (
    (re.compile(r"^decode_head\.(?:linear_c|linear_projections)\.(\d+)\."), _stage("decode_head.linear_c{}.")),
    (re.compile(r"^decode_head\.linear_fuse\."), lambda m: "decode_head.linear_fuse.conv."),
    (re.compile(r"^decode_head\.batch_norm\."), lambda m: "decode_head.linear_fuse.bn."),
    (re.compile(r"^decode_head\.classifier\."), lambda m: "decode_head.linear_pred."),
    (re.compile(r"^classifier\."), lambda m: "head."),
)
_KEY_VALUE = re.compile(r"^(.*\.attn\.)k\.(weight|bias)$")
_UNUSED_HEADS = ("decode_head.conv_seg.",)
"""Keys of heads nothing runs: mmseg's BaseDecodeHead makes ``conv_seg``, which SegFormer's head never calls."""


def unwrap_state_dict(checkpoint: Mapping) -> dict[str, torch.Tensor]:
    """The state dict inside a checkpoint: ``{"model": sd}`` / ``{"state_dict": sd}`` wrappers and
    DistributedDataParallel's ``module.`` prefix are removed."""
    for key in ("model", "state_dict"):
        if isinstance(checkpoint.get(key), Mapping):
            checkpoint = checkpoint[key]
            break
    state_dict = dict(checkpoint)
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


def is_timm_naming(state_dict: Mapping) -> bool:
    """True for timm pvt_v2 keys (a ``patch_embed.`` stem or ``stages.``)."""
    return any(k.startswith(("patch_embed.", "stages.")) for k in state_dict)


def is_hf_naming(state_dict: Mapping) -> bool:
    """True for Hugging Face SegFormer / PVTv2 keys (see :data:`_HF_KEYS`)."""
    return any(_HF_KEYS.match(k) for k in state_dict)


def hf_to_official(state_dict: Mapping) -> dict[str, torch.Tensor]:
    """Rename HF SegFormer / PVTv2 keys to ours: the encoder under ``backbone.`` when a ``decode_head`` is there
    (a SegFormer), else at the top (MiT, PVT v2); each attention's key (C, C) and value (C, C) weights (and biases)
    concatenated into ``kv`` (2C, C)."""
    prefix = "backbone." if any(k.startswith("decode_head.") for k in state_dict) else ""
    out = {}
    for key, value in state_dict.items():
        encoder = _HF_ENCODER.match(key)
        table = _HF_TO_OFFICIAL if encoder else _HF_HEAD_TO_OFFICIAL
        key = key[encoder.end():] if encoder else key
        for pattern, replace in table:
            key = pattern.sub(replace, key)
        out[prefix + key if encoder else key] = value
    for key in [k for k in out if _KEY_VALUE.match(k)]:
        start, kind = _KEY_VALUE.match(key).groups()
        if f"{start}v.{kind}" in out:
            out[f"{start}kv.{kind}"] = torch.cat((out.pop(key), out.pop(f"{start}v.{kind}")))
    return out


def hf_norm_eps(config) -> dict[str, float]:
    """The LayerNorm eps HF's model of ``config`` (a transformers ``SegformerConfig`` or ``PvtV2Config``) runs, as
    constructor arguments of ours: SegFormer's are ``nn.LayerNorm``'s default 1e-5 everywhere (its
    ``layer_norm_eps`` is unused), PVTv2's ``config.layer_norm_eps`` everywhere (the official code: 1e-6 in the
    blocks and stage norms, 1e-5 in the patch embeddings and the attention's reduction)."""
    eps = {"segformer": NORM_EPS, "pvt_v2": getattr(config, "layer_norm_eps", None)}.get(config.model_type)
    if eps is None:
        raise ValueError(f"not a SegFormer or PVTv2 config: model_type {config.model_type!r}")
    return dict(norm_eps=eps, patch_norm_eps=eps, sr_norm_eps=eps)


def timm_to_official(state_dict: Mapping) -> dict[str, torch.Tensor]:
    """Rename timm pvt_v2 keys to the official (our) keys; tensors are not copied."""
    out = {}
    for key, value in state_dict.items():
        for pattern, replace in _TIMM_TO_OFFICIAL:
            key = pattern.sub(replace, key)
        out[key] = value
    return out


def _resize_pos_embeds(model: nn.Module, state_dict: dict, expected: Mapping) -> dict:
    """Resize PVT v1 position embeddings stored for another (square) image size to the model's grid."""
    for key, value in list(state_dict.items()):
        match = _POS_EMBED.match(key)
        if match is None or key not in expected or value.shape == expected[key].shape:
            continue
        patch_embed = getattr(model, f"patch_embed{match.group(1)}")
        extra = expected[key].shape[1] - patch_embed.num_patches  # the cls token's position (stage 4)
        side = math.isqrt(value.shape[1] - extra)
        if value.dim() != 3 or side * side != value.shape[1] - extra or value.shape[2] != expected[key].shape[2]:
            continue  # not a square grid of the right width: reported as a shape mismatch
        with torch.no_grad():
            grid = resize_pos_embed(value[:, extra:].float(), (side, side), patch_embed.grid).to(value.dtype)
        state_dict[key] = torch.cat((value[:, :extra], grid), dim=1)
    return state_dict


def load_state_dict(model: nn.Module, state_dict: Mapping, strict: bool = True):
    """Load an official, timm-style, Hugging Face or our own state dict (or a checkpoint wrapping one) into ``model``.

    A classifier head in the state dict is dropped when the model has none (MiT backbones,
    ``num_classes=0``), and so is mmseg's unused ``decode_head.conv_seg``; PVT v1 position embeddings saved for
    another square image size are resized.

    Returns torch's ``(missing_keys, unexpected_keys)``. Raises TypeError naming a key of the model whose
    value is not a tensor, RuntimeError listing the missing and unexpected keys (with ``strict``) and any
    shape mismatch (always).
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of names to tensors, got {type(state_dict).__name__}")
    state_dict = unwrap_state_dict(state_dict)
    if is_hf_naming(state_dict):
        state_dict = hf_to_official(state_dict)
    elif is_timm_naming(state_dict):
        state_dict = timm_to_official(state_dict)
    expected = model.state_dict()
    unused = _UNUSED_HEADS + (() if any(k.startswith("head.") for k in expected) else ("head.",))
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(unused)}
    for key, value in state_dict.items():
        if key in expected and not isinstance(value, torch.Tensor):
            raise TypeError(f"state dict entry {key!r} is {type(value).__name__}, not a tensor")
    state_dict = _resize_pos_embeds(model, state_dict, expected)

    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [f"{k}: checkpoint {tuple(v.shape)}, model {tuple(expected[k].shape)}"
                  for k, v in state_dict.items() if k in expected and v.shape != expected[k].shape]
    if mismatched or (strict and (missing or unexpected)):
        lines = [f"state dict does not match {type(model).__name__}:"]
        for title, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                            ("shape mismatches", mismatched)):
            if keys:
                lines.append(f"  {title} ({len(keys)}): " + ", ".join(keys))
        raise RuntimeError("\n".join(lines))
    return model.load_state_dict(state_dict, strict=strict)


def read_checkpoint(path: str | os.PathLike):
    """``torch.load`` of a local file onto the CPU, weights_only (a ``.safetensors`` file, as the HF hub's
    ``model.safetensors``: ``safetensors.torch.load_file``); ValueError naming the file when it is empty."""
    if os.path.getsize(path) == 0:
        raise ValueError(f"checkpoint file {os.fspath(path)!r} is empty (0 bytes): it holds no checkpoint")
    if os.fspath(path).endswith(".safetensors"):
        from safetensors.torch import load_file  # the HF hub's format: installed with transformers

        return load_file(path, device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_checkpoint(model: nn.Module, path: str | os.PathLike, strict: bool = True):
    """Load a local checkpoint file (no downloads) with :func:`load_state_dict`; weights_only loading."""
    try:
        return load_state_dict(model, read_checkpoint(path), strict=strict)
    except TypeError as error:
        raise TypeError(f"{os.fspath(path)}: {error}") from error
