"""Eager-PyTorch references: the semantics every kernel is tested against, and the `torch` backend.

Written the way RLHF trainers write them (reversed Python loop over time steps, log_softmax + gather), but with
the exact contracts of rlhf_fast. Run them in float64 for test references.
"""
from __future__ import annotations

import torch


# ---------------------------------------------------------------- advantages


def gae(rewards, values, mask=None, *, gamma=1.0, lam=0.95, last_value=None):
    """GAE over the last dim with skip-masking. rewards, values, mask: (B, T); last_value: (B,) or None.

    Within a row, each valid token's successor is the next valid token; after the last valid token the successor
    value is last_value (0 by default: terminal). Returns (advantages, returns), 0 where mask is 0, in the
    promoted dtype of rewards and values (float64 in -> float64 out).
    """
    dtype = torch.promote_types(torch.promote_types(rewards.dtype, values.dtype), torch.float32)
    rewards, values = rewards.to(dtype), values.to(dtype)
    batch, steps = rewards.shape
    valid = torch.ones_like(rewards, dtype=torch.bool) if mask is None else mask.bool()
    next_value = rewards.new_zeros(batch) if last_value is None else last_value.to(dtype)
    running = rewards.new_zeros(batch)
    advantages = [None] * steps
    for t in reversed(range(steps)):
        m = valid[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        candidate = delta + gamma * lam * running
        running = torch.where(m, candidate, running)
        next_value = torch.where(m, values[:, t], next_value)
        advantages[t] = torch.where(m, candidate, torch.zeros_like(candidate))
    advantages = torch.stack(advantages, dim=1) if steps else rewards.new_zeros(batch, 0)
    returns = torch.where(valid, advantages + values, torch.zeros_like(advantages))
    return advantages, returns


def gae_right_padded_loop(rewards, values, *, gamma=1.0, lam=0.95):
    """The classic loop of TRL / OpenRLHF / verl for right-padded (B, T) tensors, masked entries pre-zeroed.

    Kept as the `eager` benchmark provider: it is what those trainers run.
    """
    steps = rewards.shape[-1]
    lastgaelam = 0
    reversed_adv = []
    for t in reversed(range(steps)):
        nextvalues = values[:, t + 1] if t < steps - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        reversed_adv.append(lastgaelam)
    advantages = torch.stack(reversed_adv[::-1], dim=1)
    return advantages, advantages + values


def packed_to_padded(cu_seqlens: torch.Tensor):
    """For packed segments: (index (S, Tmax) into the packed tokens, valid (S, Tmax)), right-padded."""
    starts, lengths = cu_seqlens[:-1], cu_seqlens[1:] - cu_seqlens[:-1]
    longest = int(lengths.max()) if lengths.numel() else 0
    offsets = torch.arange(longest, device=cu_seqlens.device)
    valid = offsets[None, :] < lengths[:, None]
    index = torch.where(valid, starts[:, None] + offsets[None, :], torch.zeros_like(valid, dtype=torch.long))
    return index, valid


def gae_packed(rewards, values, cu_seqlens, mask=None, *, gamma=1.0, lam=0.95, last_value=None):
    """GAE over 1-D packed tokens; segment s spans [cu_seqlens[s], cu_seqlens[s+1])."""
    index, valid = packed_to_padded(cu_seqlens)
    if mask is not None:
        valid = valid & mask.bool()[index]
    adv, ret = gae(rewards[index], values[index], valid, gamma=gamma, lam=lam, last_value=last_value)
    out_adv = adv.new_zeros(rewards.shape).index_put((index[valid],), adv[valid])
    out_ret = ret.new_zeros(rewards.shape).index_put((index[valid],), ret[valid])
    return out_adv, out_ret


def grpo_advantages(scores, group_size, *, norm_std=True, eps=1e-6):
    """(score - group mean) [/ (unbiased group std + eps)]; scores (G*group_size,). A group of one gives 0."""
    dtype = torch.promote_types(scores.dtype, torch.float32)
    groups = scores.to(dtype).reshape(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if norm_std:
        std = groups.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(centred)
        centred = centred / (std + eps)
    return centred.reshape(scores.shape)


def rloo_advantages(scores, group_size):
    """score - mean of the other scores of its group (leave-one-out baseline). A group of one gives 0."""
    dtype = torch.promote_types(scores.dtype, torch.float32)
    groups = scores.to(dtype).reshape(-1, group_size)
    if group_size == 1:
        return torch.zeros_like(groups).reshape(scores.shape)
    baseline = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    return (groups - baseline).reshape(scores.shape)


def masked_mean(x, mask=None, dim=None):
    """Mean over the entries where mask is nonzero (all entries if mask is None); 0 where nothing is valid."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    x = x.to(dtype)
    if mask is None:
        return x.mean() if dim is None else x.mean(dim=dim)
    m = mask.to(dtype)
    x = torch.where(mask.bool(), x, torch.zeros_like(x))
    total = (x * m).sum() if dim is None else (x * m).sum(dim=dim)
    count = m.sum() if dim is None else m.sum(dim=dim)
    return total / count.clamp(min=1)


def masked_var(x, mask=None):
    """Unbiased variance over the valid entries (nan with fewer than two, like torch.var)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    values = x.to(dtype) if mask is None else x.to(dtype)[mask.bool()]
    return values.var()


def masked_whiten(x, mask=None, *, shift_mean=True, eps=1e-8):
    """(x - mean) / sqrt(var + eps) with masked mean and unbiased variance; mean added back if not shift_mean.

    Applied to every entry (masked ones too), as TRL and verl do.
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x.to(dtype) - mean) * torch.rsqrt(var + eps)
    return whitened if shift_mean else whitened + mean


# ---------------------------------------------------------------- quant


def dequantize_int8(qweight, scales, dtype=torch.float32):
    """int8 (N, K) per-output-channel symmetric -> (N, K) `dtype`: q * scales[n]."""
    return (qweight.to(dtype) * scales.to(dtype)[:, None])


def unpack_int4(qweight):
    """uint8 (N, K/2), two values per byte (even k in the low nibble) -> uint8 (N, K) values in [0, 15]."""
    low, high = qweight & 0xF, qweight >> 4
    return torch.stack((low, high), dim=-1).reshape(qweight.shape[0], -1)


def dequantize_int4(qweight, scales, zeros, group_size, dtype=torch.float32):
    """Packed uint4 (N, K/2), scales (N, K/group) float, zeros (N, K/group) uint8 -> (q - zero) * scale (N, K)."""
    q = unpack_int4(qweight).to(dtype)
    rows, cols = q.shape
    grouped = q.reshape(rows, cols // group_size, group_size)
    return ((grouped - zeros.to(dtype)[..., None]) * scales.to(dtype)[..., None]).reshape(rows, cols)


def quantize_activations_int8(x):
    """Dynamic per-token symmetric int8: x (M, K) -> (q int8 (M, K), scale fp32 (M,)), x ~ q * scale.

    scale = amax / 127 and q = round_half_even(x * (127 / amax)), both in float32 (rows of zeros: q = 0,
    scale = 0); every backend quantizes with exactly these float32 operations.
    """
    xf = x.float()
    amax = xf.abs().amax(dim=-1) if xf.shape[-1] else xf.new_zeros(xf.shape[:-1])
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    q = torch.round(xf * inv[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, amax / 127.0


def qmatmul(x, qw, bias=None):
    """F.linear(x, qw.dequantize(), bias) for x (M, K); w8a8 first quantizes x per token as the kernels do.

    Computes in float64 for float64 x, else in float32, and returns x's dtype.
    """
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    weight = qw.dequantize(compute)
    if qw.scheme == "w8a8":
        q, scale = quantize_activations_int8(x)
        activations = q.to(compute) * scale.to(compute)[:, None]
        if x.requires_grad:  # straight-through: the rounding passes the gradient unchanged, as the kernels do
            activations = x.to(compute) + (activations - x.to(compute)).detach()
    else:
        activations = x.to(compute)
    out = torch.nn.functional.linear(activations, weight, None if bias is None else bias.to(compute))
    return out.to(x.dtype)
