"""PVT v1 / v2 / MiT models on sra_kernels: configurations, shapes, the official forward, checkpoints,
backends and training.

The oracle is a functional transcription of the official forwards (whai362/PVT classification/pvt.py,
pvt_v2.py, detection/pvt.py; SegFormer mix_transformer.py) run in float64 on our state dicts.
"""

import copy
import math
import os

import pytest
import torch
import torch.nn.functional as F

import pvt
from pvt.checkpoints import timm_to_official
from pvt.models import MixVisionTransformer, PyramidVisionTransformer
from pvt.registry import MODEL_CONFIGS
from sra_kernels import SpatialReductionAttention

# Published parameter counts (millions, 1000-class head; timm agrees), see DESIGN.md.
PUBLISHED_PARAMS_M = {
    "pvt_v2_b0": 3.667, "pvt_v2_b1": 14.009, "pvt_v2_b2": 25.363, "pvt_v2_b2_li": 22.554,
    "pvt_v2_b3": 45.239, "pvt_v2_b4": 62.556, "pvt_v2_b5": 81.956,
    "pvt_tiny": 13.229, "pvt_small": 24.486, "pvt_medium": 44.208, "pvt_large": 61.369,
}
TINY = dict(depths=(1, 1, 1, 1))
"""A one-block-per-stage override that keeps CPU tests fast; every other setting is the official one."""
SMALL = dict(TINY, embed_dims=(16, 32, 80, 128))
"""Also narrower (head_dim 16), for tests of shapes, key names and the forward's structure."""


def _meta_model(name, **kwargs):
    with torch.device("meta"):
        return pvt.create_model(name, **kwargs)


def _count(model):
    return sum(p.numel() for p in model.parameters())


def _analytic_params(name, num_classes=1000):
    """Parameter count from the configuration alone (the official layer shapes, qkv_bias=True)."""
    cls, cfg = MODEL_CONFIGS[name]
    if cls is pvt.SegFormer:  # MiT + 4 Linears C_i -> D, the 4D -> D fuse conv (no bias) + BN, 150-class classifier
        D = cfg["decoder_dim"]
        return (_analytic_params(name.replace("segformer", "mit")) + sum(C * D + D for C in cfg["embed_dims"])
                + 4 * D * D + 2 * D + D * 150 + 150)
    v1 = cls is PyramidVisionTransformer
    total, prev = 0, 3
    for i, C in enumerate(cfg["embed_dims"]):
        k = (4 if i == 0 else 2) if v1 else (7 if i == 0 else 3)
        total += prev * C * k * k + C + 2 * C  # patch-embedding conv + LayerNorm
        hidden, sr = int(C * cfg["mlp_ratios"][i]), cfg["sr_ratios"][i]
        attn = 4 * C * C + 4 * C  # q (C, C), kv (2C, C), proj (C, C), with biases
        if cfg.get("linear"):
            attn += C * C + C + 2 * C  # 1x1 sr conv + norm
        elif sr > 1:
            attn += C * C * sr * sr + C + 2 * C
        mlp = 2 * C * hidden + hidden + C + (0 if v1 else 10 * hidden)  # fc1, fc2 (+ DWConv 3x3 + bias)
        total += cfg["depths"][i] * (4 * C + attn + mlp)  # + norm1, norm2
        total += 0 if v1 else 2 * C  # stage norm
        prev = C
    if v1:
        dims = cfg["embed_dims"]
        total += 56 * 56 * dims[0] + 28 * 28 * dims[1] + 14 * 14 * dims[2] + (7 * 7 + 1) * dims[3]  # pos_embed at 224
        total += dims[3] + 2 * dims[3]  # cls token, final norm
    if cls is not MixVisionTransformer:
        total += cfg["embed_dims"][-1] * num_classes + num_classes
    return total


# ---------------------------------------------------------------- configurations


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS_M))
def test_parameter_count_matches_published(name):
    assert round(_count(_meta_model(name)) / 1e6, 3) == PUBLISHED_PARAMS_M[name]


@pytest.mark.parametrize("name", pvt.list_models())
def test_parameter_count_matches_configuration(name):
    assert _count(_meta_model(name)) == _analytic_params(name)


def test_list_models_and_unknown_name():
    names = pvt.list_models()
    assert names == sorted(names) and len(names) == 23
    assert {"pvt_tiny", "pvt_large", "pvt_v2_b0", "pvt_v2_b5", "pvt_v2_b2_li", "mit_b0", "mit_b5", "segformer_b0",
            "segformer_b5"} <= set(names)
    with pytest.raises(ValueError, match="unknown model 'pvt_v3'.*pvt_v2_b0"):
        pvt.create_model("pvt_v3")


@pytest.mark.parametrize("name", ["pvt_small", "pvt_v2_b2", "pvt_v2_b2_li", "mit_b1"])
def test_official_layer_settings(name):
    """Heads, sr ratios, eps values, qkv bias, linear SRA + ReLU, DWConv, drop-path schedule."""
    model = _meta_model(name, drop_path_rate=0.3)
    _, cfg = MODEL_CONFIGS[name]
    linear = cfg.get("linear", False)
    probs = []
    for i in range(4):
        for blk in getattr(model, f"block{i + 1}"):
            assert isinstance(blk.attn, SpatialReductionAttention)
            assert (blk.attn.num_heads, blk.attn.sr_ratio, blk.attn.linear) == (
                (1, 2, 5, 8)[i], (8, 4, 2, 1)[i], linear)
            assert blk.attn.q.bias is not None and blk.attn.kv.bias is not None
            assert blk.norm1.eps == blk.norm2.eps == 1e-6
            if linear or blk.attn.sr_ratio > 1:
                assert blk.attn.norm.eps == 1e-5
            assert (blk.mlp.relu is not None) == linear
            assert (blk.mlp.dwconv is None) == isinstance(model, PyramidVisionTransformer)
            assert blk.mlp.fc1.out_features == int(blk.mlp.fc1.in_features * cfg["mlp_ratios"][i])
            probs.append(getattr(blk.drop_path, "drop_prob", 0.0))
        assert getattr(model, f"patch_embed{i + 1}").norm.eps == 1e-5
        if not isinstance(model, PyramidVisionTransformer):
            assert getattr(model, f"norm{i + 1}").eps == 1e-6
    assert probs == pytest.approx(torch.linspace(0, 0.3, sum(cfg["depths"])).tolist())
    if isinstance(model, PyramidVisionTransformer):
        assert model.norm.eps == 1e-6


def test_mit_defaults_to_drop_path_and_no_head():
    model = _meta_model("mit_b0", num_classes=1000)
    assert not any(k.startswith("head.") for k in model.state_dict())
    assert model.block4[-1].drop_path.drop_prob == pytest.approx(0.1)


def test_initialisation():
    """trunc_normal(.02) Linear, LayerNorm 1/0, v2 conv normal(0, sqrt(2/fan_out)), v1 conv PyTorch default."""
    torch.manual_seed(0)
    v2 = pvt.create_model("pvt_v2_b0", **TINY)
    w = v2.block3[0].mlp.fc1.weight
    assert w.std().item() == pytest.approx(0.02, rel=0.05) and v2.block3[0].mlp.fc1.bias.abs().max() == 0
    assert v2.norm2.weight.eq(1).all() and v2.norm2.bias.eq(0).all()
    dw = v2.block3[0].mlp.dwconv.dwconv.weight  # fan_out = 3 * 3 * C / C
    assert dw.std().item() == pytest.approx(math.sqrt(2 / 9), rel=0.05)
    sr = v2.block1[0].attn.sr.weight  # fan_out = 8 * 8 * 32
    assert sr.std().item() == pytest.approx(math.sqrt(2 / (8 * 8 * 32)), rel=0.05)
    v1 = pvt.create_model("pvt_tiny", **TINY)
    sr = v1.block1[0].attn.sr.weight  # nn.Conv2d default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = 64 * 8 * 8
    bound = 1 / math.sqrt(64 * 64)
    assert sr.abs().max() <= bound and sr.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert v1.pos_embed1.std().item() == pytest.approx(0.02, rel=0.1) and v1.cls_token.abs().max() > 0


def test_backend_reaches_every_attention():
    model = pvt.create_model("pvt_v2_b0", backend="reference", **TINY)
    attentions = [m for m in model.modules() if isinstance(m, SpatialReductionAttention)]
    assert len(attentions) == 4 and all(a.backend == "reference" for a in attentions)
    model.configure_attention(backend="sdpa")
    assert all(a.backend == "sdpa" for a in attentions)


# ---------------------------------------------------------------- shapes at any resolution


def _ceil_div(n, d):
    return -(-n // d)


@pytest.mark.parametrize("name", ["pvt_tiny", "pvt_v2_b0", "pvt_v2_b2_li", "mit_b0"])
@pytest.mark.parametrize("size", [(64, 64), (225, 301), (97, 130)])
def test_feature_shapes_any_resolution(name, size):
    """v2 / MiT: padded 7x7/4 and 3x3/2 convs give ceil(H / stride); v1: floor(H / patch) per stage."""
    torch.manual_seed(0)
    model = pvt.create_model(name, backend="sdpa", num_classes=7, **SMALL).eval()
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        feats = model.forward_features(x)
        out = model(x)
    H, W = size
    expected = []
    for i, C in enumerate(model.embed_dims):
        if isinstance(model, PyramidVisionTransformer):
            H, W = (H // 4, W // 4) if i == 0 else (H // 2, W // 2)
        else:
            H, W = (_ceil_div(H, 4), _ceil_div(W, 4)) if i == 0 else (_ceil_div(H, 2), _ceil_div(W, 2))
        expected.append((1, C, H, W))
    assert [tuple(f.shape) for f in feats] == expected
    assert all(torch.isfinite(f).all() for f in feats)
    if isinstance(model, MixVisionTransformer):
        assert [tuple(f.shape) for f in out] == expected
    else:
        assert out.shape == (1, 7)


# ---------------------------------------------------------------- the official forward, transcribed


def _ln(x, sd, key, eps):
    return F.layer_norm(x, (x.shape[-1],), sd[f"{key}.weight"], sd[f"{key}.bias"], eps)


def _linear(x, sd, key):
    return F.linear(x, sd[f"{key}.weight"], sd.get(f"{key}.bias"))


def _official_attention(x, H, W, sd, key, heads, sr, linear):
    B, N, C = x.shape
    q = _linear(x, sd, f"{key}.q").reshape(B, N, heads, C // heads).permute(0, 2, 1, 3)
    x_ = x
    if linear or sr > 1:
        x_ = x.permute(0, 2, 1).reshape(B, C, H, W)
        if linear:
            x_ = F.adaptive_avg_pool2d(x_, 7)
        x_ = F.conv2d(x_, sd[f"{key}.sr.weight"], sd[f"{key}.sr.bias"], stride=1 if linear else sr)
        x_ = _ln(x_.reshape(B, C, -1).permute(0, 2, 1), sd, f"{key}.norm", 1e-5)
        if linear:
            x_ = F.gelu(x_)
    kv = _linear(x_, sd, f"{key}.kv").reshape(B, -1, 2, heads, C // heads).permute(2, 0, 3, 1, 4)
    attn = ((q @ kv[0].transpose(-2, -1)) * (C // heads) ** -0.5).softmax(dim=-1)
    return _linear((attn @ kv[1]).transpose(1, 2).reshape(B, N, C), sd, f"{key}.proj")


def _official_block(x, H, W, sd, key, heads, sr, linear, dwconv):
    x = x + _official_attention(_ln(x, sd, f"{key}.norm1", 1e-6), H, W, sd, f"{key}.attn", heads, sr, linear)
    h = _linear(_ln(x, sd, f"{key}.norm2", 1e-6), sd, f"{key}.mlp.fc1")
    if linear:
        h = F.relu(h)
    if dwconv:
        B, N, C = h.shape
        h = F.conv2d(h.transpose(1, 2).view(B, C, H, W), sd[f"{key}.mlp.dwconv.dwconv.weight"],
                     sd[f"{key}.mlp.dwconv.dwconv.bias"], padding=1, groups=C).flatten(2).transpose(1, 2)
    return x + _linear(F.gelu(h), sd, f"{key}.mlp.fc2")


def _official_v2(sd, x, depths, linear):
    """PyramidVisionTransformerV2 / MixVisionTransformer: (stage maps, logits or None)."""
    B, outs = x.shape[0], []
    for i in range(4):
        weight = sd[f"patch_embed{i + 1}.proj.weight"]
        x = F.conv2d(x, weight, sd[f"patch_embed{i + 1}.proj.bias"], stride=4 if i == 0 else 2,
                     padding=weight.shape[-1] // 2)
        H, W = x.shape[2:]
        x = _ln(x.flatten(2).transpose(1, 2), sd, f"patch_embed{i + 1}.norm", 1e-5)
        for j in range(depths[i]):
            x = _official_block(x, H, W, sd, f"block{i + 1}.{j}", (1, 2, 5, 8)[i], (8, 4, 2, 1)[i], linear, True)
        tokens = _ln(x, sd, f"norm{i + 1}", 1e-6)
        x = tokens.reshape(B, H, W, -1).permute(0, 3, 1, 2)
        outs.append(x)
    logits = _linear(tokens.mean(dim=1), sd, "head") if "head.weight" in sd else None
    return outs, logits


def _official_v1(sd, x, depths, img_size, detection):
    """PyramidVisionTransformer: the classification forward (logits) or the detection one (stage maps)."""
    B, outs = x.shape[0], []
    grids = [(img_size // 4, img_size // 4)] + [((img_size // 2 ** (i + 1)) // 2,) * 2 for i in range(1, 4)]
    for i in range(4):
        x = F.conv2d(x, sd[f"patch_embed{i + 1}.proj.weight"], sd[f"patch_embed{i + 1}.proj.bias"],
                     stride=4 if i == 0 else 2)
        H, W = x.shape[2:]
        x = _ln(x.flatten(2).transpose(1, 2), sd, f"patch_embed{i + 1}.norm", 1e-5)

        def get_pos(pos):  # _get_pos_embed, including its comparison with patch_embed1's num_patches
            if H * W == grids[0][0] * grids[0][1]:
                return pos
            grid = pos.reshape(1, *grids[i], -1).permute(0, 3, 1, 2)
            return F.interpolate(grid, size=(H, W), mode="bilinear").reshape(1, -1, H * W).permute(0, 2, 1)

        pos = sd[f"pos_embed{i + 1}"]
        if i == 3 and not detection:
            x = torch.cat((sd["cls_token"].expand(B, -1, -1), x), dim=1)
            pos = torch.cat((pos[:, :1], get_pos(pos[:, 1:])), dim=1)
        else:
            pos = get_pos(pos[:, 1:] if i == 3 else pos)
        x = x + pos
        for j in range(depths[i]):
            x = _official_block(x, H, W, sd, f"block{i + 1}.{j}", (1, 2, 5, 8)[i], (8, 4, 2, 1)[i], False, False)
        if i < 3 or detection:
            x = x.reshape(B, H, W, -1).permute(0, 3, 1, 2)
            outs.append(x)
    if detection:
        return outs
    return _linear(_ln(x, sd, "norm", 1e-6)[:, 0], sd, "head")


def _randomise(model):
    """Fresh random values in every parameter (LayerNorm affines, biases and position embeddings too)."""
    with torch.no_grad():
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                if isinstance(module, torch.nn.LayerNorm) and name == "weight":
                    p.copy_(1 + 0.2 * torch.randn_like(p))
                elif p.dim() == 1 or name.startswith(("pos_embed", "cls_token")):
                    p.copy_(0.2 * torch.randn_like(p))
                else:  # weights: unit-variance outputs
                    p.copy_(torch.randn_like(p) / math.sqrt(p[0].numel()))
    return model


@pytest.mark.parametrize("name", ["pvt_v2_b0", "pvt_v2_b2_li", "mit_b0"])
@pytest.mark.parametrize("size", [(64, 64), (70, 99)])
def test_v2_and_mit_match_official_forward(name, size):
    torch.manual_seed(1)
    depths = (2, 1, 1, 1)
    model = pvt.create_model(name, backend="reference", depths=depths, embed_dims=SMALL["embed_dims"], num_classes=5)
    model = _randomise(model).double().eval()
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    sd = model.state_dict()
    feats_ref, logits_ref = _official_v2(sd, x, depths, MODEL_CONFIGS[name][1].get("linear", False))
    with torch.no_grad():
        feats = model.forward_features(x)
        out = model(x)
    for f, r in zip(feats, feats_ref):
        torch.testing.assert_close(f, r, rtol=1e-9, atol=1e-9)
    if logits_ref is None:
        assert all(torch.equal(a, b) for a, b in zip(out, feats))
    else:
        torch.testing.assert_close(out, logits_ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("size", [(64, 64), (96, 136), (224, 224)])
def test_v1_matches_official_forward(size):
    """Classification (cls token, resized position embeddings) and detection (stage maps) forwards."""
    torch.manual_seed(2)
    depths = (2, 1, 1, 1)
    model = pvt.create_model("pvt_tiny", backend="reference", depths=depths, embed_dims=SMALL["embed_dims"],
                             num_classes=5)
    model = _randomise(model).double().eval()
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    sd = model.state_dict()
    with torch.no_grad():
        torch.testing.assert_close(model(x), _official_v1(sd, x, depths, 224, detection=False),
                                   rtol=1e-9, atol=1e-9)
        for f, r in zip(model.forward_features(x), _official_v1(sd, x, depths, 224, detection=True)):
            torch.testing.assert_close(f, r, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------- checkpoints


def _timm_filter(state_dict):
    """timm's ``_checkpoint_filter_fn`` (timm/models/pvt_v2.py): official keys -> timm keys."""
    import re

    out = {}
    for k, v in state_dict.items():
        if k.startswith("patch_embed"):
            k = k.replace("patch_embed1", "patch_embed")
            k = k.replace("patch_embed2", "stages.1.downsample")
            k = k.replace("patch_embed3", "stages.2.downsample")
            k = k.replace("patch_embed4", "stages.3.downsample")
        k = k.replace("dwconv.dwconv", "dwconv")
        k = re.sub(r"block(\d+).(\d+)", lambda x: f"stages.{int(x.group(1)) - 1}.blocks.{x.group(2)}", k)
        k = re.sub(r"^norm(\d+)", lambda x: f"stages.{int(x.group(1)) - 1}.norm", k)
        out[k] = v
    return out


def _outputs(model, x):
    with torch.no_grad():
        out = model(x)
    return out if torch.is_tensor(out) else torch.cat([o.flatten() for o in out])


@pytest.mark.parametrize("name", ["pvt_v2_b0", "pvt_v2_b2_li", "pvt_tiny", "mit_b0"])
def test_state_dict_round_trips(name):
    """Official naming (ours), timm naming, wrappers and DDP prefixes load into a fresh model exactly."""
    torch.manual_seed(3)
    source = pvt.create_model(name, backend="sdpa", **SMALL).eval()
    target = pvt.create_model(name, backend="sdpa", **SMALL).eval()
    x = torch.randn(1, 3, 64, 64)
    expected = _outputs(source, x)
    official = source.state_dict()
    variants = {
        "official": official,
        "model wrapper": {"model": official, "epoch": 3},
        "state_dict wrapper": {"state_dict": official},
        "DDP prefix": {f"module.{k}": v for k, v in official.items()},
    }
    if not isinstance(source, PyramidVisionTransformer):  # timm has pvt_v2 only
        variants["timm"] = _timm_filter(official)
    for label, state_dict in variants.items():
        with torch.no_grad():
            for p in target.parameters():
                p.fill_(float("nan"))  # every parameter must be loaded
        pvt.load_state_dict(target, state_dict)
        assert torch.equal(_outputs(target, x), expected), label


def test_timm_key_names():
    """Our map inverts timm's filter, and produces the names of timm's pvt_v2 modules."""
    official = _meta_model("pvt_v2_b0").state_dict()
    timm = _timm_filter(official)
    for key in ("patch_embed.proj.weight", "stages.1.downsample.norm.bias", "stages.0.blocks.1.attn.sr.weight",
                "stages.3.blocks.0.mlp.dwconv.weight", "stages.2.norm.weight", "head.weight"):
        assert key in timm
    assert list(timm_to_official(timm)) == list(official)


def test_mit_drops_imagenet_head():
    """SegFormer's ImageNet MiT checkpoints carry a classifier; the backbone ignores it."""
    source = pvt.create_model("mit_b0", **SMALL)
    state_dict = {**source.state_dict(), "head.weight": torch.zeros(1000, 128), "head.bias": torch.zeros(1000)}
    target = pvt.create_model("mit_b0", **SMALL)
    pvt.load_state_dict(target, state_dict)
    assert torch.equal(target.block1[0].attn.q.weight, source.block1[0].attn.q.weight)


def test_mismatched_keys_raise_listing_them():
    model = pvt.create_model("pvt_v2_b0", **TINY)
    state_dict = model.state_dict()
    state_dict["block1.0.attn.qq.weight"] = state_dict.pop("block1.0.attn.q.weight")
    with pytest.raises(RuntimeError) as info:
        pvt.load_state_dict(model, state_dict)
    message = str(info.value)
    assert "missing keys (1): block1.0.attn.q.weight" in message
    assert "unexpected keys (1): block1.0.attn.qq.weight" in message
    missing, unexpected = pvt.load_state_dict(model, state_dict, strict=False)
    assert missing == ["block1.0.attn.q.weight"] and unexpected == ["block1.0.attn.qq.weight"]

    state_dict = model.state_dict()
    state_dict["head.weight"] = torch.zeros(10, 256)
    with pytest.raises(RuntimeError, match=r"shape mismatches \(1\): head.weight: checkpoint \(10, 256\), "
                                           r"model \(1000, 256\)"):
        pvt.load_state_dict(model, state_dict, strict=False)
    with pytest.raises(TypeError, match="mapping"):
        pvt.load_state_dict(model, [1, 2])


def test_pretrained_path(tmp_path):
    torch.manual_seed(5)
    source = pvt.create_model("pvt_v2_b0", num_classes=10, **SMALL).eval()
    path = tmp_path / "timm.pth"
    torch.save({"model": _timm_filter(source.state_dict())}, path)
    loaded = pvt.create_model("pvt_v2_b0", num_classes=10, pretrained=path, **SMALL).eval()
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(_outputs(loaded, x), _outputs(source, x))


def test_v1_position_embeddings_resized_on_load():
    """A 224 checkpoint loads into a 160 model; both then compute the same at 160x160."""
    torch.manual_seed(6)
    source = pvt.create_model("pvt_tiny", backend="sdpa", **SMALL).eval()
    target = pvt.create_model("pvt_tiny", backend="sdpa", img_size=160, **SMALL).eval()
    assert target.pos_embed1.shape == (1, 40 * 40, 16) and target.pos_embed4.shape == (1, 5 * 5 + 1, 128)
    pvt.load_state_dict(target, source.state_dict())
    assert torch.equal(target.pos_embed4[:, 0], source.pos_embed4[:, 0])
    x = torch.randn(1, 3, 160, 160)
    torch.testing.assert_close(_outputs(target, x), _outputs(source, x), rtol=0, atol=0)


# ---------------------------------------------------------------- backends and training


def _triton_model_case(name):
    """(model with backend triton on the kernel device, x (2, 3, 64, 64) on the CPU, a float64 copy on the
    reference backend, the device); skips where the triton backend cannot run."""
    cuda = torch.cuda.is_available()
    if not (cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("the triton backend needs CUDA, or TRITON_INTERPRET=1 set before triton is imported")
    torch.manual_seed(7)
    model = pvt.create_model(name, backend="triton", **TINY).eval()
    expected = copy.deepcopy(model).double()
    expected.configure_attention(backend="reference")
    device = torch.device("cuda" if cuda else "cpu")
    return model.to(device), torch.randn(2, 3, 64, 64), expected, device


def _assert_within_twice_the_reference_error(out, reference, expected, floor):
    err = (out.double() - expected).abs().max().item()
    err_reference = (reference.double() - expected).abs().max().item()
    assert err <= 2 * err_reference + floor * expected.abs().max().item(), (err, err_reference)


@pytest.mark.parametrize("name", ["pvt_v2_b0", "pvt_v2_b2_li"])
def test_fused_projection_path_under_bf16_autocast(name, monkeypatch):
    """fuse_projections=True under bf16 autocast (the models' mixed precision): the stages with C <= 128
    take the fused path, and the logits stay within 2x the bf16 reference's error of float64."""
    model, x, expected, device = _triton_model_case(name)
    from sra_kernels.ops import projected_attention

    model.configure_attention(fuse_projections=True)
    widths = []
    forward = projected_attention.projected_attention_forward
    monkeypatch.setattr(projected_attention, "projected_attention_forward",
                        lambda *a: widths.append(a[0].shape[-1]) or forward(*a))
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        out = model(x.to(device)).float().cpu()
        model.configure_attention(backend="reference")
        reference = model(x.to(device)).float().cpu()
        expected = expected(x.double())
    assert widths == [w for w in model.embed_dims if w <= 128]  # one fused call per attention block
    _assert_within_twice_the_reference_error(out, reference, expected, floor=4e-3)


@pytest.mark.parametrize("name", ["pvt_v2_b0", "pvt_v2_b2_li", "pvt_tiny"])
def test_triton_logits_match_reference(name, monkeypatch):
    """Whole-model logits on the triton backend vs float64, within 2x the fp32 reference's error."""
    model, x, expected, device = _triton_model_case(name)
    from sra_kernels import fused

    calls = []
    kernel = fused.sra_attention_triton

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(fused, "sra_attention_triton", counting)
    with torch.no_grad():
        expected = expected(x.double())
        out = model(x.to(device)).cpu()
        assert len(calls) == 4  # every attention ran the fused op
        model.configure_attention(backend="reference")
        reference = model(x.to(device)).cpu()
    _assert_within_twice_the_reference_error(out, reference, expected, floor=1e-5)


def test_training_steps_reduce_loss():
    torch.manual_seed(8)
    model = pvt.create_model("pvt_v2_b0", num_classes=10, backend="sdpa", **SMALL)
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(p.grad is not None for p in model.parameters())


def _saved_bytes_loss_and_grads(model, x):
    """One training step's (bytes autograd saved in the forward, loss, {parameter: gradient}); the random
    numbers of dropout and drop path drawn from seed 1."""
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = model(x)
        loss = sum(o.float().square().mean() for o in out) if isinstance(out, list) else out.float().square().mean()
    loss.backward()
    return sum(saved), loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name, backend, most_saved", [
    ("pvt_v2_b0", "sdpa", 0.3), ("pvt_tiny", "reference", 0.3), ("segformer_b0", "sdpa", 0.75),
    ("pvt_v2_b0", "triton", 0.3),
])
def test_grad_checkpointing_keeps_gradients_and_saves_less(name, backend, most_saved, monkeypatch):
    """set_grad_checkpointing(True) with dropout and drop path on: the same loss and every same gradient (the
    blocks' random numbers replayed), while the forward saves at most ``most_saved`` of the bytes it saved without
    (the blocks keep only their inputs; SegFormer's decode head, wide at a small image, keeps its activations);
    under no_grad nothing is checkpointed."""
    device = torch.device("cpu")
    if backend == "triton":
        device = _triton_model_case(name)[-1]
    torch.manual_seed(0)
    model = pvt.create_model(name, backend=backend, drop_rate=0.1, drop_path_rate=0.3, **SMALL).to(device).train()
    x = torch.randn(2, 3, 64, 64, device=device)
    saved, loss, grads = _saved_bytes_loss_and_grads(model, x)
    model.set_grad_checkpointing(True)
    saved_checkpointed, loss_checkpointed, grads_checkpointed = _saved_bytes_loss_and_grads(model, x)
    torch.testing.assert_close(loss_checkpointed, loss, rtol=1e-6, atol=0)
    assert grads_checkpointed.keys() == grads.keys() and len(grads) == len(list(model.parameters()))
    for key, grad in grads.items():
        torch.testing.assert_close(grads_checkpointed[key], grad, rtol=1e-5, atol=1e-7, msg=key)
    assert saved_checkpointed <= most_saved * saved, (saved_checkpointed, saved)

    def no_checkpoint(*args, **kwargs):
        raise AssertionError("checkpointed under no_grad")

    monkeypatch.setattr(pvt.models, "checkpoint", no_checkpoint)
    with torch.no_grad():
        model.eval()(x)
