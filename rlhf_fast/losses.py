"""Losses: per-token KL penalties, masked reductions and loss aggregation, fused PPO policy and value losses.

`kl_penalty`, `ppo_policy_loss` and `ppo_value_loss` take ``backend=`` (``auto | triton | cuda | cpu | torch``);
the kernels accept float32 / bfloat16 / float16 / float64 inputs, compute in float32 and return float32 (the
torch backend keeps float64 for float64 inputs). `masked_sum` and `agg_loss` are a few torch ops (cheap, and
differentiable through autograd). Masked entries are ignored even when they hold inf or nan.
"""
from __future__ import annotations

import math


from . import _validate as check
from . import backend as _backend
from . import reference

KL_KINDS = tuple(reference.KL_KINDS)
AGG_MODES = reference.AGG_MODES


def _kernels(name: str):
    return _backend.kernels(name, "losses")


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


def kl_penalty(logp, ref_logp, kind="k1", *, backend=None):
    """Per-token KL estimator of the policy against the reference model (verl's kl_penalty), float32.

    logp, ref_logp: (...) float log-probs of the sampled tokens. kind: "k1" logp - ref; "abs" |logp - ref|;
    "k2" / "mse" ½(logp - ref)²; "k3" / "low_var_kl" exp(d) - d - 1 with d = clamp(ref - logp, ±20), the result
    clamped to ±10; "k1+" / "k3+" the value of k1 / k3 with the gradient of k2 (straight-through).
    Gradients flow to both inputs.
    """
    logp, ref_logp = check.common_float(logp=logp, ref_logp=ref_logp)
    check.same_shape("ref_logp", ref_logp, "logp", logp)
    check.same_device("ref_logp", ref_logp, "logp", logp)
    kind = _check_kind(kind)
    name = _backend.select("kl_penalty", backend, logp.device)
    if name == "torch":
        return reference.kl_penalty(logp, ref_logp, kind)
    return _backend.call(_kernels(name).kl_penalty, logp.contiguous(), ref_logp.contiguous(), kind)


def masked_sum(x, mask=None, *, dim=None):
    """Sum of x over the entries where mask is nonzero (all entries if mask is None), over `dim` (int or tuple)
    or everything (dim=None). float32 (float64 for float64 x); differentiable."""
    check.floating("x", x)
    mask = check.bool_mask("mask", mask, "x", x)
    return reference.masked_sum(x, mask, dim)


def agg_loss(loss, mask=None, mode="token-mean", *, normalizer=None, horizon=None):
    """Aggregates a per-token loss (..., T) over valid tokens (mask nonzero) to a float32 scalar, as verl's
    agg_loss; rows are all the leading dims, and rows without a valid token are left out of every seq-mean mode.

    token-mean: Σ(loss·m) / Σm. token-sum: Σ(loss·m). seq-mean-token-sum: Σ(loss·m) / V, V = rows with a valid
    token. seq-mean-token-mean: Σ over those rows of (Σ_t loss·m / Σ_t m), / V. seq-mean-token-sum-norm (Dr. GRPO):
    Σ(loss·m) / V / T. No valid token anywhere gives 0, never NaN. Differentiable.
    normalizer: a number > 0 that replaces the count the mode divides by (Σm, 1 for token-sum, V): a global count
    for losses that must not depend on how the batch is split (verl's batch_num_tokens / dp_size or
    global_batch_size / dp_size). horizon: a number > 0 that replaces T in seq-mean-token-sum-norm (verl's
    loss_scale_factor; ignored by the other modes).
    """
    check.floating("loss", loss)
    if loss.dim() < 1:
        raise ValueError("loss must have at least one dim (..., T)")
    mask = check.bool_mask("mask", mask, "loss", loss)
    return reference.agg_loss(loss, mask, _check_mode("mode", mode),
                              normalizer=_check_divisor("normalizer", normalizer),
                              horizon=_check_divisor("horizon", horizon))


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


def ppo_policy_loss(logp, old_logp, advantages, mask=None, *, clip_low=0.2, clip_high=0.2, dual_clip=None,
                    agg="token-mean", normalizer=None, horizon=None, backend=None):
    """Clipped PPO policy loss, fused: one kernel forward (per-token loss, clip decisions, statistics and the
    masked aggregation; on Triton a second one-program kernel adds the tiles' partials) and one backward.

    logp, old_logp, advantages, mask: (..., T). ratio = exp(clamp(logp - old_logp, ±20)) (the clamp, as in verl,
    keeps exp finite); pg = max(-A·ratio, -A·clamp(ratio, 1 - clip_low, 1 + clip_high)); with dual_clip c > 1,
    where A < 0, pg = min(pg, -A·c). loss = agg_loss(pg, mask, agg, normalizer=normalizer, horizon=horizon).
    Returns (loss, stats): loss a float32 0-dim tensor; stats float32 0-dim tensors, masked means over the valid
    tokens whatever `agg` is: "clipfrac" (tokens where the clipped term is the larger), "approx_kl" (mean of
    old_logp - logp, verl's ppo_kl), "ratio_mean". No host sync.
    The gradient flows to logp only: old_logp and advantages are constants of the update (detached).
    """
    (logp, old_logp, advantages), mask = _loss_inputs(("logp", "old_logp", "advantages"),
                                                      (logp, old_logp, advantages), mask)
    clip_low, clip_high = _check_clip("clip_low", clip_low), _check_clip("clip_high", clip_high)
    dual_clip = _check_dual_clip(dual_clip)
    agg = _check_mode("agg", agg)
    normalizer, horizon = _check_divisor("normalizer", normalizer), _check_divisor("horizon", horizon)
    name = _backend.select("ppo_policy_loss", backend, logp.device)
    if name == "torch":
        return reference.ppo_policy_loss(logp, old_logp.detach(), advantages.detach(), mask, clip_low=clip_low,
                                         clip_high=clip_high, dual_clip=dual_clip, agg=agg, normalizer=normalizer,
                                         horizon=horizon)
    loss, stats = _backend.call(
        _kernels(name).ppo_policy_loss, _as_rows(logp), _as_rows(old_logp), _as_rows(advantages),
        None if mask is None else _as_rows(mask), clip_low, clip_high, dual_clip, agg)
    stats = stats.detach()
    loss = _renormalized(loss, stats, agg, logp.shape[-1], normalizer, horizon)
    clipfrac, approx_kl, ratio_mean, _, _ = stats.unbind()
    return loss, {"clipfrac": clipfrac, "approx_kl": approx_kl, "ratio_mean": ratio_mean}


def ppo_value_loss(values, old_values, returns, mask=None, *, clip=0.2, agg="token-mean", normalizer=None, horizon=None,
                   backend=None):
    """Clipped value loss, fused like `ppo_policy_loss`: 0.5·agg(max((V-R)², (clamp(V, old ± clip) - R)²)).

    values, old_values, returns, mask: (..., T). Returns (loss, {"clipfrac"}), float32 0-dim tensors (clipfrac:
    valid tokens where the clipped term is the larger). clip=None turns the clipping off: 0.5·agg((V-R)²).
    normalizer, horizon: as in `agg_loss`.
    The gradient flows to values only.
    """
    (values, old_values, returns), mask = _loss_inputs(("values", "old_values", "returns"),
                                                       (values, old_values, returns), mask)
    clip = math.inf if clip is None else _check_clip("clip", clip)
    agg = _check_mode("agg", agg)
    normalizer, horizon = _check_divisor("normalizer", normalizer), _check_divisor("horizon", horizon)
    name = _backend.select("ppo_value_loss", backend, values.device)
    if name == "torch":
        return reference.ppo_value_loss(values, old_values.detach(), returns.detach(), mask, clip=clip, agg=agg,
                                        normalizer=normalizer, horizon=horizon)
    loss, stats = _backend.call(
        _kernels(name).ppo_value_loss, _as_rows(values), _as_rows(old_values), _as_rows(returns),
        None if mask is None else _as_rows(mask), clip, agg)
    stats = stats.detach()
    return _renormalized(loss, stats, agg, values.shape[-1], normalizer, horizon), {"clipfrac": stats[0]}
