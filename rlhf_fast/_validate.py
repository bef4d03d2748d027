"""Argument checks shared by every public op: errors name the argument and say what to do."""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def tensor(name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def floating(name: str, x) -> torch.Tensor:
    tensor(name, x)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be float32, bfloat16, float16 or float64, got {x.dtype}; convert it with {name}.float()"
        )
    return x


def integer(name: str, x) -> torch.Tensor:
    tensor(name, x)
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {x.dtype}; convert it with {name}.long()")
    return x


def same_shape(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if x.shape != ref.shape:
        raise ValueError(
            f"{name} has shape {tuple(x.shape)} but {ref_name} has shape {tuple(ref.shape)}; they must match"
        )


def same_device(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if x.device != ref.device:
        raise ValueError(
            f"{name} is on {x.device} but {ref_name} is on {ref.device}; move it with {name}.to({ref_name}.device)"
        )


def bool_mask(name: str, mask, ref_name: str, ref: torch.Tensor) -> torch.Tensor | None:
    """None, or `mask` as a bool tensor shaped like `ref` (nonzero = valid)."""
    if mask is None:
        return None
    tensor(name, mask)
    same_shape(name, mask, ref_name, ref)
    same_device(name, mask, ref_name, ref)
    return mask if mask.dtype == torch.bool else mask != 0


def common_float(**named: torch.Tensor) -> list[torch.Tensor]:
    """Checks the tensors are floating and brings them to one dtype (copies only those that differ)."""
    dtype = None
    for name, x in named.items():
        floating(name, x)
        dtype = x.dtype if dtype is None or dtype == x.dtype else torch.promote_types(dtype, x.dtype)
    return [x if x.dtype == dtype else x.to(dtype) for x in named.values()]


def positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def positive_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite float, got {value!r}")
    return float(value)
