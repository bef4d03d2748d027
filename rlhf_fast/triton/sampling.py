"""Triton kernel of the sampling family, registered as a torch.library triton_op (rlhf_fast_triton::sample).

Same contract as torch.ops.rlhf_fast.sample (csrc/registration.cpp): one program per row. Every filter keeps
the entries at or above a threshold, found without sorting: top-k's threshold is the largest value v with at
least k entries >= v, top-p's the largest v whose entries >= v hold top_p of the (top-k) mass, each by bisection
over the 32-bit order-preserving keys of the float values (32 counting passes over the row, exact, ties kept
together); min-p's is max + T log(min_p). The draw is the inverse-CDF walk of the CPU kernel: the first kept
entry at which the running sum of exp((x - max) / T) exceeds u * Z_kept, u one uniform per row.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from . import on_tensor_device

MAX_BLOCK = 4096


@triton.jit
def _key(x):
    """int32 keys ordered as the float32 values (for non-NaN values)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _count_at_least(row, vocab, threshold_key, floor_key, m, scale2, WEIGHTED: tl.constexpr, BLOCK: tl.constexpr):
    """Over the entries with key >= floor_key: how many have key >= threshold_key (or their mass, WEIGHTED)."""
    total = tl.zeros([], tl.float32)
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(row + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
        key = _key(x)
        hit = (cols < vocab) & (key >= threshold_key) & (key >= floor_key)
        if WEIGHTED:
            total += tl.sum(tl.where(hit, tl.exp2((x - m) * scale2), 0.0), axis=0)
        else:
            total += tl.sum(hit.to(tl.float32), axis=0)
    return total


@triton.jit
def _largest_key(row, vocab, lo, hi, goal, floor_key, m, scale2, WEIGHTED: tl.constexpr, BLOCK: tl.constexpr):
    """The largest key K in [lo, hi) with count_at_least(K) >= goal, given that lo qualifies and hi does not."""
    lo = lo.to(tl.int64)
    hi = hi.to(tl.int64)
    for _ in range(33):
        if hi - lo > 1:
            mid = lo + (hi - lo) // 2
            enough = _count_at_least(row, vocab, mid.to(tl.int32), floor_key, m, scale2, WEIGHTED, BLOCK) >= goal
            lo = tl.where(enough, mid, lo)
            hi = tl.where(enough, hi, mid)
    return lo.to(tl.int32)


@triton.jit
def _sample_kernel(
    logits,
    uniforms,
    tokens,
    logp_kept,
    logp_full,
    inner,
    stride_outer,
    stride_inner,
    vocab,
    inv_t,
    temperature,
    top_k,
    top_p,
    log_min_p,
    HAS_TOP_K: tl.constexpr,
    HAS_TOP_P: tl.constexpr,
    HAS_MIN_P: tl.constexpr,
    BLOCK: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    row = logits + (r // inner) * stride_outer + (r % inner) * stride_inner
    scale2 = inv_t * 1.4426950408889634
    # max and full sum (online), and whether the row holds a NaN
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.zeros([], tl.float32)
    nan = tl.zeros([], tl.int32)
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(row + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
        nan += tl.sum((x != x).to(tl.int32), axis=0)
        new_m = tl.maximum(m, tl.max(tl.where(x != x, float("-inf"), x), axis=0))
        s = tl.where(s > 0, s * tl.exp2((m - new_m) * scale2), s)
        m = new_m
        s += tl.sum(tl.where(x == float("-inf"), 0.0, tl.exp2((x - m) * scale2)), axis=0)
    min_key = -2147483647 - 1
    max_plus = _key(m) + 1  # no entry has a key this large (m is the max)
    floor_key = tl.full([], min_key, tl.int32)
    kept = s
    if HAS_TOP_K:
        if top_k < vocab:
            floor_key = _largest_key(row, vocab, floor_key, max_plus, top_k + 0.0, floor_key, m, scale2, False, BLOCK)
            kept = _count_at_least(row, vocab, floor_key, floor_key, m, scale2, True, BLOCK)
    if HAS_TOP_P:
        goal = top_p * kept
        floor_key = _largest_key(row, vocab, floor_key, max_plus, goal, floor_key, m, scale2, True, BLOCK)
    if HAS_MIN_P:
        floor_key = tl.maximum(floor_key, _key(m + temperature * log_min_p))
    if HAS_TOP_P or HAS_MIN_P:
        kept = _count_at_least(row, vocab, floor_key, floor_key, m, scale2, True, BLOCK)
    # the walk: first kept entry where the running sum exceeds u * kept
    target = tl.load(uniforms + r).to(tl.float32) * kept
    cum = tl.zeros([], tl.float32)
    token = tl.full([], 2147483647, tl.int32)
    last = tl.zeros([], tl.int32)
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(row + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
        e = tl.where((cols < vocab) & (_key(x) >= floor_key) & (x != float("-inf")), tl.exp2((x - m) * scale2), 0.0)
        running = cum + tl.cumsum(e, axis=0)
        token = tl.minimum(token, tl.min(tl.where((running > target) & (e > 0), cols, 2147483647), axis=0))
        last = tl.maximum(last, tl.max(tl.where(e > 0, cols, 0), axis=0))
        cum += tl.sum(e, axis=0)
    token = tl.where(token == 2147483647, last, token)  # the sums rounded below the target: the last kept entry
    z = (tl.load(row + token).to(tl.float32) - m) * inv_t
    invalid = (nan > 0) | (m == float("-inf"))
    tl.store(tokens + r, tl.where(invalid, 0, token).to(tl.int64))
    tl.store(logp_kept + r, tl.where(invalid, float("nan"), z - tl.log(kept)))
    tl.store(logp_full + r, tl.where(invalid, float("nan"), z - tl.log(s)))


def launch_config(vocab: int) -> dict:
    """Block size and warps of the kernel for a vocab of `vocab` entries (16 warps: 8 spilled a few bytes on
    sm_90, tests/test_triton_sm90.py)."""
    return {"BLOCK": min(MAX_BLOCK, triton.next_power_of_2(vocab)), "num_warps": 16}


@triton_op("rlhf_fast_triton::sample", mutates_args=())
@on_tensor_device
def sample(
    logits: torch.Tensor, uniforms: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits (A, B, V), last dim contiguous; uniforms (A, B) float64 -> (tokens int64, logp_filtered,
    logp_full fp32), each (A, B)."""
    rows = logits.shape[:2]
    tokens = torch.empty(rows, dtype=torch.long, device=logits.device)
    kept = torch.empty(rows, dtype=torch.float32, device=logits.device)
    full = torch.empty(rows, dtype=torch.float32, device=logits.device)
    count = rows[0] * rows[1]
    if count > 0:
        vocab = logits.shape[2]
        wrap_triton(_sample_kernel)[(count,)](
            logits,
            uniforms.contiguous(),
            tokens,
            kept,
            full,
            max(1, rows[1]),
            logits.stride(0),
            logits.stride(1),
            vocab,
            1.0 / temperature,
            temperature,
            max(top_k, 1),
            top_p,
            math.log(min_p) if min_p > 0 else 0.0,
            HAS_TOP_K=top_k > 0,
            HAS_TOP_P=top_p < 1.0,
            HAS_MIN_P=min_p > 0,
            **launch_config(vocab),
        )
    return tokens, kept, full
