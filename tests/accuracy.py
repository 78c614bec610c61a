"""The FlashAttention accuracy rule shared by the kernel tests.

A kernel's error against the float64 reference may be at most twice the error of the same-dtype
PyTorch reference, plus a small floor.
"""

import torch

FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 4e-3}
"""Error floor per dtype, in units of (1 + the largest reference value): about one rounding of the
output (the 1 covers outputs that are exactly zero, e.g. dq with a single key)."""


def assert_within_reference_error(name: str, got: torch.Tensor, exact: torch.Tensor, peer: torch.Tensor,
                                  dtype: torch.dtype) -> None:
    """got (kernel) vs exact (float64 reference), allowed 2x the error of peer (same-dtype reference)."""
    assert got.shape == exact.shape, f"{name}: shape {tuple(got.shape)} != {tuple(exact.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    scale = exact.abs().max().item()
    err = (got.double() - exact).abs().max().item()
    peer_err = (peer.double() - exact).abs().max().item()
    assert err <= 2 * peer_err + FLOOR[dtype] * (1 + scale), (
        f"{name}: error {err:.3g} > 2 x torch {dtype} error {peer_err:.3g} + floor (scale {scale:.3g})"
    )
