"""OpenRLHF 0.11.2 on rlhf_fast's kernels, with OpenRLHF's own semantics.

    from rlhf_fast.integrations import openrlhf as rf_openrlhf
    rf_openrlhf.patch()             # or: with rf_openrlhf.patch(): ...

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

import functools
import importlib
import inspect

import torch

import rlhf_fast as rf

from ._common import aggregation, binary_mask, discount, kernel_floats, needs_grad
from ._patching import Adapter, Patch, Target

PEER = "openrlhf"
PINNED = "0.11.2"
UTILS = "openrlhf.models.utils"
LOSS = "openrlhf.models.loss"
EXPERIENCE = "openrlhf.trainer.ppo_utils.experience_maker"


def _replaces(original):
    """Decorator: the replacement keeps the original's name, docstring and signature (`__wrapped__`)."""
    return functools.wraps(original)


# ------------------------------------------------------------------ openrlhf.models.utils

def _compute_approx_kl(original):
    @_replaces(original)
    def compute_approx_kl(log_probs, log_probs_base, log_probs_old=None, kl_estimator="k1",
                          unbiased_gradient=False):
        if (unbiased_gradient or kl_estimator not in ("k1", "k2", "k3") or not isinstance(log_probs, torch.Tensor)
                or not isinstance(log_probs_base, torch.Tensor) or log_probs.shape != log_probs_base.shape):
            return original(log_probs, log_probs_base, log_probs_old, kl_estimator, unbiased_gradient)
        # OpenRLHF computes in float32 and clamps every estimator to ±10; our k3 clamps the same way (its ±20
        # clamp of the log-ratio only acts where the value is already past 10).
        value = rf.kl_penalty(log_probs.float(), log_probs_base.float(), kl_estimator)
        return value if kl_estimator == "k3" else value.clamp(min=-10, max=10)
    return compute_approx_kl


def _log_probs_from_logits(original):
    @_replaces(original)
    def log_probs_from_logits(logits, labels, temperature=1.0):
        if temperature != 1.0:
            logits.div_(temperature)  # OpenRLHF's side effect: callers may read the scaled logits
        if not kernel_floats(logits) or not isinstance(labels, torch.Tensor) or labels.is_floating_point():
            return original(logits, labels, 1.0)
        return rf.logprobs(logits, labels)
    return log_probs_from_logits


def _compute_entropy(original):
    @_replaces(original)
    def compute_entropy(logits):
        if not kernel_floats(logits):
            return original(logits)
        return rf.entropy(logits)
    return compute_entropy


def _masked_mean(original):
    @_replaces(original)
    def masked_mean(tensor, mask, dim=None):
        if dim is not None or mask is None or not kernel_floats(tensor) or not binary_mask(mask, tensor):
            return original(tensor, mask, dim)
        mean = rf.masked_mean(tensor, mask)
        return torch.where(mask.bool().any(), mean, float("nan"))  # OpenRLHF's 0 / 0 with nothing valid
    return masked_mean


# ------------------------------------------------------------------ losses and GAE (methods)

def _plan(action_mask, like, token_level_loss, dp_size, batch_num_tokens, global_batch_size):
    """(our mode, factor) for OpenRLHF's aggregate_loss, or None for the original. The global counts are
    only used when given (OpenRLHF ignores dp_size without them)."""
    if action_mask is None:  # a plain mean over every token; the sequence-level loss needs a mask
        if not token_level_loss:
            return None
        return "token-mean", 1.0 if batch_num_tokens is None else like.numel() / batch_num_tokens * dp_size
    if not binary_mask(action_mask, like):
        return None
    if token_level_loss:
        return aggregation(action_mask, "token-mean", 1 if batch_num_tokens is None else dp_size, batch_num_tokens)
    return aggregation(action_mask, "seq-mean-token-mean", 1 if global_batch_size is None else dp_size,
                       global_batch_size=global_batch_size)


def _same_shape(first, *others):
    return all(isinstance(t, torch.Tensor) and t.shape == first.shape for t in others) and first.dim() >= 1


def _policy_forward(original):
    masked_mean = importlib.import_module(UTILS).masked_mean

    @_replaces(original)
    def forward(self, log_probs, old_log_probs, advantages, action_mask=None, rollout_log_probs=None, dp_size=1,
                batch_num_tokens=None, global_batch_size=None):
        clips = [discount(v) for v in (self.clip_eps_low, self.clip_eps_high)]
        plan = None
        if (self.policy_loss_type == "ppo" and self.is_correction_level == "off"
                and all(c is not None and c >= 0 for c in clips)
                and kernel_floats(log_probs, old_log_probs, advantages)
                and _same_shape(log_probs, old_log_probs, advantages) and not needs_grad(old_log_probs, advantages)):
            plan = _plan(action_mask, log_probs, self.token_level_loss, dp_size, batch_num_tokens,
                         global_batch_size)
        if plan is None:
            return original(self, log_probs, old_log_probs, advantages, action_mask, rollout_log_probs, dp_size,
                            batch_num_tokens, global_batch_size)
        mode, factor = plan
        loss, stats = rf.ppo_policy_loss(log_probs, old_log_probs, advantages, action_mask, clip_low=clips[0],
                                         clip_high=clips[1], dual_clip=self.dual_clip, agg=mode)
        clip_ratio = stats["clipfrac"]
        if action_mask is not None:
            clip_ratio = torch.where(action_mask.bool().any(), clip_ratio, float("nan"))
        # OpenRLHF's ppo_kl uses the log-ratio before its ±20 clamp (ours after it): computed as it does.
        ppo_kl = masked_mean(-(log_probs - old_log_probs).detach(), action_mask, dim=None)
        return loss * factor, clip_ratio, ppo_kl, None, None
    return forward


def _value_forward(original):
    @_replaces(original)
    def forward(self, values, old_values, returns, action_mask=None, dp_size=1, batch_num_tokens=None,
                global_batch_size=None):
        clip = None if self.clip_eps is None else discount(self.clip_eps)
        plan = None
        if ((self.clip_eps is None or (clip is not None and clip >= 0))
                and kernel_floats(values, old_values, returns) and _same_shape(values, old_values, returns)
                and not needs_grad(old_values, returns)):
            plan = _plan(action_mask, values, self.token_level_loss, dp_size, batch_num_tokens, global_batch_size)
        if plan is None:
            return original(self, values, old_values, returns, action_mask, dp_size, batch_num_tokens,
                            global_batch_size)
        mode, factor = plan
        loss, _ = rf.ppo_value_loss(values, old_values, returns, action_mask, clip=clip, agg=mode)
        return loss * factor
    return forward


def _gae_method(original):
    @_replaces(original)
    @torch.no_grad()
    def get_advantages_and_returns(self, values, rewards, action_mask, gamma, lambd):
        gamma_f, lam_f = discount(gamma), discount(lambd)
        if (gamma_f is None or lam_f is None or not kernel_floats(values, rewards) or values.dim() != 2
                or values.shape != rewards.shape
                or (action_mask is not None and not binary_mask(action_mask, values))):
            return original(self, values, rewards, action_mask, gamma, lambd)
        # OpenRLHF zeroes rewards and values at masked tokens and runs its loop over every position.
        if action_mask is not None:
            values, rewards = action_mask * values, action_mask * rewards
        return rf.gae(rewards, values, None, gamma=gamma_f, lam=lam_f)
    return get_advantages_and_returns


METHODS = (
    (LOSS, "PolicyLoss", "forward", _policy_forward,
     ("log_probs", "old_log_probs", "advantages", "action_mask", "rollout_log_probs", "dp_size", "batch_num_tokens",
      "global_batch_size")),
    (LOSS, "ValueLoss", "forward", _value_forward,
     ("values", "old_values", "returns", "action_mask", "dp_size", "batch_num_tokens", "global_batch_size")),
    (EXPERIENCE, "RemoteExperienceMaker", "get_advantages_and_returns", _gae_method,
     ("values", "rewards", "action_mask", "gamma", "lambd")),
)


def _patch_methods():
    """Replaces each METHODS entry on its class (recorded in the handle like a target) and returns the undo;
    a class that does not import, or whose method lacks a parameter, is left alone and listed as skipped."""
    handle = _ADAPTER.handle
    undo = []
    for module_name, class_name, method, make, params in METHODS:
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
        replacement = make(original)
        setattr(cls, method, replacement)
        handle.replaced[qualname] = (original, replacement)
        handle.bindings[qualname] = [qualname]
        undo.append((cls, method, original))

    def restore():
        for cls, method, original in undo:
            setattr(cls, method, original)
    return restore


TARGETS = (
    Target(UTILS, "compute_approx_kl", _compute_approx_kl,
           ("log_probs", "log_probs_base", "log_probs_old", "kl_estimator", "unbiased_gradient")),
    Target(UTILS, "log_probs_from_logits", _log_probs_from_logits, ("logits", "labels", "temperature")),
    Target(UTILS, "compute_entropy", _compute_entropy, ("logits",)),
    Target(UTILS, "masked_mean", _masked_mean, ("tensor", "mask", "dim")),
)

# OpenRLHF modules that bind the targets by name (imported first so that patch() finds them).
SCAN = (UTILS, LOSS, "openrlhf.models.actor", EXPERIENCE, "openrlhf.trainer.ray.ppo_actor",
        "openrlhf.trainer.ray.ppo_critic")

_ADAPTER = Adapter(PEER, PINNED, TARGETS, scan=SCAN, hooks=(_patch_methods,))


def patch() -> Patch:
    """Runs OpenRLHF on rlhf_fast's kernels (idempotent); the handle is a context manager that undoes it."""
    return _ADAPTER.patch()


def unpatch() -> None:
    """Puts OpenRLHF's own functions and methods back."""
    _ADAPTER.unpatch()
