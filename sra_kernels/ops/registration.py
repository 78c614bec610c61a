"""torch.library registration of the Triton ops, shared by the op files that register them beside their launchers.

:func:`register` makes one custom op in the ``sra_kernels`` namespace with its fake (meta) implementation
(so that ``torch.compile`` traces it without graph breaks), its autograd (whose backward calls the
backward op) and its FLOP formula (so that ``torch.utils.flop_counter.FlopCounterMode`` counts it), and
returns the callable the rest of the package uses.

That callable skips the dispatcher in eager mode: the dispatcher and torch.library's autograd wrapper cost
~0.1-0.3 ms of host time per op call, longer than the kernels at PVT sizes. An eager call on a real tensor
runs the implementation directly, inside an ``autograd.Function`` with the op's own ``setup_context`` and
``backward``; traced calls (torch.compile, export, fake or functional tensors), dispatch modes (e.g.
FlopCounterMode) and functorch transforms take the registered op.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula


def eager(x: Tensor) -> bool:
    """True for an eager call on a real tensor: run the Python implementations directly."""
    return (type(x) is Tensor and not torch.compiler.is_compiling()
            and torch._C._len_torch_dispatch_stack() == 0  # e.g. FlopCounterMode counts the ops
            and not torch._C._are_functorch_transforms_active())


def fake_rows(rows: Callable, *sizes, count: int = 1):
    """In a fake implementation: ``rows(*sizes)`` (``count`` row counts of buffers whose rows follow a launch plan)
    where every size is concrete; new dynamic sizes where any is symbolic, so that the plan's heuristics put no
    guard on them (the buffers are bias-gradient partials, which only a finishing sum reads)."""
    if all(isinstance(n, int) for n in sizes):
        return rows(*sizes)
    ctx = torch.library.get_ctx()
    fresh = tuple(ctx.new_dynamic_size() for _ in range(count))
    return fresh if count > 1 else fresh[0]


def call(op, impl: Callable, *args):
    """``op(*args)``, or its implementation ``impl(*args)`` directly in eager mode (see :func:`eager`)."""
    return impl(*args) if eager(args[0]) else op(*args)


def _first_order_only(name: str, backward: Callable) -> Callable:
    """``backward``, refusing to run under ``create_graph=True``: the backward ops are not differentiable, so a
    double backward (e.g. a gradient penalty) would silently get wrong or missing gradients. Autograd enables
    grad mode inside a backward exactly when it builds a graph of it (torch.compile's tracing does not)."""

    def first_order_backward(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError(
                f"sra_kernels::{name} has no double backward (create_graph=True, e.g. a gradient penalty): "
                "run this model on backend='reference' (the eager math, twice differentiable; PyTorch's fused "
                "attention kernels behind sdpa have no double backward either) for higher-order gradients")
        return backward(ctx, *grads)

    return first_order_backward


def _without_materialized_grads(setup_context: Callable) -> Callable:
    """``setup_context`` that also tells autograd not to materialise zero gradients for the outputs nothing
    differentiated (the statistics and saved tensors every op returns beside its result): their backward
    receives None there instead of freshly zero-filled buffers."""

    def setup(ctx, inputs, output):
        ctx.set_materialize_grads(False)
        setup_context(ctx, inputs, output)

    return setup


def _autograd_entry_point(op, impl, setup_context, backward):
    """In eager mode an ``autograd.Function`` over ``impl`` with the op's own ``setup_context`` and
    ``backward`` (``impl`` itself when nothing is differentiated); the registered op when traced."""

    def forward(ctx, *args):  # the ctx-taking form: apply() then skips binding a signature per call
        output = impl(*args)
        setup_context(ctx, args, output)
        return output

    function = type(f"{op._name.split('::')[-1]}_eager", (torch.autograd.Function,), {
        "forward": staticmethod(forward), "backward": staticmethod(backward)})

    def entry_point(*args):
        if not eager(args[0]):
            return op(*args)
        if torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args):
            return function.apply(*args)
        return impl(*args)  # nothing to differentiate: no autograd node, no saved tensors

    return entry_point


def register(name: str, impl: Callable, *, fake: Callable, flops: Callable | None = None,
             setup_context: Callable | None = None, backward: Callable | None = None):
    """Register ``sra_kernels::name`` (schema from ``impl``'s annotations); returns (op, callable).

    ``fake`` takes the op's arguments and returns meta outputs; ``flops`` is a FLOP formula (argument shapes
    in, FLOPs out; see ``torch.utils.flop_counter``); ``setup_context`` and ``backward`` are the autograd
    pair of ``torch.library.register_autograd`` (a forward op has them, a backward op does not).
    """
    op = torch.library.custom_op(f"sra_kernels::{name}", mutates_args=())(impl)
    op.register_fake(fake)
    if flops is not None:
        register_flop_formula(getattr(torch.ops.sra_kernels, name))(flops)
    if backward is None:
        return op, lambda *args: call(op, impl, *args)
    backward = _first_order_only(name, backward)
    setup_context = _without_materialized_grads(setup_context)
    op.register_autograd(backward, setup_context=setup_context)
    return op, _autograd_entry_point(op, impl, setup_context, backward)
