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
    if mask is not None:
        check.tensor("mask", mask)
        if mask.shape != lead:
            raise ValueError(f"mask must have shape {tuple(lead)} (logits_p without its vocab dim), got "
                             f"{tuple(mask.shape)}")
        check.same_device("mask", mask, "logits_p", logits_p)
        mask = mask if mask.dtype == torch.bool else mask != 0
    name = _backend.select("f_divergence", backend, logits_p.device)
    if name == "torch":
        return reference.f_divergence(logits_p, logits_q, kind, alpha=alpha, temperature=temperature, mask=mask)
    flat_mask = None if mask is None else mask.reshape(-1).contiguous()
    out, _ = _kernels(name).f_divergence(_rows(logits_p, vocab), _rows(logits_q, vocab), flat_mask, kind,
                                         float(alpha) if alpha is not None else 0.0, float(temperature))
    return out.view(lead)
