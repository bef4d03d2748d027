"""Advantage estimation: GAE (dense and packed), GRPO / RLOO group advantages, masked whitening and means.

Every op takes ``backend=`` (``auto | triton | cuda | cpu | torch``, default ``RLHF_FAST_BACKEND`` or auto),
accepts float32 / bfloat16 / float16 / float64 inputs, computes in float32 (float64 on the torch backend for
float64 inputs) and returns float32 (float64 for float64 inputs on the torch backend).
"""
from __future__ import annotations

import math

import torch

from . import _validate as check
from . import backend as _backend
from . import reference


def _kernels(name: str):
    return _backend.kernels(name, "advantages")


def _packed_gae(rewards, values, mask, last_value, cu_seqlens, gamma, lam, name):
    ops = _kernels(name)
    lv = None if last_value is None else last_value.float().contiguous()
    return _backend.call(ops.gae, rewards.contiguous(), values.contiguous(),
                         None if mask is None else mask.contiguous(), lv, cu_seqlens, float(gamma), float(lam))


def _check_discount(gamma, lam):
    for label, value in (("gamma", gamma), ("lam", lam)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{label} must be a finite float, got {value!r}")


def gae(rewards, values, mask=None, *, gamma=1.0, lam=0.95, last_value=None, backend=None):
    """Generalised advantage estimation with skip-masking.

    rewards, values: (..., T) float; mask: (..., T) bool/int/float (nonzero = valid) or None;
    last_value: (...) bootstrap value after each row's last valid token, or None (terminal, 0).
    Within a row each valid token's successor is the next valid token, so holes and left or right padding are
    skipped; masked positions get 0. With right padding this equals the reversed loop of TRL/OpenRLHF/verl.
    Returns (advantages, returns), float32, shaped like rewards. Gradients flow to rewards, values, last_value.
    """
    rewards, values = check.common_float(rewards=rewards, values=values)
    check.same_shape("values", values, "rewards", rewards)
    check.same_device("values", values, "rewards", rewards)
    if rewards.dim() < 1:
        raise ValueError("rewards must have at least one dim (..., T)")
    _check_discount(gamma, lam)
    mask = check.bool_mask("mask", mask, "rewards", rewards)
    lead = rewards.shape[:-1]
    if last_value is not None:
        check.floating("last_value", last_value)
        check.same_device("last_value", last_value, "rewards", rewards)
        if last_value.shape != lead:
            raise ValueError(f"last_value must have shape {tuple(lead)} (one value per row), "
                             f"got {tuple(last_value.shape)}")
    name = _backend.select("gae", backend, rewards.device)
    rows, steps = math.prod(lead), rewards.shape[-1]
    if name == "torch":
        adv, ret = reference.gae(rewards.reshape(rows, steps), values.reshape(rows, steps),
                                 None if mask is None else mask.reshape(rows, steps), gamma=gamma, lam=lam,
                                 last_value=None if last_value is None else last_value.reshape(rows))
        return adv.reshape(rewards.shape), ret.reshape(rewards.shape)
    cu_seqlens = torch.arange(rows + 1, device=rewards.device, dtype=torch.long) * steps
    adv, ret = _packed_gae(rewards.reshape(-1), values.reshape(-1), None if mask is None else mask.reshape(-1),
                           None if last_value is None else last_value.reshape(-1), cu_seqlens, gamma, lam, name)
    return adv.view(rewards.shape), ret.view(rewards.shape)


def gae_packed(rewards, values, cu_seqlens, mask=None, *, gamma=1.0, lam=0.95, last_value=None, backend=None):
    """GAE over packed sequences: rewards, values (N,) hold S sequences back to back, sequence s spanning
    tokens [cu_seqlens[s], cu_seqlens[s+1]) (cu_seqlens: (S+1,) int, 0 first, N last, non-decreasing, as in
    flash-attention varlen). mask (N,) and last_value (S,) as in `gae`. Returns (advantages, returns) (N,) fp32.

    cu_seqlens is checked once on the host (one device sync when it lives on the GPU).
    """
    rewards, values = check.common_float(rewards=rewards, values=values)
    check.same_shape("values", values, "rewards", rewards)
    check.same_device("values", values, "rewards", rewards)
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D packed tokens (N,), got shape {tuple(rewards.shape)}")
    _check_discount(gamma, lam)
    check.integer("cu_seqlens", cu_seqlens)
    check.same_device("cu_seqlens", cu_seqlens, "rewards", rewards)
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError("cu_seqlens must be 1-D with S+1 entries")
    cu_seqlens = cu_seqlens.long().contiguous()
    host = cu_seqlens.cpu()
    if host[0] != 0 or host[-1] != rewards.numel() or bool((host[1:] < host[:-1]).any()):
        raise ValueError(f"cu_seqlens must start at 0, end at the number of tokens ({rewards.numel()}) and never "
                         f"decrease; got {host.tolist()[:8]}{'...' if host.numel() > 8 else ''}")
    mask = check.bool_mask("mask", mask, "rewards", rewards)
    if last_value is not None:
        check.floating("last_value", last_value)
        check.same_device("last_value", last_value, "rewards", rewards)
        if last_value.shape != (cu_seqlens.numel() - 1,):
            raise ValueError(f"last_value must have shape ({cu_seqlens.numel() - 1},), one per sequence, "
                             f"got {tuple(last_value.shape)}")
    name = _backend.select("gae_packed", backend, rewards.device)
    if name == "torch":
        return reference.gae_packed(rewards, values, cu_seqlens, mask, gamma=gamma, lam=lam, last_value=last_value)
    return _packed_gae(rewards, values, mask, last_value, cu_seqlens, gamma, lam, name)


def _group_scores(scores, group_size):
    check.floating("scores", scores)
    check.positive_int("group_size", group_size)
    if scores.numel() % group_size:
        raise ValueError(f"group_size={group_size} does not divide the {scores.numel()} scores; pass scores of "
                         f"n_prompts * group_size samples, grouped contiguously")


def _group_advantages(scores, group_size, norm_std, leave_one_out, eps, backend, op):
    name = _backend.select(op, backend, scores.device)
    flat = scores.reshape(-1)
    if name == "torch":
        if leave_one_out:
            return reference.rloo_advantages(flat, group_size).reshape(scores.shape)
        return reference.grpo_advantages(flat, group_size, norm_std=norm_std, eps=eps).reshape(scores.shape)
    if scores.requires_grad and torch.is_grad_enabled():
        # The kernels give values only; the (rarely wanted) gradient comes from the float32 reference.
        return _group_advantages(scores, group_size, norm_std, leave_one_out, eps, "torch", op).float()
    out = _kernels(name).group_advantages(flat.contiguous(), group_size, norm_std, leave_one_out, float(eps))
    return out.view(scores.shape)


def grpo_advantages(scores, group_size, *, norm_std=True, eps=1e-6, backend=None):
    """GRPO: (score - group mean) / (unbiased group std + eps), or without the std when norm_std=False.

    scores: (n_prompts * group_size,) (any shape whose flattening is grouped contiguously). A group of one
    sample has no baseline and gets 0. Returns float32, shaped like scores.
    """
    _group_scores(scores, group_size)
    return _group_advantages(scores, group_size, norm_std, False, eps, backend, "grpo_advantages")


def rloo_advantages(scores, group_size, *, backend=None):
    """RLOO: score - mean of the other samples' scores in its group. A group of one gets 0. float32."""
    _group_scores(scores, group_size)
    return _group_advantages(scores, group_size, False, True, 0.0, backend, "rloo_advantages")


def _moments(x, mask, backend, op):
    """(count, sum, sumsq) float64 (3,) of the valid entries, or None for the torch backend."""
    name = _backend.select(op, backend, x.device)
    if name == "torch" or (x.requires_grad and torch.is_grad_enabled()):
        return None
    return _kernels(name).masked_moments(x.contiguous(), None if mask is None else mask.contiguous())


def masked_mean(x, mask=None, *, backend=None):
    """Mean of x over the entries where mask is nonzero (0 when none is); a float32 scalar tensor.

    The kernels reduce in fp64 partials; with requires_grad the torch reference is used so gradients flow.
    """
    check.floating("x", x)
    mask = check.bool_mask("mask", mask, "x", x)
    moments = _moments(x, mask, backend, "masked_mean")
    if moments is None:
        return reference.masked_mean(x, mask).float()
    return (moments[1] / moments[0].clamp(min=1)).float()


def masked_whiten(x, mask=None, *, shift_mean=True, eps=1e-8, backend=None):
    """(x - mean) * rsqrt(var + eps) with the masked mean and the unbiased masked variance (NaN with fewer
    than two valid entries, like torch.var); if not shift_mean the mean is added back. Applied to every entry,
    masked ones too, as TRL and verl do. Returns float32 shaped like x.
    """
    check.floating("x", x)
    mask = check.bool_mask("mask", mask, "x", x)
    moments = _moments(x, mask, backend, "masked_whiten")
    if moments is None:
        return reference.masked_whiten(x, mask, shift_mean=shift_mean, eps=eps).float()
    count, total, squares = moments.unbind()
    mean = total / count
    var = (squares - count * mean * mean) / (count - 1)
    whitened = (x.float() - mean.float()) * torch.rsqrt(var.float() + eps)
    return whitened if shift_mean else whitened + mean.float()
