"""Advantage estimation: GAE (dense and packed), GRPO / RLOO group advantages, masked whitening and means.

Every op takes ``backend=`` (``auto | triton | cuda | cpu | torch``, default ``RLHF_FAST_BACKEND`` or auto),
accepts float32 / bfloat16 / float16 / float64 inputs, computes in float32 (float64 on the torch backend for
float64 inputs) and returns float32 (float64 for float64 inputs on the torch backend).
"""

from __future__ import annotations

import math

import torch

from . import _ops, reference
from . import _validate as check
from . import backend as _backend


def _kernels(name: str):
    return _ops.kernels(name, "advantages")


def _packed_gae(rewards, values, mask, last_value, cu_seqlens, gamma, lam, name):
    ops = _kernels(name)
    lv = None if last_value is None else last_value.float().contiguous()
    return _ops.call(
        ops.gae,
        rewards.contiguous(),
        values.contiguous(),
        None if mask is None else mask.contiguous(),
        lv,
        cu_seqlens,
        float(gamma),
        float(lam),
    )


def _check_discount(gamma, lam):
    for label, value in (("gamma", gamma), ("lam", lam)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{label} must be a finite float, got {value!r}")


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
    last_value: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the last dim, with skip-masking.

    Parameters
    ----------
    rewards : torch.Tensor
        ``(..., T)`` per-token rewards, float32 / bfloat16 / float16 / float64, any strides.
    values : torch.Tensor
        ``(..., T)`` value estimates, same shape and device as `rewards` (mixed float dtypes are promoted).
    mask : torch.Tensor or None
        ``(..., T)`` bool / int / float, nonzero = valid; None: every token is valid.
    gamma : float
        Discount, a finite float.
    lam : float
        GAE lambda, a finite float.
    last_value : torch.Tensor or None
        ``(...)``, one bootstrap value per row: the successor value after the row's last valid token.
        None: 0 (the episode ends there).
    backend : str or None
        ``"auto" | "triton" | "cuda" | "cpu" | "torch"``; None: ``RLHF_FAST_BACKEND`` or ``"auto"``.

    Returns
    -------
    advantages : torch.Tensor
        ``(..., T)`` float32 (float64 for float64 inputs on the torch backend), 0 at masked tokens.
    returns : torch.Tensor
        ``(..., T)`` advantages + values at valid tokens, 0 at masked tokens; same dtype.

    Raises
    ------
    TypeError
        A non-float `rewards`, `values` or `last_value`, or a mask that is not a tensor.
    ValueError
        Mismatched shapes or devices (the message names the argument), a 0-dim `rewards`, a non-finite
        `gamma` / `lam`, a `last_value` not shaped ``rewards.shape[:-1]``.
    rlhf_fast.BackendUnavailable
        A backend asked for by name cannot run these tensors.

    Notes
    -----
    Within a row each valid token's successor is the next valid token, so holes, left padding, right padding
    and all-masked rows are skipped. With right padding the result is exactly the reversed loop that TRL,
    OpenRLHF and verl run. Inputs may be non-contiguous; the kernels compute in float32. Differentiable in
    `rewards`, `values` and `last_value` (the backward runs the same scan on the reversed gradient).
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
            raise ValueError(
                f"last_value must have shape {tuple(lead)} (one value per row), got {tuple(last_value.shape)}"
            )
    name = _backend.select("gae", backend, rewards.device)
    rows, steps = math.prod(lead), rewards.shape[-1]
    if name == "torch":
        adv, ret = reference.gae(
            rewards.reshape(rows, steps),
            values.reshape(rows, steps),
            None if mask is None else mask.reshape(rows, steps),
            gamma=gamma,
            lam=lam,
            last_value=None if last_value is None else last_value.reshape(rows),
        )
        return adv.reshape(rewards.shape), ret.reshape(rewards.shape)
    cu_seqlens = torch.arange(rows + 1, device=rewards.device, dtype=torch.long) * steps
    adv, ret = _packed_gae(
        rewards.reshape(-1),
        values.reshape(-1),
        None if mask is None else mask.reshape(-1),
        None if last_value is None else last_value.reshape(-1),
        cu_seqlens,
        gamma,
        lam,
        name,
    )
    return adv.view(rewards.shape), ret.view(rewards.shape)


def gae_packed(
    rewards: torch.Tensor,
    values: torch.Tensor,
    cu_seqlens: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
    last_value: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`gae` over 1-D packed sequences (the flash-attention varlen layout).

    Parameters
    ----------
    rewards : torch.Tensor
        ``(N,)`` float: S sequences back to back.
    values : torch.Tensor
        ``(N,)`` float, same device.
    cu_seqlens : torch.Tensor
        ``(S+1,)`` int: sequence ``s`` spans tokens ``[cu_seqlens[s], cu_seqlens[s+1])``; starts at 0, ends at
        N, never decreases.
    mask : torch.Tensor or None
        ``(N,)``, nonzero = valid, as in `gae`.
    gamma : float
        Discount, a finite float.
    lam : float
        GAE lambda, a finite float.
    last_value : torch.Tensor or None
        ``(S,)``, one bootstrap value per sequence; None: 0 (terminal).
    backend : str or None
        As in `gae`.

    Returns
    -------
    advantages : torch.Tensor
        ``(N,)`` float32 (float64 for float64 inputs on the torch backend), 0 at masked tokens.
    returns : torch.Tensor
        ``(N,)``, same dtype, 0 at masked tokens.

    Raises
    ------
    TypeError
        Non-float rewards / values / last_value, or a non-integer `cu_seqlens`.
    ValueError
        `rewards` not 1-D, mismatched shapes or devices, a `cu_seqlens` that does not start at 0, end at N
        and never decrease, a `last_value` not shaped ``(S,)``, a non-finite `gamma` / `lam`.
    rlhf_fast.BackendUnavailable
        A backend asked for by name cannot run these tensors.

    Notes
    -----
    Masking, successors and gradients as in `gae`, within each sequence. `cu_seqlens` is checked once on the
    host: one device sync when it lives on the GPU (`gae` builds its own and does not sync).
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
        raise ValueError(
            f"cu_seqlens must start at 0, end at the number of tokens ({rewards.numel()}) and never "
            f"decrease; got {host.tolist()[:8]}{'...' if host.numel() > 8 else ''}"
        )
    mask = check.bool_mask("mask", mask, "rewards", rewards)
    if last_value is not None:
        check.floating("last_value", last_value)
        check.same_device("last_value", last_value, "rewards", rewards)
        if last_value.shape != (cu_seqlens.numel() - 1,):
            raise ValueError(
                f"last_value must have shape ({cu_seqlens.numel() - 1},), one per sequence, "
                f"got {tuple(last_value.shape)}"
            )
    name = _backend.select("gae_packed", backend, rewards.device)
    if name == "torch":
        return reference.gae_packed(rewards, values, cu_seqlens, mask, gamma=gamma, lam=lam, last_value=last_value)
    return _packed_gae(rewards, values, mask, last_value, cu_seqlens, gamma, lam, name)


def _group_scores(scores, group_size):
    check.floating("scores", scores)
    check.positive_int("group_size", group_size)
    if scores.numel() % group_size:
        raise ValueError(
            f"group_size={group_size} does not divide the {scores.numel()} scores; pass scores of "
            f"n_prompts * group_size samples, grouped contiguously"
        )


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


def grpo_advantages(
    scores: torch.Tensor, group_size: int, *, norm_std: bool = True, eps: float = 1e-6, backend: str | None = None
) -> torch.Tensor:
    """GRPO group advantages: ``(score - group mean) / (unbiased group std + eps)``.

    Parameters
    ----------
    scores : torch.Tensor
        ``(n_prompts * group_size,)`` float (any shape whose flattening holds each group contiguously).
    group_size : int
        Samples per prompt, a positive int that divides ``scores.numel()``.
    norm_std : bool
        False: ``score - group mean``, without the division.
    eps : float
        Added to the standard deviation.
    backend : str or None
        As in `gae`.

    Returns
    -------
    torch.Tensor
        Shaped like `scores`, float32 (float64 for float64 inputs on the torch backend).

    Raises
    ------
    TypeError
        Non-float `scores`.
    ValueError
        A `group_size` that is not a positive int or does not divide the number of scores.

    Notes
    -----
    A group of one sample has no baseline and gets 0. The kernels give values only; with a `scores` that
    requires grad the float32 reference runs so that the gradient flows.
    """
    _group_scores(scores, group_size)
    return _group_advantages(scores, group_size, norm_std, False, eps, backend, "grpo_advantages")


def rloo_advantages(scores: torch.Tensor, group_size: int, *, backend: str | None = None) -> torch.Tensor:
    """RLOO advantages: each score minus the mean of the other samples' scores in its group.

    Parameters
    ----------
    scores : torch.Tensor
        ``(n_prompts * group_size,)`` float, groups contiguous (as in `grpo_advantages`).
    group_size : int
        Samples per prompt, a positive int that divides ``scores.numel()``.
    backend : str or None
        As in `gae`.

    Returns
    -------
    torch.Tensor
        Shaped like `scores`, float32 (float64 for float64 inputs on the torch backend). A group of one gets 0.

    Raises
    ------
    TypeError
        Non-float `scores`.
    ValueError
        A `group_size` that is not a positive int or does not divide the number of scores.
    """
    _group_scores(scores, group_size)
    return _group_advantages(scores, group_size, False, True, 0.0, backend, "rloo_advantages")


def _moments(x, mask, backend, op):
    """(count, sum, sumsq) float64 (3,) of the valid entries, or None for the torch backend."""
    name = _backend.select(op, backend, x.device)
    if name == "torch" or (x.requires_grad and torch.is_grad_enabled()):
        return None
    return _kernels(name).masked_moments(x.contiguous(), None if mask is None else mask.contiguous())


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None = None, *, backend: str | None = None) -> torch.Tensor:
    """Mean of `x` over the entries where `mask` is nonzero.

    Parameters
    ----------
    x : torch.Tensor
        Float tensor of any shape.
    mask : torch.Tensor or None
        Shaped like `x`, nonzero = valid; None: every entry.
    backend : str or None
        As in `gae`.

    Returns
    -------
    torch.Tensor
        0-dim float32; 0 when no entry is valid.

    Raises
    ------
    TypeError
        Non-float `x`.
    ValueError
        A mask of another shape or device.

    Notes
    -----
    The kernels reduce in float64 partials; with an `x` that requires grad the torch reference runs so that
    gradients flow.
    """
    check.floating("x", x)
    mask = check.bool_mask("mask", mask, "x", x)
    moments = _moments(x, mask, backend, "masked_mean")
    if moments is None:
        return reference.masked_mean(x, mask).float()
    return (moments[1] / moments[0].clamp(min=1)).float()


def masked_whiten(
    x: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    shift_mean: bool = True,
    eps: float = 1e-8,
    backend: str | None = None,
) -> torch.Tensor:
    """``(x - mean) * rsqrt(var + eps)`` with the masked mean and the unbiased masked variance.

    Parameters
    ----------
    x : torch.Tensor
        Float tensor of any shape.
    mask : torch.Tensor or None
        Shaped like `x`, nonzero = valid (the entries the moments are taken over); None: every entry.
    shift_mean : bool
        False: the mean is added back after the scaling.
    eps : float
        Added to the variance.
    backend : str or None
        As in `gae`.

    Returns
    -------
    torch.Tensor
        Float32, shaped like `x`.

    Raises
    ------
    TypeError
        Non-float `x`.
    ValueError
        A mask of another shape or device.

    Notes
    -----
    The result is applied to every entry, masked ones too, as TRL and verl do. With fewer than two valid
    entries the variance is NaN (as ``torch.var``), and so is the result.
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
