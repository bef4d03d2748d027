"""f-divergences between the softmax distributions of two sets of logits, per position, from raw logits.

    d = rf.f_divergence(policy_logits, ref_logits, "kl", temperature=0.7, mask=mask)   # (..., V) -> (...) fp32

Kinds (P = softmax(logits_p / T), Q = softmax(logits_q / T), sums over the vocab):
kl = sum P log(P/Q); reverse_kl = sum Q log(Q/P); js = KL(P||M)/2 + KL(Q||M)/2, M = (P+Q)/2; tv = sum |P-Q| / 2;
hellinger = 1 - sum sqrt(PQ); chi2 = sum (P-Q)^2 / Q; alpha = (sum P^a Q^(1-a) - 1) / (a(a-1)), a = alpha not in {0, 1}.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from . import _ops, reference
from . import _validate as check
from . import backend as _backend
from .logprobs import _vocab_chunks

KINDS = reference.F_DIVERGENCES


def _kernels(name: str):
    return _ops.kernels(name, "divergence")


def _check_kind(kind, alpha):
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "alpha":
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise ValueError(f"alpha must be a finite float for kind='alpha', got {alpha!r}")
        if alpha in (0, 1):
            raise ValueError(
                f"alpha must not be 0 or 1 (the alpha-divergence is undefined there; use kind='kl' or "
                f"'reverse_kl' for those limits), got {alpha!r}"
            )
    elif alpha is not None:
        raise ValueError(f"alpha is only used by kind='alpha'; got alpha={alpha!r} with kind={kind!r}")


def _check_mask(mask, lead, ref_name, ref, what):
    """None, or `mask` (nonzero = valid) as a bool tensor shaped `lead` (ref_name's shape `what`)."""
    if mask is None:
        return None
    check.tensor("mask", mask)
    if mask.shape != lead:
        raise ValueError(f"mask must have shape {tuple(lead)} ({ref_name} {what}), got {tuple(mask.shape)}")
    check.same_device("mask", mask, ref_name, ref)
    return mask if mask.dtype == torch.bool else mask != 0


def _rows(x: torch.Tensor, vocab: int) -> torch.Tensor:
    """x as (rows, vocab) with a unit vocab stride; a view when possible."""
    x = x.reshape(-1, vocab)
    return x if x.stride(-1) == 1 else x.contiguous()


def f_divergence(
    logits_p: torch.Tensor,
    logits_q: torch.Tensor,
    kind: str,
    *,
    alpha: float | None = None,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Per-position f-divergence between ``P = softmax(logits_p / T)`` and ``Q = softmax(logits_q / T)``.

    Parameters
    ----------
    logits_p : torch.Tensor
        ``(..., V)`` raw logits of P, float32 / bfloat16 / float16 / float64, V >= 1. Rows may be strided (a
        vocab slice ``logits[..., :V]`` is read in place); a vocab stride other than 1 is copied.
    logits_q : torch.Tensor
        ``(..., V)`` raw logits of Q, same shape and device (mixed float dtypes are promoted to one).
    kind : str
        ``"kl"``: Σ P log(P/Q). ``"reverse_kl"``: Σ Q log(Q/P). ``"js"``: ½ KL(P‖M) + ½ KL(Q‖M),
        M = (P+Q)/2. ``"tv"``: ½ Σ ``|P − Q|``. ``"hellinger"``: 1 − Σ √(PQ). ``"chi2"``: Σ (P − Q)²/Q.
        ``"alpha"``: (Σ P^α Q^(1−α) − 1) / (α(α−1)).
    alpha : float or None
        α of ``kind="alpha"``: required there, finite, not 0 or 1 (use kl / reverse_kl for those limits);
        rejected for the other kinds.
    temperature : float
        Positive finite float T, applied to both sides.
    mask : torch.Tensor or None
        ``(...)`` bool / int / float, nonzero = valid; masked positions give 0 and no gradient.
    backend : str or None
        ``"auto" | "triton" | "cuda" | "cpu" | "torch"``; None: ``RLHF_FAST_BACKEND`` or ``"auto"``.

    Returns
    -------
    torch.Tensor
        ``(...)`` float32, one value per position (the sum over the vocab); float64 for float64 inputs on the
        torch backend.

    Raises
    ------
    TypeError
        Non-float logits, a mask that is not a tensor.
    ValueError
        An unknown `kind`, a missing, non-finite, 0 or 1 `alpha` for ``"alpha"`` or an `alpha` given with
        another kind, mismatched shapes or devices, an empty vocab dim, a non-positive temperature, a mask not
        shaped ``logits_p.shape[:-1]``.
    rlhf_fast.BackendUnavailable
        A backend asked for by name cannot run these tensors.

    Notes
    -----
    Gradients flow to both logits, in their dtype (float64 inputs are accepted and computed in float32 by the
    kernels); a side that does not require a gradient (the frozen reference) gets none computed. Vocab
    entries where both logits are -inf (a padded vocab) are absent: they change nothing and get a zero
    gradient. The kernels allocate no ``(N, V)`` float32 buffer.
    """
    _check_kind(kind, alpha)
    check.positive_float("temperature", temperature)
    logits_p, logits_q = check.common_float(logits_p=logits_p, logits_q=logits_q)
    check.same_shape("logits_q", logits_q, "logits_p", logits_p)
    check.same_device("logits_q", logits_q, "logits_p", logits_p)
    if logits_p.dim() < 1 or logits_p.shape[-1] == 0:
        raise ValueError(f"logits_p must have a non-empty last (vocab) dim (..., V), got shape {tuple(logits_p.shape)}")
    lead, vocab = logits_p.shape[:-1], logits_p.shape[-1]
    mask = _check_mask(mask, lead, "logits_p", logits_p, "without its vocab dim")
    name = _backend.select("f_divergence", backend, logits_p.device)
    if name == "torch":
        return reference.f_divergence(logits_p, logits_q, kind, alpha=alpha, temperature=temperature, mask=mask)
    flat_mask = None if mask is None else mask.reshape(-1).contiguous()
    out, _ = _ops.call(
        _kernels(name).f_divergence,
        _rows(logits_p, vocab),
        _rows(logits_q, vocab),
        flat_mask,
        kind,
        float(alpha) if alpha is not None else 0.0,
        float(temperature),
    )
    return out.view(lead)


# ---------------------------------------------------------------- linear_f_divergence

# one-pass kinds whose chunk values merge exactly (chain rule); js and tv need P and Q themselves (a second pass)
_POWER = {"hellinger": (0.5, -1.0), "chi2": (2.0, 1.0)}
# Bytes of one (tokens x chunk) buffer of a side's logits or gradient; a pass holds at most four (both sides'
# logits, then both gradients). Under glibc's largest mmap threshold (32 MiB), so that the gradient the backward
# kernel returns for each chunk lands in the heap memory the previous chunk's freed (no fresh pages to fault in);
# not much smaller, since each chunk costs a handful of parallel regions (matmuls, kernels), each a thread barrier
# that a busy machine makes expensive (4 MiB buffers made the op ~1.4x slower than 32 MiB at 1024 tokens there).
LINEAR_BUFFER_BYTES = 28 * 2**20


def _power_params(kind, alpha):
    if kind == "alpha":
        return float(alpha), 1.0 / (alpha * (alpha - 1.0))
    return _POWER[kind]


def _weighted_sum(weights, values):
    """sum_c weights * values over chunks (last dim), where a chunk of zero weight adds 0 (its values may be nan)."""
    return torch.where(weights > 0, weights * values, torch.zeros_like(values)).sum(-1)


class _Head(NamedTuple):
    """One side's lm head and the logits the divergence kernels see for it, with y = hidden @ weight.T + bias:
    gain * y without a soft cap, factor * cap * tanh(scale * y / cap) with one (factor = kernel T / T, and
    gain = scale * factor: the logit scale and the temperature folded into one multiplier)."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    scale: float
    cap: float | None
    factor: float

    @property
    def gain(self):
        return self.scale * self.factor

    def logits(self, start, end, out):
        """out (tokens, end - start) <- the kernels' logits of vocab entries [start, end)."""
        weight = self.weight[start:end].T
        bias = None if self.bias is None else self.bias[start:end]
        gain = self.gain if self.cap is None else 1.0
        if out.dtype != self.hidden.dtype:  # the other side is wider, or capped (float32 kernels' logits)
            out.copy_(torch.nn.functional.linear(self.hidden, weight.T, bias))
            if gain != 1.0:
                out.mul_(gain)
        elif bias is not None:
            torch.addmm(bias, self.hidden, weight, beta=gain, alpha=gain, out=out)
        elif gain != 1.0:
            out.addmm_(self.hidden, weight, beta=0.0, alpha=gain)
        else:
            torch.mm(self.hidden, weight, out=out)
        if self.cap is not None:
            out.mul_(self.scale / self.cap).tanh_().mul_(self.cap * self.factor)
        return out

    def to_head_gradient(self, grad, logits):
        """The gradient of the logits y given that of the kernels' logits (`logits`, overwritten), in place:
        without a cap the gain is left to the gradient matmuls (returned); with one, d/dy = gain (1 - t^2) d/dz."""
        if self.cap is None:
            return self.gain
        tanh_squared = logits.mul_(1.0 / (self.cap * self.factor)).square_()
        grad.mul_(tanh_squared.mul_(-self.gain).add_(self.gain))
        return 1.0


def _buffers(count, tokens, chunk, dtype, device):
    """`count` flat buffers for (tokens x chunk) blocks, and a function viewing one as (tokens, n) for n <= chunk."""
    flat = [torch.empty(tokens * chunk, dtype=dtype, device=device) for _ in range(count)]
    return flat, lambda buffer, n: buffer[: tokens * n].view(tokens, n)


class _LinearFDivergence(torch.autograd.Function):
    """Chunked f-divergence of lm-head logits; the backward recomputes each chunk and feeds the divergence
    backward kernel the whole rows' statistics (its per-entry gradient needs only them and the entry). Each pass
    reuses one buffer per side (and per needed gradient) across its chunks."""

    @staticmethod
    def forward(
        ctx,
        hidden_p,
        weight_p,
        bias_p,
        hidden_q,
        weight_q,
        bias_q,
        mask,
        kind,
        alpha,
        temperature,
        name,
        chunks,
        transforms,
        dtype,
    ):
        ops = _ops.kernels(name, "divergence")
        heads = (_Head(hidden_p, weight_p, bias_p, *transforms[0]), _Head(hidden_q, weight_q, bias_q, *transforms[1]))
        tokens, width = hidden_p.shape[0], chunks[0][1] - chunks[0][0]
        (buffer_a, buffer_b), view = _buffers(2, tokens, width, dtype, hidden_p.device)
        first_kind = "kl" if kind in ("js", "tv") else kind
        lse_p, lse_q, values, aux = [], [], [], []
        for start, end in chunks:
            a = heads[0].logits(start, end, view(buffer_a, end - start))
            b = heads[1].logits(start, end, view(buffer_b, end - start))
            out, stats = ops.f_divergence(a, b, mask, first_kind, float(alpha or 0.0), temperature)
            lse_p.append(stats[:, 0])
            lse_q.append(stats[:, 1])
            values.append(out)
            aux.append(stats[:, 2])
        lse_p_c, lse_q_c = torch.stack(lse_p, -1), torch.stack(lse_q, -1)  # (rows, chunks)
        row_lse_p, row_lse_q = torch.logsumexp(lse_p_c, -1), torch.logsumexp(lse_q_c, -1)
        w = torch.exp(lse_p_c - row_lse_p[:, None])  # each chunk's share of P and of Q
        v = torch.exp(lse_q_c - row_lse_q[:, None])
        values = torch.stack(values, -1)
        if kind == "kl":
            value = _weighted_sum(w, values + lse_p_c - lse_q_c) - row_lse_p + row_lse_q
            statistic = value
        elif kind == "reverse_kl":
            value = _weighted_sum(v, values + lse_q_c - lse_p_c) - row_lse_q + row_lse_p
            statistic = value
        elif kind in ("js", "tv"):
            normalisers = torch.stack([row_lse_p, row_lse_q, torch.zeros_like(row_lse_p)], -1).contiguous()
            sums = torch.zeros(tokens, 2, dtype=torch.float32, device=hidden_p.device)
            for start, end in chunks:
                a = heads[0].logits(start, end, view(buffer_a, end - start))
                b = heads[1].logits(start, end, view(buffer_b, end - start))
                sums += ops.f_divergence_second_pass(a, b, mask, normalisers, kind, temperature)
            # js: the sums are KL(P || M), KL(Q || M); tv: sum |P - Q|, sum P sign(P - Q)
            value = 0.5 * sums.sum(-1) if kind == "js" else 0.5 * sums[:, 0]
            statistic = sums[:, 0] if kind == "js" else sums[:, 1]
        else:
            e, scale = _power_params(kind, alpha)
            terms = (
                e * (lse_p_c - row_lse_p[:, None])
                + (1 - e) * (lse_q_c - row_lse_q[:, None])
                + torch.log(torch.stack(aux, -1))
            )
            absent = (w == 0) & (v == 0)  # a chunk where both logits are -inf throughout
            log_s = torch.logsumexp(torch.where(absent, torch.full_like(terms, -math.inf), terms), -1)
            value = scale * torch.expm1(log_s)
            statistic = log_s.exp()
        if mask is not None:
            value = torch.where(mask, value, torch.zeros_like(value))
        stats = torch.stack([row_lse_p, row_lse_q, statistic], -1).float().contiguous()
        value = value.float().contiguous()
        ctx.save_for_backward(hidden_p, weight_p, bias_p, hidden_q, weight_q, bias_q, mask, value, stats)
        ctx.options = kind, float(alpha or 0.0), temperature, name, chunks, transforms, dtype
        return value

    @staticmethod
    def backward(ctx, grad_out):
        hidden_p, weight_p, bias_p, hidden_q, weight_q, bias_q, mask, value, stats = ctx.saved_tensors
        kind, alpha, temperature, name, chunks, transforms, dtype = ctx.options
        heads = (_Head(hidden_p, weight_p, bias_p, *transforms[0]), _Head(hidden_q, weight_q, bias_q, *transforms[1]))
        ops = _ops.kernels(name, "divergence")
        need = ctx.needs_input_grad
        need_side = (any(need[0:3]), any(need[3:6]))
        grads = [None] * 6
        for side, head in enumerate(heads):
            offset = 3 * side
            if need[offset]:
                grads[offset] = torch.zeros(head.hidden.shape, dtype=torch.float32, device=head.hidden.device)
            if need[offset + 1]:
                grads[offset + 1] = torch.empty_like(head.weight)
            if need[offset + 2]:
                grads[offset + 2] = torch.empty(head.bias.shape, dtype=torch.float32, device=head.bias.device)
        grad_out = grad_out.float().contiguous()
        tokens, width = hidden_p.shape[0], chunks[0][1] - chunks[0][0]
        buffers, view = _buffers(2, tokens, width, dtype, hidden_p.device)
        for start, end in chunks:
            logits = [head.logits(start, end, view(buffer, end - start)) for head, buffer in zip(heads, buffers)]
            chunk_grads = ops.f_divergence_backward(
                grad_out, *logits, mask, value, stats, kind, alpha, temperature, *need_side
            )
            for side, head in enumerate(heads):
                if not need_side[side]:
                    continue
                offset = 3 * side
                grad = chunk_grads[side]
                gain = head.to_head_gradient(grad, logits[side])
                if need[offset]:
                    grads[offset].addmm_(grad.float(), head.weight[start:end].float(), alpha=gain)
                grad = grad.to(head.hidden.dtype)
                if need[offset + 1]:
                    grads[offset + 1][start:end].addmm_(grad.T, head.hidden, beta=0.0, alpha=gain)
                if need[offset + 2]:
                    torch.sum(grad, 0, dtype=torch.float32, out=grads[offset + 2][start:end])
                    if gain != 1.0:
                        grads[offset + 2][start:end].mul_(gain)
            del chunk_grads, grad
        for index, source in ((0, hidden_p), (2, bias_p), (3, hidden_q), (5, bias_q)):
            if grads[index] is not None:
                grads[index] = grads[index].to(source.dtype)
        return (*grads, None, None, None, None, None, None, None, None)


def _per_side(name: str, value, check_one) -> tuple:
    """A keyword given once for both heads, or as a (p, q) pair: (value_p, value_q), each checked."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be one value for both heads or a (p, q) pair, got {value!r}")
        return tuple(check_one(f"{name}[{i}]", v) for i, v in enumerate(value))
    value = check_one(name, value)
    return value, value


def _optional_cap(name, value):
    return None if value is None else check.positive_float(name, value)


def _transforms(logit_scale, softcap, temperature):
    """(the kernels' temperature, per side (scale, cap, factor)) for `_Head`: without a cap on the p side the
    kernels take T / scale_p and its logits go through untouched."""
    kernel_t = temperature if softcap[0] is not None else temperature / logit_scale[0]
    factor = kernel_t / temperature
    return kernel_t, tuple((scale, cap, factor) for scale, cap in zip(logit_scale, softcap))


def _check_head(name, hidden, weight, bias):
    check.floating(f"hidden_{name}", hidden)
    check.floating(f"weight_{name}", weight)
    if weight.dim() != 2 or hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden_{name} must be (..., H) and weight_{name} (V, H); got {tuple(hidden.shape)} and "
            f"{tuple(weight.shape)}"
        )
    check.same_device(f"weight_{name}", weight, f"hidden_{name}", hidden)
    dtypes = {hidden.dtype, weight.dtype} | ({bias.dtype} if bias is not None else set())
    if len(dtypes) != 1:
        raise TypeError(
            f"hidden_{name}, weight_{name} and bias_{name} must share one dtype, got "
            f"{sorted(str(d) for d in dtypes)}; cast them with .to(hidden_{name}.dtype)"
        )
    if bias is not None:
        check.same_device(f"bias_{name}", bias, f"hidden_{name}", hidden)
        if bias.shape != weight.shape[:1]:
            raise ValueError(f"bias_{name} must be (V,) = ({weight.shape[0]},), got {tuple(bias.shape)}")


def linear_f_divergence(
    hidden_p: torch.Tensor,
    weight_p: torch.Tensor,
    hidden_q: torch.Tensor,
    weight_q: torch.Tensor,
    kind: str,
    *,
    bias_p: torch.Tensor | None = None,
    bias_q: torch.Tensor | None = None,
    alpha: float | None = None,
    temperature: float = 1.0,
    logit_scale: float | tuple[float, float] = 1.0,
    softcap: float | None | tuple[float | None, float | None] = None,
    mask: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """`f_divergence` between the lm-head logits of two models, never holding either model's full logits.

    Parameters
    ----------
    hidden_p : torch.Tensor
        ``(..., H_p)`` float: the p model's lm-head input.
    weight_p : torch.Tensor
        ``(V, H_p)``, the p model's lm-head weight, the dtype and device of `hidden_p`.
    hidden_q : torch.Tensor
        ``(..., H_q)``, the same leading shape and device as `hidden_p`.
    weight_q : torch.Tensor
        ``(V, H_q)``, the same vocab size V >= 1.
    kind : str
        As in `f_divergence`.
    bias_p : torch.Tensor or None
        ``(V,)``, the dtype of `hidden_p`.
    bias_q : torch.Tensor or None
        ``(V,)``, the dtype of `hidden_q`.
    alpha : float or None
        As in `f_divergence`.
    temperature : float
        Positive finite float T.
    logit_scale : float or tuple of float
        ``z = logit_scale * y`` as in `linear_logprobs`: one value for both heads, or a ``(p, q)`` pair.
    softcap : float, None, or tuple
        ``z = softcap * tanh(z / softcap)`` after the scale, as in `linear_logprobs`: one value (or None)
        for both heads, or a ``(p, q)`` pair. ``**head_transform(policy.config)`` gives both keywords when
        policy and reference share an architecture; pass pairs when they differ.
    mask : torch.Tensor or None
        ``(...)``, nonzero = valid; masked positions give 0 and no gradient.
    backend : str or None
        As in `f_divergence`.

    Returns
    -------
    torch.Tensor
        ``(...)`` float32, the kinds and semantics of `f_divergence` applied to
        ``P = softmax(z_p / T)`` and ``Q = softmax(z_q / T)``, ``y = hidden @ weight.T + bias`` on each side.

    Raises
    ------
    TypeError
        Non-float tensors, or a side whose hidden / weight / bias dtypes differ.
    ValueError
        Bad `kind` / `alpha` (as in `f_divergence`), weights not ``(V, H)`` matching their hidden states,
        different leading shapes or vocab sizes, a bias not ``(V,)``, mismatched devices, a
        `logit_scale` / `softcap` pair of another length, a non-positive temperature, scale or cap.
    rlhf_fast.BackendUnavailable
        A backend asked for by name cannot run these tensors.

    Notes
    -----
    The vocab is walked in chunks: one ``(tokens x chunk)`` buffer per side of at most
    ``LINEAR_BUFFER_BYTES`` (28 MiB), written by ``out=`` matmuls and reused from chunk to chunk, plus
    ``(tokens, chunks)`` float32 statistics. kl, reverse_kl and the power kinds merge the chunks' own
    divergences exactly (the chain rule over each chunk's share of P and Q): one matmul per side. js and tv
    need the rows' normalisers first, so they compute each chunk twice, the second time through a row kernel
    that sums the chunk's terms against the rows' log-normalisers. The backward recomputes each chunk and turns
    it into its gradient with the divergence backward kernel (exact per entry given the rows' statistics),
    accumulating grad_hidden in float32 and grad_weight / grad_bias chunk by chunk.

    Gradients flow to both hidden states, weights and biases; a side without gradients (the frozen reference)
    costs only its projections. A logit scale without a cap costs nothing (it folds into the temperature and
    the matmuls' ``alpha``); a soft cap makes the kernels' logits float32 and adds elementwise passes per
    chunk.
    """
    _check_kind(kind, alpha)
    temperature = check.positive_float("temperature", temperature)
    logit_scale = _per_side("logit_scale", logit_scale, check.positive_float)
    softcap = _per_side("softcap", softcap, _optional_cap)
    _check_head("p", hidden_p, weight_p, bias_p)
    _check_head("q", hidden_q, weight_q, bias_q)
    check.same_device("hidden_q", hidden_q, "hidden_p", hidden_p)
    if hidden_p.shape[:-1] != hidden_q.shape[:-1]:
        raise ValueError(
            f"hidden_p and hidden_q must have the same leading shape, got {tuple(hidden_p.shape)} and "
            f"{tuple(hidden_q.shape)}"
        )
    if weight_p.shape[0] != weight_q.shape[0] or weight_p.shape[0] == 0:
        raise ValueError(
            f"weight_p and weight_q must have the same vocab size V >= 1, got {weight_p.shape[0]} and "
            f"{weight_q.shape[0]}"
        )
    lead = hidden_p.shape[:-1]
    mask = _check_mask(mask, lead, "hidden_p", hidden_p, "without its last dim")
    mask = None if mask is None else mask.reshape(-1).contiguous()
    name = _backend.select("f_divergence", backend, hidden_p.device)
    flat_p = hidden_p.reshape(-1, hidden_p.shape[-1])
    flat_q = hidden_q.reshape(-1, hidden_q.shape[-1])
    if name == "torch":
        logits = [
            reference.head_logits(h, w, b, logit_scale=s, softcap=c)
            for h, w, b, s, c in (
                (flat_p, weight_p, bias_p, logit_scale[0], softcap[0]),
                (flat_q, weight_q, bias_q, logit_scale[1], softcap[1]),
            )
        ]
        out = reference.f_divergence(logits[0], logits[1], kind, alpha=alpha, temperature=temperature, mask=mask)
        return out.view(lead)
    # the kernels take both sides' logits in one dtype: the wider one, float32 where a soft cap is applied
    dtype = torch.promote_types(hidden_p.dtype, hidden_q.dtype)
    if softcap != (None, None):
        dtype = torch.promote_types(dtype, torch.float32)
    chunks = _vocab_chunks(flat_p.shape[0], weight_p.shape[0], dtype.itemsize, LINEAR_BUFFER_BYTES)
    kernel_t, transforms = _transforms(logit_scale, softcap, temperature)
    out = _LinearFDivergence.apply(
        flat_p, weight_p, bias_p, flat_q, weight_q, bias_q, mask, kind, alpha, kernel_t, name, chunks, transforms, dtype
    )
    return out.view(lead)
