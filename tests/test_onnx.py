"""ONNX export: whichever backend a model runs, ``torch.onnx.export`` traces PyTorch's math (the planner routes the
triton / auto backends to ``sdpa`` while an ONNX exporter traces), so the graph holds standard ops only and
onnxruntime reproduces PyTorch."""

import io
import warnings

import pytest
import torch

import pvt
from sra_kernels.plan import Problem, plan_sra

TINY = dict(depths=(1, 1, 1, 1))
STANDARD = {"Conv", "LayerNormalization", "MatMul", "Softmax"}
"""Ops every exported PVT graph holds (the attention as MatMul / Softmax)."""


def test_planner_routes_onnx_export_to_pytorch_math(monkeypatch):
    problem = Problem(1, 256, 4, 32, 1, 8, False, torch.float32, False)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for backend, path in (("triton", "sdpa"), ("auto", "sdpa"), ("sdpa", "sdpa"), ("reference", "reference")):
        for device in (cpu, cuda):  # a triton model exports where the kernels cannot run, too
            assert plan_sra(problem, device, backend, onnx_export=True).path == path
    # an eager call plans without asking whether an exporter runs: no host cost
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: pytest.fail("asked in eager mode"))
    model = pvt.create_model("pvt_v2_b0", backend="sdpa", **TINY).eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))


def _run(model_proto, x):
    """The graph's ops and its output on x in onnxruntime (CPU)."""
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return {n.op_type for n in model_proto.graph.node}, session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def _check(model, x, model_proto):
    ops, out = _run(model_proto, x)
    assert STANDARD <= ops and all(n.domain in ("", "ai.onnx") for n in model_proto.graph.node), ops
    model.configure_attention(backend="reference")
    with torch.no_grad():
        expected = model(x)
    assert torch.allclose(torch.from_numpy(out), expected, rtol=0, atol=1e-4)


def _export(model, x, dynamo=True):
    pytest.importorskip("onnxscript")
    onnx = pytest.importorskip("onnx")
    if dynamo:
        return torch.onnx.export(model, (x,), dynamo=True, verbose=False).model_proto
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer warnings
        torch.onnx.export(model, (x,), buffer, dynamo=False)
    return onnx.load_from_string(buffer.getvalue())


@pytest.mark.parametrize("name", ["pvt_v2_b0", "segformer_b0"])
def test_export_holds_standard_ops_and_matches_pytorch(name):
    """The triton backend (``auto`` plans the same under export: see the planner test)."""
    model = pvt.create_model(name, backend="triton", **TINY).eval()
    x = torch.randn(2, 3, 64, 64)
    _check(model, x, _export(model, x))


def test_legacy_torchscript_exporter():
    model = pvt.create_model("pvt_v2_b0", backend="triton", **TINY).eval()
    x = torch.randn(1, 3, 64, 64)
    _check(model, x, _export(model, x, dynamo=False))


def _timm_pvt_v2_b0():
    timm = pytest.importorskip("timm")
    return timm.create_model("pvt_v2_b0", pretrained=False, depths=(1, 1, 1, 1))


def _hf_segformer():
    transformers = pytest.importorskip("transformers")
    config = transformers.SegformerConfig(hidden_sizes=[16, 32, 80, 128], num_attention_heads=[1, 2, 5, 8],
                                          depths=[1, 1, 1, 1], decoder_hidden_size=32, num_labels=5)
    return transformers.SegformerForSemanticSegmentation(config)


@pytest.mark.parametrize("host", [_timm_pvt_v2_b0, _hf_segformer], ids=["timm pvt_v2_b0", "HF SegFormer"])
def test_patched_host_model_exports(host):
    """A timm / HF model whose attention :func:`sra_kernels.integrations.patch` put on the triton backend."""
    from sra_kernels.integrations import patch

    model = host().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    assert patch(model, backend="triton")
    ops, out = _run(_export(model, x), x)
    assert STANDARD <= ops
    expected = expected if torch.is_tensor(expected) else expected.logits
    assert torch.allclose(torch.from_numpy(out), expected, rtol=0, atol=1e-4)
