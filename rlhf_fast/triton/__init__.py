"""Triton kernels, one module per family. Imported lazily: importing triton costs time and needs a GPU or
TRITON_INTERPRET=1 (set before the first call) to run. Nothing here registers autograd: dispatch gives a
module's triton_ops the autograd of their op specs when it first loads the module."""

from __future__ import annotations

import functools
import inspect

import torch


def on_tensor_device(launcher):
    """Decorator of a Triton launcher: runs it with the device of its first tensor argument current.

    Triton launches on the current CUDA device (and its current stream); without this, tensors on cuda:1 while
    cuda:0 is current would be read by a kernel running on cuda:0. No-op for tensors elsewhere (the CPU under the
    interpreter)."""

    @functools.wraps(launcher)
    def on_device(*args, **kwargs):
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if first is None or first.device.type != "cuda":
            return launcher(*args, **kwargs)
        with torch.cuda.device(first.device):
            return launcher(*args, **kwargs)

    # The resolved signature, for torch.library's schema inference (which reads string annotations in the
    # globals of the function it is given).
    on_device.__signature__ = inspect.signature(launcher, eval_str=True)
    return on_device
