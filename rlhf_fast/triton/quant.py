"""Triton kernels of the quant family, registered as torch.library triton_ops (rlhf_fast_triton::qmatmul_*).

One tiled kernel serves the three schemes. Each program owns a BLOCK_M x BLOCK_N tile of the output and walks
its share of K: it loads the activation tile contiguously and the quantized weight tile, dequantizes the weight in
registers (int8: a cast, the per-channel scale goes to the epilogue; int4: the packed bytes as they lie, low and
high nibbles minus the group zero point, times the group scale, interleaved back into K order) and accumulates
with tl.dot in float32 (W8A8: int8 x int8 tl.dot in int32).
Large M: a grid over (M tiles, N tiles), the epilogue applies scales and bias and writes x's dtype; up to
SPLIT_MAX_ROWS rows, where the output tiles alone would leave SMs idle, K is also split over programs.
M <= 16 (decode): the same kernel as a split-K GEMV, BLOCK_M = 16 and K split over SPLIT_K programs per N tile so
that the weight stream keeps every SM busy. Split K: a second small kernel sums the float32 partials, adds the bias
and casts (deterministic, no atomics).
W8A8 quantizes the activations first with a separate small kernel (one program per row: amax, then int8 values,
bit for bit reference.quantize_activations_int8), so the GEMM's inner loop streams int8 activations instead of
re-reading and re-quantizing 16-bit ones per N tile.
Block sizes are fixed, not autotuned (no GPU measurement yet); `plan` lists every launch and tests/test_quant.py
compiles each for sm_90 (no spills). See benchmarks/NOTES.md.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .. import backend as _backend
from . import on_tensor_device

GEMV_MAX_ROWS = 16
SPLIT_MAX_ROWS = 256  # the tiled GEMM splits K up to this many rows (see _config)
QUANT_BLOCK = 1024
SUM_BLOCK = 1024


@triton.jit
def _quantize_activation(x, inv):
    """int8 of round_half_even(x * inv) clamped to [-127, 127], NaN products giving 0 (reference.py).

    The float32 product x * inv is only compared, truncated and selected afterwards, never added to: ptxas would
    contract a multiply followed by an add (x * inv - floor(x * inv)) into an FMA, rounding with the exact product
    instead of the float32 one the reference rounds. Truncation, not libdevice floor: no flush-to-zero variant.
    """
    p = x * inv
    p = tl.minimum(tl.maximum(tl.where(p == p, p, 0.0), -127.0), 127.0)  # round(clamp) == clamp(round): integer bounds
    a = tl.abs(p)
    t = a.to(tl.int32)  # truncation: floor(|p|)
    half = t.to(tl.float32) + 0.5
    r = t + ((a > half) | ((a == half) & ((t & 1) == 1))).to(tl.int32)
    return tl.where(p < 0, -r, r).to(tl.int8)


@triton.jit
def _quantize_rows_kernel(x, q, scale, K, BLOCK: tl.constexpr):
    # amax as the integer maximum of the |x| bit patterns: the same order as the floats, NaN above inf (so a NaN
    # propagates, which tl.maximum does not do), and no comparison that a flush-to-zero could apply to.
    row = tl.program_id(0).to(tl.int64)
    amax_bits = tl.zeros([BLOCK], tl.int32)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        v = tl.load(x + row * K + offs, mask=offs < K, other=0.0).to(tl.float32)
        amax_bits = tl.maximum(amax_bits, v.to(tl.int32, bitcast=True) & 0x7FFFFFFF)
    top = tl.max(amax_bits, axis=0).to(tl.float32, bitcast=True)
    inv = tl.where(top > 0, tl.math.div_rn(127.0, top), 0.0)  # NaN or inf amax: 0
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        v = tl.load(x + row * K + offs, mask=offs < K, other=0.0).to(tl.float32)
        tl.store(q + row * K + offs, _quantize_activation(v, inv), mask=offs < K)
    tl.store(scale + row, tl.math.div_rn(top, 127.0))


@triton.jit
def _qmatmul_kernel(
    x,
    qweight,
    scales,
    zeros,
    x_scale,
    bias,
    out,
    M,
    N,
    K,
    group_size,
    k_per_split,
    SCHEME: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr,
    GROUP_ALIGNED: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Grouped tile order: GROUP_M row tiles share each weight column tile while it is in L2.
    pid = tl.program_id(0)
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    width = GROUP_M * tiles_n
    first_m = (pid // width) * GROUP_M
    rows_in_group = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % rows_in_group
    pid_n = (pid % width) // rows_in_group
    split = tl.program_id(1)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = offs_m < M, offs_n < N
    rows = offs_m.to(tl.int64)[:, None] * K
    cols = offs_n.to(tl.int64)[None, :]
    k_start = split * k_per_split
    k_end = tl.minimum(K, k_start + k_per_split)
    groups = K // group_size
    if SCHEME == "w8a8":
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < k_end
        a = tl.load(x + rows + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0)  # contiguous along K
        if SCHEME == "int4":
            # The packed (BLOCK_N, BLOCK_K / 2) tile as it lies in memory, both nibbles dequantized, interleaved back
            # into K order (even k from the low nibble) and transposed: x is read contiguously, not as 2-strided
            # even / odd gathers.
            offs_p = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            p_ok = offs_p < k_end // 2
            channel = offs_n.to(tl.int64)[:, None]
            packed = tl.load(
                qweight + channel * (K // 2) + offs_p[None, :], mask=n_ok[:, None] & p_ok[None, :], other=0
            )
            if GROUP_ALIGNED:  # the whole tile lies in one group
                at = channel * groups + k0 // group_size
                g_ok = n_ok[:, None]
            else:
                at = channel * groups + (2 * offs_p[None, :]) // group_size
                g_ok = n_ok[:, None] & p_ok[None, :]
            s = tl.load(scales + at, mask=g_ok, other=0.0)
            z = tl.load(zeros + at, mask=g_ok, other=0).to(tl.float32)
            w_lo = ((packed & 0xF).to(tl.float32) - z) * s  # (q - z) * s: exactly 0 where q == z
            w_hi = ((packed >> 4).to(tl.float32) - z) * s
            w = tl.trans(tl.interleave(w_lo, w_hi))
        else:
            w = tl.load(qweight + cols * K + offs_k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0)
        if SCHEME == "w8a8":
            acc += tl.dot(a, w, out_dtype=tl.int32)
        elif UPCAST:
            acc += tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision=PRECISION)
        else:
            acc += tl.dot(a, w.to(a.dtype), input_precision=PRECISION)  # int8 |q| <= 127: exact in 16-bit floats

    if SCHEME == "int8":
        acc = acc * tl.load(scales + offs_n, mask=n_ok, other=0.0)[None, :]
    elif SCHEME == "w8a8":
        sx = tl.load(x_scale + offs_m, mask=m_ok, other=0.0)
        acc = acc.to(tl.float32) * sx[:, None] * tl.load(scales + offs_n, mask=n_ok, other=0.0)[None, :]
    if HAS_BIAS and SPLIT_K == 1:
        acc += tl.load(bias + offs_n, mask=n_ok, other=0.0)[None, :]
    # SPLIT_K > 1: `out` is the float32 partials buffer (SPLIT_K, M, N).
    dst = out + split.to(tl.int64) * M * N + offs_m.to(tl.int64)[:, None] * N + cols
    tl.store(dst, acc.to(out.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _sum_splits_kernel(
    partials, bias, out, total, N, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < total
    acc = tl.zeros([BLOCK], tl.float32)
    for split in range(SPLIT_K):
        acc += tl.load(partials + split * total + offs, mask=inside, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias + offs % N, mask=inside, other=0.0)
    tl.store(out + offs, acc.to(out.dtype.element_ty), mask=inside)


SM90_SMS = 132  # H100 SXM / H200: the SM count planned for when no device is visible (compile checks)


@functools.cache
def _device_sm_count(device_index):
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _sm_count(device):
    return (
        _device_sm_count(device.index if device.index is not None else torch.cuda.current_device())
        if device.type == "cuda"
        else SM90_SMS
    )


def _config(rows, in_features, out_features, scheme, dtype, sm_count):
    """(BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages) for an (M, K) x (K, N) problem; every one compiles
    for sm_90 without register spills (tests/test_quant.py checks through ptxas)."""
    if _backend.triton_interpret():  # the interpreter: small tiles (its cost is per element and per program)
        return 16, 32, 32, (2 if rows <= GEMV_MAX_ROWS else 1), 4, 1
    # float32 weight-only: tl.dot with input_precision="ieee" is an FMA loop that holds its operand slices in
    # registers, so it takes thin K tiles (128 x 128 x 64 spilled 10-12 KB per thread).
    ieee = dtype == torch.float32 and scheme != "w8a8"
    if rows <= GEMV_MAX_ROWS:
        block_n, block_k, warps = (64, 32, 4) if ieee else (64, 256, 4) if scheme == "w8a8" else (64, 128, 8)
        split = max(
            1, min(triton.cdiv(in_features, block_k), triton.cdiv(4 * sm_count, triton.cdiv(out_features, block_n)))
        )
        return 16, block_n, block_k, split, warps, 4
    block_m, block_n, block_k, warps, stages = (
        (64, 128, 16, 8, 3) if ieee else (128, 128, 128 if scheme == "w8a8" else 64, 8, 3)
    )
    # Up to SPLIT_MAX_ROWS rows the output tiles alone leave SMs idle (32 CTAs for M <= 128, N = 4096 on 132
    # SMs): split K so that about one wave runs, keeping >= 4 K tiles per split for the pipeline.
    tiles = triton.cdiv(rows, block_m) * triton.cdiv(out_features, block_n)
    split = 1
    if rows <= SPLIT_MAX_ROWS:
        split = max(1, min(sm_count // tiles, triton.cdiv(in_features, 4 * block_k)))
    return block_m, block_n, block_k, split, warps, stages


class Launch(NamedTuple):
    """One kernel launch of a plan: kernel[grid](*args, **options)."""

    kernel: triton.runtime.JITFunction
    grid: tuple
    args: tuple
    options: dict


def plan(x, qweight, scales, zeros, group_size, bias, scheme, *, sm_count=None):
    """(out, launches) of qmatmul_<scheme>: `out` is allocated, and running the launches in order fills it.

    x (M, K) float, the weight tensors of `scheme`, bias fp32 (N,) or None; sm_count defaults to x's device (132,
    an sm_90 part, for a tensor off the GPU). Compile checks build their kernels from this, so they see exactly the
    configurations that run.
    """
    rows, in_features = x.shape
    out_features = qweight.shape[0]
    launches = []
    if rows == 0 or out_features == 0 or in_features == 0:  # the bias (or zeros), no launch
        out = torch.zeros((rows, out_features), dtype=torch.float32, device=x.device)
        return (out if bias is None else out.add_(bias)).to(x.dtype), launches
    out = torch.empty((rows, out_features), dtype=x.dtype, device=x.device)
    x_scale = None
    if scheme == "w8a8":  # quantize the activations first; the GEMM streams int8
        xq = torch.empty((rows, in_features), dtype=torch.int8, device=x.device)
        x_scale = torch.empty((rows,), dtype=torch.float32, device=x.device)
        launches.append(
            Launch(
                _quantize_rows_kernel,
                (rows,),
                (x, xq, x_scale, in_features),
                dict(BLOCK=min(QUANT_BLOCK, triton.next_power_of_2(max(in_features, 16)))),
            )
        )
        activations = xq
    else:
        activations = x
    block_m, block_n, block_k, split, warps, stages = _config(
        rows, in_features, out_features, scheme, x.dtype, _sm_count(x.device) if sm_count is None else sm_count
    )
    k_per_split = triton.cdiv(triton.cdiv(in_features, split), block_k) * block_k  # whole BLOCK_K tiles
    split = triton.cdiv(in_features, k_per_split)
    target = out if split == 1 else torch.empty((split, rows, out_features), dtype=torch.float32, device=x.device)
    unused = scales  # any tensor, for the pointers a scheme does not read
    launches.append(
        Launch(
            _qmatmul_kernel,
            (triton.cdiv(rows, block_m) * triton.cdiv(out_features, block_n), split),
            (
                activations,
                qweight,
                scales,
                unused if zeros is None else zeros,
                unused if x_scale is None else x_scale,
                unused if bias is None else bias,
                target,
                rows,
                out_features,
                in_features,
                group_size,
                k_per_split,
            ),
            dict(
                SCHEME=scheme,
                HAS_BIAS=bias is not None,
                SPLIT_K=split,
                GROUP_ALIGNED=scheme == "int4" and group_size % block_k == 0,
                # the interpreter's bfloat16 tl.dot is wrong: it multiplies in float32 there instead
                UPCAST=x.dtype == torch.bfloat16 and _backend.triton_interpret(),
                PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
                BLOCK_M=block_m,
                BLOCK_N=block_n,
                BLOCK_K=block_k,
                GROUP_M=8,
                num_warps=warps,
                num_stages=stages,
            ),
        )
    )
    if split > 1:  # one pass: sum of the partials, bias, cast
        total = rows * out_features
        launches.append(
            Launch(
                _sum_splits_kernel,
                (triton.cdiv(total, SUM_BLOCK),),
                (target, unused if bias is None else bias, out, total, out_features),
                dict(SPLIT_K=split, HAS_BIAS=bias is not None, BLOCK=SUM_BLOCK),
            )
        )
    return out, launches


@on_tensor_device
def _run(x, qweight, scales, zeros, group_size, bias, scheme):
    out, launches = plan(x, qweight, scales, zeros, group_size, bias, scheme)
    for launch in launches:
        wrap_triton(launch.kernel)[launch.grid](*launch.args, **launch.options)
    return out


@triton_op("rlhf_fast_triton::qmatmul_int8", mutates_args=())
def qmatmul_int8(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Same contract as torch.ops.rlhf_fast.qmatmul_int8."""
    return _run(x, qweight, scales, None, 1, bias, "int8")


@triton_op("rlhf_fast_triton::qmatmul_int4", mutates_args=())
def qmatmul_int4(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """Same contract as torch.ops.rlhf_fast.qmatmul_int4."""
    return _run(x, qweight, scales, zeros, group_size, bias, "int4")


@triton_op("rlhf_fast_triton::qmatmul_w8a8", mutates_args=())
def qmatmul_w8a8(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Same contract as torch.ops.rlhf_fast.qmatmul_w8a8."""
    return _run(x, qweight, scales, None, 1, bias, "w8a8")
