"""SegFormer B0-B5 (MiT + the all-MLP decode head): configurations, shapes, the official decoder, the CLI, and
Hugging Face SegFormer / PVTv2 checkpoints loaded into our models, checked against HF's own forward in float64."""

import math

import pytest
import torch
import torch.nn.functional as F

import pvt
from pvt.checkpoints import hf_norm_eps
from pvt.cli import main
from pvt.registry import MODEL_CONFIGS
from sra_kernels import SpatialReductionAttention

TINY = dict(depths=(1, 1, 1, 1), embed_dims=(16, 32, 80, 128), decoder_dim=32)
"""One block per stage, narrow stages and decoder: fast on a CPU; heads and sr ratios stay the official ones."""
PUBLISHED_PARAMS_M = {0: 3.8, 1: 13.7, 2: 27.5, 3: 47.3, 4: 64.1, 5: 84.7}
"""SegFormer paper, Table 1 / 2 (ADE20K, 150 classes)."""


def _randomise(model):
    """Perturb every parameter and set BatchNorm statistics away from 0 / 1, so each weight shows in the output."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        for name, buffer in model.named_buffers():
            if "running_" in name:
                buffer.copy_(torch.rand_like(buffer) + 0.5)
    return model


# ---------------------------------------------------------------- configurations and shapes


@pytest.mark.parametrize("i", range(6))
def test_configurations_match_published(i):
    with torch.device("meta"):
        model = pvt.create_model(f"segformer_b{i}")
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == PUBLISHED_PARAMS_M[i]
    assert model.num_classes == 150 and model.decode_head.linear_pred.out_channels == 150
    assert model.decode_head.linear_c1.proj.out_features == (256 if i < 2 else 768)
    _, config = MODEL_CONFIGS[f"segformer_b{i}"]
    assert {k: v for k, v in config.items() if k != "decoder_dim"} == MODEL_CONFIGS[f"mit_b{i}"][1]


@pytest.mark.parametrize("size", [(64, 64), (50, 71)])
def test_logits_at_a_quarter_of_the_input(size):
    model = pvt.create_model("segformer_b0", num_classes=5, backend="sdpa", **TINY).eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        logits = model(x)
        features = pvt.create_model("segformer_b0", num_classes=0, backend="sdpa", **TINY).eval()(x)
    grid = (math.ceil(size[0] / 4), math.ceil(size[1] / 4))
    assert logits.shape == (2, 5, *grid) and torch.isfinite(logits).all()
    assert features.shape == (2, 32, *grid)  # num_classes=0: the fused decoder map


def _official_head(sd, feats):
    """NVlabs/SegFormer segformer_head.py ``SegFormerHead.forward`` on our state dict, eval mode (mmcv's
    ConvModule: conv without bias, BatchNorm, ReLU; dropout is the identity)."""
    n, size = feats[0].shape[0], feats[0].shape[2:]

    def mlp(i, c):
        x = F.linear(c.flatten(2).transpose(1, 2), sd[f"decode_head.linear_c{i}.proj.weight"],
                     sd[f"decode_head.linear_c{i}.proj.bias"])
        return x.permute(0, 2, 1).reshape(n, -1, c.shape[2], c.shape[3])

    maps = [F.interpolate(mlp(i, feats[i - 1]), size=size, mode="bilinear", align_corners=False) for i in (4, 3, 2)]
    x = F.conv2d(torch.cat(maps + [mlp(1, feats[0])], dim=1), sd["decode_head.linear_fuse.conv.weight"])
    bn = "decode_head.linear_fuse.bn."
    x = F.relu(F.batch_norm(x, sd[bn + "running_mean"], sd[bn + "running_var"], sd[bn + "weight"], sd[bn + "bias"]))
    return F.conv2d(x, sd["decode_head.linear_pred.weight"], sd["decode_head.linear_pred.bias"])


def test_decoder_matches_the_official_head():
    model = _randomise(pvt.create_model("segformer_b2", num_classes=7, backend="reference", **TINY)).double().eval()
    x = torch.randn(2, 3, 64, 48, dtype=torch.float64)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert all(torch.equal(a, b) for a, b in zip(feats, model.backbone(x)))
        assert torch.allclose(model(x), _official_head(model.state_dict(), feats), rtol=0, atol=1e-12)


def test_backend_reaches_every_attention_and_official_checkpoints_load():
    model = pvt.create_model("segformer_b0", backend="reference", **TINY)
    model.configure_attention(backend="sdpa")
    attentions = [m for m in model.modules() if isinstance(m, SpatialReductionAttention)]
    assert model.backend == "sdpa" and len(attentions) == 4 and all(a.backend == "sdpa" for a in attentions)
    # an mmseg checkpoint: {"meta", "state_dict"} with BaseDecodeHead's unused conv_seg
    state_dict = {**model.state_dict(), "decode_head.conv_seg.weight": torch.zeros(150, 128, 1, 1)}
    target = pvt.create_model("segformer_b0", **TINY)
    pvt.load_state_dict(target, {"meta": {}, "state_dict": state_dict})
    assert torch.equal(target.decode_head.linear_c4.proj.weight, model.decode_head.linear_c4.proj.weight)


def test_cli_info_bench_and_train(capsys):
    main(["info", "segformer_b0", "--img-size", "512", "512"])
    out = capsys.readouterr().out
    assert "parameters: 3.753 M" in out and "8.388 GMACs" in out  # the paper: 3.8 M, 8.4 "GFLOPs" at 512x512
    main(["bench", "segformer_b0", "--batch", "1", "--img-size", "32", "32", "--steps", "1", "--warmup", "0",
          "--backends", "sdpa"])
    assert "segformer_b0 32x32 batch 1" in capsys.readouterr().out
    with pytest.raises(ValueError, match="segmentation model, not a classifier"):
        main(["train", "segformer_b0", "--epochs", "1", "--img-size", "32", "32", "--no-progress"])


# ---------------------------------------------------------------- Hugging Face checkpoints

HF_STAGES = dict(hidden_sizes=[16, 32, 48, 64], num_attention_heads=[1, 2, 3, 4], depths=[1, 2, 1, 1])


def _ours(cls, config, **kwargs):
    """Our model of an HF config (reference backend, float64, HF's LayerNorm eps)."""
    model = cls(embed_dims=config.hidden_sizes, num_heads=config.num_attention_heads, depths=config.depths,
                mlp_ratios=config.mlp_ratios, sr_ratios=config.sr_ratios, qkv_bias=True, backend="reference",
                **{**hf_norm_eps(config), **kwargs})
    return model.double().eval()


@pytest.mark.parametrize("source", ["state_dict", "hub file"])
def test_hf_segformer_matches_hf_forward(source, tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.SegformerConfig(**HF_STAGES, decoder_hidden_size=24, num_labels=5)
    hf = _randomise(transformers.SegformerForSemanticSegmentation(config)).double().eval()
    ours = _ours(pvt.SegFormer, config, num_classes=5, decoder_dim=24)
    if source == "state_dict":  # transformers 5's names (stages, q_proj / k_proj / v_proj, linear_projections)
        pvt.load_state_dict(ours, hf.state_dict())
    else:  # the hub's model.safetensors keeps the original names (encoder.block, attention.self.key, linear_c)
        hf.save_pretrained(tmp_path)
        pvt.load_checkpoint(ours, tmp_path / "model.safetensors")
    x = torch.randn(2, 3, 64, 48, dtype=torch.float64)
    with torch.no_grad():
        expected = hf(pixel_values=x, output_hidden_states=True)
        assert torch.allclose(ours(x), expected.logits, rtol=0, atol=1e-12)
        for a, b in zip(ours.forward_features(x), expected.hidden_states):
            assert torch.allclose(a, b, rtol=0, atol=1e-12)
        official = _ours(pvt.SegFormer, config, num_classes=5, decoder_dim=24, norm_eps=1e-6)
        official.load_state_dict(ours.state_dict())
        assert (official(x) - expected.logits).abs().max() > 1e-9  # the eps are seen: 1e-12 checks them


def test_hf_mit_backbone_and_classifier_load_into_mit():
    transformers = pytest.importorskip("transformers")
    config = transformers.SegformerConfig(**HF_STAGES, num_labels=3)
    hf = _randomise(transformers.SegformerForImageClassification(config)).double().eval()
    ours = _ours(pvt.MixVisionTransformer, config)
    pvt.load_state_dict(ours, hf.state_dict())  # its classifier is dropped: MiT is a backbone
    backbone = transformers.SegformerModel(config).double().eval()
    backbone.load_state_dict(hf.segformer.state_dict())
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        expected = backbone(pixel_values=x, output_hidden_states=True).hidden_states
        for state_dict in (hf.state_dict(), backbone.state_dict()):
            pvt.load_state_dict(ours, state_dict)
            assert all(torch.allclose(a, b, rtol=0, atol=1e-12) for a, b in zip(ours(x), expected))


@pytest.mark.parametrize("linear", [False, True])
def test_hf_pvt_v2_matches_hf_forward(linear, tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.PvtV2Config(**HF_STAGES, num_labels=5, linear_attention=linear)
    hf = _randomise(transformers.PvtV2ForImageClassification(config)).double().eval()
    ours = _ours(pvt.PyramidVisionTransformerV2, config, num_classes=5, linear=linear)
    hf.save_pretrained(tmp_path)
    pvt.load_checkpoint(ours, tmp_path / "model.safetensors")
    x = torch.randn(2, 3, 64, 48, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(ours(x), hf(pixel_values=x).logits, rtol=0, atol=1e-12)
        features = _ours(pvt.PyramidVisionTransformerV2, config, num_classes=0, linear=linear)
        pvt.load_state_dict(features, hf.pvt_v2.state_dict())  # PvtV2Model: no classifier
        expected = hf.pvt_v2(pixel_values=x, output_hidden_states=True).hidden_states
        assert all(torch.allclose(a, b, rtol=0, atol=1e-12) for a, b in zip(features.forward_features(x), expected))


def test_hf_norm_eps():
    transformers = pytest.importorskip("transformers")
    assert hf_norm_eps(transformers.SegformerConfig()) == dict(norm_eps=1e-5, patch_norm_eps=1e-5, sr_norm_eps=1e-5)
    config = transformers.PvtV2Config(layer_norm_eps=1e-4)
    assert hf_norm_eps(config) == dict(norm_eps=1e-4, patch_norm_eps=1e-4, sr_norm_eps=1e-4)
    with pytest.raises(ValueError, match="not a SegFormer or PVTv2 config"):
        hf_norm_eps(transformers.ViTConfig())
