"""Shared test setup.

Without a GPU the Triton kernels run under the Triton interpreter (TRITON_INTERPRET=1, set here before
anything imports triton). Tests marked `gpu` skip when CUDA is absent.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from rlhf_fast import backend  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def devices():
    """Devices to test on: the CPU always, CUDA when present."""
    return ["cpu"] + (["cuda"] if HAS_CUDA else [])


def live_backends(device):
    """The rlhf_fast backends (besides torch) that can run tensors on `device` here."""
    dev = torch.device(device)
    return [name for name in ("cpu", "cuda", "triton") if backend.why_not(name, dev) is None]


def device_backend_pairs():
    """(device, backend) for every kernel backend live here, plus torch on each device."""
    pairs = []
    for device in devices():
        pairs += [(device, name) for name in live_backends(device) + ["torch"]]
    return pairs


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
