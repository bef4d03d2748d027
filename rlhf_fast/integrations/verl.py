"""verl 0.9.1 on rlhf_fast's kernels, with verl's own semantics.

    from rlhf_fast.integrations import verl as rf_verl
    rf_verl.patch()                 # or: with rf_verl.patch(): ...

verl runs its trainer and its actor, critic and reference work in Ray actors, which `patch()` in the driver does
not reach. To patch every worker process of the job: a script that calls ray.init itself passes
`ray.init(runtime_env=rf_verl.ray_runtime_env())`; a launcher that does (`python -m verl.trainer.main_ppo`) runs with
`RAY_RUNTIME_ENV_HOOK=rlhf_fast.integrations.ray_workers.runtime_env_hook` and `RLHF_FAST_PATCH=verl` exported.

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

import numpy as np
import torch

import rlhf_fast as rf

from . import ray_workers
from ._common import aggregation, binary_mask, discount, kernel_floats, needs_grad
from ._patching import Adapter, Patch, Target, dispatching

PEER = "verl"
PINNED = "0.9.1"
TF = "verl.utils.torch_functional"
CORE = "verl.trainer.ppo.core_algos"

# verl's kl_penalty names -> ours; None: the peer's original (abs+ has no kernel; full raises in verl).
_KL_NAMES = {
    "kl": "k1",
    "k1": "k1",
    "abs": "abs",
    "mse": "k2",
    "k2": "k2",
    "low_var_kl": "k3",
    "k3": "k3",
    "kl+": "k1+",
    "k1+": "k1+",
    "mse+": "k2",
    "k2+": "k2",
    "low_var_kl+": "k3+",
    "k3+": "k3+",
}


# ------------------------------------------------------------------ torch_functional

# Each function below gets the call's arguments by name and returns NotImplemented where verl's original runs
# (see _patching.dispatching).


def _logprobs_from_logits(a):
    logits, labels = a["logits"], a["labels"]
    if not kernel_floats(logits) or not isinstance(labels, torch.Tensor) or labels.is_floating_point():
        return NotImplemented
    # In place only over an intermediate (model output), never over a leaf's storage.
    base = logits if logits._base is None else logits._base
    inplace = bool(a["inplace_backward"]) and not base.is_leaf
    return rf.logprobs(logits, labels, inplace_backward=inplace)


def _entropy_from_logits(a):
    return rf.entropy(a["logits"]) if kernel_floats(a["logits"]) else NotImplemented


def _masked_mean(a):
    values, mask = a["values"], a["mask"]
    if a["axis"] is not None or not kernel_floats(values) or not binary_mask(mask, values):
        return NotImplemented
    return rf.masked_mean(values, mask)


def _masked_whiten(a):
    values, mask = a["values"], a["mask"]
    # verl raises for fewer than two valid entries: those calls go to it.
    if not kernel_floats(values) or not binary_mask(mask, values) or int(mask.sum()) < 2:
        return NotImplemented
    return rf.masked_whiten(values, mask, shift_mean=a["shift_mean"])


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


def _gae(a):
    rewards, values, mask = a["token_level_rewards"], a["values"], a["response_mask"]
    gamma, lam = discount(a["gamma"]), discount(a["lam"])
    if (
        gamma is None
        or lam is None
        or not kernel_floats(rewards, values)
        or rewards.dim() != 2
        or values.shape != rewards.shape
        or not binary_mask(mask, rewards)
        or int(mask.sum()) < 2
    ):
        return NotImplemented  # (verl's whitening raises for fewer than two valid tokens)
    with torch.no_grad():
        valid = mask.bool()
        advantages, _ = rf.gae(rewards, values, valid, gamma=gamma, lam=lam)
        advantages = _carry_into_holes(advantages, valid)
        returns = advantages + values
        advantages = rf.masked_whiten(advantages, valid)
    return advantages, returns


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


def _outcome_advantage(a, kernel):
    """verl's outcome advantages (score = row sum of the token rewards, one per sample, broadcast over the
    response mask) with kernel(sorted scores, group size), or NotImplemented."""
    rewards, mask = a["token_level_rewards"], a["response_mask"]
    if not kernel_floats(rewards) or rewards.dim() != 2 or not isinstance(mask, torch.Tensor):
        return NotImplemented
    with torch.no_grad():
        advantages = _group_advantage(rewards.sum(dim=-1), a["index"], kernel)
    if advantages is None:
        return NotImplemented
    advantages = advantages.unsqueeze(-1) * mask
    return advantages, advantages


def _grpo(a):
    eps = discount(a["epsilon"])
    if eps is None:
        return NotImplemented
    norm_std = bool(a["norm_adv_by_std_in_grpo"])
    return _outcome_advantage(a, lambda s, g: rf.grpo_advantages(s, g, norm_std=norm_std, eps=eps))


def _rloo(a):
    return _outcome_advantage(a, rf.rloo_advantages)  # verl's RLOO ignores epsilon, config and **kwargs


# ------------------------------------------------------------------ losses


def _kl_penalty(a):
    logprob, ref_logprob = a["logprob"], a["ref_logprob"]
    kind = _KL_NAMES.get(a["kl_penalty"]) if isinstance(a["kl_penalty"], str) else None
    if (
        kind is None
        or not kernel_floats(logprob, ref_logprob)
        or not isinstance(ref_logprob, torch.Tensor)
        or logprob.shape != ref_logprob.shape
    ):
        return NotImplemented
    return rf.kl_penalty(logprob, ref_logprob, kind)


_GLOBAL_COUNTS = ("dp_size", "batch_num_tokens", "global_batch_size", "loss_scale_factor")


def _agg_loss(a):
    loss, mask = a["loss_mat"], a["loss_mask"]
    if not kernel_floats(loss) or loss.dim() < 1 or not binary_mask(mask, loss):
        return NotImplemented
    plan = aggregation(mask, a["loss_agg_mode"], **{k: a[k] for k in _GLOBAL_COUNTS})
    if plan is None:
        return NotImplemented
    mode, factor = plan
    return rf.agg_loss(loss, mask, mode) * factor


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


def _policy_loss(a):
    old, logp, adv, mask, config = (a[k] for k in ("old_log_prob", "log_prob", "advantages", "response_mask", "config"))
    if (
        config is None
        or a["rollout_is_weights"] is not None
        or not kernel_floats(old, logp, adv)
        or not old.shape == logp.shape == adv.shape
        or logp.dim() < 1
        or needs_grad(old, adv)
        or not binary_mask(mask, logp)
    ):
        return NotImplemented
    ranges = _clip_ranges(config)
    plan = None if ranges is None else aggregation(mask, a["loss_agg_mode"], **config.global_batch_info)
    if plan is None:
        return NotImplemented
    (low, high, dual), (mode, factor) = ranges, plan
    loss, stats = rf.ppo_policy_loss(logp, old, adv, mask, clip_low=low, clip_high=high, dual_clip=dual, agg=mode)
    with torch.no_grad():
        # Dual clip binds where A < 0 and the ratio exceeds c (the clipped term never does: 1 - low < c).
        ratio = torch.exp(torch.clamp(logp.detach().float() - old.float(), -20.0, 20.0))
        lower = rf.masked_mean(((adv < 0) & (ratio > dual)).float(), mask)
    metrics = {
        "actor/pg_clipfrac": stats["clipfrac"].item(),
        "actor/ppo_kl": stats["approx_kl"].item(),
        "actor/pg_clipfrac_lower": lower.item(),
    }
    return loss * factor, metrics


def _value_loss(a):
    vpreds, returns, values, mask = a["vpreds"], a["returns"], a["values"], a["response_mask"]
    clip = discount(a["cliprange_value"])
    if (
        clip is None
        or clip < 0
        or not kernel_floats(vpreds, returns, values)
        or not vpreds.shape == returns.shape == values.shape
        or vpreds.dim() < 1
        or needs_grad(returns, values)
        or not binary_mask(mask, vpreds)
    ):
        return NotImplemented
    plan = aggregation(mask, a["loss_agg_mode"], **{k: a[k] for k in _GLOBAL_COUNTS})
    if plan is None:
        return NotImplemented
    mode, factor = plan
    loss, stats = rf.ppo_value_loss(vpreds, values, returns, mask, clip=clip, agg=mode)
    return loss * factor, stats["clipfrac"]


# ------------------------------------------------------------------ the adapter


def _target(module, name, ours, params):
    """Target `module.name` replaced by a dispatcher to `ours`, which handles calls that set only `params`."""
    return Target(module, name, lambda original: dispatching(original, ours, params), params)


TARGETS = (
    _target(TF, "logprobs_from_logits", _logprobs_from_logits, ("logits", "labels", "inplace_backward")),
    _target(TF, "entropy_from_logits", _entropy_from_logits, ("logits",)),
    _target(TF, "masked_mean", _masked_mean, ("values", "mask", "axis")),
    _target(TF, "masked_whiten", _masked_whiten, ("values", "mask", "shift_mean")),
    _target(
        CORE, "compute_gae_advantage_return", _gae, ("token_level_rewards", "values", "response_mask", "gamma", "lam")
    ),
    _target(
        CORE,
        "compute_grpo_outcome_advantage",
        _grpo,
        ("token_level_rewards", "response_mask", "index", "epsilon", "norm_adv_by_std_in_grpo", "config"),
    ),
    _target(
        CORE,
        "compute_rloo_outcome_advantage",
        _rloo,
        ("token_level_rewards", "response_mask", "index", "epsilon", "config", "kwargs"),
    ),
    _target(CORE, "kl_penalty", _kl_penalty, ("logprob", "ref_logprob", "kl_penalty")),
    _target(CORE, "agg_loss", _agg_loss, ("loss_mat", "loss_mask", "loss_agg_mode") + _GLOBAL_COUNTS),
    _target(
        CORE,
        "compute_policy_loss_vanilla",
        _policy_loss,
        ("old_log_prob", "log_prob", "advantages", "response_mask", "loss_agg_mode", "config", "rollout_is_weights"),
    ),
    _target(
        CORE,
        "compute_value_loss",
        _value_loss,
        ("vpreds", "returns", "values", "response_mask", "cliprange_value", "loss_agg_mode") + _GLOBAL_COUNTS,
    ),
)

# Names registered while patched: registry -> {name: qualified name of the patched target it selects}.
REGISTERED = {
    "POLICY_LOSS_REGISTRY": {"rlhf_fast": f"{CORE}.compute_policy_loss_vanilla"},
    "ADV_ESTIMATOR_REGISTRY": {
        "rlhf_fast": f"{CORE}.compute_gae_advantage_return",
        "rlhf_fast_grpo": f"{CORE}.compute_grpo_outcome_advantage",
        "rlhf_fast_rloo": f"{CORE}.compute_rloo_outcome_advantage",
    },
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
SCAN = (
    CORE,
    "verl.workers.utils.losses",
    "verl.trainer.ppo.ray_trainer",
    "verl.trainer.distillation.losses",
    "verl.workers.rollout.naive.naive_rollout",
    "verl.workers.engine.fsdp.transformer_impl",
)

_ADAPTER = Adapter(PEER, PINNED, TARGETS, scan=SCAN, hooks=(_register_names,))


def patch() -> Patch:
    """Runs verl on rlhf_fast's kernels, in this process (see the module docstring for what is patched).

    Returns
    -------
    rlhf_fast.integrations._patching.Patch
        The handle: a context manager whose with-block ends with `unpatch`; ``handle.skipped`` says which
        targets were left as verl has them and why (another verl version). Idempotent: while patched, the
        same handle.
    """
    return _ADAPTER.patch()


def unpatch() -> None:
    """Puts verl's own functions and registries back, in every binding `patch` wrote.

    Returns
    -------
    None
        Nothing.
    """
    _ADAPTER.unpatch()


def ray_runtime_env(base: dict | None = None) -> dict:
    """A runtime_env for ``ray.init`` that patches verl in every Ray worker process of the job.

    Parameters
    ----------
    base : dict or None
        Your own runtime_env (not modified): its ``env_vars`` and ``worker_process_setup_hook`` are kept, your
        hook running first.

    Returns
    -------
    dict
        `base` plus ``RLHF_FAST_PATCH=verl`` in its ``env_vars`` and the worker setup hook
        (``rlhf_fast.integrations.ray_workers.setup_worker``, chained after base's own). Patch the driver
        with `patch` as usual:

        import ray
        from rlhf_fast.integrations import verl as rf_verl
        rf_verl.patch()
        ray.init(runtime_env=rf_verl.ray_runtime_env())   # or ray_runtime_env({"env_vars": {...}})
    """
    return ray_workers.runtime_env((PEER,), base)
