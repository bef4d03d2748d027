"""Triton kernels of the log-prob family, registered as torch.library triton_ops (rlhf_fast_triton::*).

Same contracts as torch.ops.rlhf_fast.logprobs_forward / logprobs_backward / logprobs_backward_
(csrc/registration.cpp). One program per row loops over the vocab in BLOCK chunks. The forward keeps an online
(max, sum 2^(v - max), sum 2^(v - max) (v - max)) with v = x log2(e) / T, rebased when a chunk raises the max,
so the row is read once; lse = ln2 (max + log2 s), entropy = ln2 (log2 s - t / s). The backward reads the row
once more and writes d(logits) = -p (g_lp + g_H (log p + H)) / T (+ g_lp / T at the label) in the logits' dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ..backend import triton_interpret
from . import on_tensor_device

MAX_BLOCK = 4096


@triton.jit
def _forward_kernel(
    logits,
    labels,
    logp,
    entropy,
    lse,
    inner,
    stride_outer,
    stride_inner,
    vocab,
    inv_t,
    ignore_index,
    HAS_LABELS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    row = logits + (r // inner) * stride_outer + (r % inner) * stride_inner
    scale = inv_t * 1.4426950408889634
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.zeros([], tl.float32)
    t = tl.zeros([], tl.float32)
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(row + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
        v = x * scale
        new_m = tl.maximum(m, tl.max(v, axis=0))
        d = tl.where(s > 0, m - new_m, 0.0)  # rebase the running sums onto the new max (none while s == 0)
        e = tl.exp2(d)
        t = e * (t + s * d)
        s = s * e
        m = new_m
        u = v - m
        p = tl.where(x == float("-inf"), 0.0, tl.exp2(u))
        s += tl.sum(p, axis=0)
        t += tl.sum(p * tl.where(p > 0, u, 0.0), axis=0)  # p = 0 terms (x = -inf) add 0, not nan
    log2_s = tl.log2(s)
    row_lse = 0.6931471805599453 * (m + log2_s)
    tl.store(lse + r, row_lse)
    tl.store(entropy + r, 0.6931471805599453 * (log2_s - t / s))
    if HAS_LABELS:
        label = tl.load(labels + r)
        in_row = (label >= 0) & (label < vocab)
        x_label = tl.load(row + label, mask=in_row, other=0.0).to(tl.float32)
        # a label outside [0, V) (other than ignore_index) reads nothing and gives NaN
        out = tl.where(in_row, x_label * inv_t - row_lse, float("nan"))
        tl.store(logp + r, tl.where(label == ignore_index, 0.0, out))


@triton.jit
def _backward_kernel(
    logits,
    grad,
    labels,
    lse,
    entropy,
    grad_logp,
    grad_entropy,
    inner,
    stride_outer,
    stride_inner,
    grad_stride_outer,
    grad_stride_inner,
    vocab,
    inv_t,
    ignore_index,
    HAS_GRAD_LOGP: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
    BLOCK: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    outer, within = r // inner, r % inner
    row = logits + outer * stride_outer + within * stride_inner
    grad_row = grad + outer * grad_stride_outer + within * grad_stride_inner
    scale = inv_t * 1.4426950408889634
    lse2 = tl.load(lse + r) * 1.4426950408889634
    alpha = 0.0
    label = -1
    if HAS_GRAD_LOGP:
        raw = tl.load(labels + r)
        counted = raw != ignore_index  # a label outside [0, V) has no one-hot term (a vocab slice)
        alpha = tl.where(counted, tl.load(grad_logp + r) * inv_t, 0.0)
        label = tl.where(counted & (raw >= 0) & (raw < vocab), raw, -1)
    beta = 0.0
    row_entropy = 0.0
    if HAS_GRAD_ENTROPY:
        beta = tl.load(grad_entropy + r) * inv_t
        row_entropy = tl.load(entropy + r)
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = cols < vocab
        x = tl.load(row + cols, mask=inside, other=0.0).to(tl.float32)
        u2 = x * scale - lse2
        p = tl.exp2(u2)
        log_p = tl.where(p > 0, u2 * 0.6931471805599453, 0.0)  # p = 0 (x = -inf): gradient 0, not nan
        g = -p * (alpha + beta * (log_p + row_entropy))
        g = tl.where(cols == label, g + alpha, g)
        tl.store(grad_row + cols, g.to(grad.dtype.element_ty), mask=inside)


def row_config(vocab: int) -> dict:
    """Launch options of the one-program-per-row kernels (_forward_kernel, _backward_kernel)."""
    return {"BLOCK": min(MAX_BLOCK, triton.next_power_of_2(vocab)), "num_warps": 8}


def _by_row(t: torch.Tensor | None) -> torch.Tensor | None:
    """A per-row tensor (labels, lse, entropy, upstream gradients) laid out as the kernels index it: the (A, B)
    rows contiguous (a no-op for the tensors rlhf_fast.logprobs passes)."""
    return None if t is None else t.contiguous()


@triton_op("rlhf_fast_triton::logprobs_forward", mutates_args=())
@on_tensor_device
def logprobs_forward(
    logits: torch.Tensor, labels: torch.Tensor | None, temperature: float, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits (A, B, V), last dim contiguous; labels (A, B) int64 or None -> (logp, entropy, lse) fp32."""
    rows = logits.shape[:2]
    labels = _by_row(labels)
    logp = torch.empty(rows if labels is not None else (0,), dtype=torch.float32, device=logits.device)
    entropy = torch.empty(rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty(rows, dtype=torch.float32, device=logits.device)
    count = rows[0] * rows[1]
    if count > 0:
        vocab = logits.shape[2]
        wrap_triton(_forward_kernel)[(count,)](
            logits,
            labels if labels is not None else lse,
            logp,
            entropy,
            lse,
            max(1, rows[1]),
            logits.stride(0),
            logits.stride(1),
            vocab,
            1.0 / temperature,
            ignore_index,
            HAS_LABELS=labels is not None,
            **row_config(vocab),
        )
    return logp, entropy, lse


@on_tensor_device
def _launch_backward(grad_logp, grad_entropy, logits, labels, lse, entropy, temperature, ignore_index, grad):
    rows = logits.shape[0] * logits.shape[1]
    if rows == 0:
        return
    has_grad_logp = grad_logp is not None and labels is not None
    grad_logp, grad_entropy, labels, lse, entropy = map(_by_row, (grad_logp, grad_entropy, labels, lse, entropy))
    vocab = logits.shape[2]
    wrap_triton(_backward_kernel)[(rows,)](
        logits,
        grad,
        labels if labels is not None else lse,
        lse,
        entropy,
        grad_logp if has_grad_logp else lse,
        grad_entropy if grad_entropy is not None else lse,
        max(1, logits.shape[1]),
        logits.stride(0),
        logits.stride(1),
        grad.stride(0),
        grad.stride(1),
        vocab,
        1.0 / temperature,
        ignore_index,
        HAS_GRAD_LOGP=has_grad_logp,
        HAS_GRAD_ENTROPY=grad_entropy is not None,
        **row_config(vocab),
    )


@triton_op("rlhf_fast_triton::logprobs_backward", mutates_args=())
def logprobs_backward(
    grad_logp: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    temperature: float,
    ignore_index: int,
) -> torch.Tensor:
    """d(logits) (A, B, V) contiguous in the logits' dtype."""
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    _launch_backward(grad_logp, grad_entropy, logits, labels, lse, entropy, temperature, ignore_index, grad)
    return grad


@triton_op("rlhf_fast_triton::logprobs_backward_", mutates_args=("logits",))
def logprobs_backward_(
    grad_logp: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    temperature: float,
    ignore_index: int,
) -> None:
    """d(logits) written over the logits (their strides kept)."""
    _launch_backward(grad_logp, grad_entropy, logits, labels, lse, entropy, temperature, ignore_index, logits)


@triton.jit
def _linear_forward_kernel(
    hidden,
    weight,
    bias,
    labels,
    partial,
    label_logit,
    tokens,
    vocab,
    hidden_size,
    stride_hidden,
    stride_weight,
    stride_bias,
    stride_labels,
    inv_t,
    cap_in,
    HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    GROUP_N: tl.constexpr,
):
    """One (BLOCK_N tokens x BLOCK_V vocab) tile of the logits, never stored: its rows' (max, sum e^(z - max),
    sum e^(z - max) (z - max)) go to partial[tile, :, row], and the label's logit where it falls in the tile.
    z = y inv_t with inv_t = logit_scale / T, or with SOFTCAP z = inv_t tanh(y cap_in) with cap_in =
    logit_scale / softcap and inv_t = softcap / T (y: the tile's logits as the lm_head gives them)."""
    # Grouped program order: GROUP_N token tiles walk the vocab tiles together (token tile fastest), so the
    # programs in flight share GROUP_N hidden tiles and a few weight tiles in L2; hidden is read about once and
    # the weight once per group, instead of all of hidden once per vocab tile.
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(tokens, BLOCK_N)
    per_group = GROUP_N * tl.cdiv(vocab, BLOCK_V)
    first_n = (pid // per_group) * GROUP_N
    group_tiles = tl.minimum(tiles_n - first_n, GROUP_N)  # the last group may be short
    pid_n = first_n + (pid % per_group) % group_tiles
    pid_v = (pid % per_group) // group_tiles
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    ks = tl.arange(0, BLOCK_H)
    row_ok = rows < tokens
    col_ok = cols < vocab
    acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    for k in range(0, hidden_size, BLOCK_H):
        k_ok = (k + ks) < hidden_size
        a = tl.load(
            hidden + rows[:, None].to(tl.int64) * stride_hidden + (k + ks)[None, :],
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        b = tl.load(
            weight + cols[None, :].to(tl.int64) * stride_weight + (k + ks)[:, None],
            mask=col_ok[None, :] & k_ok[:, None],
            other=0.0,
        )
        if DOT_FP32:  # exact products of 16-bit inputs; for the interpreter, whose 16-bit tl.dot is wrong
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias + cols.to(tl.int64) * stride_bias, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    # Rounded to the inputs' dtype as an lm_head's output is (the backward recomputes them that way too).
    if DOT_FP32 and hidden.dtype.element_ty == tl.bfloat16:
        # The interpreter (DOT_FP32) rounds float32 to bfloat16 toward zero; the GPU and torch round to nearest even.
        bits = acc.to(tl.uint32, bitcast=True)
        z = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    else:
        z = acc.to(hidden.dtype.element_ty).to(tl.float32)
    if SOFTCAP:  # tanh(x) = 1 - 2 / (e^(2x) + 1): -1 and 1 at the ends (e^(2x) = 0, inf), never NaN
        z = 1.0 - 2.0 / (tl.exp2(z * (cap_in * 2.8853900817779268)) + 1.0)
    z = z * inv_t
    z = tl.where(col_ok[None, :], z, float("-inf"))  # the ragged last vocab tile contributes nothing
    m = tl.max(z, axis=1)
    # A row whose logits in this tile are all -inf (a padded vocab masked by a -inf bias): s = t = 0, not NaN.
    u = z - tl.where(m == float("-inf"), 0.0, m)[:, None]
    p = tl.exp2(u * 1.4426950408889634)
    s = tl.sum(p, axis=1)
    t = tl.sum(p * tl.where(p > 0, u, 0.0), axis=1)
    out = partial + pid_v.to(tl.int64) * 3 * tokens + rows
    tl.store(out, m, mask=row_ok)
    tl.store(out + tokens, s, mask=row_ok)
    tl.store(out + 2 * tokens, t, mask=row_ok)
    label = tl.load(labels + rows.to(tl.int64) * stride_labels, mask=row_ok, other=-1)
    hit = cols[None, :] == label[:, None]
    in_tile = row_ok & (label >= pid_v * BLOCK_V) & (label < pid_v * BLOCK_V + BLOCK_V) & (label < vocab)
    tl.store(label_logit + rows, tl.sum(tl.where(hit, z, 0.0), axis=1), mask=in_tile)


def linear_config(dtype: torch.dtype) -> dict:
    """Launch options of _linear_forward_kernel for inputs of `dtype`. Untuned: no GPU measurement yet.

    16-bit inputs: a common Hopper tensor-core matmul tile. float32 inputs take full-precision (ieee) dots, which
    run on the FMA units with the tile in registers: 128 x 128 tiles spill several KB per thread on sm_90, 64 x 64
    ones do not (tests/test_triton_sm90.py). The interpreter gets small tiles (it runs them in Python) and
    multiplies in float32 (DOT_FP32: its 16-bit tl.dot is wrong; it also rounds the logits to bfloat16 by hand,
    as the interpreter's cast rounds toward zero)."""
    if triton_interpret():  # GROUP_N = 2: small inputs still span several groups and a short last one
        return {
            "PRECISION": "ieee",
            "DOT_FP32": True,
            "BLOCK_N": 16,
            "BLOCK_V": 64,
            "BLOCK_H": 16,
            "GROUP_N": 2,
            "num_warps": 4,
            "num_stages": 1,
        }
    if dtype == torch.float32:
        return {
            "PRECISION": "ieee",
            "DOT_FP32": False,
            "BLOCK_N": 64,
            "BLOCK_V": 64,
            "BLOCK_H": 32,
            "GROUP_N": 8,
            "num_warps": 4,
            "num_stages": 2,
        }
    return {
        "PRECISION": "tf32",
        "DOT_FP32": False,
        "BLOCK_N": 128,
        "BLOCK_V": 128,
        "BLOCK_H": 64,
        "GROUP_N": 8,
        "num_warps": 8,
        "num_stages": 3,
    }


@triton_op("rlhf_fast_triton::linear_logprobs_forward", mutates_args=())
@on_tensor_device
def linear_logprobs_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    temperature: float,
    ignore_index: int,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden (N, H), weight (V, H) with contiguous last dims, bias (V,) or None and labels (N,) int64 of any
    stride -> (logp, entropy, lse) (N,) fp32 of softmax(z / T), the logits never stored: y = hidden @ weight.T +
    bias, z = logit_scale y, then z = softcap tanh(z / softcap) when softcap is set (rlhf_fast.linear_logprobs).
    float32 / bfloat16 / float16 only (float32 dots in full precision)."""
    tokens, hidden_size = hidden.shape
    vocab = weight.shape[0]
    config = linear_config(hidden.dtype)
    tiles = triton.cdiv(vocab, config["BLOCK_V"])
    partial = torch.empty((tiles, 3, tokens), dtype=torch.float32, device=hidden.device)
    # Each label in [0, V) is written by the one tile holding it; one outside [0, V) keeps NaN (nothing is read).
    label_logit = torch.full((tokens,), float("nan"), dtype=torch.float32, device=hidden.device)
    if tokens > 0:
        wrap_triton(_linear_forward_kernel)[(triton.cdiv(tokens, config["BLOCK_N"]) * tiles,)](
            hidden,
            weight,
            bias if bias is not None else hidden,
            labels,
            partial,
            label_logit,
            tokens,
            vocab,
            hidden_size,
            hidden.stride(0),
            weight.stride(0),
            bias.stride(0) if bias is not None else 0,
            labels.stride(0),
            logit_scale / temperature if softcap is None else softcap / temperature,
            1.0 if softcap is None else logit_scale / softcap,
            HAS_BIAS=bias is not None,
            SOFTCAP=softcap is not None,
            **config,
        )
    tile_max, tile_sum, tile_weighted = partial.unbind(1)
    top = tile_max.max(dim=0).values
    scale = torch.exp(tile_max - top)
    total = (tile_sum * scale).sum(0)
    shift = torch.where(tile_sum > 0, tile_max - top, 0.0)  # tiles of -inf logits (s = 0) add nothing, not NaN
    weighted = (scale * (tile_weighted + tile_sum * shift)).sum(0)
    lse = top + torch.log(total)
    entropy = torch.log(total) - weighted / total
    logp = torch.where(labels == ignore_index, torch.zeros_like(lse), label_logit - lse)
    return logp, entropy, lse
