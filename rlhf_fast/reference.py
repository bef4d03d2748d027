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


# ---------------------------------------------------------------- logprobs


def _entropy_of(log_probs):
    """-sum p log p over the last dim; p = 0 entries (logits of -inf) contribute 0, also to the gradient."""
    p = log_probs.exp()
    return -(p * log_probs.masked_fill(p == 0, 0)).sum(-1)


def logprobs(logits, labels, *, temperature=1.0, ignore_index=-100, return_entropy=False):
    """log softmax(logits / temperature) at `labels`: logits (..., V), labels (...) int -> (...) [, entropy (...)].

    Positions whose label is ignore_index get log-prob 0 (and no gradient), other labels outside [0, V) NaN;
    the entropy is computed at every position. Computed in float32, or float64 for float64 logits (the test
    reference).
    """
    dtype = torch.promote_types(logits.dtype, torch.float32)
    log_probs = torch.log_softmax(logits.to(dtype) / temperature, dim=-1)
    ignored = labels == ignore_index
    in_range = (labels >= 0) & (labels < logits.shape[-1])
    safe = torch.where(ignored | ~in_range, torch.zeros_like(labels), labels).long()
    logp = log_probs.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(in_range, logp, torch.full_like(logp, math.nan))
    logp = torch.where(ignored, torch.zeros_like(logp), logp)
    return (logp, _entropy_of(log_probs)) if return_entropy else logp


def entropy(logits, *, temperature=1.0):
    """Entropy of softmax(logits / temperature) over the last dim: (..., V) -> (...)."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    return _entropy_of(torch.log_softmax(logits.to(dtype) / temperature, dim=-1))


def head_logits(hidden, weight, bias=None, *, logit_scale=1.0, softcap=None):
    """The logits of an lm_head with a model's logit transform, before any temperature: the head's output
    y = hidden @ weight.T + bias in the inputs' dtype (as eager computes it), then, in float32 (float64 for
    float64 inputs), z = logit_scale * y (Cohere) and, with a soft cap, z = softcap * tanh(z / softcap)
    (Gemma 2/3). hidden (..., H), weight (V, H), bias (V,) or None -> (..., V)."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    if logit_scale == 1.0 and softcap is None:
        return logits
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) * logit_scale
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


def linear_logprobs(
    hidden,
    weight,
    labels,
    *,
    bias=None,
    temperature=1.0,
    logit_scale=1.0,
    softcap=None,
    ignore_index=-100,
    return_entropy=False,
):
    """`logprobs` of softmax(head_logits(hidden, weight, bias, logit_scale, softcap) / temperature):
    hidden (..., H), weight (V, H), bias (V,) or None, labels (...)."""
    logits = head_logits(hidden, weight, bias, logit_scale=logit_scale, softcap=softcap)
    return logprobs(logits, labels, temperature=temperature, ignore_index=ignore_index, return_entropy=return_entropy)


def logprobs_per_row_loop(logits, labels):
    """The memory-bounding loop of TRL's selective_log_softmax / OpenRLHF: one batch row (T, V) at a time in
    float32, so only one row's log-softmax is alive. logits (B, T, V), labels (B, T) -> (B, T) float32."""
    rows = [
        torch.log_softmax(row.float(), dim=-1).gather(-1, row_labels.unsqueeze(-1)).squeeze(-1)
        for row, row_labels in zip(logits, labels)
    ]
    return torch.stack(rows) if rows else logits.new_zeros(labels.shape, dtype=torch.float32)


# ---------------------------------------------------------------- losses

KL_KINDS = {
    "k1": "k1",
    "abs": "abs",
    "k2": "k2",
    "mse": "k2",
    "k3": "k3",
    "low_var_kl": "k3",
    "k1+": "k1+",
    "k3+": "k3+",
}
AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def _at_least_float32(*tensors):
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return [t.to(dtype) for t in tensors]


def kl_penalty(logp, ref_logp, kind="k1"):
    """Per-token KL estimator of the policy against the reference model, as verl writes it.

    k1: logp - ref; abs: |logp - ref|; k2 (mse): ½(logp - ref)²; k3 (low_var_kl): with d = clamp(ref - logp, ±20),
    clamp(exp(d) - d - 1, ±10). "k1+" / "k3+": the value of k1 / k3 with the gradient of k2 (straight-through).
    """
    kind = KL_KINDS[kind]
    logp, ref_logp = _at_least_float32(logp, ref_logp)
    if kind.endswith("+"):
        value = kl_penalty(logp, ref_logp, kind[:-1])
        surrogate = 0.5 * (logp - ref_logp).square()
        return surrogate - surrogate.detach() + value.detach()
    if kind == "k1":
        return logp - ref_logp
    if kind == "abs":
        return (logp - ref_logp).abs()
    if kind == "k2":
        return 0.5 * (logp - ref_logp).square()
    kl = torch.clamp(ref_logp - logp, min=-20.0, max=20.0)
    return torch.clamp(kl.exp() - kl - 1, min=-10.0, max=10.0)


def masked_sum(x, mask=None, dim=None):
    """Sum of x over the entries where mask is nonzero (masked entries are ignored even when inf/nan)."""
    (x,) = _at_least_float32(x)
    if mask is not None:
        x = torch.where(mask.bool(), x, torch.zeros_like(x))
    return x.sum() if dim is None else x.sum(dim=dim)


def agg_loss(loss, mask=None, mode="token-mean", *, normalizer=None, horizon=None):
    """Aggregates a per-token loss (..., T) to a scalar, as verl's agg_loss (rows = all leading dims flattened).

    token-mean: Σ(loss·m) / Σm. token-sum: Σ(loss·m). seq-mean-token-sum: Σ(loss·m) / (rows with a valid token).
    seq-mean-token-mean: Σ over rows with a valid token of (Σ_t loss·m / Σ_t m), / (rows with a valid token).
    seq-mean-token-sum-norm: Σ(loss·m) / (rows with a valid token) / T. Rows without a valid token are left out of
    every seq-mean mode. `normalizer` (a number > 0) replaces the count divided by (valid tokens, 1 for token-sum,
    valid rows), `horizon` (> 0) replaces T of seq-mean-token-sum-norm (verl's loss_scale_factor; the other modes
    ignore it). With the default counts, nothing valid (or nothing at all) gives 0.
    """
    (loss,) = _at_least_float32(loss)
    valid = torch.ones_like(loss, dtype=torch.bool) if mask is None else mask.bool()
    rows, steps = loss.shape[:-1].numel(), loss.shape[-1]
    loss, valid = loss.reshape(rows, steps), valid.reshape(rows, steps)
    row_sums = masked_sum(loss, valid, dim=-1)
    counts = valid.sum(-1)
    has_tokens = counts > 0
    if mode not in AGG_MODES:
        raise ValueError(f"mode must be one of {AGG_MODES}, got {mode!r}")
    if mode == "seq-mean-token-mean":
        total = torch.where(has_tokens, row_sums / counts.clamp(min=1), torch.zeros_like(row_sums)).sum()
    else:
        total = row_sums.sum()
    if normalizer is None:
        count = {"token-mean": counts.sum(), "token-sum": 1}.get(mode, has_tokens.sum())
        normalizer = count.clamp(min=1) if torch.is_tensor(count) else count
    if mode == "seq-mean-token-sum-norm":
        normalizer = normalizer * (max(steps, 1) if horizon is None else horizon)
    return total / normalizer


def ppo_policy_loss(
    logp,
    old_logp,
    advantages,
    mask=None,
    *,
    clip_low=0.2,
    clip_high=0.2,
    dual_clip=None,
    agg="token-mean",
    normalizer=None,
    horizon=None,
):
    """Clipped PPO policy loss as verl's compute_policy_loss; returns (loss, stats).

    ratio = exp(clamp(logp - old_logp, ±20)); pg = max(-A·ratio, -A·clamp(ratio, 1 - clip_low, 1 + clip_high)); with
    dual_clip c, where A < 0: min(pg, -A·c); loss = agg_loss(pg, mask, agg, normalizer=..., horizon=...).
    stats: clipfrac (valid tokens where the clipped term is larger), approx_kl (masked mean of old_logp - logp,
    log-ratio clamped), ratio_mean; all masked means over valid tokens.
    """
    logp, old_logp, advantages = _at_least_float32(logp, old_logp, advantages)
    negative_approx_kl = torch.clamp(logp - old_logp, min=-20.0, max=20.0)
    ratio = torch.exp(negative_approx_kl)
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    pg_losses = torch.maximum(pg_losses1, pg_losses2)
    if dual_clip is not None:
        pg_losses3 = -advantages * dual_clip
        pg_losses = torch.where(advantages < 0, torch.minimum(pg_losses, pg_losses3), pg_losses)
    loss = agg_loss(pg_losses, mask, agg, normalizer=normalizer, horizon=horizon)
    with torch.no_grad():
        stats = {
            "clipfrac": agg_loss(torch.gt(pg_losses2, pg_losses1).to(logp.dtype), mask),
            "approx_kl": agg_loss(-negative_approx_kl, mask),
            "ratio_mean": agg_loss(ratio, mask),
        }
    return loss, stats


def ppo_value_loss(
    values, old_values, returns, mask=None, *, clip=0.2, agg="token-mean", normalizer=None, horizon=None
):
    """Clipped value loss as verl's compute_value_loss: 0.5·agg(max((V-R)², (clamp(V, old±clip) - R)²)).

    stats: clipfrac (valid tokens where the clipped term is larger). clip=None: no clipping.
    """
    values, old_values, returns = _at_least_float32(values, old_values, returns)
    clipped_values = values if clip is None else torch.clamp(values, old_values - clip, old_values + clip)
    vf_losses1 = (values - returns) ** 2
    vf_losses2 = (clipped_values - returns) ** 2
    loss = agg_loss(0.5 * torch.maximum(vf_losses1, vf_losses2), mask, agg, normalizer=normalizer, horizon=horizon)
    with torch.no_grad():
        stats = {"clipfrac": agg_loss(torch.gt(vf_losses2, vf_losses1).to(values.dtype), mask)}
    return loss, stats


def linear_ppo_policy_loss(
    hidden,
    weight,
    labels,
    old_logp,
    advantages,
    mask=None,
    *,
    bias=None,
    temperature=1.0,
    clip_low=0.2,
    clip_high=0.2,
    dual_clip=None,
    agg="token-mean",
    normalizer=None,
    horizon=None,
    entropy_coef=0.0,
    ref_logp=None,
    kl_coef=0.0,
    kl_kind="k3",
    ignore_index=-100,
):
    """The eager composition that rlhf_fast.linear_ppo_policy_loss fuses: full logits, log_softmax + gather and
    entropy, ppo_policy_loss, agg_loss of the entropy and of kl_penalty. Returns (loss, stats) with the stats of
    ppo_policy_loss plus the loss's terms pg_loss, entropy and (with ref_logp) kl."""
    logp, entropy = linear_logprobs(
        hidden, weight, labels, bias=bias, temperature=temperature, ignore_index=ignore_index, return_entropy=True
    )
    scale = dict(normalizer=normalizer, horizon=horizon)
    pg_loss, stats = ppo_policy_loss(
        logp, old_logp, advantages, mask, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, agg=agg, **scale
    )
    entropy_term = agg_loss(entropy, mask, agg, **scale)
    loss = pg_loss - entropy_coef * entropy_term
    stats.update(pg_loss=pg_loss.detach(), entropy=entropy_term.detach())
    if ref_logp is not None:
        kl = agg_loss(kl_penalty(logp, ref_logp, kl_kind), mask, agg, **scale)
        loss = loss + kl_coef * kl
        stats["kl"] = kl.detach()
    return loss, stats


# ---------------------------------------------------------------- quant


def dequantize_int8(qweight, scales, dtype=torch.float32):
    """int8 (N, K) per-output-channel symmetric -> (N, K) `dtype`: q * scales[n]."""
    return qweight.to(dtype) * scales.to(dtype)[:, None]


def unpack_int4(qweight):
    """uint8 (N, K/2), two values per byte (even k in the low nibble) -> uint8 (N, K) values in [0, 15]."""
    low, high = qweight & 0xF, qweight >> 4
    return torch.stack((low, high), dim=-1).reshape(qweight.shape[0], 2 * qweight.shape[1])


def dequantize_int4(qweight, scales, zeros, group_size, dtype=torch.float32):
    """Packed uint4 (N, K/2), scales (N, K/group) float, zeros (N, K/group) uint8 -> (q - zero) * scale (N, K)."""
    q = unpack_int4(qweight).to(dtype)
    rows, cols = q.shape
    grouped = q.reshape(rows, cols // group_size, group_size)
    return ((grouped - zeros.to(dtype)[..., None]) * scales.to(dtype)[..., None]).reshape(rows, cols)


def quantize_activations_int8(x):
    """Dynamic per-token symmetric int8: x (M, K) -> (q int8 (M, K), scale fp32 (M,)), x ~ q * scale.

    scale = amax / 127 and q = round_half_even(x * (127 / amax)) clamped to [-127, 127], all in float32 with
    subnormals kept (rows of zeros: q = 0, scale = 0); every backend quantizes with exactly these operations.
    A NaN product (non-finite x, or 0 * inf when amax is so small that 127 / amax overflows) gives q = 0. A row
    holding a NaN or an inf gets 127 / amax = 0, so q = 0 and scale = NaN or inf: its matmul output is NaN.
    """
    xf = x.float()
    amax = xf.abs().amax(dim=-1) if xf.shape[-1] else xf.new_zeros(xf.shape[:-1])
    # a true float32 division: torch evaluates `127.0 / amax` as reciprocal(amax) * 127, rounded twice
    inv = torch.where(amax > 0, amax.new_full((), 127.0) / amax, torch.zeros_like(amax))
    q = torch.round(xf * inv[:, None]).nan_to_num_(nan=0.0).clamp_(-127, 127).to(torch.int8)
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


# ---------------------------------------------------------------- sampling


def filtered_log_probs(logits, *, temperature=1.0, top_k=None, top_p=None, min_p=None):
    """float64 log-probabilities (..., V) of the distribution Hugging Face's sampling draws from: softmax of
    logits / T after its top-k, top-p and min-p warpers (in that order; removed entries -inf). Top-p removes the
    entries whose cumulative probability, counted from the smallest up, is <= 1 - top_p; entries with equal
    logits are kept or removed together (the warper itself splits such a tie in its sort order)."""
    z = logits.double() / temperature
    if top_k is not None and top_k < z.shape[-1]:
        kth = torch.topk(z, top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, -math.inf)
    if top_p is not None and top_p < 1.0:
        ascending, order = torch.sort(z, dim=-1)
        cumulative = torch.softmax(ascending, dim=-1).cumsum(-1)
        last_of_tie = torch.searchsorted(ascending.contiguous(), ascending.contiguous(), right=True) - 1
        removed_sorted = cumulative.gather(-1, last_of_tie) <= 1.0 - top_p
        removed_sorted[..., -1] = False
        removed = torch.zeros_like(removed_sorted).scatter(-1, order, removed_sorted)
        z = z.masked_fill(removed, -math.inf)
    if min_p is not None and min_p > 0.0:
        z = z.masked_fill(z < z.amax(-1, keepdim=True) + math.log(min_p), -math.inf)
    return torch.log_softmax(z, dim=-1)


def sample(logits, uniforms, *, temperature=1.0, top_k=None, top_p=None, min_p=None):
    """The inverse-CDF draw of the kernels: token = the first entry (in vocab order) where the running sum of
    the filtered probabilities exceeds the row's uniform. logits (..., V), uniforms (...) float64 in [0, 1).
    Returns (tokens int64, filtered logp fp32, full logp fp32)."""
    logp = filtered_log_probs(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    cumulative = logp.exp().cumsum(-1)
    target = uniforms.double()[..., None] * cumulative[..., -1:]
    tokens = torch.searchsorted(cumulative.contiguous(), target.contiguous(), right=True)[..., 0]
    tokens = tokens.clamp_max(logits.shape[-1] - 1)
    full = torch.log_softmax(logits.double() / temperature, dim=-1)
    pick = tokens[..., None]
    return tokens, logp.gather(-1, pick)[..., 0].float(), full.gather(-1, pick)[..., 0].float()


def sample_rows(logits, *, temperature=1.0, generator=None):
    """The eager form of `rf.sample(logits, temperature=T, generator=g, logprob="full")` for (N, V) logits: the
    same uniforms from `generator`, so the same tokens (but at a cumulative boundary that rounds the other way),
    through softmax, cumsum and searchsorted in float64. Returns (tokens int64, logp fp32)."""
    uniforms = torch.rand(logits.shape[:-1], dtype=torch.float64, device=logits.device, generator=generator)
    tokens, _, full = sample(logits, uniforms, temperature=temperature)
    return tokens, full


def sample_with_warpers(logits, *, temperature=1.0, top_k=None, top_p=None, min_p=None, generator=None):
    """What trainers run today: Hugging Face's logits warpers, softmax and torch.multinomial. logits (N, V)."""
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    scores = TemperatureLogitsWarper(temperature)(None, logits)
    if top_k is not None:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p is not None:
        scores = TopPLogitsWarper(top_p)(None, scores)
    if min_p is not None:
        scores = MinPLogitsWarper(min_p)(None, scores)
    return torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator)[:, 0]
