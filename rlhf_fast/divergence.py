"""f-divergences between the softmax distributions of two sets of logits, per position, from raw logits.

    d = rf.f_divergence(policy_logits, ref_logits, "kl", temperature=0.7, mask=mask)   # (..., V) -> (...) fp32

Kinds (P = softmax(logits_p / T), Q = softmax(logits_q / T), sums over the vocab):
kl = sum P log(P/Q); reverse_kl = sum Q log(Q/P); js = KL(P||M)/2 + KL(Q||M)/2, M = (P+Q)/2; tv = sum |P-Q| / 2;
hellinger = 1 - sum sqrt(PQ); chi2 = sum (P-Q)^2 / Q; alpha = (sum P^a Q^(1-a) - 1) / (a(a-1)), a = alpha not in {0, 1}.
"""
from __future__ import annotations

import math

import torch

from . import _validate as check
from . import backend as _backend
from . import reference

KINDS = reference.F_DIVERGENCES


def _kernels(name: str):
    return _backend.kernels(name, "divergence")


def _check_kind(kind, alpha):
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "alpha":
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise ValueError(f"alpha must be a finite float for kind='alpha', got {alpha!r}")
        if alpha in (0, 1):
            raise ValueError(f"alpha must not be 0 or 1 (the alpha-divergence is undefined there; use kind='kl' or "
                             f"'reverse_kl' for those limits), got {alpha!r}")
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


def f_divergence(logits_p, logits_q, kind, *, alpha=None, temperature=1.0, mask=None, backend=None):
    """Per-position f-divergence between P = softmax(logits_p / T) and Q = softmax(logits_q / T).

    logits_p, logits_q: (..., V) float (float32, bfloat16, float16, float64; promoted to a common dtype), V >= 1;
    mask: (...) bool/int/float (nonzero = valid) or None: masked positions give 0 and no gradient.
    Returns (...) float32 (float64 for float64 inputs on the torch backend). Differentiable in both logits (the
    gradients come back in the logits' dtype). Vocab entries where both logits are -inf are absent (padded vocab).
    `alpha` is required for kind='alpha' and rejected for the other kinds.
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
    out, _ = _backend.call(_kernels(name).f_divergence, _rows(logits_p, vocab), _rows(logits_q, vocab), flat_mask,
                           kind, float(alpha) if alpha is not None else 0.0, float(temperature))
    return out.view(lead)


# ---------------------------------------------------------------- linear_f_divergence

# one-pass kinds whose chunk values merge exactly (chain rule); js and tv need P and Q themselves (a second pass)
_POWER = {"hellinger": (0.5, -1.0), "chi2": (2.0, 1.0)}


def _power_params(kind, alpha):
    if kind == "alpha":
        return float(alpha), 1.0 / (alpha * (alpha - 1.0))
    return _POWER[kind]


def _chunk_logits(hidden, weight, bias, start, end):
    return torch.nn.functional.linear(hidden, weight[start:end], None if bias is None else bias[start:end])


def _weighted_sum(weights, values):
    """sum_c weights * values over chunks (last dim), where a chunk of zero weight adds 0 (its values may be nan)."""
    return torch.where(weights > 0, weights * values, torch.zeros_like(values)).sum(-1)


def _second_pass_terms(logits_p, logits_q, lse_p, lse_q, kind, temperature):
    """js: (sum of the js terms, sum P log(P/M)); tv: (sum |P - Q| / 2, sum P sign(P - Q)) over one chunk, fp32."""
    lp = logits_p.float() / temperature - lse_p[:, None]
    lq = logits_q.float() / temperature - lse_q[:, None]
    p, q = lp.exp(), lq.exp()
    if kind == "tv":
        sign = torch.sign(p - q)
        return 0.5 * (p - q).abs().sum(-1), (p * sign).sum(-1)
    lm = torch.logaddexp(lp, lq) - math.log(2.0)
    k_p = torch.where(p > 0, p * (lp - lm), torch.zeros_like(p))
    k_q = torch.where(q > 0, q * (lq - lm), torch.zeros_like(q))
    return 0.5 * (k_p + k_q).sum(-1), k_p.sum(-1)


class _LinearFDivergence(torch.autograd.Function):
    """Chunked f-divergence of lm-head logits; the backward recomputes each chunk and feeds the divergence
    backward kernel the whole rows' statistics (its per-entry gradient needs only them and the entry)."""

    @staticmethod
    def forward(ctx, hidden_p, weight_p, bias_p, hidden_q, weight_q, bias_q, mask, kind, alpha, temperature, name,
                chunks):
        ops = _backend.kernels(name, "divergence")
        first_kind = "kl" if kind in ("js", "tv") else kind
        lse_p, lse_q, values, aux = [], [], [], []
        for start, end in chunks:
            a = _chunk_logits(hidden_p, weight_p, bias_p, start, end)
            b = _chunk_logits(hidden_q, weight_q, bias_q, start, end)
            out, stats = ops.f_divergence(a, b, None, first_kind, float(alpha or 0.0), temperature)
            lse_p.append(stats[:, 0])
            lse_q.append(stats[:, 1])
            values.append(out)
            aux.append(stats[:, 2])
            del a, b
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
            value = torch.zeros_like(row_lse_p)
            statistic = torch.zeros_like(row_lse_p)
            for start, end in chunks:
                a = _chunk_logits(hidden_p, weight_p, bias_p, start, end)
                b = _chunk_logits(hidden_q, weight_q, bias_q, start, end)
                term, stat = _second_pass_terms(a, b, row_lse_p, row_lse_q, kind, temperature)
                value += term
                statistic += stat
                del a, b
        else:
            e, scale = _power_params(kind, alpha)
            terms = (e * (lse_p_c - row_lse_p[:, None]) + (1 - e) * (lse_q_c - row_lse_q[:, None])
                     + torch.log(torch.stack(aux, -1)))
            absent = (w == 0) & (v == 0)  # a chunk where both logits are -inf throughout
            log_s = torch.logsumexp(torch.where(absent, torch.full_like(terms, -math.inf), terms), -1)
            value = scale * torch.expm1(log_s)
            statistic = log_s.exp()
        if mask is not None:
            value = torch.where(mask, value, torch.zeros_like(value))
        stats = torch.stack([row_lse_p, row_lse_q, statistic], -1).float().contiguous()
        value = value.float().contiguous()
        ctx.save_for_backward(hidden_p, weight_p, bias_p, hidden_q, weight_q, bias_q, mask, value, stats)
        ctx.options = kind, float(alpha or 0.0), temperature, name, chunks
        return value

    @staticmethod
    def backward(ctx, grad_out):
        hidden_p, weight_p, bias_p, hidden_q, weight_q, bias_q, mask, value, stats = ctx.saved_tensors
        kind, alpha, temperature, name, chunks = ctx.options
        ops = _backend.kernels(name, "divergence")
        need = ctx.needs_input_grad
        need_p, need_q = any(need[0:3]), any(need[3:6])
        grads = [None] * 6
        if need[0]:
            grads[0] = torch.zeros(hidden_p.shape, dtype=torch.float32, device=hidden_p.device)
        if need[3]:
            grads[3] = torch.zeros(hidden_q.shape, dtype=torch.float32, device=hidden_q.device)
        for index in (1, 2, 4, 5):
            source = (weight_p, bias_p, None, weight_q, bias_q)[index - 1]
            if need[index]:
                grads[index] = torch.empty_like(source)
        grad_out = grad_out.float().contiguous()
        for start, end in chunks:
            a = _chunk_logits(hidden_p, weight_p, bias_p, start, end)
            b = _chunk_logits(hidden_q, weight_q, bias_q, start, end)
            grad_a, grad_b = ops.f_divergence_backward(grad_out, a, b, mask, value, stats, kind, alpha, temperature,
                                                       need_p, need_q)
            del a, b
            for grad, hidden, weight, offset in ((grad_a, hidden_p, weight_p, 0), (grad_b, hidden_q, weight_q, 3)):
                if not (need_p if offset == 0 else need_q):
                    continue
                if need[offset]:
                    grads[offset].addmm_(grad.float(), weight[start:end].float())
                if need[offset + 1]:
                    grads[offset + 1][start:end] = (grad.T @ hidden).to(weight.dtype)
                if need[offset + 2]:
                    grads[offset + 2][start:end] = grad.float().sum(0).to(grads[offset + 2].dtype)
        for index, source in ((0, hidden_p), (3, hidden_q)):
            if grads[index] is not None:
                grads[index] = grads[index].to(source.dtype)
        return (*grads, None, None, None, None, None, None)


def _check_head(name, hidden, weight, bias):
    check.floating(f"hidden_{name}", hidden)
    check.floating(f"weight_{name}", weight)
    if weight.dim() != 2 or hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden_{name} must be (..., H) and weight_{name} (V, H); got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    check.same_device(f"weight_{name}", weight, f"hidden_{name}", hidden)
    dtypes = {hidden.dtype, weight.dtype} | ({bias.dtype} if bias is not None else set())
    if len(dtypes) != 1:
        raise TypeError(f"hidden_{name}, weight_{name} and bias_{name} must share one dtype, got "
                        f"{sorted(str(d) for d in dtypes)}; cast them with .to(hidden_{name}.dtype)")
    if bias is not None:
        check.same_device(f"bias_{name}", bias, f"hidden_{name}", hidden)
        if bias.shape != weight.shape[:1]:
            raise ValueError(f"bias_{name} must be (V,) = ({weight.shape[0]},), got {tuple(bias.shape)}")


def linear_f_divergence(hidden_p, weight_p, hidden_q, weight_q, kind, *, bias_p=None, bias_q=None, alpha=None,
                        temperature=1.0, mask=None, backend=None):
    """`f_divergence` between the lm-head logits of two models, never holding either model's full logits.

    P = softmax((hidden_p @ weight_p.T + bias_p) / T), Q likewise from the q side; hidden_p (..., H_p) and
    hidden_q (..., H_q) with the same leading shape, weight_p (V, H_p), weight_q (V, H_q). Returns (...) float32,
    the same kinds and semantics as `f_divergence` (mask: (...) nonzero = valid; masked positions 0 with no
    gradient). Gradients flow to both hidden states, both weights and both biases; a frozen side (tensors
    without grad, e.g. the reference model) costs no gradient work.

    The vocab is walked in chunks: at most one (tokens x chunk) block of logits per side is alive, about 64 MiB
    each (the chunk of `linear_logprobs` for two sides), plus (tokens, chunks) float32 statistics. kl,
    reverse_kl and the power kinds merge the chunks' own divergences exactly (chain rule over the chunks'
    shares of P and Q): one matmul per side; js and tv need the rows' normalisers first, so they compute each
    chunk twice. The backward recomputes each chunk's logits, turns them into their gradient with the
    divergence backward kernel (the rows' statistics make the per-entry gradient exact), and accumulates
    grad_hidden in float32 and grad_weight / grad_bias chunk by chunk.
    """
    _check_kind(kind, alpha)
    temperature = check.positive_float("temperature", temperature)
    _check_head("p", hidden_p, weight_p, bias_p)
    _check_head("q", hidden_q, weight_q, bias_q)
    check.same_device("hidden_q", hidden_q, "hidden_p", hidden_p)
    if hidden_p.shape[:-1] != hidden_q.shape[:-1]:
        raise ValueError(f"hidden_p and hidden_q must have the same leading shape, got {tuple(hidden_p.shape)} and "
                         f"{tuple(hidden_q.shape)}")
    if weight_p.shape[0] != weight_q.shape[0] or weight_p.shape[0] == 0:
        raise ValueError(f"weight_p and weight_q must have the same vocab size V >= 1, got {weight_p.shape[0]} and "
                         f"{weight_q.shape[0]}")
    lead = hidden_p.shape[:-1]
    mask = _check_mask(mask, lead, "hidden_p", hidden_p, "without its last dim")
    mask = None if mask is None else mask.reshape(-1).contiguous()
    name = _backend.select("f_divergence", backend, hidden_p.device)
    flat_p = hidden_p.reshape(-1, hidden_p.shape[-1])
    flat_q = hidden_q.reshape(-1, hidden_q.shape[-1])
    if name == "torch":
        logits_p = torch.nn.functional.linear(flat_p, weight_p, bias_p)
        logits_q = torch.nn.functional.linear(flat_q, weight_q, bias_q)
        out = reference.f_divergence(logits_p, logits_q, kind, alpha=alpha, temperature=temperature, mask=mask)
        return out.view(lead)
    from .logprobs import _vocab_chunks
    chunks = _vocab_chunks(flat_p.shape[0], weight_p.shape[0], 2 * max(flat_p.element_size(), flat_q.element_size()))
    out = _LinearFDivergence.apply(flat_p, weight_p, bias_p, flat_q, weight_q, bias_q, mask, kind, alpha,
                                   temperature, name, chunks)
    return out.view(lead)
