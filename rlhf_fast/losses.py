"""Losses: per-token KL penalties, masked reductions and loss aggregation, fused PPO policy and value losses.

`kl_penalty`, `ppo_policy_loss` and `ppo_value_loss` take ``backend=`` (``auto | triton | cuda | cpu | torch``);
the kernels accept float32 / bfloat16 / float16 / float64 inputs, compute in float32 and return float32 (the
torch backend keeps float64 for float64 inputs). `masked_sum` and `agg_loss` are a few torch ops (cheap, and
differentiable through autograd). Masked entries are ignored even when they hold inf or nan.
"""

from __future__ import annotations

import math

import torch  # annotations

from . import _ops, reference
from . import _validate as check
from . import backend as _backend

KL_KINDS = tuple(reference.KL_KINDS)
AGG_MODES = reference.AGG_MODES


def _kernels(name: str):
    return _ops.kernels(name, "losses")


def _check_kind(kind) -> str:
    if not isinstance(kind, str) or kind not in reference.KL_KINDS:
        raise ValueError(f"kind must be one of {KL_KINDS}, got {kind!r}")
    return reference.KL_KINDS[kind]


def _check_mode(label: str, mode) -> str:
    if not isinstance(mode, str) or mode not in AGG_MODES:
        raise ValueError(f"{label} must be one of {AGG_MODES}, got {mode!r}")
    return mode


def _check_clip(label: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{label} must be a finite float >= 0, got {value!r}")
    return float(value)


def _check_divisor(label: str, value):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{label} must be None or a finite number > 0, got {value!r}")
    return float(value)


def kl_penalty(
    logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1", *, backend: str | None = None
) -> torch.Tensor:
    """Per-token KL estimator of the policy against the reference model (verl's ``kl_penalty``), elementwise.

    Parameters
    ----------
    logp : torch.Tensor
        ``(...)`` float log-probs of the sampled tokens under the policy.
    ref_logp : torch.Tensor
        ``(...)`` the same tokens' log-probs under the reference model; same shape and device.
    kind : str
        ``"k1"``: logp - ref. ``"abs"``: ``|logp - ref|``. ``"k2"`` (= ``"mse"``): ½(logp - ref)².
        ``"k3"`` (= ``"low_var_kl"``): exp(d) - d - 1 with d = clamp(ref - logp, ±20), the result clamped to
        ±10 (verl's clamps). ``"k1+"`` / ``"k3+"``: the value of k1 / k3 with the gradient of k2
        (straight-through).
    backend : str or None
        ``"auto" | "triton" | "cuda" | "cpu" | "torch"``; None: ``RLHF_FAST_BACKEND`` or ``"auto"``.

    Returns
    -------
    torch.Tensor
        ``(...)`` float32 (the torch backend keeps float64 for float64 inputs). Gradients flow to both
        inputs, in each input's dtype.

    Raises
    ------
    TypeError
        Non-float inputs.
    ValueError
        An unknown `kind`, mismatched shapes or devices.
    rlhf_fast.BackendUnavailable
        A backend asked for by name cannot run these tensors.

    Notes
    -----
    Near d = 0, k3 as written cancels in float32 (exp(d) carries an absolute error near 1e-7 while the value is
    about d²/2). The kernels (CPU, CUDA, Triton) take ``d²·(1/2 + d/6 + … + d⁶/8!)`` below ``|d| = 0.25`` and
    ``expm1(d) - d`` above, and the gradient as ``-expm1(d)``: within about 5e-7 relative of the exact value
    for d from 1e-8 to 0.3. The torch backend is verl's formula as written (exact enough in float64, the test
    reference; in float32 it cancels as verl's does). Mixed float dtypes are promoted to one.
    """
    logp, ref_logp = check.common_float(logp=logp, ref_logp=ref_logp)
    check.same_shape("ref_logp", ref_logp, "logp", logp)
    check.same_device("ref_logp", ref_logp, "logp", logp)
    kind = _check_kind(kind)
    name = _backend.select("kl_penalty", backend, logp.device)
    if name == "torch":
        return reference.kl_penalty(logp, ref_logp, kind)
    return _ops.call(_kernels(name).kl_penalty, logp.contiguous(), ref_logp.contiguous(), kind)


def masked_sum(
    x: torch.Tensor, mask: torch.Tensor | None = None, *, dim: int | tuple[int, ...] | None = None
) -> torch.Tensor:
    """Sum of `x` over the entries where `mask` is nonzero.

    Parameters
    ----------
    x : torch.Tensor
        Float tensor of any shape.
    mask : torch.Tensor or None
        Shaped like `x`, nonzero = valid; None: every entry.
    dim : int, tuple of int, or None
        The dims to sum over; None: everything.

    Returns
    -------
    torch.Tensor
        float32 (float64 for float64 `x`); differentiable (a few torch ops).

    Raises
    ------
    TypeError
        Non-float `x`.
    ValueError
        A mask of another shape or device.
    """
    check.floating("x", x)
    mask = check.bool_mask("mask", mask, "x", x)
    return reference.masked_sum(x, mask, dim)


def agg_loss(
    loss: torch.Tensor,
    mask: torch.Tensor | None = None,
    mode: str = "token-mean",
    *,
    normalizer: float | None = None,
    horizon: float | None = None,
) -> torch.Tensor:
    """A per-token loss ``(..., T)`` aggregated over the valid tokens to a scalar, as verl 0.9.1's ``agg_loss``.

    Parameters
    ----------
    loss : torch.Tensor
        ``(..., T)`` float per-token loss; the rows are all the leading dims.
    mask : torch.Tensor or None
        Shaped like `loss`, nonzero = valid; None: every token.
    mode : str
        With m the mask and V the number of rows holding a valid token:
        ``"token-mean"``: Σ(loss·m) / Σm. ``"token-sum"``: Σ(loss·m). ``"seq-mean-token-sum"``: Σ(loss·m) / V.
        ``"seq-mean-token-mean"``: the sum over those V rows of (Σₜ loss·m / Σₜ m), / V.
        ``"seq-mean-token-sum-norm"`` (Dr. GRPO): Σ(loss·m) / V / T.
    normalizer : float or None
        A number > 0 that replaces the count the mode divides by (Σm, 1 for token-sum, or V): a global count,
        for losses that must not depend on how a batch is split (verl's ``batch_num_tokens / dp_size`` for
        token-mean, ``global_batch_size / dp_size`` for the seq-mean modes, ``1 / dp_size`` for token-sum).
    horizon : float or None
        A number > 0 that replaces T in ``seq-mean-token-sum-norm`` (verl's ``loss_scale_factor``); the other
        modes ignore it.

    Returns
    -------
    torch.Tensor
        0-dim float32 (float64 for float64 `loss`); differentiable (a few torch ops).

    Raises
    ------
    TypeError
        Non-float `loss`.
    ValueError
        An unknown `mode`, a 0-dim `loss`, a mask of another shape or device, a `normalizer` or `horizon`
        that is not a finite number > 0.

    Notes
    -----
    Rows without a valid token are left out of every seq-mean mode. No valid token at all gives 0, not NaN.
    Masked entries are ignored even when they hold inf or nan.
    """
    check.floating("loss", loss)
    if loss.dim() < 1:
        raise ValueError("loss must have at least one dim (..., T)")
    mask = check.bool_mask("mask", mask, "loss", loss)
    return reference.agg_loss(
        loss,
        mask,
        _check_mode("mode", mode),
        normalizer=_check_divisor("normalizer", normalizer),
        horizon=_check_divisor("horizon", horizon),
    )


def _renormalized(loss, stats, agg, steps, normalizer, horizon):
    """The kernels divide by the mode's own count (valid tokens, 1 or valid rows; returned in stats) and, for
    seq-mean-token-sum-norm, by T: a given normalizer / horizon rescales the loss by own / wanted divisor. Both
    are constants of the batch, so the gradient scales alike through autograd."""
    if normalizer is not None:
        loss = loss * ({"token-mean": stats[3], "token-sum": 1.0}.get(agg, stats[4]) / normalizer)
    if agg == "seq-mean-token-sum-norm" and horizon is not None:
        loss = loss * (max(steps, 1) / horizon)
    return loss


def _check_dual_clip(value) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 1:
        raise ValueError(f"dual_clip must be None or a finite float > 1, got {value!r}")
    return float(value)


def _loss_inputs(names, tensors, mask):
    tensors = check.common_float(**dict(zip(names, tensors)))
    first = tensors[0]
    for label, t in zip(names[1:], tensors[1:]):
        check.same_shape(label, t, names[0], first)
        check.same_device(label, t, names[0], first)
    if first.dim() < 1:
        raise ValueError(f"{names[0]} must have at least one dim (..., T)")
    return tensors, check.bool_mask("mask", mask, names[0], first)


def _as_rows(x):
    if x.dim() == 2 and x.is_contiguous():
        return x
    return x.reshape(x.shape[:-1].numel(), x.shape[-1]).contiguous()


def ppo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    agg: str = "token-mean",
    normalizer: float | None = None,
    horizon: float | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped PPO policy loss, fused: one kernel forward (loss, clip decisions, statistics, aggregation)
    and one backward.

    Parameters
    ----------
    logp : torch.Tensor
        ``(..., T)`` float log-probs of the sampled tokens under the current policy.
    old_logp : torch.Tensor
        ``(..., T)`` their log-probs under the policy that sampled them; a constant of the update.
    advantages : torch.Tensor
        ``(..., T)`` A; a constant of the update.
    mask : torch.Tensor or None
        ``(..., T)``, nonzero = valid; None: every token.
    clip_low : float
        Finite float >= 0: the ratio is clipped below at ``1 - clip_low``.
    clip_high : float
        Finite float >= 0: the ratio is clipped above at ``1 + clip_high``.
    dual_clip : float or None
        Dual-clip constant c > 1 for negative advantages; None: off.
    agg : str
        Aggregation mode, as `agg_loss`'s `mode`.
    normalizer : float or None
        As in `agg_loss`.
    horizon : float or None
        As in `agg_loss`.
    backend : str or None
        ``"auto" | "triton" | "cuda" | "cpu" | "torch"``; None: ``RLHF_FAST_BACKEND`` or ``"auto"``.

    Returns
    -------
    loss : torch.Tensor
        0-dim float32 (the torch backend keeps float64 for float64 inputs).
    stats : dict of str to torch.Tensor
        0-dim float32 tensors, no host sync, token means over the valid tokens whatever `agg` is:
        ``"clipfrac"`` (the fraction of valid tokens where the clipped term is the larger), ``"approx_kl"``
        (the mean of old_logp - logp, log-ratio clamped: verl's ``ppo_kl``), ``"ratio_mean"``.

    Raises
    ------
    TypeError
        Non-float inputs.
    ValueError
        Mismatched shapes or devices, a 0-dim input, a negative or non-finite clip, a `dual_clip` <= 1, an
        unknown `agg`, a `normalizer` or `horizon` that is not a number > 0.
    rlhf_fast.BackendUnavailable
        A backend asked for by name cannot run these tensors.

    Notes
    -----
    ``ratio = exp(clamp(logp - old_logp, ±20))`` (the clamp, as in verl, keeps exp finite);
    ``pg = max(-A·ratio, -A·clamp(ratio, 1 - clip_low, 1 + clip_high))``; with a dual clip c, where A < 0,
    ``pg = min(pg, -A·c)``; ``loss = agg_loss(pg, mask, agg, normalizer=normalizer, horizon=horizon)``.

    The gradient flows to `logp` only, in its dtype. Masked entries are ignored even when they hold inf or nan
    (selected out, never multiplied); a nan at a valid token reaches the loss (the clamps keep nan, as
    ``torch.clamp`` does). Mixed float dtypes are promoted to one.
    """
    (logp, old_logp, advantages), mask = _loss_inputs(
        ("logp", "old_logp", "advantages"), (logp, old_logp, advantages), mask
    )
    clip_low, clip_high = _check_clip("clip_low", clip_low), _check_clip("clip_high", clip_high)
    dual_clip = _check_dual_clip(dual_clip)
    agg = _check_mode("agg", agg)
    normalizer, horizon = _check_divisor("normalizer", normalizer), _check_divisor("horizon", horizon)
    name = _backend.select("ppo_policy_loss", backend, logp.device)
    if name == "torch":
        return reference.ppo_policy_loss(
            logp,
            old_logp.detach(),
            advantages.detach(),
            mask,
            clip_low=clip_low,
            clip_high=clip_high,
            dual_clip=dual_clip,
            agg=agg,
            normalizer=normalizer,
            horizon=horizon,
        )
    loss, stats = _ops.call(
        _kernels(name).ppo_policy_loss,
        _as_rows(logp),
        _as_rows(old_logp),
        _as_rows(advantages),
        None if mask is None else _as_rows(mask),
        clip_low,
        clip_high,
        dual_clip,
        agg,
    )
    stats = stats.detach()
    loss = _renormalized(loss, stats, agg, logp.shape[-1], normalizer, horizon)
    clipfrac, approx_kl, ratio_mean, _, _ = stats.unbind()
    return loss, {"clipfrac": clipfrac, "approx_kl": approx_kl, "ratio_mean": ratio_mean}


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    clip: float | None = 0.2,
    agg: str = "token-mean",
    normalizer: float | None = None,
    horizon: float | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped value loss, fused like `ppo_policy_loss`:
    ``0.5 · agg(max((V - R)², (clamp(V, old ± clip) - R)²))``.

    Parameters
    ----------
    values : torch.Tensor
        ``(..., T)`` float V, the critic's current values.
    old_values : torch.Tensor
        ``(..., T)`` the values at rollout time; a constant of the update.
    returns : torch.Tensor
        ``(..., T)`` R; a constant of the update.
    mask : torch.Tensor or None
        ``(..., T)``, nonzero = valid; None: every token.
    clip : float or None
        Finite float >= 0; None: no clipping, ``0.5 · agg((V - R)²)``.
    agg : str
        Aggregation mode, as `agg_loss`'s `mode`.
    normalizer : float or None
        As in `agg_loss`.
    horizon : float or None
        As in `agg_loss`.
    backend : str or None
        As in `ppo_policy_loss`.

    Returns
    -------
    loss : torch.Tensor
        0-dim float32 (the torch backend keeps float64 for float64 inputs).
    stats : dict of str to torch.Tensor
        ``{"clipfrac"}``: the fraction of valid tokens where the clipped term is the larger, 0-dim float32.

    Raises
    ------
    TypeError
        Non-float inputs.
    ValueError
        Mismatched shapes or devices, a negative or non-finite clip, an unknown `agg`, a `normalizer` or
        `horizon` that is not a number > 0.
    rlhf_fast.BackendUnavailable
        A backend asked for by name cannot run these tensors.

    Notes
    -----
    The gradient flows to `values` only. Masking, NaN and dtype rules as in `ppo_policy_loss`.
    """
    (values, old_values, returns), mask = _loss_inputs(
        ("values", "old_values", "returns"), (values, old_values, returns), mask
    )
    clip = math.inf if clip is None else _check_clip("clip", clip)
    agg = _check_mode("agg", agg)
    normalizer, horizon = _check_divisor("normalizer", normalizer), _check_divisor("horizon", horizon)
    name = _backend.select("ppo_value_loss", backend, values.device)
    if name == "torch":
        return reference.ppo_value_loss(
            values,
            old_values.detach(),
            returns.detach(),
            mask,
            clip=clip,
            agg=agg,
            normalizer=normalizer,
            horizon=horizon,
        )
    loss, stats = _ops.call(
        _kernels(name).ppo_value_loss,
        _as_rows(values),
        _as_rows(old_values),
        _as_rows(returns),
        None if mask is None else _as_rows(mask),
        clip,
        agg,
    )
    stats = stats.detach()
    return _renormalized(loss, stats, agg, values.shape[-1], normalizer, horizon), {"clipfrac": stats[0]}
