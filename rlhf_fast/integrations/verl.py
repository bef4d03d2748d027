"""verl 0.9.1 on rlhf_fast's kernels, with verl's own semantics.

    from rlhf_fast.integrations import verl as rf_verl
    rf_verl.patch()                 # or: with rf_verl.patch(): ...

Patched, in every verl module that holds them (and in verl's registries, so that the usual config names
`adv_estimator: gae | grpo | rloo` and `policy_loss.loss_mode: vanilla` run our kernels):

- `verl.utils.torch_functional`: `logprobs_from_logits` (float32 log-probs, as verl's flash-attn path
  returns; `inplace_backward` honoured), `entropy_from_logits` (float32), `masked_mean`, `masked_whiten`.
- `verl.trainer.ppo.core_algos`: `compute_gae_advantage_return` (our GAE; masked positions carry the next
  valid token's advantage, as verl's loop leaves them; whitened by our masked_whiten), the GRPO and RLOO
  outcome advantages (uid groups of one size, in any order, are sorted into our contiguous-group kernels),
  `kl_penalty` (every name verl accepts), `agg_loss` (every mode, with `dp_size`, `batch_num_tokens`,
  `global_batch_size`, `loss_scale_factor`), the `vanilla` policy loss and `compute_value_loss` (our fused
  losses, with verl's aggregation and metrics).

`patch()` also registers the name "rlhf_fast" in both registries (policy loss: the fused vanilla loss;
advantage estimator: GAE) and "rlhf_fast_grpo" / "rlhf_fast_rloo" as advantage estimators.

A call our kernels cannot do exactly as verl would goes to verl's original: float64 inputs, masks that are not
0/1 (verl weights tokens by the mask), reductions over an axis, uid groups of different sizes or of one sample,
gradients wanted for inputs our fused losses treat as constants (old log-probs, advantages, returns), rollout
importance weights, the `abs+` and `full` KL names, and every argument verl itself rejects (so its errors are
unchanged). Results are float32 where verl would return bf16/fp16.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

import rlhf_fast as rf

from ._common import aggregation, binary_mask, discount, kernel_floats, needs_grad
from ._patching import Adapter, Patch, Target

PEER = "verl"
PINNED = "0.9.1"
TF = "verl.utils.torch_functional"
CORE = "verl.trainer.ppo.core_algos"

# verl's kl_penalty names -> ours; None: the peer's original (abs+ has no kernel; full raises in verl).
_KL_NAMES = {"kl": "k1", "k1": "k1", "abs": "abs", "mse": "k2", "k2": "k2", "low_var_kl": "k3", "k3": "k3",
             "kl+": "k1+", "k1+": "k1+", "mse+": "k2", "k2+": "k2", "low_var_kl+": "k3+", "k3+": "k3+"}


def _replaces(original):
    """Decorator: the replacement keeps the original's name, docstring and signature (`__wrapped__`)."""
    return functools.wraps(original)


# ------------------------------------------------------------------ torch_functional

def _logprobs_from_logits(original):
    @_replaces(original)
    def logprobs_from_logits(logits, labels, inplace_backward=True):
        if not kernel_floats(logits) or not isinstance(labels, torch.Tensor) or labels.is_floating_point():
            return original(logits, labels, inplace_backward)
        # In place only over an intermediate (model output), never over a leaf's storage.
        base = logits if logits._base is None else logits._base
        inplace = bool(inplace_backward) and not base.is_leaf
        return rf.logprobs(logits, labels, inplace_backward=inplace)
    return logprobs_from_logits


def _entropy_from_logits(original):
    @_replaces(original)
    def entropy_from_logits(logits):
        if not kernel_floats(logits):
            return original(logits)
        return rf.entropy(logits)
    return entropy_from_logits


def _masked_mean(original):
    @_replaces(original)
    def masked_mean(values, mask, axis=None):
        if axis is not None or not kernel_floats(values) or not binary_mask(mask, values):
            return original(values, mask, axis)
        return rf.masked_mean(values, mask)
    return masked_mean


def _masked_whiten(original):
    @_replaces(original)
    def masked_whiten(values, mask, shift_mean=True):
        # verl raises for fewer than two valid entries: those calls go to it.
        if not kernel_floats(values) or not binary_mask(mask, values) or int(mask.sum()) < 2:
            return original(values, mask, shift_mean)
        return rf.masked_whiten(values, mask, shift_mean=shift_mean)
    return masked_whiten


# ------------------------------------------------------------------ advantages

def _carry_into_holes(advantages, valid):
    """verl's loop leaves, at a masked position, the advantage of the next valid token of the row (0 after the
    last one); ours writes 0 there. advantages, valid: (B, T)."""
    steps = valid.shape[-1]
    position = torch.arange(steps, device=valid.device).expand_as(valid)
    marked = torch.where(valid, position, steps)
    next_valid = marked.flip(-1).cummin(-1).values.flip(-1)
    padded = torch.cat([advantages, advantages.new_zeros(advantages.shape[:-1] + (1,))], dim=-1)
    return padded.gather(-1, next_valid)


def _gae(original):
    @_replaces(original)
    def compute_gae_advantage_return(token_level_rewards, values, response_mask, gamma, lam):
        gamma_f, lam_f = discount(gamma), discount(lam)
        if (gamma_f is None or lam_f is None or not kernel_floats(token_level_rewards, values)
                or token_level_rewards.dim() != 2 or values.shape != token_level_rewards.shape
                or not binary_mask(response_mask, token_level_rewards) or int(response_mask.sum()) < 2):
            return original(token_level_rewards, values, response_mask, gamma, lam)
        with torch.no_grad():
            valid = response_mask.bool()
            advantages, _ = rf.gae(token_level_rewards, values, valid, gamma=gamma_f, lam=lam_f)
            advantages = _carry_into_holes(advantages, valid)
            returns = advantages + values
            advantages = rf.masked_whiten(advantages, valid)
        return advantages, returns
    return compute_gae_advantage_return


def _uniform_groups(index, batch):
    """(order, group_size) that sorts the samples into contiguous groups of one size > 1, or None."""
    if index is None or len(index) != batch or batch == 0:
        return None
    try:
        _, inverse, counts = np.unique(np.asarray(index), return_inverse=True, return_counts=True)
    except TypeError:  # uids that do not sort
        return None
    size = int(counts[0])
    if size < 2 or (counts != size).any():
        return None
    return np.argsort(inverse.reshape(-1), kind="stable"), size


def _group_advantage(scores, index, kernel):
    """kernel(sorted scores, group_size) applied in uid order and put back in sample order, or None."""
    plan = _uniform_groups(index, scores.shape[0])
    if plan is None:
        return None
    order, size = plan
    order = torch.as_tensor(order, device=scores.device)
    out = torch.empty(scores.shape, dtype=torch.float32, device=scores.device)
    out[order] = kernel(scores[order], size)
    return out


def _outcome_inputs_ok(token_level_rewards, response_mask):
    return (kernel_floats(token_level_rewards) and token_level_rewards.dim() == 2
            and isinstance(response_mask, torch.Tensor))


def _grpo(original):
    @_replaces(original)
    def compute_grpo_outcome_advantage(token_level_rewards, response_mask, index, epsilon=1e-6,
                                       norm_adv_by_std_in_grpo=True, config=None):
        advantages = None
        if _outcome_inputs_ok(token_level_rewards, response_mask) and discount(epsilon) is not None:
            with torch.no_grad():
                scores = token_level_rewards.sum(dim=-1)
                advantages = _group_advantage(scores, index, lambda s, g: rf.grpo_advantages(
                    s, g, norm_std=bool(norm_adv_by_std_in_grpo), eps=float(epsilon)))
        if advantages is None:
            return original(token_level_rewards, response_mask, index, epsilon, norm_adv_by_std_in_grpo, config)
        advantages = advantages.unsqueeze(-1) * response_mask
        return advantages, advantages
    return compute_grpo_outcome_advantage


def _rloo(original):
    @_replaces(original)
    def compute_rloo_outcome_advantage(token_level_rewards, response_mask, index, epsilon=1e-6, config=None,
                                       **kwargs):
        advantages = None
        if _outcome_inputs_ok(token_level_rewards, response_mask):
            with torch.no_grad():
                scores = token_level_rewards.sum(dim=-1)
                advantages = _group_advantage(scores, index, rf.rloo_advantages)
        if advantages is None:
            return original(token_level_rewards, response_mask, index, epsilon, config, **kwargs)
        advantages = advantages.unsqueeze(-1) * response_mask
        return advantages, advantages
    return compute_rloo_outcome_advantage


# ------------------------------------------------------------------ losses

def _kl_penalty(original):
    @_replaces(original)
    def kl_penalty(logprob, ref_logprob, kl_penalty):
        kind = _KL_NAMES.get(kl_penalty) if isinstance(kl_penalty, str) else None
        if (kind is None or not kernel_floats(logprob, ref_logprob) or not isinstance(ref_logprob, torch.Tensor)
                or logprob.shape != ref_logprob.shape):
            return original(logprob, ref_logprob, kl_penalty)
        return rf.kl_penalty(logprob, ref_logprob, kind)
    return kl_penalty


def _agg_loss(original):
    @_replaces(original)
    def agg_loss(loss_mat, loss_mask, loss_agg_mode, dp_size=1, batch_num_tokens=None, global_batch_size=None,
                 loss_scale_factor=None):
        plan = None
        if kernel_floats(loss_mat) and loss_mat.dim() >= 1 and binary_mask(loss_mask, loss_mat):
            plan = aggregation(loss_mask, loss_agg_mode, dp_size, batch_num_tokens, global_batch_size,
                                loss_scale_factor)
        if plan is None:
            return original(loss_mat, loss_mask, loss_agg_mode, dp_size, batch_num_tokens, global_batch_size,
                            loss_scale_factor)
        mode, factor = plan
        return rf.agg_loss(loss_mat, loss_mask, mode) * factor
    return agg_loss


def _clip_ranges(config):
    """verl's (clip low, clip high, dual clip c) from an actor config, or None if verl would reject them."""
    clip = config.clip_ratio
    low = config.clip_ratio_low if config.clip_ratio_low is not None else clip
    high = config.clip_ratio_high if config.clip_ratio_high is not None else clip
    dual = config.get("clip_ratio_c", 3.0)
    values = [discount(v) for v in (low, high, dual)]
    if any(v is None for v in values) or values[0] < 0 or values[1] < 0 or values[2] <= 1.0:
        return None
    return values


def _policy_loss(original):
    @_replaces(original)
    def compute_policy_loss_vanilla(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                                    config=None, rollout_is_weights=None):
        ranges = plan = None
        if (config is not None and rollout_is_weights is None and kernel_floats(old_log_prob, log_prob, advantages)
                and old_log_prob.shape == log_prob.shape == advantages.shape and log_prob.dim() >= 1
                and not needs_grad(old_log_prob, advantages) and binary_mask(response_mask, log_prob)):
            ranges = _clip_ranges(config)
            if ranges is not None:
                plan = aggregation(response_mask, loss_agg_mode, **config.global_batch_info)
        if plan is None:
            return original(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                            rollout_is_weights)
        low, high, dual = ranges
        mode, factor = plan
        loss, stats = rf.ppo_policy_loss(log_prob, old_log_prob, advantages, response_mask, clip_low=low,
                                         clip_high=high, dual_clip=dual, agg=mode)
        with torch.no_grad():
            # Dual clip binds where A < 0 and the ratio exceeds c (the clipped term never does: 1 - low < c).
            ratio = torch.exp(torch.clamp(log_prob.detach().float() - old_log_prob.float(), -20.0, 20.0))
            lower = rf.masked_mean(((advantages < 0) & (ratio > dual)).float(), response_mask)
        metrics = {
            "actor/pg_clipfrac": stats["clipfrac"].item(),
            "actor/ppo_kl": stats["approx_kl"].item(),
            "actor/pg_clipfrac_lower": lower.item(),
        }
        return loss * factor, metrics
    return compute_policy_loss_vanilla


def _value_loss(original):
    @_replaces(original)
    def compute_value_loss(vpreds, returns, values, response_mask, cliprange_value, loss_agg_mode="token-mean",
                           dp_size=1, batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None):
        plan = None
        clip = discount(cliprange_value)
        if (clip is not None and clip >= 0 and kernel_floats(vpreds, returns, values)
                and vpreds.shape == returns.shape == values.shape and vpreds.dim() >= 1
                and not needs_grad(returns, values) and binary_mask(response_mask, vpreds)):
            plan = aggregation(response_mask, loss_agg_mode, dp_size, batch_num_tokens, global_batch_size,
                                loss_scale_factor)
        if plan is None:
            return original(vpreds, returns, values, response_mask, cliprange_value, loss_agg_mode, dp_size,
                            batch_num_tokens, global_batch_size, loss_scale_factor)
        mode, factor = plan
        loss, stats = rf.ppo_value_loss(vpreds, values, returns, response_mask, clip=clip, agg=mode)
        return loss * factor, stats["clipfrac"]
    return compute_value_loss


# ------------------------------------------------------------------ the adapter

TARGETS = (
    Target(TF, "logprobs_from_logits", _logprobs_from_logits, ("logits", "labels", "inplace_backward")),
    Target(TF, "entropy_from_logits", _entropy_from_logits, ("logits",)),
    Target(TF, "masked_mean", _masked_mean, ("values", "mask", "axis")),
    Target(TF, "masked_whiten", _masked_whiten, ("values", "mask", "shift_mean")),
    Target(CORE, "compute_gae_advantage_return", _gae,
           ("token_level_rewards", "values", "response_mask", "gamma", "lam")),
    Target(CORE, "compute_grpo_outcome_advantage", _grpo,
           ("token_level_rewards", "response_mask", "index", "epsilon", "norm_adv_by_std_in_grpo", "config")),
    Target(CORE, "compute_rloo_outcome_advantage", _rloo,
           ("token_level_rewards", "response_mask", "index", "epsilon", "config")),
    Target(CORE, "kl_penalty", _kl_penalty, ("logprob", "ref_logprob", "kl_penalty")),
    Target(CORE, "agg_loss", _agg_loss,
           ("loss_mat", "loss_mask", "loss_agg_mode", "dp_size", "batch_num_tokens", "global_batch_size",
            "loss_scale_factor")),
    Target(CORE, "compute_policy_loss_vanilla", _policy_loss,
           ("old_log_prob", "log_prob", "advantages", "response_mask", "loss_agg_mode", "config",
            "rollout_is_weights")),
    Target(CORE, "compute_value_loss", _value_loss,
           ("vpreds", "returns", "values", "response_mask", "cliprange_value", "loss_agg_mode", "dp_size",
            "batch_num_tokens", "global_batch_size", "loss_scale_factor")),
)

# Names registered while patched: registry -> {name: qualified name of the patched target it selects}.
REGISTERED = {
    "POLICY_LOSS_REGISTRY": {"rlhf_fast": f"{CORE}.compute_policy_loss_vanilla"},
    "ADV_ESTIMATOR_REGISTRY": {"rlhf_fast": f"{CORE}.compute_gae_advantage_return",
                               "rlhf_fast_grpo": f"{CORE}.compute_grpo_outcome_advantage",
                               "rlhf_fast_rloo": f"{CORE}.compute_rloo_outcome_advantage"},
}


def _register_names():
    """Adds REGISTERED to verl's registries (each name selecting the patched function) and returns the undo."""
    import verl.trainer.ppo.core_algos as core

    added = []
    for registry_name, names in REGISTERED.items():
        registry = getattr(core, registry_name)
        for name, qualname in names.items():
            entry = _ADAPTER.handle.replaced.get(qualname)
            if entry is not None and name not in registry:
                registry[name] = entry[1]
                added.append((registry, name))

    def undo():
        for registry, name in added:
            registry.pop(name, None)
    return undo


# verl modules that bind the targets by name (imported first so that patch() finds them; one that does not
# import in this environment binds the replacements if it is imported while patched).
SCAN = (CORE, "verl.workers.utils.losses", "verl.trainer.ppo.ray_trainer", "verl.trainer.distillation.losses",
        "verl.workers.rollout.naive.naive_rollout", "verl.workers.engine.fsdp.transformer_impl")

_ADAPTER = Adapter(PEER, PINNED, TARGETS, scan=SCAN, hooks=(_register_names,))


def patch() -> Patch:
    """Runs verl on rlhf_fast's kernels (idempotent); the handle is a context manager that undoes it."""
    return _ADAPTER.patch()


def unpatch() -> None:
    """Puts verl's own functions and registries back."""
    _ADAPTER.unpatch()
