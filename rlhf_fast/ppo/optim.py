"""The loop's optimiser: AdamW through torch's fused kernel, and a step that drops the gradients it applied.

At a 151936-row vocabulary the embedding dominates both: torch's default AdamW path runs ~10 elementwise passes
over each (V, H) parameter per step (a (V, H) temporary among them), the fused kernel one; and a gradient kept
until the next backward holds another (V, H) float32 tensor through the next rollout and scoring.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor


def adamw(params, lr: float) -> torch.optim.AdamW:
    """AdamW with torch's fused kernel where the parameters' device has one (CPU and CUDA do), else torch's default.
    The same update, up to float rounding in the last bit."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=lr, fused=True)
    except RuntimeError:  # a device without a fused AdamW kernel
        return torch.optim.AdamW(params, lr=lr)


def clip_and_step(optimizer: torch.optim.Optimizer, params, max_grad_norm: float) -> torch.Tensor:
    """Clips the gradients of `params` to a global norm of max_grad_norm, steps, then sets every gradient of the
    optimiser to None, so a gradient lives only from its backward to its step. Returns the norm before clipping
    (of the whole gradient: sharded parameters' norms are reduced over the processes)."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm
