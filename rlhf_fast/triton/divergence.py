"""Triton kernels of the f-divergence family, registered as torch.library triton_ops (rlhf_fast_triton::*).

The math (and the per-row statistics saved for the backward) is that of csrc/divergence_common.h. One program
per row loops over the vocab in BLOCK-wide tiles. The one-pass kinds (kl, reverse_kl, hellinger, chi2, alpha)
carry, per stream, a running max, the sum of exp(x - max) and a weighted sum, rescaled tile by tile, so each input
is read once (the sums are kept per lane and reduced once at the end); js and tv read the row a second time once
lse_p and lse_q are known. The backward reads each input once and writes each gradient that is needed once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ..backend import triton_interpret
from ..reference import POWER_DIVERGENCES, power_divergence_constants
from . import on_tensor_device
from ._math import expm1

# The kernels' kind codes, the same as csrc/divergence_common.h.
KL, REVERSE_KL, JS, TV, POWER = 0, 1, 2, 3, 4
KIND_CODES = {"kl": KL, "reverse_kl": REVERSE_KL, "js": JS, "tv": TV, **{k: POWER for k in POWER_DIVERGENCES}}
MAX_BLOCK = 4096
# Under the interpreter (CPU tests) small tiles, so that small vocabs still span several tiles and a ragged one.
INTERPRETER_MAX_BLOCK = 128
LN2 = tl.constexpr(0.6931471805599453)


def _params(kind: str, alpha: float) -> tuple[int, float, float]:
    if kind not in KIND_CODES or (kind == "alpha" and alpha in (0.0, 1.0)):
        raise ValueError(f"f_divergence: unknown kind {kind!r} (or alpha in {{0, 1}} for kind 'alpha')")
    exponent, scale = power_divergence_constants(kind, alpha) if kind in POWER_DIVERGENCES else (0.0, 0.0)
    return KIND_CODES[kind], exponent, scale


def _block(vocab: int) -> int:
    cap = INTERPRETER_MAX_BLOCK if triton_interpret() else MAX_BLOCK
    return min(cap, max(16, triton.next_power_of_2(vocab)))


@triton.jit
def _power_logit(a, b, exponent):
    c = exponent * a + (1.0 - exponent) * b
    return tl.where((a == float("-inf")) & (b == float("-inf")), float("-inf"), c)


@triton.jit
def _raise_max(run_max, x):
    """The running max raised by tile x; the factor that rescales sums kept against the old one; its finite
    stand-in (0 while everything seen is -inf) to subtract before exp."""
    new_max = tl.maximum(run_max, tl.max(x, axis=0))
    safe = tl.where(new_max == float("-inf"), 0.0, new_max)
    return new_max, tl.exp(run_max - safe), safe


@triton.jit
def _load_tile(xp, xq, cols, vocab, inv_t):
    inside = cols < vocab
    a = tl.load(xp + cols, mask=inside, other=float("-inf")).to(tl.float32) * inv_t
    b = tl.load(xq + cols, mask=inside, other=float("-inf")).to(tl.float32) * inv_t
    return a, b


@triton.jit
def _second_pass_sums(xp, xq, end, vocab, inv_t, lse_a, lse_b, KIND: tl.constexpr, BLOCK: tl.constexpr):
    """Entries [0, end) of a row against its log-normalisers: js (sum P (lp - lm), sum Q (lq - lm)); tv (sum |P - Q|,
    sum P sign(P - Q))."""
    lane = tl.arange(0, BLOCK)
    t1 = tl.zeros([], tl.float32)
    t2 = tl.zeros([], tl.float32)
    for start in range(0, end, BLOCK):
        a, b = _load_tile(xp, xq, start + lane, vocab, inv_t)
        lp = a - lse_a
        lq = b - lse_b
        p = tl.exp(lp)
        q = tl.exp(lq)
        if KIND == 2:
            lm = tl.log(p + q) - LN2
            t1 += tl.sum(tl.where(p > 0, p * (lp - lm), 0.0), axis=0)
            t2 += tl.sum(tl.where(q > 0, q * (lq - lm), 0.0), axis=0)
        else:
            d = p - q
            t1 += tl.sum(tl.abs(d), axis=0)
            t2 += tl.sum(tl.where(d > 0, p, tl.where(d < 0, -p, 0.0)), axis=0)
    return t1, t2


@triton.jit
def _forward_kernel(
    xp,
    xq,
    mask,
    out,
    stats,
    vocab,
    stride_p,
    stride_q,
    inv_t,
    exponent,
    scale,
    KIND: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    xp += row * stride_p
    xq += row * stride_q
    end = vocab
    if HAS_MASK:
        valid = tl.load(mask + row) != 0
        end = tl.where(valid, vocab, 0)  # masked rows read nothing
    lane = tl.arange(0, BLOCK)
    # Per-lane sums against per-row running maxima: one reduction per stream and tile (the max), the sums are
    # reduced once at the end.
    max_a = tl.full([], float("-inf"), tl.float32)
    max_b = tl.full([], float("-inf"), tl.float32)
    max_c = tl.full([], float("-inf"), tl.float32)
    acc_a = tl.zeros([BLOCK], tl.float32)
    acc_wa = tl.zeros([BLOCK], tl.float32)
    acc_b = tl.zeros([BLOCK], tl.float32)
    acc_wb = tl.zeros([BLOCK], tl.float32)
    acc_c = tl.zeros([BLOCK], tl.float32)
    for start in range(0, end, BLOCK):
        a, b = _load_tile(xp, xq, start + lane, vocab, inv_t)
        max_a, rescale_a, safe_a = _raise_max(max_a, a)
        max_b, rescale_b, safe_b = _raise_max(max_b, b)
        ea = tl.exp(a - safe_a)
        eb = tl.exp(b - safe_b)
        acc_a = acc_a * rescale_a + ea
        acc_b = acc_b * rescale_b + eb
        if KIND == 0:
            acc_wa = acc_wa * rescale_a + tl.where(ea > 0, ea * (a - b), 0.0)
        if KIND == 1:
            acc_wb = acc_wb * rescale_b + tl.where(eb > 0, eb * (b - a), 0.0)
        if KIND == 4:
            c = _power_logit(a, b, exponent)
            max_c, rescale_c, safe_c = _raise_max(max_c, c)
            acc_c = acc_c * rescale_c + tl.exp(c - safe_c)
    sum_a = tl.sum(acc_a, axis=0)
    sum_b = tl.sum(acc_b, axis=0)
    weighted_a = tl.sum(acc_wa, axis=0)
    weighted_b = tl.sum(acc_wb, axis=0)
    max_c = max_c + tl.log(tl.sum(acc_c, axis=0))  # lse of the power logits
    lse_a = max_a + tl.log(sum_a)
    lse_b = max_b + tl.log(sum_b)
    if KIND == 0:
        aux = weighted_a / sum_a - lse_a + lse_b
        value = aux
    elif KIND == 1:
        aux = weighted_b / sum_b - lse_b + lse_a
        value = aux
    elif KIND == 4:
        log_s = max_c - exponent * lse_a - (1.0 - exponent) * lse_b
        s_minus_1 = expm1(log_s)  # one exponential for the value scale (S - 1) and the backward's S
        aux = 1.0 + s_minus_1
        value = scale * s_minus_1
    else:
        t1, t2 = _second_pass_sums(xp, xq, end, vocab, inv_t, lse_a, lse_b, KIND, BLOCK)
        if KIND == 2:
            value = 0.5 * (t1 + t2)
            aux = t1
        else:
            value = 0.5 * t1
            aux = t2
    if HAS_MASK:
        value = tl.where(valid, value, 0.0)
        lse_a = tl.where(valid, lse_a, 0.0)
        lse_b = tl.where(valid, lse_b, 0.0)
        aux = tl.where(valid, aux, 0.0)
    tl.store(out + row, value)
    tl.store(stats + 3 * row + 0, lse_a)
    tl.store(stats + 3 * row + 1, lse_b)
    tl.store(stats + 3 * row + 2, aux)


@triton.jit
def _second_pass_kernel(
    xp,
    xq,
    mask,
    stats,
    sums,
    vocab,
    stride_p,
    stride_q,
    inv_t,
    KIND: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    end = vocab
    if HAS_MASK:
        end = tl.where(tl.load(mask + row) != 0, vocab, 0)  # masked rows read nothing and sum to 0
    t1, t2 = _second_pass_sums(
        xp + row * stride_p,
        xq + row * stride_q,
        end,
        vocab,
        inv_t,
        tl.load(stats + 3 * row + 0),
        tl.load(stats + 3 * row + 1),
        KIND,
        BLOCK,
    )
    tl.store(sums + 2 * row + 0, t1)
    tl.store(sums + 2 * row + 1, t2)


@triton.jit
def _backward_kernel(
    grad_out,
    xp,
    xq,
    mask,
    out,
    stats,
    grad_p,
    grad_q,
    vocab,
    stride_p,
    stride_q,
    inv_t,
    exponent,
    scale,
    KIND: tl.constexpr,
    HAS_MASK: tl.constexpr,
    NEED_P: tl.constexpr,
    NEED_Q: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    xp += row * stride_p
    xq += row * stride_q
    grad_p += row * vocab
    grad_q += row * vocab
    g = tl.load(grad_out + row) * inv_t
    lse_a = tl.load(stats + 3 * row + 0)
    lse_b = tl.load(stats + 3 * row + 1)
    aux = tl.load(stats + 3 * row + 2)
    value = tl.load(out + row)
    lane = tl.arange(0, BLOCK)
    for start in range(0, vocab, BLOCK):
        cols = start + lane
        a, b = _load_tile(xp, xq, cols, vocab, inv_t)
        lp = a - lse_a
        lq = b - lse_b
        p = tl.exp(lp)
        q = tl.exp(lq)
        if KIND == 0:
            dp = tl.where(p > 0, g * p * (lp - lq - aux), 0.0)
            dq = g * (q - p)
        elif KIND == 1:
            dp = g * (p - q)
            dq = tl.where(q > 0, g * q * (lq - lp - aux), 0.0)
        elif KIND == 4:
            w = tl.exp(_power_logit(lp, lq, exponent))
            dp = g * scale * exponent * (w - p * aux)
            dq = g * scale * (1.0 - exponent) * (w - q * aux)
        elif KIND == 2:
            lm = tl.log(p + q) - LN2
            dp = tl.where(p > 0, 0.5 * g * p * (lp - lm - aux), 0.0)
            dq = tl.where(q > 0, 0.5 * g * q * (lq - lm - (2.0 * value - aux)), 0.0)
        else:
            d = p - q
            s = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
            dp = 0.5 * g * p * (s - aux)
            dq = -0.5 * g * q * (s - (aux - 2.0 * value))
        if HAS_MASK:  # masked rows saved zero statistics: their terms may be inf or nan, their gradient is 0
            valid = tl.load(mask + row) != 0
            dp = tl.where(valid, dp, 0.0)
            dq = tl.where(valid, dq, 0.0)
        inside = cols < vocab
        if NEED_P:
            tl.store(grad_p + cols, dp.to(grad_p.dtype.element_ty), mask=inside)
        if NEED_Q:
            tl.store(grad_q + cols, dq.to(grad_q.dtype.element_ty), mask=inside)


@triton_op("rlhf_fast_triton::f_divergence", mutates_args=())
@on_tensor_device
def f_divergence(
    logits_p: torch.Tensor,
    logits_q: torch.Tensor,
    mask: torch.Tensor | None,
    kind: str,
    alpha: float,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as torch.ops.rlhf_fast.f_divergence: (rows, V) logits -> out (rows,), stats (rows, 3) fp32."""
    code, exponent, scale = _params(kind, alpha)
    rows, vocab = logits_p.shape
    out = torch.empty((rows,), dtype=torch.float32, device=logits_p.device)
    stats = torch.empty((rows, 3), dtype=torch.float32, device=logits_p.device)
    if rows > 0:
        wrap_triton(_forward_kernel)[(rows,)](
            logits_p,
            logits_q,
            mask if mask is not None else logits_p,
            out,
            stats,
            vocab,
            logits_p.stride(0),
            logits_q.stride(0),
            1.0 / temperature,
            exponent,
            scale,
            KIND=code,
            HAS_MASK=mask is not None,
            BLOCK=_block(vocab),
            num_warps=8,
        )
    return out, stats


@triton_op("rlhf_fast_triton::f_divergence_second_pass", mutates_args=())
@on_tensor_device
def f_divergence_second_pass(
    logits_p: torch.Tensor,
    logits_q: torch.Tensor,
    mask: torch.Tensor | None,
    stats: torch.Tensor,
    kind: str,
    temperature: float,
) -> torch.Tensor:
    """Same contract as torch.ops.rlhf_fast.f_divergence_second_pass: (rows, 2) fp32 js / tv sums."""
    if kind not in ("js", "tv"):
        raise ValueError(f"f_divergence_second_pass: kind must be 'js' or 'tv', got {kind!r}")
    rows, vocab = logits_p.shape
    sums = torch.empty((rows, 2), dtype=torch.float32, device=logits_p.device)
    if rows > 0:
        wrap_triton(_second_pass_kernel)[(rows,)](
            logits_p,
            logits_q,
            mask if mask is not None else logits_p,
            stats,
            sums,
            vocab,
            logits_p.stride(0),
            logits_q.stride(0),
            1.0 / temperature,
            KIND=KIND_CODES[kind],
            HAS_MASK=mask is not None,
            BLOCK=_block(vocab),
            num_warps=8,
        )
    return sums


@triton_op("rlhf_fast_triton::f_divergence_backward", mutates_args=())
@on_tensor_device
def f_divergence_backward(
    grad_out: torch.Tensor,
    logits_p: torch.Tensor,
    logits_q: torch.Tensor,
    mask: torch.Tensor | None,
    out: torch.Tensor,
    stats: torch.Tensor,
    kind: str,
    alpha: float,
    temperature: float,
    need_grad_p: bool,
    need_grad_q: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as torch.ops.rlhf_fast.f_divergence_backward."""
    code, exponent, scale = _params(kind, alpha)
    rows, vocab = logits_p.shape
    grad_p = logits_p.new_empty(logits_p.shape if need_grad_p else (0,))
    grad_q = logits_q.new_empty(logits_q.shape if need_grad_q else (0,))
    if rows > 0 and (need_grad_p or need_grad_q):
        wrap_triton(_backward_kernel)[(rows,)](
            grad_out,
            logits_p,
            logits_q,
            mask if mask is not None else logits_p,
            out,
            stats,
            grad_p if need_grad_p else logits_p,
            grad_q if need_grad_q else logits_q,
            vocab,
            logits_p.stride(0),
            logits_q.stride(0),
            1.0 / temperature,
            exponent,
            scale,
            KIND=code,
            HAS_MASK=mask is not None,
            NEED_P=need_grad_p,
            NEED_Q=need_grad_q,
            BLOCK=_block(vocab),
            num_warps=8,
        )
    return grad_p, grad_q
