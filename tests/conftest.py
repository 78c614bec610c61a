"""Shared fixtures: the devices the kernels run on, seeding, the slow-sweep rule."""

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"

KERNEL_DEVICES = (["cuda"] if CUDA else []) + (["cpu"] if INTERPRETER else [])
"""Devices on which the Triton kernels run: CUDA natively, CPU in Triton's interpreter."""


def nan_empty(shape, dtype, device):
    """``torch.empty`` filled with NaN, for buffers a kernel must fully overwrite: an unwritten element shows."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


@pytest.fixture(autouse=True)
def _seed_threads_and_fp32():
    """Seed every test; one intra-op thread (small shapes: on a busy 2-core CPU OpenMP threads spin
    and run 5-30x slower); fp32 PyTorch math in true fp32 on CUDA (no TF32), so that the fp32 peer
    of the accuracy rule is a real fp32 computation."""
    torch.manual_seed(0)
    threads, precision = torch.get_num_threads(), torch.get_float32_matmul_precision()
    torch.set_num_threads(1)
    torch.set_float32_matmul_precision("highest")
    with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=False):
        yield
    torch.set_num_threads(threads)
    torch.set_float32_matmul_precision(precision)


def pytest_collection_modifyitems(config, items):
    if not KERNEL_DEVICES:
        skip = pytest.mark.skip(reason="Triton kernels need CUDA or TRITON_INTERPRET=1")
        for item in items:
            if "kernel_device" in getattr(item, "fixturenames", ()):
                item.add_marker(skip)


@pytest.fixture(params=KERNEL_DEVICES or ["unavailable"])
def kernel_device(request):
    """A device on which the Triton kernels run (parametrised over CUDA and the interpreter)."""
    return torch.device(request.param)


def pytest_runtest_setup(item):
    if "slow" in item.keywords and not CUDA:
        pytest.skip("slow sweep: runs natively when CUDA is present")
