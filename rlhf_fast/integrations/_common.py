"""Input checks shared by the verl and OpenRLHF adapters: when a peer's call can go to our kernels."""

from __future__ import annotations

import torch

# Dtypes our kernels take (they compute in float32); float64 calls stay with the peer, whose float64
# arithmetic is more precise than ours.
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def kernel_floats(*tensors) -> bool:
    """True if every tensor is a float32/bf16/fp16 tensor (None entries are skipped)."""
    return all(t is None or (isinstance(t, torch.Tensor) and t.dtype in KERNEL_DTYPES) for t in tensors)


def needs_grad(*tensors) -> bool:
    """True if autograd would take a gradient to one of the tensors."""
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def binary_mask(mask, like: torch.Tensor) -> bool:
    """True if `mask` is a tensor shaped like `like` whose entries are all 0 or 1.

    The peers multiply by the mask (a float mask weights the tokens); our kernels select by it (nonzero =
    valid), so only a 0/1 mask means the same to both. A bool mask needs no look; any other costs one pass.
    """
    if not isinstance(mask, torch.Tensor) or mask.shape != like.shape or mask.device != like.device:
        return False
    if mask.dtype == torch.bool:
        return True
    if mask.numel() == 0:
        return True
    if not mask.is_floating_point() and not mask.is_complex():  # integers: 0/1 iff within [0, 1], one pass
        low, high = torch.aminmax(mask)
        return bool(low >= 0) and bool(high <= 1)
    return bool(((mask == 0) | (mask == 1)).all())


def discount(value) -> float | None:
    """gamma/lambda as a float (a 0-dim tensor is read), or None if it is not a single finite number."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            return None
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if value == value and abs(value) != float("inf") else None


def aggregation(loss_mask, mode, dp_size=1, batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None):
    """(our mode, factor) with verl's agg_loss(loss, mask, mode, ...) = our agg_loss(loss, mask, our mode) *
    factor, or None where verl itself raises (unknown mode, dp_size > 1 without the global counts). OpenRLHF's
    token- and sequence-level losses are verl's token-mean and seq-mean-token-mean.

    Every verl mode but seq-mean-token-mean is the masked token sum S over a normaliser; ours gives S / count
    in token-mean. seq-mean-token-mean is the sum of the row means over a normaliser; ours gives it over the
    number of rows with a valid token. Counts stay on the device (no sync); 0/0 gives NaN where verl's does.
    """
    valid = loss_mask.bool()
    if mode in ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
        count = valid.sum()
        if mode == "token-sum":
            return "token-mean", count * dp_size
        if mode == "token-mean":
            if batch_num_tokens is None and dp_size > 1:
                return None
            return "token-mean", count / (count if batch_num_tokens is None else batch_num_tokens) * dp_size
        rows = (valid.sum(-1) > 0).sum()
        if global_batch_size is None and dp_size > 1:
            return None
        factor = count / (rows if global_batch_size is None else global_batch_size) * dp_size
        if mode == "seq-mean-token-sum-norm":
            factor = factor / (loss_mask.shape[-1] if loss_scale_factor is None else loss_scale_factor)
        return "token-mean", factor
    if mode == "seq-mean-token-mean":
        rows = (valid.sum(-1) > 0).sum()
        if global_batch_size is None and dp_size > 1:
            return None
        return "seq-mean-token-mean", rows / (rows if global_batch_size is None else global_batch_size) * dp_size
    return None
