"""sra_kernels.integrations against the real timm and transformers (tiny random models, CPU-fast): a patched
model's outputs and every parameter gradient equal the unpatched model's (float64, to rounding, on the
reference and sdpa backends; the accuracy rule on triton), checkpoints round-trip with the host's keys,
dropout runs in training only, unpatch restores the host forward, output_attentions=True raises."""

import copy
import subprocess
import sys

import pytest
import torch

from sra_kernels import integrations
from sra_kernels.integrations import patch, unpatch
from tests.accuracy import assert_within_reference_error

ROUNDING = 1e-10
"""float64 patched vs unpatched: the largest error, in units of (1 + the largest value), as tests/accuracy.py
counts (the 1 covers gradients that are exactly zero up to rounding, e.g. the key bias's)."""


def _timm():
    return pytest.importorskip("timm")


def _transformers():
    return pytest.importorskip("transformers")


def _timm_model(name="pvt_v2_b0", **kwargs):
    return _timm().create_model(name, num_classes=10, **kwargs)


def _segformer_config(**kwargs):
    return _transformers().SegformerConfig(
        num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32], patch_sizes=[7, 3],
        strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2], decoder_hidden_size=16, num_labels=3,
        drop_path_rate=0.0, **kwargs)


def _pvt_v2_config(**kwargs):
    return _transformers().PvtV2Config(
        num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32], patch_sizes=[7, 3],
        strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2], **kwargs)


def _segformer_semantic(**kwargs):
    return _transformers().SegformerForSemanticSegmentation(_segformer_config(**kwargs))


def _segformer_model(**kwargs):
    return _transformers().SegformerModel(_segformer_config(**kwargs))


def _pvt_v2_model(**kwargs):
    return _transformers().PvtV2Model(_pvt_v2_config(**kwargs))


def _pvt_v2_linear(**kwargs):
    return _pvt_v2_model(linear_attention=True, **kwargs)


MODELS = {
    "timm_pvt_v2_b0": (_timm_model, 64),
    "timm_pvt_v2_b2_li": (lambda: _timm_model("pvt_v2_b2_li", depths=(1, 1, 1, 1)), 64),
    "hf_segformer_semantic": (_segformer_semantic, 32),
    "hf_segformer_model": (_segformer_model, 32),
    "hf_pvt_v2_model": (_pvt_v2_model, 32),
    "hf_pvt_v2_linear": (_pvt_v2_linear, 32),
}
"""name -> (builder, image side)."""


def _randomise(model):
    """O(1) activations without structure: HF's std-0.02 init makes every attention nearly uniform."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, p[0].numel() ** -0.5)
            else:
                p.add_(torch.randn_like(p), alpha=0.1)
    return model.eval()


def _first(output):
    """The model's main output: a tensor (timm), or the first field of a ModelOutput (logits, last hidden state)."""
    return output if isinstance(output, torch.Tensor) else output[0]


def _forward_backward(model, x):
    """(output, {parameter name: gradient}) of one forward and the backward of <output, a fixed random tensor>."""
    model.zero_grad(set_to_none=True)
    out = _first(model(x))
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype).to(out))
    return out.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _assert_rounding(name, got, want):
    assert got.shape == want.shape, name
    err = (got - want).abs().max().item()
    assert err <= ROUNDING * (1 + want.abs().max().item()), f"{name}: error {err:.3g}"


def _assert_same_results(got, want):
    (out, grads), (want_out, want_grads) = got, want
    _assert_rounding("output", out, want_out)
    assert grads.keys() == want_grads.keys()
    for name in want_grads:
        _assert_rounding(name, grads[name], want_grads[name])


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_patched_matches_host_float64(name, backend):
    build, side = MODELS[name]
    host = _randomise(build()).double()
    x = torch.randn(2, 3, side, side, dtype=torch.float64)
    patched = copy.deepcopy(host)
    names = patch(patched, backend=backend)
    assert names and all(n.endswith(("attn", "attention")) for n in names)
    convs = [m for n in names for m in patched.get_submodule(n).modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    _assert_same_results(_forward_backward(patched, x), _forward_backward(host, x))


TRITON_MODELS = {
    "timm_pvt_v2_b0": (lambda: _timm_model(depths=(1, 1, 1, 1)), 64),  # one block per stage: interpreter time
    "hf_segformer_semantic": MODELS["hf_segformer_semantic"],
    "hf_pvt_v2_linear": MODELS["hf_pvt_v2_linear"],
}


@pytest.mark.parametrize("name", sorted(TRITON_MODELS))
def test_patched_triton_within_accuracy_rule(name, kernel_device):
    """triton float32 vs the host in float64, allowed twice the host's own float32 error (tests/accuracy.py)."""
    build, side = TRITON_MODELS[name]
    host = _randomise(build())
    x = torch.randn(2, 3, side, side)
    exact = _forward_backward(copy.deepcopy(host).double(), x.double())
    host, x = host.to(kernel_device), x.to(kernel_device)
    peer = _forward_backward(host, x)
    patch(host, backend="triton")
    got = _forward_backward(host, x)
    assert_within_reference_error("output", got[0].cpu(), exact[0], peer[0].cpu(), torch.float32)
    assert got[1].keys() == exact[1].keys()
    for param in exact[1]:
        assert_within_reference_error(param, got[1][param].cpu(), exact[1][param], peer[1][param].cpu(),
                                      torch.float32)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_unpatch_restores_host_forward(name):
    build, side = MODELS[name]
    model = _randomise(build())
    x = torch.randn(1, 3, side, side)
    want = _first(model(x))
    names = patch(model, backend="sdpa")
    assert patch(model, backend="reference", deterministic=True) == names  # again: new options, same modules
    assert unpatch(model) == names and unpatch(model) == []
    assert all("forward" not in vars(module) for module in model.modules())
    assert torch.equal(_first(model(x)), want)


def test_timm_state_dict_round_trip():
    model = _randomise(_timm_model())
    keys = set(model.state_dict())
    patch(model, backend="reference")
    state = model.state_dict()
    assert set(state) == keys
    fresh = _timm_model().eval()
    patch(fresh, backend="reference")
    result = fresh.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(fresh(x), model(x))


@pytest.mark.parametrize("build", [_segformer_semantic, _pvt_v2_linear])
def test_hf_save_pretrained_round_trip(build, tmp_path):
    model = _randomise(build())
    keys = set(model.state_dict())
    patch(model, backend="reference")
    assert set(model.state_dict()) == keys and not any(".kv." in k for k in keys)
    model.save_pretrained(tmp_path)
    loaded, info = type(model).from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    patch(loaded, backend="reference")
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(_first(loaded.eval()(x)), _first(model(x)))


@pytest.mark.parametrize("build", [_segformer_semantic, _segformer_model, _pvt_v2_model])
def test_hf_output_attentions_raises(build):
    x = torch.randn(1, 3, 32, 32)
    for model, kwargs in ((build(), dict(output_attentions=True)), (build(output_attentions=True), {})):  # or config
        patch(model.eval(), backend="reference")
        with pytest.raises(ValueError, match="output_attentions=True"):
            model(x, **kwargs)
    assert _first(model(x, output_attentions=False)).isfinite().all()


def _patched_attention(name):
    """(a model, its first attention module, patched, a function running that module on one fixed input)."""
    if name == "timm":
        model = _timm_model().eval()
        patch(model, backend="reference")
        module, x = model.stages[0].blocks[0].attn, torch.randn(2, 256, 32)
        return model, module, lambda: module(x, (16, 16))
    model = (_segformer_semantic() if name == "hf_segformer" else _pvt_v2_model()).eval()
    module, x = model.get_submodule(patch(model, backend="reference")[0]), torch.randn(2, 64, 16)
    return model, module, lambda: _first(module(x, 8, 8))


def _dropouts(name, module):
    """((the owner of the attention-probability dropout's p, its attribute), the output dropout or None)."""
    if name in ("timm", "hf_pvt_v2"):
        return (module.attn_drop, "p"), module.proj_drop
    if hasattr(module, "self"):  # SegFormer 4.x: the output dropout is SegformerSelfOutput's
        return (module.self.dropout, "p"), module.output.dropout
    return (module, "attention_dropout"), None  # SegFormer 5.x: the block applies the hidden dropout


@pytest.mark.parametrize("name", ["timm", "hf_segformer", "hf_pvt_v2"])
def test_dropout_in_training_only(name):
    model, module, run = _patched_attention(name)
    base = run()  # eval
    model.train()
    assert torch.equal(run(), base)  # every p = 0
    (owner, attribute), output_dropout = _dropouts(name, module)
    setattr(owner, attribute, 0.5)
    first, second = run(), run()
    assert not torch.equal(first, base) and not torch.equal(first, second)
    model.eval()
    assert torch.equal(run(), base)
    setattr(owner, attribute, 0.0)
    if output_dropout is not None:
        output_dropout.p = 0.5
        model.train()
        out = run()
        kept = out != 0
        assert 0.3 < kept.float().mean() < 0.7 and torch.allclose(out[kept], 2 * base[kept], atol=1e-6)


def test_family_functions_and_errors():
    model = _segformer_model()
    assert integrations.patch_hf_segformer(model) == patch(model)
    with pytest.raises(ValueError, match="no PvtV2SelfAttention"):
        integrations.patch_hf_pvt_v2(model)
    with pytest.raises(ValueError, match="holds no"):
        patch(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="backend"):
        patch(model, backend="cuda")
    with pytest.raises(TypeError, match="deterministic"):
        patch(model, deterministic=1)
    assert set(unpatch(model)) == {n for n, m in model.named_modules() if n.endswith(".attention")}


def test_imports_without_timm_and_transformers():
    code = ("import sys; sys.modules['timm'] = sys.modules['transformers'] = None\n"
            "import torch, sra_kernels.integrations as i\n"
            "try:\n    i.patch_timm_pvt_v2(torch.nn.Linear(2, 2))\nexcept ImportError: print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "ok", result.stderr
