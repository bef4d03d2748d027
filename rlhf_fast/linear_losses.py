"""Fused linear policy loss: the PPO / GRPO clipped objective straight from the lm_head input.

`linear_ppo_policy_loss(hidden, weight, labels, old_logp, advantages, mask)` is `ppo_policy_loss` (plus the
entropy bonus and the KL-to-reference term) of the log-probs of the logits hidden @ weight.T + bias, without the
(N, V) logits and without recomputing them in the backward. The tokens are walked in chunks whose
(chunk, V) logits block holds at most CHUNK_BYTES: full rows, so each row's log-sum-exp, log-prob and entropy
are exact in one pass, and since the loss's derivative with respect to a token's log-prob and entropy is known
as soon as they are (the aggregation weights come from the mask up front), the block is turned into its
gradient on the spot and used for grad_hidden and grad_weight. Three lm-head-sized matmuls per update, as eager
(logits, grad_hidden, grad_weight); the backward only scales the gradients the forward left.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from . import _ops, reference
from . import _validate as check
from . import backend as _backend
from . import logprobs as _logprobs
from . import losses as _losses

# One (token-chunk x V) block of logits, in the inputs' dtype, holds at most this many bytes.
CHUNK_BYTES = 128 * 2**20

# Order of the per-chunk sums the forward accumulates: the three loss terms, then the three token means.
_SUMS = ("pg_loss", "entropy", "kl", "clipfrac", "approx_kl", "ratio_mean")


def agg_weights(mask, shape, mode, dtype, device, normalizer=None, horizon=None):
    """Per-token weights w (rows, T) with agg_loss(x, mask, mode, normalizer=, horizon=) = Σ w·x, from the mask
    alone (no host sync): token-mean m / Σm; token-sum m; seq-mean-token-sum m / S; seq-mean-token-mean
    m / (Σ_t m · S); seq-mean-token-sum-norm m / (S · T); S = rows with a valid token. `normalizer` replaces
    Σm, 1 or S, `horizon` replaces T, as in agg_loss.
    """
    steps = shape[1]
    m = torch.ones(shape, dtype=dtype, device=device) if mask is None else mask.reshape(shape).to(dtype)
    counts = m.sum(-1, keepdim=True)
    if normalizer is None:
        normalizer = {"token-mean": counts.sum().clamp(min=1), "token-sum": 1}.get(
            mode, (counts > 0).sum().clamp(min=1)
        )
    if mode == "seq-mean-token-mean":
        m = m / counts.clamp(min=1)
    if mode == "seq-mean-token-sum-norm":
        normalizer = normalizer * (max(steps, 1) if horizon is None else horizon)
    return m / normalizer


def _kl_grad(logp, ref_logp, kind):
    """d kl_penalty(logp, ref_logp, kind) / d logp, elementwise (the value comes from the family's kl_penalty)."""
    diff = logp - ref_logp
    if kind.endswith("+") or kind == "k2":  # straight-through kinds take the gradient of k2
        return diff
    if kind == "k1":
        return torch.ones_like(diff)
    if kind == "abs":
        return diff.sign()
    d = (-diff).clamp(-20.0, 20.0)
    expm1 = torch.expm1(d)
    live = (diff.abs() <= 20.0) & ((expm1 - d).abs() <= 10.0)  # where neither of k3's clamps cuts the gradient
    return torch.where(live, -expm1, torch.zeros_like(diff))


def _token_terms(logp, entropy, chunk, opts):
    """The loss terms of one chunk's tokens and the loss's derivatives with respect to their logp and entropy.

    Returns (sums (len(_SUMS),), grad_logp (n,), grad_entropy (n,) or None).
    """
    old, adv, weight, mean_weight, ref = chunk
    log_ratio = (logp - old).clamp(-20.0, 20.0)
    ratio = log_ratio.exp()
    pg_plain = -adv * ratio
    pg_clipped = -adv * ratio.clamp(1.0 - opts["clip_low"], 1.0 + opts["clip_high"])
    clipped = pg_clipped > pg_plain  # the ratio is outside the clip range: no gradient
    pg = torch.maximum(pg_plain, pg_clipped)
    live = ~clipped & ((logp - old).abs() <= 20.0)
    if opts["dual_clip"] is not None:
        floor = -adv * opts["dual_clip"]
        dual = (adv < 0) & (floor < pg)
        pg = torch.where(dual, floor, pg)
        live = live & ~dual
    grad_logp = torch.where(live, pg_plain, torch.zeros_like(pg))
    if ref is not None:
        kl = opts["kl_value"](logp, ref.to(logp.dtype), opts["kl_kind"])
        grad_logp = grad_logp + opts["kl_coef"] * _kl_grad(logp, ref, opts["kl_kind"])
    else:
        kl = torch.zeros_like(pg)
    sums = torch.stack(
        [
            pg * weight,
            entropy * weight,
            kl * weight,
            clipped.to(pg.dtype) * mean_weight,
            -log_ratio * mean_weight,
            ratio * mean_weight,
        ]
    ).sum(-1)
    grad_entropy = None if opts["entropy_coef"] == 0 else -opts["entropy_coef"] * weight
    return sums, grad_logp * weight, grad_entropy


class _KernelRows:
    """Row math of the kernel backends: rlhf_fast's log-prob forward and in-place backward over one block."""

    def __init__(self, name):
        self.ops = _ops.kernels(name, "logprobs")

    def forward(self, logits, labels, temperature, ignore_index):
        logp, entropy, lse = self.ops.logprobs_forward(logits[None], labels[None], temperature, ignore_index)
        return logp[0], entropy[0], lse[0]

    def backward_(self, grad_logp, grad_entropy, logits, labels, lse, entropy, temperature, ignore_index):
        rows = lambda t: None if t is None else t.to(torch.float32).contiguous()[None]  # noqa: E731
        self.ops.logprobs_backward_(
            rows(grad_logp),
            rows(grad_entropy),
            logits[None],
            labels[None],
            lse[None],
            entropy[None],
            temperature,
            ignore_index,
        )


class _TorchRows:
    """The same row math in torch, in float32 (float64 for float64 logits)."""

    @staticmethod
    def _scaled(logits, temperature):
        return logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature

    def forward(self, logits, labels, temperature, ignore_index):
        scaled = self._scaled(logits, temperature)
        lse = torch.logsumexp(scaled, -1)
        log_p = scaled - lse[:, None]
        p = log_p.exp()
        entropy = -(p * log_p.masked_fill(p == 0, 0)).sum(-1)
        ignored = labels == ignore_index
        outside = ~ignored & ((labels < 0) | (labels >= logits.shape[-1]))  # NaN, as the kernels give
        index = labels.masked_fill(ignored | outside, 0)[:, None]
        logp = log_p.gather(-1, index)[:, 0].masked_fill(ignored, 0).masked_fill(outside, float("nan"))
        return logp, entropy, lse

    def backward_(self, grad_logp, grad_entropy, logits, labels, lse, entropy, temperature, ignore_index):
        """d(logits) = (onehot - p) g_logp / T - p (log p + H) g_entropy / T, written over the logits."""
        log_p = self._scaled(logits, temperature) - lse[:, None]
        p = log_p.exp()
        grad = -p * grad_logp[:, None]
        if grad_entropy is not None:
            grad -= p * (log_p.masked_fill(p == 0, 0) + entropy[:, None]) * grad_entropy[:, None]
        skipped = (labels == ignore_index) | (labels < 0) | (labels >= logits.shape[-1])
        grad.scatter_add_(1, labels.masked_fill(skipped, 0)[:, None], grad_logp.masked_fill(skipped, 0)[:, None])
        logits.copy_(grad / temperature)


def _token_chunks(tokens, vocab, itemsize):
    """(start, end) token ranges: as few as keep each (chunk, V) block within CHUNK_BYTES, of even sizes (256
    tokens at V=151936 fp32: two blocks of 78 MB rather than 128 MB + 22 MB)."""
    most = max(1, CHUNK_BYTES // max(1, vocab * itemsize))
    count = -(-tokens // most)  # ceil
    step = -(-tokens // count) if tokens else 1
    return [(start, min(tokens, start + step)) for start in range(0, tokens, step)]


def _fused_pass(hidden, weight, bias, labels, per_token, opts, rows, needs):
    """Walks the token chunks: the loss sums (len(_SUMS),) and, for the inputs flagged in `needs`, the gradients
    of the loss with respect to hidden, weight and bias (None where not needed)."""
    need_hidden, need_weight, need_bias = needs
    temperature, ignore_index = opts["temperature"], opts["ignore_index"]
    grad_hidden = torch.empty_like(hidden) if need_hidden else None
    # grad_weight and grad_bias accumulate over the chunks in float32 (float64 for float64 weights).
    accumulate = torch.promote_types(weight.dtype, torch.float32)
    low_precision = accumulate != weight.dtype
    grad_weight = torch.zeros(weight.shape, dtype=accumulate, device=weight.device) if need_weight else None
    grad_bias = torch.zeros(bias.shape, dtype=accumulate, device=bias.device) if need_bias else None
    sums = None
    for start, end in _token_chunks(hidden.shape[0], weight.shape[0], hidden.element_size()):
        chunk_hidden, chunk_labels = hidden[start:end], labels[start:end]
        logits = torch.nn.functional.linear(chunk_hidden, weight, bias)
        logp, entropy, lse = rows.forward(logits, chunk_labels, temperature, ignore_index)
        chunk_sums, grad_logp, grad_entropy = _token_terms(
            logp, entropy, [None if t is None else t[start:end] for t in per_token], opts
        )
        sums = chunk_sums if sums is None else sums + chunk_sums
        if any(needs):
            grad_logp = grad_logp.masked_fill(chunk_labels == ignore_index, 0)
            rows.backward_(grad_logp, grad_entropy, logits, chunk_labels, lse, entropy, temperature, ignore_index)
            if need_hidden:
                torch.mm(logits, weight, out=grad_hidden[start:end])
            if need_weight:
                if low_precision:
                    grad_weight += logits.t() @ chunk_hidden
                else:
                    torch.addmm(grad_weight, logits.t(), chunk_hidden, out=grad_weight)
            if need_bias:
                grad_bias += logits.sum(0, dtype=accumulate)
        del logits  # before the next block is allocated: one alive at a time
    if sums is None:  # no tokens
        sums = torch.zeros(len(_SUMS), dtype=per_token[0].dtype, device=hidden.device)
    if grad_weight is not None:
        grad_weight = grad_weight.to(weight.dtype)
    if grad_bias is not None:
        grad_bias = grad_bias.to(bias.dtype)
    return sums, (grad_hidden, grad_weight, grad_bias)


def _loss_of(sums, opts):
    pg, entropy, kl = sums[0], sums[1], sums[2]
    return pg - opts["entropy_coef"] * entropy + opts["kl_coef"] * kl


class _LinearPolicyLoss(torch.autograd.Function):
    """Forward: the fused pass (loss sums and the gradients); backward: those gradients times grad_loss."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, per_token, opts, rows):
        sums, grads = _fused_pass(hidden, weight, bias, labels, per_token, opts, rows, ctx.needs_input_grad[:3])
        ctx.grads = grads
        ctx.mark_non_differentiable(sums)
        return _loss_of(sums, opts), sums

    @staticmethod
    def backward(ctx, grad_loss, _grad_sums):
        # in place: the buffers are this node's alone and released here (no second (V, H) gradient at once)
        scaled = tuple(None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in ctx.grads)
        ctx.grads = None
        return (*scaled, None, None, None, None)


def _finite(label, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{label} must be a finite float, got {value!r}")
    return float(value)


def linear_ppo_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    agg: str = "token-mean",
    normalizer: float | None = None,
    horizon: float | None = None,
    entropy_coef: float = 0.0,
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_kind: str = "k3",
    ignore_index: int = -100,
    check_labels: bool | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`ppo_policy_loss` of the log-probs of the lm-head logits ``hidden @ weight.T + bias``, fused with the head.

    Parameters
    ----------
    hidden : torch.Tensor
        ``(..., T, H)`` float: the lm head's input.
    weight : torch.Tensor
        ``(V, H)``, an lm head's weight, the same dtype and device as `hidden`.
    labels : torch.Tensor
        ``(..., T)`` int: the sampled tokens.
    old_logp : torch.Tensor
        ``(..., T)`` log-probs at rollout time; a constant.
    advantages : torch.Tensor
        ``(..., T)`` A; a constant.
    mask : torch.Tensor or None
        ``(..., T)``, nonzero = valid; None: every token.
    bias : torch.Tensor or None
        ``(V,)``, same dtype.
    temperature : float
        Positive finite float T: ``logp = log softmax(logits / T)[label]``.
    clip_low : float
        As in `ppo_policy_loss`.
    clip_high : float
        As in `ppo_policy_loss`.
    dual_clip : float or None
        As in `ppo_policy_loss`.
    agg : str
        Aggregation mode of every term, as `agg_loss`'s `mode` (every verl 0.9.1 mode).
    normalizer : float or None
        As in `agg_loss`.
    horizon : float or None
        As in `agg_loss`.
    entropy_coef : float
        Finite float: weight of the entropy bonus.
    ref_logp : torch.Tensor or None
        ``(..., T)`` the reference model's log-probs of the labels; a constant; needed when `kl_coef` != 0.
    kl_coef : float
        Finite float: weight of the KL-to-reference term.
    kl_kind : str
        KL estimator, any `kl_penalty` kind (the straight-through ``"k1+"`` / ``"k3+"`` included).
    ignore_index : int
        Label of positions whose log-prob is 0 (as in `logprobs`).
    check_labels : bool or None
        As in `logprobs`; the check runs on the labels before the kernels (the output is a loss, not
        log-probs).
    backend : str or None
        ``"auto" | "triton" | "cuda" | "cpu" | "torch"``; None: ``RLHF_FAST_BACKEND`` or ``"auto"``.

    Returns
    -------
    loss : torch.Tensor
        0-dim float32 (float64 for float64 inputs on the torch backend):
        ``agg(pg) - entropy_coef · agg(H) + kl_coef · agg(kl_penalty(logp, ref_logp, kl_kind))``.
    stats : dict of str to torch.Tensor
        0-dim tensors, no host sync: ``"clipfrac"``, ``"approx_kl"``, ``"ratio_mean"`` (token means over the
        valid tokens, as `ppo_policy_loss`), and the loss's terms ``"pg_loss"`` = agg(pg), ``"entropy"`` =
        agg(H) and, when `ref_logp` is given, ``"kl"`` = agg(kl_penalty), so that
        ``loss = pg_loss - entropy_coef · entropy + kl_coef · kl``.

    Raises
    ------
    TypeError
        Non-float tensors or mismatched hidden / weight / bias dtypes, non-integer labels, a non-int
        `ignore_index`.
    ValueError
        A `hidden` with fewer than two dims, shapes or devices that do not match ``hidden.shape[:-1]``, a
        `kl_coef` != 0 without `ref_logp`, a non-finite coefficient, any bad value `ppo_policy_loss` rejects,
        and labels out of range when they are checked.
    rlhf_fast.BackendUnavailable
        A backend asked for by name cannot run these tensors.

    Notes
    -----
    H is the entropy of ``softmax(logits / T)``; ratio, pg and the aggregation are exactly those of
    `ppo_policy_loss` / `agg_loss` (rows without a valid token are left out of every seq-mean mode; nothing
    valid gives 0).

    Gradients flow to hidden, weight and bias (those that require them; a frozen weight costs no
    grad_weight matmul). They are computed during the forward, one ``(chunk, V)`` block of logits of at most
    ``CHUNK_BYTES`` (128 MiB) at a time; the backward only scales them by the upstream gradient. Per update
    that is three lm-head-sized matmuls, as eager (logits, grad_hidden, grad_weight), and nothing of size
    ``(N, V)`` is allocated. `old_logp`, `advantages` and `ref_logp` are constants.

    The row math (log-sum-exp, log-prob, entropy, the logits' gradient) runs on the log-prob kernels of the
    cpu / cuda / triton backends, or in torch on backend ``"torch"`` (log_softmax in float32, float64 for
    float64 inputs); the matmuls are torch's on every backend.
    """
    _logprobs.check_linear(hidden, weight, bias)
    if hidden.dim() < 2:
        raise ValueError(f"hidden must be (..., T, H), got shape {tuple(hidden.shape)}")
    lead = hidden.shape[:-1]
    names = ("old_logp", "advantages") + (() if ref_logp is None else ("ref_logp",))
    tensors = (old_logp, advantages) + (() if ref_logp is None else (ref_logp,))
    tensors, mask = _losses._loss_inputs(names, tensors, mask)
    if tensors[0].shape != lead:
        raise ValueError(
            f"old_logp has shape {tuple(tensors[0].shape)} but hidden.shape[:-1] is {tuple(lead)}; they must match"
        )
    check.same_device("old_logp", tensors[0], "hidden", hidden)
    check.positive_float("temperature", temperature)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    _logprobs._check_labels(labels, lead, hidden.device, "hidden.shape[:-1]", check_labels)
    _logprobs._check_label_range(labels, weight.shape[0], ignore_index, check_labels)
    agg = _losses._check_mode("agg", agg)
    normalizer = _losses._check_divisor("normalizer", normalizer)
    horizon = _losses._check_divisor("horizon", horizon)
    opts: dict[str, Any] = {
        "temperature": float(temperature),
        "ignore_index": ignore_index,
        "clip_low": _losses._check_clip("clip_low", clip_low),
        "clip_high": _losses._check_clip("clip_high", clip_high),
        "dual_clip": _losses._check_dual_clip(dual_clip),
        "kl_kind": _losses._check_kind(kl_kind),
        "entropy_coef": _finite("entropy_coef", entropy_coef),
        "kl_coef": _finite("kl_coef", kl_coef),
    }
    if opts["kl_coef"] != 0 and ref_logp is None:
        raise ValueError("kl_coef != 0 needs ref_logp (the reference model's log-probs of the labels)")

    name = _backend.select("linear_ppo_policy_loss", backend, hidden.device)
    rows = _TorchRows() if name == "torch" else _KernelRows(name)
    opts["kl_value"] = reference.kl_penalty if name == "torch" else _ops.kernels(name, "losses").kl_penalty
    compute = torch.float64 if name == "torch" and hidden.dtype == torch.float64 else torch.float32
    shape = (lead[:-1].numel(), lead[-1])
    valid = torch.ones(shape, dtype=torch.bool, device=hidden.device) if mask is None else mask.reshape(shape)
    # Masked tokens' inputs are selected out (they may hold inf / nan) and weigh 0.
    clean = [torch.where(valid, t.reshape(shape).to(compute), 0).reshape(-1) for t in tensors]
    weights = agg_weights(mask, shape, agg, compute, hidden.device, normalizer, horizon).reshape(-1)
    mean_weights = agg_weights(mask, shape, "token-mean", compute, hidden.device).reshape(-1)
    per_token = [clean[0], clean[1], weights, mean_weights, clean[2] if ref_logp is not None else None]

    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1).long()
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias)):
        loss, sums = _LinearPolicyLoss.apply(flat_hidden, weight, bias, flat_labels, per_token, opts, rows)
    else:
        sums, _ = _fused_pass(flat_hidden, weight, bias, flat_labels, per_token, opts, rows, (False,) * 3)
        loss = _loss_of(sums, opts)
    stats = dict(zip(_SUMS, sums.detach().unbind()))
    if ref_logp is None:
        del stats["kl"]
    return loss, stats
