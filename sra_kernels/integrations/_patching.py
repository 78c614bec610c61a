"""What the timm and Hugging Face patchers share: the options, binding a forward on a module instance
(Liger-Kernel's convention: the host's class, parameters and state-dict keys stay as they are), and the
call of :func:`sra_kernels.sra_attention` on a host module's own weights."""

from __future__ import annotations

import types
from collections.abc import Callable

import torch
from torch import nn

from ..functional import sra_attention
from ..options import check_backend_name

STATE = "_sra_kernels_options"
"""The instance attribute of a patched module: the :func:`sra_attention` options its forward runs with."""
RELAID = "_sra_kernels_channels_last"
"""The instance attribute of a patched module: its parameters that patching made channels_last (unpatch makes them
contiguous again, so that the host's own conv runs bit for bit as before)."""


def check_options(backend: str, fuse_projections: bool | None, deterministic: bool | None,
                  autotune: bool | None) -> dict:
    """The options of :func:`sra_attention` as keyword arguments, checked once at patch time."""
    check_backend_name(backend)
    for name, value in (("fuse_projections", fuse_projections), ("deterministic", deterministic),
                        ("autotune", autotune)):
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool or None, got {value!r}")
    return dict(backend=backend, fuse_projections=fuse_projections, deterministic=deterministic,
                autotune=autotune)


def patch_instances(model: nn.Module, classes: tuple[type, ...], forward_of: Callable[[nn.Module], Callable],
                    options: dict) -> list[str]:
    """Bind ``forward_of(module)`` as the forward of every module of ``model`` that is an instance of
    ``classes`` (again, with the new options, where already patched); returns their qualified names.

    The reduction conv weights of those modules become ``torch.channels_last`` (the same parameters, values and
    state-dict entries), the layout the reduction kernels read without a per-call copy."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, classes):
            relaid = vars(module).get(RELAID, [])
            for param in module.parameters():  # the sr conv's weight: the only 4-D parameter
                if param.dim() == 4 and not param.is_contiguous(memory_format=torch.channels_last):
                    param.data = param.data.contiguous(memory_format=torch.channels_last)
                    relaid.append(param)
            module.forward = types.MethodType(forward_of(module), module)
            module.__dict__[RELAID] = relaid
            setattr(module, STATE, dict(options))
            names.append(name)
    return names


def unpatch(model: nn.Module) -> list[str]:
    """Restore the class forward of every module of ``model`` that a ``patch_*`` function patched, and the layout
    of the parameters patching relaid; returns their qualified names."""
    names = []
    for name, module in model.named_modules():
        if hasattr(module, STATE):
            for param in module.__dict__.pop(RELAID):
                param.data = param.data.contiguous()
            del module.forward, module.__dict__[STATE]
            names.append(name)
    return names


def nothing_found(model: nn.Module, what: str) -> ValueError:
    return ValueError(f"{type(model).__name__} holds no {what} module to patch")


def refuse_attention_output() -> ValueError:
    return ValueError("output_attentions=True: the patched attention never materialises the attention "
                      "probabilities; call sra_kernels.integrations.unpatch(model) to get them")


def cat_linears(first: nn.Linear, second: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The (2C, C) weight and (2C,) bias of two (C, C) Linears stacked (k above v), built per call so that
    autograd reaches each one's own parameters."""
    bias = None if first.bias is None else torch.cat([first.bias, second.bias])
    return torch.cat([first.weight, second.weight]), bias


def run_sra(module: nn.Module, x: torch.Tensor, size, q: nn.Linear, kv: tuple[torch.Tensor, torch.Tensor | None],
            proj: nn.Linear, sr: nn.Conv2d | None, norm: nn.LayerNorm | None, *, num_heads: int, linear: bool,
            scale: float | None, attn_drop: float) -> torch.Tensor:
    """:func:`sra_attention` of x (B, N, C) on the host module's layers -> (B, N, C), with the options it was
    patched with. ``sr``/``norm``: the reduction conv and its LayerNorm, None without reduction; the reduction
    ratio is the conv's kernel size (unused in ``linear`` mode); ``attn_drop``: the attention-probability
    dropout, applied in training only."""
    sr_ratio = 1 if sr is None or linear else sr.kernel_size[0]
    return sra_attention(
        x, size, q.weight, q.bias, *kv, proj.weight, proj.bias,
        None if sr is None else sr.weight, None if sr is None else sr.bias,
        None if norm is None else norm.weight, None if norm is None else norm.bias,
        num_heads=num_heads, sr_ratio=sr_ratio, linear=linear, eps=1e-5 if norm is None else norm.eps, scale=scale,
        dropout_p=attn_drop if module.training else 0.0, **getattr(module, STATE))
