"""Load official PVT / SegFormer and timm ``pvt_v2`` state dicts into our models.

Our keys are the official ones (``patch_embed{i}``, ``block{i}.{j}``, ``norm{i}``,
``mlp.dwconv.dwconv``, ``pos_embed{i}``, ``cls_token``, ``head``). timm's pvt_v2 keys
(``patch_embed`` stem, ``stages.{i-1}.downsample``, ``stages.{i-1}.blocks.{j}``,
``stages.{i-1}.norm``, ``mlp.dwconv``) are mapped back, the inverse of timm's
``_checkpoint_filter_fn``.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping

import torch
from torch import nn

from .layers import resize_pos_embed

_TIMM_TO_OFFICIAL = (
    (re.compile(r"^patch_embed\."), lambda m: "patch_embed1."),
    (re.compile(r"^stages\.(\d+)\.downsample\."), lambda m: f"patch_embed{int(m.group(1)) + 1}."),
    (re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\."), lambda m: f"block{int(m.group(1)) + 1}.{m.group(2)}."),
    (re.compile(r"^stages\.(\d+)\.norm\."), lambda m: f"norm{int(m.group(1)) + 1}."),
    (re.compile(r"\.mlp\.dwconv\."), lambda m: ".mlp.dwconv.dwconv."),
)
_POS_EMBED = re.compile(r"^pos_embed(\d+)$")


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
    """Load an official, timm-style or our own state dict (or a checkpoint wrapping one) into ``model``.

    A classifier head in the state dict is dropped when the model has none (MiT backbones,
    ``num_classes=0``); PVT v1 position embeddings saved for another square image size are resized.

    Returns torch's ``(missing_keys, unexpected_keys)``. Raises TypeError naming a key of the model whose
    value is not a tensor, RuntimeError listing the missing and unexpected keys (with ``strict``) and any
    shape mismatch (always).
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of names to tensors, got {type(state_dict).__name__}")
    state_dict = unwrap_state_dict(state_dict)
    if is_timm_naming(state_dict):
        state_dict = timm_to_official(state_dict)
    expected = model.state_dict()
    if not any(k.startswith("head.") for k in expected):
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("head.")}
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
    """``torch.load`` of a local file onto the CPU, weights_only; ValueError naming the file when it is empty."""
    if os.path.getsize(path) == 0:
        raise ValueError(f"checkpoint file {os.fspath(path)!r} is empty (0 bytes): it holds no checkpoint")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_checkpoint(model: nn.Module, path: str | os.PathLike, strict: bool = True):
    """Load a local checkpoint file (no downloads) with :func:`load_state_dict`; weights_only loading."""
    try:
        return load_state_dict(model, read_checkpoint(path), strict=strict)
    except TypeError as error:
        raise TypeError(f"{os.fspath(path)}: {error}") from error
