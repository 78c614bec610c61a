"""What Triton's CPU interpreter (``TRITON_INTERPRET=1``) gets wrong, and the workarounds that are
switched on only there (compiled GPU code is unchanged):

* bf16 values loaded in a kernel are raw bits, so ``tl.dot`` / ``tl.sum`` on them give garbage:
  kernels upcast loads to fp32 when their ``UPCAST`` constexpr is ``INTERPRETED``;
* fp32 -> bf16 casts truncate instead of rounding to nearest even (a bias that grows in every sum):
  :func:`rounded_cast` rounds on the bits first.
"""

import os

import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
"""True when kernels run in Triton's CPU interpreter (read once, when the kernels are defined)."""

ROUND_BF16_BY_HAND: tl.constexpr = tl.constexpr(INTERPRETED)


@triton.jit
def rounded_cast(x, dtype: tl.constexpr):
    """fp32 ``x`` cast to ``dtype`` with round-to-nearest-even, in the interpreter too."""
    if ROUND_BF16_BY_HAND:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)
