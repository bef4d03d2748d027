"""--dtype and --grad-checkpointing.

bf16: the trainable policy and critic keep float32 master weights, gradients and AdamW state and run their
forward passes (rollout, scoring and update) under bf16 autocast; the frozen reference and reward model are
cast to bf16 weights. The fused lm head reads bf16 hidden states and a bf16 copy of the head weight. Log-probs,
entropies, KL terms, advantages and losses stay float32: the kernels return float32 whatever their inputs.
"""

from __future__ import annotations

import contextlib

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def autocast(dtype: torch.dtype | None, device: torch.device):
    """torch.autocast to `dtype` on `device`, or nothing for None / float32."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def head_inputs(hidden, weight, bias, dtype: torch.dtype | None):
    """(hidden, weight, bias) in the autocast dtype for the fused lm head (a custom op autocast does not see);
    unchanged for None / float32. The casts are differentiable: gradients reach the float32 master weight."""
    if dtype is None or dtype == torch.float32:
        return hidden, weight, bias
    return hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


def frozen(model, cfg):
    """A frozen model (reference, reward) in --dtype's weights."""
    return model.to(DTYPES[cfg.dtype])


def trainable(model, cfg):
    """--grad-checkpointing on a Hugging Face model (the policy, the critic's trunk): activations of each decoder
    layer are recomputed in the backward instead of kept."""
    if cfg.grad_checkpointing:  # activation_checkpointing_enable since transformers 5.x, the old name before
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def critic(model, cfg, device):
    """The critic (a models.ValueModel) on `device`, with --dtype's autocast and --grad-checkpointing."""
    model.autocast = compute_dtype(cfg)
    trainable(model.trunk, cfg)
    return model.to(device)


def compute_dtype(cfg) -> torch.dtype | None:
    """The autocast dtype of the trainable models' forward passes (None: float32 throughout)."""
    return None if cfg.dtype == "fp32" else DTYPES[cfg.dtype]
