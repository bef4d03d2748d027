"""Triton kernels of the losses family, registered as torch.library triton_ops (rlhf_fast_triton::*).

kl_penalty: one elementwise kernel each way. PPO losses: forward = one program per tile of BLOCK_R rows that
walks the rows in BLOCK_T-wide steps, accumulating per-row loss sums and counts (so seq-mean-token-mean gets
exact row means) and the statistics, and writes one partial slot; a single-program second kernel adds the
slots in order and writes the loss and stats. Backward = one kernel recomputing the per-token math, scaled by
the normalisers left in `stats` (no host sync). The per-token math matches csrc/losses_common.h.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from . import on_tensor_device
from ._math import exp_minus_linear, expm1

ELEMENTWISE_BLOCK = 1024
TILE = 1024  # elements per program step of the PPO kernels
FINALIZE_BLOCK = 256  # the finalize program holds BLOCK x 8 float64 accumulators
TOTALS = 8  # partial slot: loss sum, row-mean sum, valid tokens, valid rows, clipped, -log-ratio, ratio, (pad)
STATS = 5  # clipfrac, approx_kl, ratio_mean, valid tokens, valid rows

KL_CODES = {"k1": 0, "abs": 1, "k2": 2, "mse": 2, "k3": 3, "low_var_kl": 3, "k1+": 4, "k3+": 5}
AGG_CODES = {
    "token-mean": 0,
    "token-sum": 1,
    "seq-mean-token-sum": 2,
    "seq-mean-token-mean": 3,
    "seq-mean-token-sum-norm": 4,
}


def _code(table, label, value):
    if value not in table:
        raise ValueError(f"{label} must be one of {tuple(table)}, got {value!r}")
    return table[value]


@triton.jit
def _clamp(x, lo, hi):
    # nan stays nan, as in torch.clamp (tl.minimum / tl.maximum would drop it)
    return tl.where(x < lo, lo, tl.where(x > hi, hi, x))


@triton.jit
def _k3_parts(logp, ref):
    """(d, expm1(d), exp(d) - d - 1) with d = clamp(ref - logp, ±20), without the cancellation near d = 0."""
    d = _clamp(ref - logp, -20.0, 20.0)
    expm1_d = expm1(d)
    return d, expm1_d, exp_minus_linear(d, expm1_d)


@triton.jit
def _kl_value(logp, ref, KIND: tl.constexpr):
    diff = logp - ref
    if KIND == 1:
        out = tl.abs(diff)
    elif KIND == 2:
        out = 0.5 * diff * diff
    elif KIND == 3 or KIND == 5:
        _, _, value = _k3_parts(logp, ref)
        out = _clamp(value, -10.0, 10.0)
    else:  # k1, k1+
        out = diff
    return out


@triton.jit
def _kl_grad(logp, ref, KIND: tl.constexpr):
    """d kl / d logp (d / d ref is its negative); the "+" kinds take the gradient of k2."""
    diff = logp - ref
    if KIND == 0:
        out = tl.full(diff.shape, 1.0, tl.float32)
    elif KIND == 1:
        out = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0))
    elif KIND == 3:
        _, expm1_d, value = _k3_parts(logp, ref)
        raw = ref - logp
        inner = tl.where((raw >= -20.0) & (raw <= 20.0), expm1_d, 0.0)
        out = tl.where((value > 10.0) | (value < -10.0), 0.0, -inner)
    else:  # k2, k1+, k3+
        out = diff
    return out


@triton.jit
def _kl_penalty_kernel(logp, ref, out, n, KIND: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    a = tl.load(logp + offs, mask=inside, other=0.0).to(tl.float32)
    b = tl.load(ref + offs, mask=inside, other=0.0).to(tl.float32)
    tl.store(out + offs, _kl_value(a, b, KIND), mask=inside)


@triton.jit
def _kl_penalty_backward_kernel(grad, logp, ref, out, n, KIND: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    g = tl.load(grad + offs, mask=inside, other=0.0)
    a = tl.load(logp + offs, mask=inside, other=0.0).to(tl.float32)
    b = tl.load(ref + offs, mask=inside, other=0.0).to(tl.float32)
    tl.store(out + offs, (g * _kl_grad(a, b, KIND)).to(out.dtype.element_ty), mask=inside)


@triton_op("rlhf_fast_triton::kl_penalty", mutates_args=())
@on_tensor_device
def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str) -> torch.Tensor:
    """Same contract as torch.ops.rlhf_fast.kl_penalty (contiguous inputs of one dtype, fp32 out)."""
    code = _code(KL_CODES, "kind", kind)
    out = torch.empty(logp.shape, dtype=torch.float32, device=logp.device)
    n = logp.numel()
    if n:
        wrap_triton(_kl_penalty_kernel)[(triton.cdiv(n, ELEMENTWISE_BLOCK),)](
            logp, ref_logp, out, n, KIND=code, BLOCK=ELEMENTWISE_BLOCK
        )
    return out


@triton_op("rlhf_fast_triton::kl_penalty_backward", mutates_args=())
@on_tensor_device
def kl_penalty_backward(grad: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, kind: str) -> torch.Tensor:
    """grad * d kl / d logp in logp's dtype (d / d ref_logp is its negative)."""
    code = _code(KL_CODES, "kind", kind)
    out = torch.empty_like(logp)
    n = logp.numel()
    if n:
        wrap_triton(_kl_penalty_backward_kernel)[(triton.cdiv(n, ELEMENTWISE_BLOCK),)](
            grad, logp, ref_logp, out, n, KIND=code, BLOCK=ELEMENTWISE_BLOCK
        )
    return out


@triton.jit
def _token_loss(x, y, z, p0, p1, p2, IS_POLICY: tl.constexpr, HAS_DUAL: tl.constexpr):
    """(loss, clipped, -log-ratio, ratio, d loss / d x). Policy: (x, y, z) = (logp, old_logp, advantages),
    (p0, p1, p2) = (clip_low, clip_high, dual_clip). Value: (values, old_values, returns), p0 = clip."""
    if IS_POLICY:
        log_ratio = x - y
        clamped = _clamp(log_ratio, -20.0, 20.0)
        ratio = tl.exp(clamped)
        unclipped = -z * ratio
        clipped = -z * _clamp(ratio, 1.0 - p0, 1.0 + p1)
        clip_active = clipped > unclipped  # then the ratio lies outside the clip range: no gradient
        loss = tl.where(clip_active, clipped, unclipped)
        from_ratio = (clipped <= unclipped) & (log_ratio >= -20.0) & (log_ratio <= 20.0)
        if HAS_DUAL:
            dual = (z < 0) & (loss > -z * p2)
            loss = tl.where(dual, -z * p2, loss)
            from_ratio = from_ratio & (dual == 0)
        grad = tl.where(from_ratio, unclipped, 0.0)
        neg_log_ratio = -clamped
    else:
        err = x - z
        clipped_err = _clamp(x, y - p0, y + p0) - z
        unclipped_sq = err * err
        clipped_sq = clipped_err * clipped_err
        clip_active = clipped_sq > unclipped_sq  # then V lies outside old +- clip: no gradient
        loss = 0.5 * tl.where(clip_active, clipped_sq, unclipped_sq)
        grad = tl.where(clip_active, 0.0, err)
        neg_log_ratio = tl.zeros(x.shape, tl.float32)
        ratio = tl.zeros(x.shape, tl.float32)
    return loss, clip_active, neg_log_ratio, ratio, grad


@triton.jit
def _load_tile(a, b, c, mask, row, row_ok, t, steps, HAS_MASK: tl.constexpr):
    inside = row_ok[:, None] & (t[None, :] < steps)
    offs = row[:, None].to(tl.int64) * steps + t[None, :]
    valid = inside
    if HAS_MASK:
        valid = valid & (tl.load(mask + offs, mask=inside, other=0) != 0)
    x = tl.load(a + offs, mask=valid, other=0.0).to(tl.float32)
    y = tl.load(b + offs, mask=valid, other=0.0).to(tl.float32)
    z = tl.load(c + offs, mask=valid, other=0.0).to(tl.float32)
    return offs, inside, valid, x, y, z


@triton.jit(do_not_specialize=["rows", "steps"])
def _loss_forward_kernel(
    a,
    b,
    c,
    mask,
    partial,
    rows,
    steps,
    p0,
    p1,
    p2,
    IS_POLICY: tl.constexpr,
    HAS_DUAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    pid = tl.program_id(0)
    row = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = row < rows
    col = tl.arange(0, BLOCK_T)
    row_sum = tl.zeros([BLOCK_R], tl.float32)
    row_valid = tl.zeros([BLOCK_R], tl.float32)
    clipped = tl.zeros([BLOCK_R], tl.float32)
    neg_log_ratio = tl.zeros([BLOCK_R], tl.float32)
    ratio = tl.zeros([BLOCK_R], tl.float32)
    for start in range(0, steps, BLOCK_T):
        _, _, valid, x, y, z = _load_tile(a, b, c, mask, row, row_ok, start + col, steps, HAS_MASK)
        loss, clip_active, nlr, r, _ = _token_loss(x, y, z, p0, p1, p2, IS_POLICY, HAS_DUAL)
        row_sum += tl.sum(tl.where(valid, loss, 0.0), axis=1)
        row_valid += tl.sum(valid.to(tl.float32), axis=1)
        clipped += tl.sum((valid & clip_active).to(tl.float32), axis=1)
        neg_log_ratio += tl.sum(tl.where(valid, nlr, 0.0), axis=1)
        ratio += tl.sum(tl.where(valid, r, 0.0), axis=1)
    has_tokens = row_valid > 0
    row_mean = tl.where(has_tokens, row_sum / tl.maximum(row_valid, 1.0), 0.0)
    slot = partial + pid * 8
    tl.store(slot + 0, tl.sum(row_sum, axis=0))
    tl.store(slot + 1, tl.sum(row_mean, axis=0))
    tl.store(slot + 2, tl.sum(row_valid, axis=0))
    tl.store(slot + 3, tl.sum(has_tokens.to(tl.float32), axis=0))
    tl.store(slot + 4, tl.sum(clipped, axis=0))
    tl.store(slot + 5, tl.sum(neg_log_ratio, axis=0))
    tl.store(slot + 6, tl.sum(ratio, axis=0))
    tl.store(slot + 7, 0.0)


@triton.jit
def _pick(totals, k, index):
    return tl.sum(tl.where(k == index, totals, 0.0), axis=0)


@triton.jit
def _agg_divisor(tokens, valid_rows, steps, AGG: tl.constexpr):
    """What the aggregate divides by (0: nothing valid, the loss and its gradient are 0); as agg_divisor in
    csrc/losses_common.h: valid tokens, 1, valid rows, valid rows, valid rows x steps."""
    if AGG == 0:
        divisor = tokens
    elif AGG == 1:
        divisor = tl.where(tokens > 0, 1.0, 0.0)
    elif AGG == 4:
        divisor = valid_rows * steps.to(valid_rows.dtype)
    else:
        divisor = valid_rows
    return divisor


@triton.jit(do_not_specialize=["steps"])
def _loss_finalize_kernel(partial, programs, loss, stats, steps, AGG: tl.constexpr, BLOCK: tl.constexpr):
    k = tl.arange(0, 8)
    acc = tl.zeros([BLOCK, 8], tl.float64)
    for start in range(0, programs, BLOCK):
        p = start + tl.arange(0, BLOCK)
        acc += tl.load(partial + p[:, None] * 8 + k[None, :], mask=p[:, None] < programs, other=0.0).to(tl.float64)
    totals = tl.sum(acc, axis=0)
    tokens = _pick(totals, k, 2)
    valid_rows = _pick(totals, k, 3)
    divisor = _agg_divisor(tokens, valid_rows, steps, AGG)
    if AGG == 3:  # seq-mean-token-mean: the sum of the row means
        numerator = _pick(totals, k, 1)
    else:
        numerator = _pick(totals, k, 0)
    value = tl.where(divisor > 0, numerator / tl.where(divisor > 0, divisor, 1.0), 0.0)
    tl.store(loss, value.to(tl.float32))
    per_token = tl.where(tokens > 0, 1.0 / tl.maximum(tokens, 1.0), 0.0)
    tl.store(stats + 0, (_pick(totals, k, 4) * per_token).to(tl.float32))
    tl.store(stats + 1, (_pick(totals, k, 5) * per_token).to(tl.float32))
    tl.store(stats + 2, (_pick(totals, k, 6) * per_token).to(tl.float32))
    tl.store(stats + 3, tokens.to(tl.float32))
    tl.store(stats + 4, valid_rows.to(tl.float32))


@triton.jit(do_not_specialize=["rows", "steps"])
def _loss_backward_kernel(
    grad_loss,
    a,
    b,
    c,
    mask,
    stats,
    grad,
    rows,
    steps,
    p0,
    p1,
    p2,
    IS_POLICY: tl.constexpr,
    HAS_DUAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    AGG: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    pid = tl.program_id(0)
    row = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = row < rows
    col = tl.arange(0, BLOCK_T)
    divisor = _agg_divisor(tl.load(stats + 3), tl.load(stats + 4), steps, AGG)
    scale = tl.load(grad_loss) * tl.where(divisor > 0, 1.0 / tl.where(divisor > 0, divisor, 1.0), 0.0)
    row_scale = tl.full([BLOCK_R], 1.0, tl.float32)
    if AGG == 3:
        if HAS_MASK:
            row_valid = tl.zeros([BLOCK_R], tl.float32)
            for start in range(0, steps, BLOCK_T):
                t = start + col
                inside = row_ok[:, None] & (t[None, :] < steps)
                offs = row[:, None].to(tl.int64) * steps + t[None, :]
                row_valid += tl.sum((tl.load(mask + offs, mask=inside, other=0) != 0).to(tl.float32), axis=1)
            row_scale = tl.where(row_valid > 0, 1.0 / tl.maximum(row_valid, 1.0), 0.0)
        else:
            row_scale = row_scale / tl.maximum(steps.to(tl.float32), 1.0)
    row_scale = row_scale * scale
    for start in range(0, steps, BLOCK_T):
        offs, inside, valid, x, y, z = _load_tile(a, b, c, mask, row, row_ok, start + col, steps, HAS_MASK)
        _, _, _, _, d = _token_loss(x, y, z, p0, p1, p2, IS_POLICY, HAS_DUAL)
        g = tl.where(valid, d * row_scale[:, None], 0.0)
        tl.store(grad + offs, g.to(grad.dtype.element_ty), mask=inside)


def _tiles(rows: int, steps: int) -> tuple[int, int, int]:
    block_t = min(max(triton.next_power_of_2(max(steps, 1)), 16), TILE)
    block_r = max(1, TILE // block_t)
    return block_r, block_t, max(1, triton.cdiv(rows, block_r))


@on_tensor_device
def _forward(a, b, c, mask, params, is_policy, has_dual, agg):
    rows, steps = a.shape
    agg_code = _code(AGG_CODES, "agg", agg)
    block_r, block_t, programs = _tiles(rows, steps)
    partial = torch.empty((programs, TOTALS), dtype=torch.float32, device=a.device)
    loss = torch.empty((), dtype=torch.float32, device=a.device)
    stats = torch.empty((STATS,), dtype=torch.float32, device=a.device)
    wrap_triton(_loss_forward_kernel)[(programs,)](
        a,
        b,
        c,
        mask if mask is not None else a,
        partial,
        rows,
        steps,
        *params,
        IS_POLICY=is_policy,
        HAS_DUAL=has_dual,
        HAS_MASK=mask is not None,
        BLOCK_R=block_r,
        BLOCK_T=block_t,
    )
    wrap_triton(_loss_finalize_kernel)[(1,)](partial, programs, loss, stats, steps, AGG=agg_code, BLOCK=FINALIZE_BLOCK)
    return loss, stats


@on_tensor_device
def _backward(grad_loss, a, b, c, mask, stats, params, is_policy, has_dual, agg):
    rows, steps = a.shape
    agg_code = _code(AGG_CODES, "agg", agg)
    grad = torch.empty_like(a)
    if a.numel():
        block_r, block_t, programs = _tiles(rows, steps)
        wrap_triton(_loss_backward_kernel)[(programs,)](
            grad_loss,
            a,
            b,
            c,
            mask if mask is not None else a,
            stats,
            grad,
            rows,
            steps,
            *params,
            IS_POLICY=is_policy,
            HAS_DUAL=has_dual,
            HAS_MASK=mask is not None,
            AGG=agg_code,
            BLOCK_R=block_r,
            BLOCK_T=block_t,
        )
    return grad


def _policy_params(clip_low, clip_high, dual_clip):
    return (clip_low, clip_high, dual_clip if dual_clip is not None else 0.0)


@triton_op("rlhf_fast_triton::ppo_policy_loss", mutates_args=())
def ppo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
    agg: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as torch.ops.rlhf_fast.ppo_policy_loss: (rows, steps) inputs, fp32 loss and stats (5,)."""
    return _forward(
        logp,
        old_logp,
        advantages,
        mask,
        _policy_params(clip_low, clip_high, dual_clip),
        True,
        dual_clip is not None,
        agg,
    )


@triton_op("rlhf_fast_triton::ppo_policy_loss_backward", mutates_args=())
def ppo_policy_loss_backward(
    grad_loss: torch.Tensor,
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None,
    stats: torch.Tensor,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
    agg: str,
) -> torch.Tensor:
    """d loss / d logp in logp's dtype."""
    return _backward(
        grad_loss,
        logp,
        old_logp,
        advantages,
        mask,
        stats,
        _policy_params(clip_low, clip_high, dual_clip),
        True,
        dual_clip is not None,
        agg,
    )


@triton_op("rlhf_fast_triton::ppo_value_loss", mutates_args=())
def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor | None,
    clip: float,
    agg: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as torch.ops.rlhf_fast.ppo_value_loss."""
    return _forward(values, old_values, returns, mask, (clip, 0.0, 0.0), False, False, agg)


@triton_op("rlhf_fast_triton::ppo_value_loss_backward", mutates_args=())
def ppo_value_loss_backward(
    grad_loss: torch.Tensor,
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor | None,
    stats: torch.Tensor,
    clip: float,
    agg: str,
) -> torch.Tensor:
    """d loss / d values in values' dtype."""
    return _backward(grad_loss, values, old_values, returns, mask, stats, (clip, 0.0, 0.0), False, False, agg)
