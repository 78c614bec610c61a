"""timm's PVTv2 (``timm.models.pvt_v2``, every ``pvt_v2_*`` including the linear ``pvt_v2_b2_li``) on
:func:`sra_kernels.sra_attention`."""

from __future__ import annotations

from torch import nn

from ._patching import check_options, nothing_found, patch_instances, run_sra

HOST_MODULE = "timm.models.pvt_v2"


def _forward(module: nn.Module):
    linear = module.pool is not None

    def forward(self, x, feat_size):
        """x (B, N, C), feat_size (H, W) with N = H * W -> (B, N, C), as ``Attention.forward``."""
        out = run_sra(self, x, tuple(feat_size), self.q, (self.kv.weight, self.kv.bias), self.proj, self.sr,
                      self.norm, num_heads=self.num_heads, linear=linear, scale=self.scale,
                      attn_drop=self.attn_drop.p)
        return self.proj_drop(out)

    return forward


def patch(model: nn.Module, options: dict) -> list[str]:
    """Patch every ``timm.models.pvt_v2.Attention`` of ``model`` with checked ``options``."""
    from timm.models import pvt_v2

    return patch_instances(model, (pvt_v2.Attention,), _forward, options)


def patch_timm_pvt_v2(model: nn.Module, *, backend: str = "auto", fuse_projections: bool | None = None,
                      deterministic: bool | None = None, autotune: bool | None = None) -> list[str]:
    """Run every ``timm.models.pvt_v2.Attention`` of ``model`` on :func:`sra_kernels.sra_attention`.

    The options are :func:`sra_attention`'s; the modules keep their parameters (``q``, ``kv``, ``proj``,
    ``sr``, ``norm``), so state dicts and optimizers are unaffected. Returns the patched modules' names;
    raises ValueError where there is none.
    """
    names = patch(model, check_options(backend, fuse_projections, deterministic, autotune))
    if not names:
        raise nothing_found(model, "timm pvt_v2 Attention")
    return names
