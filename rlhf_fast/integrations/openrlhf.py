"""OpenRLHF 0.11.2 on rlhf_fast's kernels, with OpenRLHF's own semantics.

    from rlhf_fast.integrations import openrlhf as rf_openrlhf
    rf_openrlhf.patch()             # or: with rf_openrlhf.patch(): ...

OpenRLHF runs its trainer and its actor, critic and reference work in Ray actors, which `patch()` in the driver
does not reach. To patch every worker process of the job: a script that calls ray.init itself passes
`ray.init(runtime_env=rf_openrlhf.ray_runtime_env())`; a launcher that does (`python -m
openrlhf.cli.train_ppo_ray`) runs with `RAY_RUNTIME_ENV_HOOK=rlhf_fast.integrations.ray_workers.runtime_env_hook` and
`RLHF_FAST_PATCH=openrlhf` exported.

Patched, in every OpenRLHF module that holds them: `openrlhf.models.utils.compute_approx_kl` (k1, k2, k3, the
±10 clamp), `log_probs_from_logits` (float32 log-probs; a temperature other than 1 still divides the caller's
logits in place, as OpenRLHF does), `compute_entropy` (float32), `masked_mean`; the `forward` of
`openrlhf.models.loss.PolicyLoss` and `ValueLoss` (our fused losses; same arguments and returned values) and
`RemoteExperienceMaker.get_advantages_and_returns` (our GAE, which with no mask is OpenRLHF's loop over the
masked rewards and values). The classes themselves are unchanged, so existing instances run the patched
`forward` too.

A call our kernels cannot do exactly as OpenRLHF would goes to OpenRLHF's original: float64 logits, masks that
are not 0/1 (OpenRLHF weights tokens by the mask), reductions over a dim, `unbiased_gradient=True`, GSPO and
train/rollout importance-sampling corrections, gradients wanted for old log-probs, advantages, old values or
returns, and every argument OpenRLHF itself rejects.
"""

from __future__ import annotations

import importlib
import inspect

import torch

import rlhf_fast as rf

from . import ray_workers
from ._common import aggregation, binary_mask, discount, kernel_floats, needs_grad
from ._patching import Adapter, Patch, Target, dispatching

PEER = "openrlhf"
PINNED = "0.11.2"
UTILS = "openrlhf.models.utils"
LOSS = "openrlhf.models.loss"
EXPERIENCE = "openrlhf.trainer.ppo_utils.experience_maker"


# ------------------------------------------------------------------ openrlhf.models.utils
# Each function below gets the call's arguments by name and returns NotImplemented where OpenRLHF's original
# runs (see _patching.dispatching).


def _compute_approx_kl(a):
    log_probs, base, estimator = a["log_probs"], a["log_probs_base"], a["kl_estimator"]
    if (
        a["unbiased_gradient"]
        or estimator not in ("k1", "k2", "k3")
        or not isinstance(log_probs, torch.Tensor)
        or not isinstance(base, torch.Tensor)
        or log_probs.shape != base.shape
    ):
        return NotImplemented
    # OpenRLHF computes in float32 and clamps every estimator to ±10; our k3 clamps the same way (its ±20 clamp
    # of the log-ratio only acts where the value is already past 10).
    value = rf.kl_penalty(log_probs.float(), base.float(), estimator)
    return value if estimator == "k3" else value.clamp(min=-10, max=10)


def _log_probs_from_logits(a):
    logits, labels = a["logits"], a["labels"]
    if not kernel_floats(logits) or not isinstance(labels, torch.Tensor) or labels.is_floating_point():
        return NotImplemented
    if a["temperature"] != 1.0:
        logits.div_(a["temperature"])  # OpenRLHF's side effect: callers may read the scaled logits
    return rf.logprobs(logits, labels)


def _compute_entropy(a):
    return rf.entropy(a["logits"]) if kernel_floats(a["logits"]) else NotImplemented


def _masked_mean(a):
    tensor, mask = a["tensor"], a["mask"]
    if a["dim"] is not None or mask is None or not kernel_floats(tensor) or not binary_mask(mask, tensor):
        return NotImplemented
    return torch.where(mask.bool().any(), rf.masked_mean(tensor, mask), float("nan"))  # OpenRLHF's 0 / 0


# ------------------------------------------------------------------ losses and GAE (methods)


def _plan(action_mask, like, token_level_loss, dp_size, batch_num_tokens, global_batch_size):
    """(our mode, factor) for OpenRLHF's aggregate_loss, or None for the original. The global counts are
    only used when given (OpenRLHF ignores dp_size without them)."""
    if action_mask is None:  # a plain mean over every token; OpenRLHF needs a mask for anything else
        return ("token-mean", 1.0) if token_level_loss and batch_num_tokens is None else None
    if not binary_mask(action_mask, like):
        return None
    if token_level_loss:
        return aggregation(action_mask, "token-mean", 1 if batch_num_tokens is None else dp_size, batch_num_tokens)
    return aggregation(
        action_mask,
        "seq-mean-token-mean",
        1 if global_batch_size is None else dp_size,
        global_batch_size=global_batch_size,
    )


def _same_shape(first, *others):
    return all(isinstance(t, torch.Tensor) and t.shape == first.shape for t in others) and first.dim() >= 1


def _loss_plan(a, module, first, constants):
    """_plan for a loss forward's arguments, or None where the original runs (gradients wanted for the
    constants of our fused losses, dtypes or shapes the kernels do not take)."""
    tensors = (a[first],) + tuple(a[name] for name in constants)
    if not kernel_floats(*tensors) or not _same_shape(*tensors) or needs_grad(*tensors[1:]):
        return None
    return _plan(
        a["action_mask"], a[first], module.token_level_loss, a["dp_size"], a["batch_num_tokens"], a["global_batch_size"]
    )


def _policy_forward(a):
    module, logp, old, adv, mask = (a[k] for k in ("self", "log_probs", "old_log_probs", "advantages", "action_mask"))
    clips = [discount(v) for v in (module.clip_eps_low, module.clip_eps_high)]
    if (
        module.policy_loss_type != "ppo"
        or module.is_correction_level != "off"
        or any(c is None or c < 0 for c in clips)
    ):
        return NotImplemented
    plan = _loss_plan(a, module, "log_probs", ("old_log_probs", "advantages"))
    if plan is None:
        return NotImplemented
    mode, factor = plan
    loss, stats = rf.ppo_policy_loss(
        logp, old, adv, mask, clip_low=clips[0], clip_high=clips[1], dual_clip=module.dual_clip, agg=mode
    )
    clip_ratio = stats["clipfrac"]
    if mask is not None:
        clip_ratio = torch.where(mask.bool().any(), clip_ratio, float("nan"))
    # OpenRLHF's ppo_kl takes the log-ratio before its ±20 clamp (ours after it): computed as it does.
    ppo_kl = importlib.import_module(UTILS).masked_mean(-(logp - old).detach(), mask, dim=None)
    return loss * factor, clip_ratio, ppo_kl, None, None


def _value_forward(a):
    module = a["self"]
    clip = None if module.clip_eps is None else discount(module.clip_eps)
    if module.clip_eps is not None and (clip is None or clip < 0):
        return NotImplemented
    plan = _loss_plan(a, module, "values", ("old_values", "returns"))
    if plan is None:
        return NotImplemented
    mode, factor = plan
    loss, _ = rf.ppo_value_loss(a["values"], a["old_values"], a["returns"], a["action_mask"], clip=clip, agg=mode)
    return loss * factor


def _gae_method(a):
    values, rewards, mask = a["values"], a["rewards"], a["action_mask"]
    gamma, lam = discount(a["gamma"]), discount(a["lambd"])
    if (
        gamma is None
        or lam is None
        or not kernel_floats(values, rewards)
        or values.dim() != 2
        or values.shape != rewards.shape
        or (mask is not None and not binary_mask(mask, values))
    ):
        return NotImplemented
    with torch.no_grad():
        # OpenRLHF zeroes rewards and values at masked tokens and runs its loop over every position.
        if mask is not None:
            values, rewards = mask * values, mask * rewards
        return rf.gae(rewards, values, None, gamma=gamma, lam=lam)


METHODS = (
    (
        LOSS,
        "PolicyLoss",
        "forward",
        _policy_forward,
        (
            "self",
            "log_probs",
            "old_log_probs",
            "advantages",
            "action_mask",
            "rollout_log_probs",
            "dp_size",
            "batch_num_tokens",
            "global_batch_size",
        ),
    ),
    (
        LOSS,
        "ValueLoss",
        "forward",
        _value_forward,
        ("self", "values", "old_values", "returns", "action_mask", "dp_size", "batch_num_tokens", "global_batch_size"),
    ),
    (
        EXPERIENCE,
        "RemoteExperienceMaker",
        "get_advantages_and_returns",
        _gae_method,
        ("self", "values", "rewards", "action_mask", "gamma", "lambd"),
    ),
)


def _patch_methods():
    """Replaces each METHODS entry on its class (recorded in the handle like a target) and returns the undo;
    a class that does not import, or whose method lacks a parameter, is left alone and listed as skipped."""
    handle = _ADAPTER.handle
    undo = []
    for module_name, class_name, method, ours, params in METHODS:
        qualname = f"{module_name}.{class_name}.{method}"
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError) as exc:
            handle.skipped[qualname] = f"{module_name}.{class_name} does not import ({exc})"
            continue
        original = cls.__dict__.get(method)
        have = inspect.signature(original).parameters if callable(original) else {}
        missing = [p for p in params if p not in have]
        if missing:
            handle.skipped[qualname] = f"its signature lacks {', '.join(missing)}"
            continue
        replacement = dispatching(original, ours, params)
        setattr(cls, method, replacement)
        handle.replaced[qualname] = (original, replacement)
        handle.bindings[qualname] = [qualname]
        undo.append((cls, method, original))

    def restore():
        for cls, method, original in undo:
            setattr(cls, method, original)

    return restore


def _target(name, ours, params):
    """Target `openrlhf.models.utils.name` replaced by a dispatcher to `ours` (calls that set only `params`)."""
    return Target(UTILS, name, lambda original: dispatching(original, ours, params), params)


TARGETS = (
    _target(
        "compute_approx_kl",
        _compute_approx_kl,
        ("log_probs", "log_probs_base", "log_probs_old", "kl_estimator", "unbiased_gradient"),
    ),
    _target("log_probs_from_logits", _log_probs_from_logits, ("logits", "labels", "temperature")),
    _target("compute_entropy", _compute_entropy, ("logits",)),
    _target("masked_mean", _masked_mean, ("tensor", "mask", "dim")),
)

# OpenRLHF modules that bind the targets by name (imported first so that patch() finds them).
SCAN = (
    UTILS,
    LOSS,
    "openrlhf.models.actor",
    EXPERIENCE,
    "openrlhf.trainer.ray.ppo_actor",
    "openrlhf.trainer.ray.ppo_critic",
)

_ADAPTER = Adapter(PEER, PINNED, TARGETS, scan=SCAN, hooks=(_patch_methods,))


def patch() -> Patch:
    """Runs OpenRLHF on rlhf_fast's kernels, in this process (see the module docstring for what is patched).

    Returns
    -------
    rlhf_fast.integrations._patching.Patch
        The handle: a context manager whose with-block ends with `unpatch`; ``handle.skipped`` says which
        targets were left as OpenRLHF has them and why (another OpenRLHF version). Idempotent: while patched, the
        same handle.
    """
    return _ADAPTER.patch()


def unpatch() -> None:
    """Puts OpenRLHF's own functions and methods back, in every binding `patch` wrote.

    Returns
    -------
    None
        Nothing.
    """
    _ADAPTER.unpatch()


def ray_runtime_env(base: dict | None = None) -> dict:
    """A runtime_env for ``ray.init`` that patches OpenRLHF in every Ray worker process of the job.

    Parameters
    ----------
    base : dict or None
        Your own runtime_env (not modified): its ``env_vars`` and ``worker_process_setup_hook`` are kept, your
        hook running first.

    Returns
    -------
    dict
        `base` plus ``RLHF_FAST_PATCH=openrlhf`` in its ``env_vars`` and the worker setup hook
        (``rlhf_fast.integrations.ray_workers.setup_worker``, chained after base's own). Patch the driver
        with `patch` as usual:

        import ray
        from rlhf_fast.integrations import openrlhf as rf_openrlhf
        rf_openrlhf.patch()
        ray.init(runtime_env=rf_openrlhf.ray_runtime_env())   # or ray_runtime_env({"env_vars": {...}})
    """
    return ray_workers.runtime_env((PEER,), base)
