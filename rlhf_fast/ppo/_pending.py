"""Temporary torch implementations of the log-prob and loss ops the PPO loop needs, with exactly the contract
signatures of the rlhf_fast public API (rf.logprobs, rf.kl_penalty, rf.ppo_policy_loss, rf.ppo_value_loss,
rf.agg_loss, rf.masked_sum). They stand in for both the kernels and the references until those families land;
then rlhf_fast/ppo/ops.py points at rf.* / rlhf_fast.reference and this file goes away.

All outputs are float32 (losses and log-probs are accumulated in float32 whatever the input dtype).
"""
from __future__ import annotations

import torch

KL_KINDS = ("k1", "abs", "k2", "mse", "k3", "low_var_kl", "k1+", "k3+")
AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def logprobs(logits, labels, *, temperature=1.0, ignore_index=-100, return_entropy=False):
    """log softmax(logits / temperature) at labels: logits (..., V), labels (...) int -> fp32 (...); 0 (and no
    gradient) where labels == ignore_index. With return_entropy, also the entropy (...) fp32 of that softmax."""
    scaled = logits.float() / temperature
    logp_all = torch.log_softmax(scaled, dim=-1)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    logp = logp_all.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    if not return_entropy:
        return logp
    return logp, entropy(logits, temperature=temperature)


def linear_logprobs(hidden, weight, labels, *, bias=None, temperature=1.0, ignore_index=-100,
                    return_entropy=False):
    """logprobs of the lm-head logits hidden @ weight.T (+ bias): hidden (..., H), weight (V, H)."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    return logprobs(logits, labels, temperature=temperature, ignore_index=ignore_index,
                    return_entropy=return_entropy)


def entropy(logits, *, temperature=1.0):
    """Entropy (...) fp32 of softmax(logits / temperature) over the last dim."""
    logp_all = torch.log_softmax(logits.float() / temperature, dim=-1)
    return -(logp_all.exp() * logp_all).sum(-1)


def kl_penalty(logp, ref_logp, kind="k1"):
    """Per-token KL estimate between the policy (logp) and the reference (ref_logp), fp32 elementwise.

    k1 = logp - ref; abs = |k1|; k2 (mse) = 0.5 k1^2; k3 (low_var_kl) = exp(d) - d - 1 with d = clamp(ref - logp,
    -20, 20), clamped to [-10, 10]. "k1+" / "k3+": the value of k1 / k3 with the gradient of k2 (straight-through).
    """
    if kind not in KL_KINDS:
        raise ValueError(f"kind must be one of {', '.join(KL_KINDS)}, got {kind!r}")
    logp, ref_logp = logp.float(), ref_logp.float()
    diff = logp - ref_logp
    if kind == "k1":
        return diff
    if kind == "abs":
        return diff.abs()
    if kind in ("k2", "mse"):
        return 0.5 * diff.square()
    if kind in ("k3", "low_var_kl"):
        d = (ref_logp - logp).clamp(-20, 20)
        return (d.exp() - d - 1).clamp(-10, 10)
    value = kl_penalty(logp, ref_logp, kind[:-1])
    grad_path = 0.5 * diff.square()
    return grad_path + (value - grad_path).detach()


def masked_sum(x, mask=None, *, dim=None):
    """Sum of x over the entries where mask is nonzero (all if mask is None), over dim (all dims if None); fp32."""
    x = x.float()
    if mask is not None:
        x = torch.where(mask.bool(), x, torch.zeros_like(x))
    return x.sum() if dim is None else x.sum(dim=dim)


def agg_loss(loss, mask=None, mode="token-mean"):
    """Reduces a (B, T) per-token loss to a scalar fp32.

    token-mean: sum over valid tokens / number of valid tokens; seq-mean-token-sum: mean over rows of the row
    sum; seq-mean-token-mean: mean over rows of the row mean (rows with no valid token count as 0);
    seq-mean-token-sum-norm: total sum / T (Dr. GRPO's constant normaliser).
    """
    if mode not in AGG_MODES:
        raise ValueError(f"mode must be one of {', '.join(AGG_MODES)}, got {mode!r}")
    loss = loss.float()
    valid = torch.ones_like(loss, dtype=torch.bool) if mask is None else mask.bool()
    if mode == "token-mean":
        return masked_sum(loss, valid) / valid.sum().clamp(min=1)
    row_sum = masked_sum(loss, valid, dim=-1)
    if mode == "seq-mean-token-sum":
        return row_sum.mean()
    if mode == "seq-mean-token-mean":
        return (row_sum / valid.sum(-1).clamp(min=1)).mean()
    return row_sum.sum() / loss.shape[-1]


def _masked_mean(x, mask):
    valid = torch.ones_like(x, dtype=torch.bool) if mask is None else mask.bool()
    return (masked_sum(x, valid) / valid.sum().clamp(min=1)).detach()


def ppo_policy_loss(logp, old_logp, advantages, mask=None, *, clip_low=0.2, clip_high=0.2, dual_clip=None,
                    agg="token-mean"):
    """Clipped PPO surrogate. ratio = exp(logp - old_logp); pg = max(-A r, -A clamp(r, 1 - clip_low, 1 + clip_high));
    with dual_clip c (> 1), where A < 0: min(pg, -A c). Returns (loss, {"clipfrac", "approx_kl", "ratio_mean"}),
    all fp32 (stats are detached 0-dim tensors over the valid tokens; approx_kl is the k3 estimate of
    KL(old || new))."""
    logp, old_logp, advantages = logp.float(), old_logp.float(), advantages.float()
    log_ratio = logp - old_logp
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    pg = torch.maximum(unclipped, clipped)
    if dual_clip is not None:
        pg = torch.where(advantages < 0, torch.minimum(pg, -advantages * dual_clip), pg)
    loss = agg_loss(pg, mask, agg)
    stats = {
        "clipfrac": _masked_mean((clipped > unclipped).float(), mask),
        "approx_kl": _masked_mean(ratio - 1 - log_ratio, mask),
        "ratio_mean": _masked_mean(ratio, mask),
    }
    return loss, stats


def ppo_value_loss(values, old_values, returns, mask=None, *, clip=0.2, agg="token-mean"):
    """Clipped value loss 0.5 max((V - R)^2, (clamp(V, old - clip, old + clip) - R)^2), aggregated by `agg`.
    clip=None disables clipping. Returns (loss, {"clipfrac"}) fp32."""
    values, old_values, returns = values.float(), old_values.float(), returns.float()
    unclipped = (values - returns).square()
    if clip is None:
        return 0.5 * agg_loss(unclipped, mask, agg), {"clipfrac": values.new_zeros(())}
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)
    clipped = (clipped_values - returns).square()
    loss = 0.5 * agg_loss(torch.maximum(unclipped, clipped), mask, agg)
    return loss, {"clipfrac": _masked_mean((clipped > unclipped).float(), mask)}
