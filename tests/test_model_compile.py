"""Whole models under torch.compile: one graph (no graph break) per family, attention backend and mode; how
many compiles new image sizes cost; CUDA graphs (CUDA only). Compiled training (forward and backward, the
triton backend's custom ops through AOTAutograd) against eager: tests/test_pvt_cli.py's loss-curve test.

One model per family and attention kind stands for its family (b0..b5 differ in widths and depths, not in
code), with one block per stage at a small image. Under ``TRITON_INTERPRET=1`` the triton backend traces the
same registered custom ops as on a GPU (the plan routes it as named; the kernels run in the interpreter).

Image sizes (documented in the README): ``torch.compile(model)`` compiles the first size statically and the
second with symbolic H and W; later sizes reuse that graph (2 compiles in all); ``dynamic=True`` compiles once.
Both as long as no stage's reduced grid reaches 1 x 1 (PyTorch specialises sizes 0 and 1: images below 64 px),
PVT v1 stays off its ``img_size`` grid (where it skips the position-embedding resize) and PyTorch's convolution
keeps its algorithm (on CPU it picks one by feature-map size: a guard, hence a recompile, past a threshold).
"""

import pytest
import torch
from torch._dynamo.testing import CompileCounter, CompileCounterWithBackend

import pvt
from pvt.registry import MODEL_CONFIGS
from sra_kernels import available_backends
from sra_kernels import plan as sra_plan
from sra_kernels import policy

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
BACKENDS = ("reference", "sdpa", "triton", "auto")
ONE_BLOCK = dict(depths=(1, 1, 1, 1))


def _family_representatives() -> list[str]:
    """Per model class and SRA kind (linear or not): its narrowest registered model, then the shallowest."""
    chosen = {}
    for name, (cls, config) in sorted(MODEL_CONFIGS.items()):
        key = (cls.__name__, config.get("linear", False))
        size = (sum(config["embed_dims"]), sum(config["depths"]))
        if key not in chosen or size < chosen[key][0]:
            chosen[key] = (size, name)
    return sorted(name for _, name in chosen.values())


MODELS = _family_representatives()


def _loss(out) -> torch.Tensor:
    """A scalar from logits or a list of stage maps (MiT)."""
    return sum(o.float().mean() for o in out) if isinstance(out, (list, tuple)) else out.float().mean()


@pytest.fixture
def fresh_dynamo():
    """Dynamo's caches emptied before and after: compiles are counted from zero and hit no other test's limit."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_every_family_is_covered():
    assert {"pvt_tiny", "pvt_v2_b0", "pvt_v2_b2_li", "mit_b0"} <= set(MODELS)


def _graph_capture(graphs: list):
    """A torch.compile backend that keeps each graph dynamo captures (traced on fake tensors, custom ops through
    their fake implementations) and runs none: the compiled function returns zeros of the graph's output shapes.
    With fullgraph=True a graph break raises, naming its reason."""

    def backend(gm, example_inputs):
        graphs.append(gm)
        (outputs,) = gm.graph.find_nodes(op="output")[0].args
        values = [node.meta["example_value"] for node in outputs]
        return lambda *args: [torch.zeros(v.shape, dtype=v.dtype, device=v.device) for v in values]

    return backend


ATTENTION_VARIANTS = ("pvt_tiny", "pvt_v2_b2_li")
"""Between them every attention form: convolution sr 8 / 4 / 2, sr 1, PVT v1's cls-token stage (1 x N), linear."""
ONE_GRAPH_CASES = [
    pytest.param(name, backend, marks=() if backend == "auto" or (name in ATTENTION_VARIANTS and backend != "sdpa")
                 else pytest.mark.slow)
    for name in MODELS for backend in BACKENDS]
"""Every model x backend; off CUDA (``slow`` runs on CUDA only) every model on ``auto`` (there: ``sdpa``, the
other models' attention being the same) and the attention variants on ``reference`` and ``triton`` too."""


@pytest.mark.parametrize("name, backend", ONE_GRAPH_CASES)
def test_one_graph_per_model_backend_and_mode(name, backend, fresh_dynamo):
    """torch.compile(fullgraph=True) captures a single graph in training (grad mode, train()) and in inference
    (no_grad, eval()), as torch._dynamo.explain counts them (graph_count 1, graph_break_count 0) but without
    running it; the triton backend's graph holds our custom ops, reference's and sdpa's none."""
    if backend == "triton" and "triton" not in available_backends(DEVICE):
        pytest.skip("the triton backend needs CUDA or TRITON_INTERPRET=1")
    model = pvt.create_model(name, backend=backend, **ONE_BLOCK).to(DEVICE)
    x = torch.randn(1, 3, 32, 32, device=DEVICE)
    for train in (True, False):
        graphs = []
        torch._dynamo.reset()
        model.train(train)
        with torch.set_grad_enabled(train):
            torch.compile(lambda images: _loss(model(images)), backend=_graph_capture(graphs), fullgraph=True)(x)
        assert len(graphs) == 1
        custom_ops = any("sra_kernels" in str(node.target) for node in graphs[0].graph.nodes)
        if backend != "auto":
            assert custom_ops == (backend == "triton"), (name, backend, train)


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_grad_checkpointing_compiles_to_one_graph(backend, fresh_dynamo):
    """set_grad_checkpointing(True) under torch.compile(fullgraph=True) (aot_eager: the checkpointed blocks and,
    on triton, our custom ops through AOTAutograd): one graph, and every gradient as in eager."""
    if backend == "triton" and "triton" not in available_backends(DEVICE):
        pytest.skip("the triton backend needs CUDA or TRITON_INTERPRET=1")
    torch.manual_seed(0)
    model = pvt.create_model("pvt_v2_b0", num_classes=10, backend=backend, **ONE_BLOCK).to(DEVICE)
    model.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 64, 64, device=DEVICE)

    def grads(run):
        model.zero_grad(set_to_none=True)
        _loss(run(x)).backward()
        return [p.grad for p in model.parameters()]

    want = grads(model)
    counter = CompileCounterWithBackend("aot_eager")
    got = grads(torch.compile(model, backend=counter, fullgraph=True))
    assert counter.frame_count == 1
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dynamic, compiles", [(None, 2), (True, 1)])
def test_new_image_sizes_recompile_at_most_once(dynamic, compiles, monkeypatch, fresh_dynamo):
    """Three image sizes: torch.compile's default compiles twice (static, then symbolic H and W), dynamic=True
    once. The attention runs ``auto`` as on a GPU the table has measurements for (sm_90, as an H200), so the
    table lookup is traced too: it guards the symbolic sizes by ranges (no graph break, no per-size compile)."""
    monkeypatch.setattr(sra_plan, "_auto_refuses", lambda device: None)
    monkeypatch.setattr(policy, "device_capability", lambda device: (9, 0))
    stage_1 = sra_plan.Problem(1, 256, 4, 64, 1, 8, False, torch.bfloat16, False)
    assert "no measurement within" in sra_plan.plan_sra(stage_1, torch.device("cpu")).reason  # the table decides
    model = pvt.create_model("pvt_v2_b2", num_classes=10, backend="auto", **ONE_BLOCK).to(torch.bfloat16).eval()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=dynamic)
    with torch.no_grad():
        for side in (64, 96, 128):
            x = torch.randn(1, 3, side, side, dtype=torch.bfloat16)
            torch.testing.assert_close(compiled(x), model(x))
    assert counter.frame_count == compiles


@pytest.mark.skipif(not CUDA, reason="mode='reduce-overhead' replays CUDA graphs: CUDA only")
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_reduce_overhead_matches_eager(backend, train, fresh_dynamo):
    """CUDA-graph replay (inductor's cudagraph trees) of a whole model: logits (and gradients) as in eager."""
    model = pvt.create_model("pvt_v2_b0", num_classes=10, backend=backend).cuda().train(train)
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    x = torch.randn(4, 3, 64, 64, device="cuda")

    def step(run):
        torch.compiler.cudagraph_mark_step_begin()
        with torch.set_grad_enabled(train):
            logits = run(x)
        if train:
            logits.float().square().mean().backward()
        grads = [p.grad.clone() for p in model.parameters()] if train else []
        model.zero_grad(set_to_none=True)
        return logits.detach().clone(), grads

    for _ in range(3):  # warm-up, CUDA-graph recording, then replays
        got, got_grads = step(compiled)
    want, want_grads = step(model)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-2, atol=1e-4)
