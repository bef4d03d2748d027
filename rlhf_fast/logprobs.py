"""Log-probs and entropies of softmax(logits / temperature): fused log-softmax + gather + entropy.

`logprobs(logits, labels)` gives log p(label) per position (and, with return_entropy=True, the entropy) in one
pass over the vocab, float32 whatever the logits' dtype, without the (N, V) float32 copy that
`log_softmax(logits.float()).gather(...)` makes. The backward writes d(logits) in the logits' dtype in one pass
(into the logits themselves with inplace_backward=True). `linear_logprobs(hidden, weight, labels)` does the same
from the lm_head input, never holding the full (N, V) logits.

Every op takes ``backend=`` (``auto | triton | cuda | cpu | torch``; see rlhf_fast.backend).
"""
from __future__ import annotations

import math

import torch

from . import _validate as check
from . import backend as _backend
from . import reference

# linear_logprobs holds one (tokens x vocab-chunk) block of logits at a time, at most this many bytes.
LINEAR_CHUNK_BYTES = 128 * 2**20
# Labels of a vocab slice are shifted into (-V, V); this marks ignored positions among them.
_SLICE_IGNORE = -(2**62)


def _kernels(name: str):
    return _backend.kernels(name, "logprobs")


def _check_options(temperature, ignore_index):
    check.positive_float("temperature", temperature)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")


def _check_logits(logits):
    check.floating("logits", logits)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must be (..., V) with V >= 1, got shape {tuple(logits.shape)}")


def _check_labels(labels, lead, device, vocab, ignore_index, lead_name):
    """labels: integer, shaped `lead`, on `device`, each in [0, vocab) or ignore_index.

    The range check reads the labels on the host (one device sync for CUDA tensors). Under torch.compile it
    is left out, and a label out of range gives a NaN log-prob instead (the kernels never read past a row).
    """
    check.integer("labels", labels)
    if labels.shape != lead:
        raise ValueError(f"labels has shape {tuple(labels.shape)} but {lead_name} needs {tuple(lead)}")
    if labels.device != device:
        raise ValueError(f"labels is on {labels.device} but the logits are on {device}; move it with "
                         f"labels.to({device!r})")
    if torch.compiler.is_compiling() or labels.numel() == 0:
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        first = int(bad.reshape(-1).nonzero()[0])
        raise ValueError(f"labels must lie in [0, {vocab}) or equal ignore_index={ignore_index}; "
                         f"labels.reshape(-1)[{first}] = {int(labels.reshape(-1)[first])}")


def _as_rows(logits):
    """logits (..., V) as a 3-D (A, B, V) tensor with a contiguous last dim, a view whenever the leading dims
    fold into two strided ones (logits[:, :-1] of a (B, T, V) tensor does), else a contiguous copy."""
    if logits.shape[-1] > 1 and logits.stride(-1) != 1:
        logits = logits.contiguous()
    groups: list[list[int]] = []  # [size, stride] of leading dims that fold together
    for size, stride in zip(logits.shape[:-1], logits.stride()[:-1]):
        if size == 1:
            continue
        if groups and groups[-1][1] == stride * size:
            groups[-1] = [groups[-1][0] * size, stride]
        else:
            groups.append([size, stride])
    if len(groups) > 2:
        return logits.reshape(1, math.prod(logits.shape[:-1]), logits.shape[-1])
    sizes = [g[0] for g in groups]
    sizes = [1] * (2 - len(sizes)) + sizes
    return logits.reshape(sizes[0], sizes[1], logits.shape[-1])


def _per_row(grad):
    return None if grad is None else grad.float().contiguous()


class _InplaceBackward(torch.autograd.Function):
    """logprobs_forward whose backward writes d(logits) over the logits buffer and returns it."""

    @staticmethod
    def forward(ctx, logits, labels, temperature, ignore_index, name):
        logp, entropy, lse = _kernels(name).logprobs_forward(logits, labels, temperature, ignore_index)
        ctx.save_for_backward(logits, labels, lse, entropy)
        ctx.temperature, ctx.ignore_index, ctx.name = temperature, ignore_index, name
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(lse)
        return logp, entropy, lse

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, _grad_lse):
        logits, labels, lse, entropy = ctx.saved_tensors
        _kernels(ctx.name).logprobs_backward_(_per_row(grad_logp) if labels is not None else None,
                                              _per_row(grad_entropy), logits, labels, lse, entropy, ctx.temperature,
                                              ctx.ignore_index)
        return logits, None, None, None, None


def _forward(logits, labels, temperature, ignore_index, inplace_backward, name):
    """(logp, entropy) (...) fp32 from the kernels of backend `name`; labels may be None (entropy only)."""
    lead = logits.shape[:-1]
    rows = _as_rows(logits)
    row_labels = None if labels is None else labels.reshape(rows.shape[:2]).long().contiguous()
    if inplace_backward and rows.requires_grad and torch.is_grad_enabled():
        logp, entropy, _ = _InplaceBackward.apply(rows, row_labels, float(temperature), ignore_index, name)
    else:
        logp, entropy, _ = _backend.call(_kernels(name).logprobs_forward, rows, row_labels, float(temperature),
                                         ignore_index)
    return (None if labels is None else logp.view(lead)), entropy.view(lead)


def logprobs(logits, labels, *, temperature=1.0, ignore_index=-100, return_entropy=False, inplace_backward=False,
             backend=None):
    """log softmax(logits / temperature) at `labels`, and optionally the entropy of that softmax.

    logits: (..., V) float32 / bfloat16 / float16 / float64, any strides (rows need not be contiguous:
    `logits[:, :-1]` is read in place; only a non-contiguous last dim is copied). labels: (...) int.
    Returns logp (...) float32, or (logp, entropy) with return_entropy=True. Positions whose label is
    ignore_index get logp 0 and no gradient through logp; the entropy is computed at every position (mask it
    with your loss mask). Labels outside [0, V) raise ValueError (checked on the host: one device sync on CUDA).

    Gradients flow to the logits, in their dtype: d = (onehot - p) g_logp / T - p (log p + H) g_entropy / T.
    inplace_backward=True writes that gradient into the logits buffer itself (no second (N, V) tensor): the
    logits' values are destroyed by the backward, so nothing else may use them afterwards (autograd raises if
    another op saved them). The `torch` backend (the eager reference) ignores it.
    """
    _check_logits(logits)
    _check_options(temperature, ignore_index)
    _check_labels(labels, logits.shape[:-1], logits.device, logits.shape[-1], ignore_index, "logits.shape[:-1]")
    name = _backend.select("logprobs", backend, logits.device)
    if name == "torch":
        out = reference.logprobs(logits, labels, temperature=temperature, ignore_index=ignore_index,
                                 return_entropy=return_entropy)
        return tuple(t.float() for t in out) if return_entropy else out.float()
    logp, entropy = _forward(logits, labels, temperature, ignore_index, inplace_backward, name)
    return (logp, entropy) if return_entropy else logp


def entropy(logits, *, temperature=1.0, backend=None):
    """Entropy of softmax(logits / temperature) over the last dim: logits (..., V) -> (...) float32."""
    _check_logits(logits)
    _check_options(temperature, -100)
    name = _backend.select("entropy", backend, logits.device)
    if name == "torch":
        return reference.entropy(logits, temperature=temperature).float()
    return _forward(logits, None, temperature, -100, False, name)[1]


# ---------------------------------------------------------------- linear_logprobs


def _vocab_chunks(tokens, vocab, itemsize):
    chunk = max(1, min(vocab, LINEAR_CHUNK_BYTES // max(1, tokens * itemsize)))
    if chunk < vocab:
        chunk = max(128, chunk // 128 * 128)  # whole cache lines of the weight and the logits
    return [(start, min(vocab, start + chunk)) for start in range(0, vocab, chunk)]


def _last_dim_contiguous(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def _slice_labels(labels, ignore_index, start):
    """Labels relative to the vocab slice starting at `start` (outside the slice: no one-hot term)."""
    return torch.where(labels == ignore_index, torch.full_like(labels, _SLICE_IGNORE), labels - start)


def _slice_logits(hidden, weight, bias, start, end):
    return torch.nn.functional.linear(hidden, weight[start:end], None if bias is None else bias[start:end])


def _chunked_linear_forward(hidden, weight, bias, labels, temperature, ignore_index, chunks, ops):
    """(logp, entropy, lse) (tokens,) fp32 from one vocab chunk of logits at a time, merged exactly: lse over the
    chunks' lse, entropy = lse - sum_c e^(lse_c - lse) E_c[z] with E_c[z] = lse_c - H_c."""
    if len(chunks) == 1:  # the whole vocab at once: the kernel's own results, nothing to merge
        logits = _slice_logits(hidden, weight, bias, 0, weight.shape[0])[None]
        logp, entropy, lse = _backend.call(ops.logprobs_forward, logits, labels[None], temperature, ignore_index)
        return logp[0], entropy[0], lse[0]
    chunk_lse, chunk_mean = [], []
    label_logit = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    for start, end in chunks:
        logits = _slice_logits(hidden, weight, bias, start, end)
        local = _slice_labels(labels, ignore_index, start)
        logp, ent, lse = ops.logprobs_forward(logits[None], local[None], temperature, _SLICE_IGNORE)
        inside = (local >= 0) & (local < end - start)
        label_logit = torch.where(inside, logp[0] + lse[0], label_logit)
        chunk_lse.append(lse[0])
        chunk_mean.append(lse[0] - ent[0])
        del logits  # before the next chunk is allocated: one chunk alive at a time
    chunk_lse = torch.stack(chunk_lse)
    lse = torch.logsumexp(chunk_lse, dim=0)
    entropy = lse - (torch.exp(chunk_lse - lse) * torch.stack(chunk_mean)).sum(0)
    logp = torch.where(labels == ignore_index, torch.zeros_like(lse), label_logit - lse)
    return logp, entropy, lse


class _LinearLogprobs(torch.autograd.Function):
    """linear_logprobs over (tokens, H) x (V, H): forward fused (Triton) or in vocab chunks; the backward
    recomputes each chunk's logits."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature, ignore_index, name):
        ctx.chunks = _vocab_chunks(hidden.shape[0], weight.shape[0], hidden.element_size())
        if name == "triton" and hidden.dtype != torch.float64:
            # Tiled matmul with the log-sum-exp / entropy epilogue: the logits never reach memory.
            logp, entropy, lse = _kernels(name).linear_logprobs_forward(
                _last_dim_contiguous(hidden), _last_dim_contiguous(weight), bias, labels, temperature, ignore_index)
        else:
            logp, entropy, lse = _chunked_linear_forward(hidden, weight, bias, labels, temperature, ignore_index,
                                                         ctx.chunks, _kernels(name))
        ctx.save_for_backward(hidden, weight, bias, labels, lse, entropy)
        ctx.temperature, ctx.ignore_index, ctx.name = temperature, ignore_index, name
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, labels, lse, entropy = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_logp, grad_entropy = _per_row(grad_logp), _per_row(grad_entropy)
        whole = len(ctx.chunks) == 1
        # several chunks add their parts of d(hidden) in fp32; one chunk writes it directly
        grad_hidden = (torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
                       if need_hidden and not whole else None)
        grad_weight = torch.empty_like(weight) if need_weight else None
        grad_bias = torch.empty_like(bias) if need_bias else None
        rows = lambda t: None if t is None else t[None]  # noqa: E731
        ops = _kernels(ctx.name)
        for start, end in ctx.chunks:
            grad_logits = _slice_logits(hidden, weight, bias, start, end)  # the slice's logits, then their gradient
            chunk_labels = labels if whole else _slice_labels(labels, ctx.ignore_index, start)
            ops.logprobs_backward_(rows(grad_logp), rows(grad_entropy), grad_logits[None], chunk_labels[None],
                                   lse[None], entropy[None], ctx.temperature,
                                   ctx.ignore_index if whole else _SLICE_IGNORE)
            if need_hidden and whole:
                grad_hidden = grad_logits @ weight
            elif need_hidden:
                grad_hidden += grad_logits @ weight[start:end]
            if need_weight:
                torch.mm(grad_logits.t(), hidden, out=grad_weight[start:end])
            if need_bias:
                grad_bias[start:end] = grad_logits.sum(0, dtype=torch.float32)
            del grad_logits  # before the next chunk is allocated
        if grad_hidden is not None:
            grad_hidden = grad_hidden.to(hidden.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def linear_logprobs(hidden, weight, labels, *, bias=None, temperature=1.0, ignore_index=-100, return_entropy=False,
                    backend=None):
    """`logprobs` of the lm_head logits hidden @ weight.T + bias without materialising them.

    hidden: (..., H), weight: (V, H) (an lm_head's), bias: (V,) or None, all one float dtype; labels: (...) int.
    Returns logp (...) float32, or (logp, entropy). Forward and backward walk the vocab in chunks of at most
    LINEAR_CHUNK_BYTES of logits (tokens x chunk, in the inputs' dtype, as an lm_head would produce them);
    the chunks' log-sum-exps and entropies merge exactly. On the Triton backend the forward is one fused kernel
    instead (tiled matmul with the log-sum-exp epilogue; float64 inputs take the chunked path). Gradients flow
    to hidden, weight and bias; the backward recomputes each chunk's logits. The `torch` backend is the eager
    reference (full logits).
    """
    check.floating("hidden", hidden)
    check.floating("weight", weight)
    if hidden.dim() < 1:
        raise ValueError("hidden must be (..., H)")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        raise ValueError(f"weight must be (V, H) with H = hidden.shape[-1] = {hidden.shape[-1]} and V >= 1, "
                         f"got shape {tuple(weight.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        check.floating(name, t)
        check.same_device(name, t, "hidden", hidden)
        if t.dtype != hidden.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but hidden has {hidden.dtype}; they must match")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    _check_options(temperature, ignore_index)
    _check_labels(labels, hidden.shape[:-1], hidden.device, weight.shape[0], ignore_index, "hidden.shape[:-1]")
    name = _backend.select("linear_logprobs", backend, hidden.device)
    if name == "torch":
        out = reference.linear_logprobs(hidden, weight, labels, bias=bias, temperature=temperature,
                                        ignore_index=ignore_index, return_entropy=return_entropy)
        return tuple(t.float() for t in out) if return_entropy else out.float()
    lead = hidden.shape[:-1]
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1).long()
    logp, entropy = _LinearLogprobs.apply(flat_hidden, weight, bias, flat_labels, float(temperature), ignore_index,
                                          name)
    return (logp.view(lead), entropy.view(lead)) if return_entropy else logp.view(lead)
