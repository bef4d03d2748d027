"""Eager-PyTorch references: the semantics every kernel is tested against, and the `torch` backend.

Written the way RLHF trainers write them (reversed Python loop over time steps, log_softmax + gather), but with
the exact contracts of rlhf_fast. Run them in float64 for test references.
"""
from __future__ import annotations

import math

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


# ---------------------------------------------------------------- divergence

F_DIVERGENCES = ("kl", "reverse_kl", "js", "tv", "hellinger", "chi2", "alpha")
# Divergences of the form scale * (sum P^a Q^(1-a) - 1).
POWER_DIVERGENCES = ("hellinger", "chi2", "alpha")


def power_divergence_constants(kind, alpha):
    """(a, scale) with divergence = scale * (sum P^a Q^(1-a) - 1): hellinger a=1/2, scale=-1 (1 - sum sqrt(PQ));
    chi2 a=2, scale=1 (sum P^2/Q - 1 = sum (P-Q)^2/Q); alpha a=alpha, scale=1/(alpha(alpha-1))."""
    if kind == "hellinger":
        return 0.5, -1.0
    if kind == "chi2":
        return 2.0, 1.0
    return float(alpha), 1.0 / (alpha * (alpha - 1.0))


def _divergence_terms(logp, logq, kind, alpha):
    """Per-vocab-entry terms whose sum over the last dim is the divergence (before the power kinds' scale)."""
    p, q = logp.exp(), logq.exp()
    if kind == "kl":
        return p * (logp - logq)
    if kind == "reverse_kl":
        return q * (logq - logp)
    if kind == "js":
        logm = torch.logaddexp(logp, logq) - math.log(2.0)
        return 0.5 * (p * (logp - logm) + q * (logq - logm))
    if kind == "tv":
        return 0.5 * (p - q).abs()
    if kind in POWER_DIVERGENCES:
        exponent, _ = power_divergence_constants(kind, alpha)
        return torch.exp(exponent * logp + (1 - exponent) * logq)
    raise ValueError(f"kind must be one of {F_DIVERGENCES}, got {kind!r}")


def _finish(terms, kind, alpha, mask):
    out = terms.sum(-1)
    if kind in POWER_DIVERGENCES:
        out = power_divergence_constants(kind, alpha)[1] * (out - 1)
    if mask is not None:
        out = torch.where(mask.bool(), out, torch.zeros_like(out))
    return out


def f_divergence(logits_p, logits_q, kind, *, alpha=None, temperature=1.0, mask=None):
    """Per-position divergence between P = softmax(logits_p / T) and Q = softmax(logits_q / T) over the last dim.

    logits_p, logits_q: (..., V); mask: (...) or None (0 = masked: result 0, no gradient). log_softmax of both
    sides, then the formula over the full (..., V) tensors. Returns (...) in float32 (float64 for float64 inputs).
    Vocab entries where both logits are -inf (a padded vocab) contribute nothing and get a zero gradient.
    """
    dtype = torch.promote_types(torch.promote_types(logits_p.dtype, logits_q.dtype), torch.float32)
    logp = torch.log_softmax(logits_p.to(dtype) / temperature, dim=-1)
    logq = torch.log_softmax(logits_q.to(dtype) / temperature, dim=-1)
    # Absent entries: the formulas would give 0 * log(0/0) = nan; computing them on finite stand-ins and then
    # discarding them keeps both the value and the gradient clean.
    absent = (logp == -math.inf) & (logq == -math.inf)
    zero = torch.zeros((), dtype=dtype, device=logp.device)
    terms = _divergence_terms(torch.where(absent, zero, logp), torch.where(absent, zero, logq), kind, alpha)
    return _finish(torch.where(absent, zero, terms), kind, alpha, mask)


def f_divergence_eager(logits_p, logits_q, kind, *, alpha=None, temperature=1.0, mask=None):
    """f_divergence the way trainers write it (log_softmax both sides, then the formula; no padded-vocab handling):
    the `eager` benchmark provider."""
    dtype = torch.promote_types(torch.promote_types(logits_p.dtype, logits_q.dtype), torch.float32)
    logp = torch.log_softmax(logits_p.to(dtype) / temperature, dim=-1)
    logq = torch.log_softmax(logits_q.to(dtype) / temperature, dim=-1)
    return _finish(_divergence_terms(logp, logq, kind, alpha), kind, alpha, mask)
