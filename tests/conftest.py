"""Shared fixtures: the devices the kernels run on, seeding, the slow-sweep rule."""

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"

KERNEL_DEVICES = (["cuda"] if CUDA else []) + (["cpu"] if INTERPRETER else [])
"""Devices on which the Triton kernels run: CUDA natively, CPU in Triton's interpreter."""


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    """Seed every test; one intra-op thread (small shapes: on a busy 2-core CPU OpenMP threads
    spin and run 5-30x slower)."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
