"""Backend registry and selection.

Backends: ``triton``, ``cuda`` (CUDA C++), ``cpu`` (C++/OpenMP), ``torch`` (eager PyTorch reference), and
``auto``. Choose per call with ``backend=`` or per process with ``RLHF_FAST_BACKEND``.

``auto``: CUDA tensors go to the fastest measured GPU backend of that op (``AUTO_GPU`` below); CPU tensors go
to the C++ kernels, or to ``torch`` when the compiled library is missing (a warning says so once). A backend
asked for by name that cannot run raises ``BackendUnavailable`` with the reason; it never falls back silently.
"""

from __future__ import annotations

import importlib
import os
import warnings

import torch

BACKENDS = ("auto", "triton", "cuda", "cpu", "torch")
ENV_VAR = "RLHF_FAST_BACKEND"

# auto's order for CUDA tensors, per op; the first live backend wins. Ops not listed use DEFAULT_GPU_ORDER.
# No GPU measurement has been taken yet: until then the CUDA C++ kernels lead where they exist, a choice from
# their structure (they need no JIT warm-up), not from a measurement. Replace with measured choices
# (benchmarks/results/<device>.csv) and say which run justifies each.
DEFAULT_GPU_ORDER = ("cuda", "triton", "torch")
AUTO_GPU: dict[str, tuple[str, ...]] = {}
# ---- quant: qmatmul on more than 4 rows. Unmeasured, chosen from the kernels' structure: the CUDA GEMV re-reads
# the activations from L1 for every weight chunk (L1-bound beyond ~4 rows, see benchmarks/NOTES.md) and past 16
# rows the cuda backend dequantizes the whole weight before cuBLAS, while the Triton kernel stays fused.
AUTO_GPU["qmatmul_many_rows"] = ("triton", "cuda", "torch")
# ---- sampling: Triton is the only GPU kernel.
AUTO_GPU["sample"] = ("triton", "torch")


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run these inputs here."""


_compiled = None
_compiled_error: str | None = None
_warned: set[str] = set()


def compiled():
    """The compiled extension module rlhf_fast._C, or None (the reason is in compiled_error())."""
    global _compiled, _compiled_error
    if _compiled is None and _compiled_error is None:
        try:
            _compiled = importlib.import_module("rlhf_fast._C")
        except (ImportError, OSError) as exc:
            _compiled_error = f"compiled library rlhf_fast._C failed to load: {exc}"
    return _compiled


def compiled_error() -> str | None:
    compiled()
    return _compiled_error


def cuda_compiled() -> bool:
    lib = compiled()
    return bool(lib is not None and lib.built_with_cuda())


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_importable() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not installed ({exc})"
    return None


def why_not(backend: str, device: torch.device) -> str | None:
    """None when `backend` can run tensors on `device`, else the reason it cannot."""
    if backend == "torch":
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"the cpu backend runs CPU tensors, these are on {device}"
        return compiled_error()
    if backend == "cuda":
        if device.type != "cuda":
            return f"the cuda backend runs CUDA tensors, these are on {device}"
        if compiled() is None:
            return compiled_error()
        if not cuda_compiled():
            return "rlhf_fast._C was built without the CUDA sources (no nvcc or a CPU-only torch at build time)"
        return None
    if backend == "triton":
        reason = _triton_importable()
        if reason:
            return reason
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpret():
            return None
        return (
            f"triton needs CUDA tensors (these are on {device}); on the CPU set TRITON_INTERPRET=1 "
            f"before the first call to run the Triton interpreter"
        )
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=5)


def requested(backend: str | None) -> str:
    name = backend if backend is not None else os.environ.get(ENV_VAR, "auto")
    if name not in BACKENDS:
        source = "backend" if backend is not None else ENV_VAR
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name


# select()'s answers, keyed by everything they depend on: the op, the backend asked for, the device type, the
# Triton interpreter switch (read only where it matters: triton off the GPU) and the compiled library's load
# state. A hit costs a dict lookup, not the checks.
_selected: dict[tuple, str] = {}


def select(op: str, backend: str | None, device: torch.device) -> str:
    """The backend that runs `op` on tensors of `device` (cached per op, request, device type and environment;
    a request that cannot run raises every time)."""
    name = requested(backend)
    device_type = device.type
    interpret = os.environ.get("TRITON_INTERPRET") if name == "triton" and device_type != "cuda" else None
    key = (op, name, device_type, interpret, _compiled, _compiled_error)
    choice = _selected.get(key)
    if choice is None:
        choice = _selected[key] = _select(op, name, device)
    return choice


def _select(op: str, name: str, device: torch.device) -> str:
    if name != "auto":
        reason = why_not(name, device)
        if reason:
            raise BackendUnavailable(f"{op}: backend {name!r} is unavailable: {reason}")
        return name
    if device.type == "cuda":
        order = AUTO_GPU.get(op, DEFAULT_GPU_ORDER)
    elif device.type == "cpu":
        order = ("cpu", "torch")
    else:
        order = ("torch",)
    for candidate in order:
        reason = why_not(candidate, device)
        if reason is None:
            if candidate != order[0]:
                _warn_once(
                    f"{op}:{device.type}",
                    f"rlhf_fast: {op} on {device.type} runs on the {candidate} "
                    f"backend because {order[0]} is unavailable: {why_not(order[0], device)}",
                )
            return candidate
    raise BackendUnavailable(f"{op}: no backend can run tensors on {device}")


def status() -> dict[str, str | None]:
    """Per backend: None when live on this machine, else why not."""
    gpu = torch.device("cuda") if torch.cuda.is_available() else None
    out: dict[str, str | None] = {"torch": None, "cpu": why_not("cpu", torch.device("cpu"))}
    if gpu is None:
        if cuda_compiled():
            out["cuda"] = "no CUDA device visible (the CUDA kernels are compiled in)"
        else:
            out["cuda"] = "no CUDA device visible, and " + (compiled_error() or "rlhf_fast._C has no CUDA kernels")
        triton_reason = _triton_importable()
        out["triton"] = triton_reason or (
            None if triton_interpret() else "no CUDA device visible (TRITON_INTERPRET=1 runs it on the CPU, slowly)"
        )
    else:
        out["cuda"] = why_not("cuda", gpu)
        out["triton"] = why_not("triton", gpu)
    return out
