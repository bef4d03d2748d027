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


# ---------------------------------------------------------------- logprobs


def _entropy_of(log_probs):
    """-sum p log p over the last dim; p = 0 entries (logits of -inf) contribute 0, also to the gradient."""
    p = log_probs.exp()
    return -(p * log_probs.masked_fill(p == 0, 0)).sum(-1)


def logprobs(logits, labels, *, temperature=1.0, ignore_index=-100, return_entropy=False):
    """log softmax(logits / temperature) at `labels`: logits (..., V), labels (...) int -> (...) [, entropy (...)].

    Positions whose label is ignore_index get log-prob 0 (and no gradient); the entropy is computed at every
    position. Computed in float32, or float64 for float64 logits (the test reference).
    """
    dtype = torch.promote_types(logits.dtype, torch.float32)
    log_probs = torch.log_softmax(logits.to(dtype) / temperature, dim=-1)
    ignored = labels == ignore_index
    safe = torch.where(ignored, torch.zeros_like(labels), labels).long()
    logp = log_probs.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(ignored, torch.zeros_like(logp), logp)
    return (logp, _entropy_of(log_probs)) if return_entropy else logp


def entropy(logits, *, temperature=1.0):
    """Entropy of softmax(logits / temperature) over the last dim: (..., V) -> (...)."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    return _entropy_of(torch.log_softmax(logits.to(dtype) / temperature, dim=-1))


def linear_logprobs(hidden, weight, labels, *, bias=None, temperature=1.0, ignore_index=-100, return_entropy=False):
    """`logprobs` of the lm_head logits hidden @ weight.T + bias (computed in the inputs' dtype, as eager does):
    hidden (..., H), weight (V, H), bias (V,) or None, labels (...)."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    return logprobs(logits, labels, temperature=temperature, ignore_index=ignore_index, return_entropy=return_entropy)


def logprobs_per_row_loop(logits, labels):
    """The memory-bounding loop of TRL's selective_log_softmax / OpenRLHF: one batch row (T, V) at a time in
    float32, so only one row's log-softmax is alive. logits (B, T, V), labels (B, T) -> (B, T) float32."""
    rows = [torch.log_softmax(row.float(), dim=-1).gather(-1, row_labels.unsqueeze(-1)).squeeze(-1)
            for row, row_labels in zip(logits, labels)]
    return torch.stack(rows) if rows else logits.new_zeros(labels.shape, dtype=torch.float32)
