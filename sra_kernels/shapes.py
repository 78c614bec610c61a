"""The geometry of an SRA call (:class:`SRAShape`) and the attention stages of the PVT families.

``MODEL_STAGES`` is the one table of every named model's attention geometry (channels, heads and sr
ratios of stages 1-4, linear SRA or not, and how its patch embeddings shrink the grid): the models of
:mod:`pvt` are built from it, and :func:`model_stages` turns it into the shapes of one input size.
"""

from __future__ import annotations

from dataclasses import dataclass

from .reference import LINEAR_POOL_SIZE


@dataclass(frozen=True)
class SRAShape:
    """Geometry of one SRA call: x (batch, height*width [+ 1 cls token], channels)."""

    batch: int
    height: int
    width: int
    channels: int
    heads: int
    sr_ratio: int = 1
    linear: bool = False
    cls_token: bool = False

    def __post_init__(self):
        for name in ("batch", "height", "width", "channels", "heads", "sr_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.channels % self.heads:
            raise ValueError(f"heads must divide channels, got channels={self.channels}, heads={self.heads}")
        if self.cls_token and self.reduces:
            raise ValueError("a cls token needs sr_ratio 1 and linear=False (PVT v1's last stage)")
        if self.sr_ratio > min(self.size) and not self.linear:  # linear SRA pools to 7x7: sr_ratio is unused
            raise ValueError(f"sr_ratio {self.sr_ratio} exceeds the {self.label} token grid")

    @property
    def tokens(self) -> int:
        """N: queries per image."""
        return self.height * self.width + int(self.cls_token)

    @property
    def reduces(self) -> bool:
        """True when keys/values come from a reduction (sr > 1 or linear), not from x itself."""
        return self.linear or self.sr_ratio > 1

    @property
    def reduced_tokens(self) -> int:
        """M: keys/values per image."""
        if self.linear:
            return LINEAR_POOL_SIZE * LINEAR_POOL_SIZE
        if self.sr_ratio > 1:
            return (self.height // self.sr_ratio) * (self.width // self.sr_ratio)
        return self.tokens

    @property
    def head_dim(self) -> int:
        return self.channels // self.heads

    @property
    def kernel(self) -> int:
        """Reduction conv kernel size (1 in linear mode, sr_ratio otherwise)."""
        return 1 if self.linear else self.sr_ratio

    @property
    def size(self) -> tuple[int, int]:
        """The ``size`` argument of ``sra_attention``: (H, W), or (1, N) with a cls token (as PVT v1 runs it)."""
        return (1, self.tokens) if self.cls_token else (self.height, self.width)

    @property
    def label(self) -> str:
        return f"{self.height}x{self.width}" + ("+cls" if self.cls_token else "")


@dataclass(frozen=True)
class ModelStages:
    """The attention geometry of one model's four stages.

    ``family`` is how the patch embeddings shrink the grid: "v1" non-overlapping patches (k = s = 4, then
    2; PVT v1, whose stage 4 carries the cls token), "v2" overlapping ones (PVT v2 and SegFormer's MiT).
    """

    family: str
    channels: tuple[int, int, int, int]
    heads: tuple[int, int, int, int] = (1, 2, 5, 8)
    sr_ratios: tuple[int, int, int, int] = (8, 4, 2, 1)
    linear: bool = False


_DIMS = (64, 128, 320, 512)
_B0_DIMS = (32, 64, 160, 256)
MODEL_STAGES: dict[str, ModelStages] = {
    **{f"pvt_{size}": ModelStages("v1", _DIMS) for size in ("tiny", "small", "medium", "large")},
    "pvt_v2_b0": ModelStages("v2", _B0_DIMS),
    **{f"pvt_v2_b{i}": ModelStages("v2", _DIMS) for i in range(1, 6)},
    "pvt_v2_b2_li": ModelStages("v2", _DIMS, linear=True),
    "mit_b0": ModelStages("v2", _B0_DIMS),
    **{f"mit_b{i}": ModelStages("v2", _DIMS) for i in range(1, 6)},
}
"""Official configurations (whai362/PVT, NVlabs/SegFormer): heads [1, 2, 5, 8], sr ratios [8, 4, 2, 1]."""


def _stage_grids(family: str, height: int, width: int) -> list[tuple[int, int]]:
    """Token grid of each stage: the patch-embedding conv's output size (n + 2*pad - k) // s + 1.

    v1: non-overlapping patches, k = s = 4 then 2, no padding (floor). v2: overlapping patches,
    k=7, s=4, pad=3 then k=3, s=2, pad=1 (ceil).
    """
    convs = [(4, 4, 0)] + [(2, 2, 0)] * 3 if family == "v1" else [(7, 4, 3)] + [(3, 2, 1)] * 3
    grids = []
    for kernel, stride, pad in convs:
        height, width = ((n + 2 * pad - kernel) // stride + 1 for n in (height, width))
        grids.append((height, width))
    return grids


def model_stages(model: str, image_size: int | tuple[int, int], batch: int = 1) -> tuple[SRAShape, ...]:
    """The attention shape of each of the 4 stages of ``model`` for (batch, 3, *image_size) images.

    PVT v1's last stage carries the cls token (N = H*W + 1, sr 1). Every block of a stage has the
    same shape; the stage's depth does not matter here.
    """
    if model not in MODEL_STAGES:
        raise ValueError(f"unknown model {model!r}; known: {', '.join(sorted(MODEL_STAGES))}")
    stages = MODEL_STAGES[model]
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    return tuple(
        SRAShape(batch, h, w, stages.channels[i], stages.heads[i], stages.sr_ratios[i], stages.linear,
                 cls_token=(stages.family == "v1" and i == 3))
        for i, (h, w) in enumerate(_stage_grids(stages.family, height, width))
    )
