"""Triton kernels of the advantages family, registered as torch.library triton_ops (rlhf_fast_triton::*).

GAE: the reversed recurrence is a scan over affine maps of the state (running advantage a, next value nv):
a valid token maps (a, nv) -> (gl*a + g*nv + r - v, v), a masked one is the identity. One program per segment
loads a tile latest-token-first and runs tl.associative_scan over the maps (a true parallel scan), then applies
the prefix maps to the state carried in from the later tiles.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from . import on_tensor_device

GAE_MAX_BLOCK = 1024
MOMENTS_BLOCK = 4096


@triton.jit
def _then(p1, q1, c11, s1, c21, p2, q2, c12, s2, c22):
    # Scan order is latest token first, so the left operand is applied first: the map "first, then second".
    return p2 * p1, p2 * q1 + q2 * s1, p2 * c11 + q2 * c21 + c12, s2 * s1, s2 * c21 + c22


@triton.jit
def _gae_kernel(
    rewards,
    values,
    mask,
    last_value,
    cu_seqlens,
    advantages,
    returns,
    gamma,
    gamma_lam,
    HAS_MASK: tl.constexpr,
    HAS_LAST_VALUE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    seg = tl.program_id(0)
    start = tl.load(cu_seqlens + seg)
    end = tl.load(cu_seqlens + seg + 1)
    carry_a = 0.0
    if HAS_LAST_VALUE:
        carry_nv = tl.load(last_value + seg).to(tl.float32)
    else:
        carry_nv = 0.0
    lane = tl.arange(0, BLOCK)
    for tile in range(0, tl.cdiv(end - start, BLOCK)):
        t = end - 1 - tile * BLOCK - lane  # latest first
        in_range = t >= start
        valid = in_range
        if HAS_MASK:
            valid = valid & (tl.load(mask + t, mask=in_range, other=0) != 0)
        r = tl.load(rewards + t, mask=valid, other=0.0).to(tl.float32)
        v = tl.load(values + t, mask=valid, other=0.0).to(tl.float32)
        one = tl.full([BLOCK], 1.0, tl.float32)
        zero = tl.zeros([BLOCK], tl.float32)
        p = tl.where(valid, gamma_lam, one)
        q = tl.where(valid, gamma, zero)
        c1 = r - v
        s = tl.where(valid, zero, one)
        c2 = v
        p, q, c1, s, c2 = tl.associative_scan((p, q, c1, s, c2), 0, _then)
        a = p * carry_a + q * carry_nv + c1
        nv = s * carry_nv + c2
        tl.store(advantages + t, tl.where(valid, a, 0.0), mask=in_range)
        tl.store(returns + t, tl.where(valid, a + v, 0.0), mask=in_range)
        is_last = lane == BLOCK - 1  # the earliest token of the tile; padding lanes are identity maps
        carry_a = tl.sum(tl.where(is_last, a, 0.0), axis=0)
        carry_nv = tl.sum(tl.where(is_last, nv, 0.0), axis=0)


@triton_op("rlhf_fast_triton::gae", mutates_args=())
@on_tensor_device
def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None,
    last_value: torch.Tensor | None,
    cu_seqlens: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as torch.ops.rlhf_fast.gae: packed 1-D tokens, fp32 outputs."""
    advantages = torch.empty(rewards.shape, dtype=torch.float32, device=rewards.device)
    returns = torch.empty_like(advantages)
    segments = cu_seqlens.numel() - 1
    if segments > 0 and rewards.numel() > 0:
        # Tile = the mean segment length rounded up to a power of two (known without a device sync), capped;
        # longer segments loop over several tiles.
        block = min(GAE_MAX_BLOCK, max(16, triton.next_power_of_2(triton.cdiv(rewards.numel(), segments))))
        wrap_triton(_gae_kernel)[(segments,)](
            rewards,
            values,
            mask if mask is not None else rewards,
            last_value if last_value is not None else rewards,
            cu_seqlens,
            advantages,
            returns,
            gamma,
            gamma * lam,
            HAS_MASK=mask is not None,
            HAS_LAST_VALUE=last_value is not None,
            BLOCK=block,
        )
    return advantages, returns


@triton.jit
def _group_advantages_kernel(
    scores,
    out,
    groups,
    group_size,
    eps,
    NORM_STD: tl.constexpr,
    LEAVE_ONE_OUT: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)[:, None]
    col = tl.arange(0, BLOCK)[None, :]
    inside = (row < groups) & (col < group_size)
    x = tl.load(scores + row * group_size + col, mask=inside, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / group_size
    centred = tl.where(inside, x - mean[:, None], 0.0)
    if LEAVE_ONE_OUT:
        scale = tl.where(group_size > 1, group_size / tl.maximum(group_size - 1, 1).to(tl.float32), 0.0)
        centred = centred * scale
    elif NORM_STD:
        var = tl.sum(centred * centred, axis=1) / tl.maximum(group_size - 1, 1).to(tl.float32)
        std = tl.where(group_size > 1, tl.sqrt(var), 0.0)
        centred = centred / (std[:, None] + eps)
    tl.store(out + row * group_size + col, centred, mask=inside)


@triton_op("rlhf_fast_triton::group_advantages", mutates_args=())
@on_tensor_device
def group_advantages(
    scores: torch.Tensor, group_size: int, norm_std: bool, leave_one_out: bool, eps: float
) -> torch.Tensor:
    """Same contract as torch.ops.rlhf_fast.group_advantages."""
    out = torch.empty(scores.shape, dtype=torch.float32, device=scores.device)
    groups = scores.numel() // group_size
    if groups > 0:
        block = triton.next_power_of_2(group_size)
        rows = max(1, min(64, 4096 // block))
        wrap_triton(_group_advantages_kernel)[(triton.cdiv(groups, rows),)](
            scores, out, groups, group_size, eps, NORM_STD=norm_std, LEAVE_ONE_OUT=leave_one_out, ROWS=rows, BLOCK=block
        )
    return out


@triton.jit
def _masked_moments_kernel(x, mask, partial, n, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    if HAS_MASK:
        valid = valid & (tl.load(mask + offs, mask=offs < n, other=0) != 0)
    value = tl.load(x + offs, mask=valid, other=0.0).to(tl.float32)
    # Partials in fp32 over one block; the blocks are summed in fp64 afterwards.
    tl.store(partial + pid * 3 + 0, tl.sum(valid.to(tl.float32), axis=0))
    tl.store(partial + pid * 3 + 1, tl.sum(value, axis=0))
    tl.store(partial + pid * 3 + 2, tl.sum(value * value, axis=0))


@triton_op("rlhf_fast_triton::masked_moments", mutates_args=())
@on_tensor_device
def masked_moments(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Same contract as torch.ops.rlhf_fast.masked_moments: (count, sum, sum of squares), float64 (3,)."""
    blocks = max(1, triton.cdiv(x.numel(), MOMENTS_BLOCK))
    partial = torch.empty((blocks, 3), dtype=torch.float32, device=x.device)
    wrap_triton(_masked_moments_kernel)[(blocks,)](
        x, mask if mask is not None else x, partial, x.numel(), HAS_MASK=mask is not None, BLOCK=MOMENTS_BLOCK
    )
    return partial.double().sum(0)
