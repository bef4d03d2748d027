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
import os

import torch

from . import _ops, reference
from . import _validate as check
from . import backend as _backend

# linear_logprobs holds one (tokens x vocab-chunk) block of logits at a time, at most this many bytes (with a
# soft cap, counting its float32 working copies: _chunk_bytes_per_logit).
LINEAR_CHUNK_BYTES = 128 * 2**20
# Labels of a vocab slice are shifted into (-V, V); this marks ignored positions among them.
_SLICE_IGNORE = -(2**62)
# Set to 1 to range-check labels on CUDA tensors too (one device sync per call), as check_labels=True does.
CHECK_LABELS_ENV = "RLHF_FAST_CHECK_LABELS"


def _kernels(name: str):
    return _ops.kernels(name, "logprobs")


def _check_options(temperature, ignore_index):
    check.positive_float("temperature", temperature)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")


def _check_logits(logits):
    check.floating("logits", logits)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must be (..., V) with V >= 1, got shape {tuple(logits.shape)}")


def _range_check_wanted(check_labels, device):
    """Whether to read the labels on the host to range-check them: check_labels if given, else on CPU tensors
    (free there) and, where RLHF_FAST_CHECK_LABELS=1, on every device."""
    if check_labels is not None:
        return check_labels
    return device.type == "cpu" or os.environ.get(CHECK_LABELS_ENV, "0") == "1"


def _check_labels(labels, lead, device, lead_name, check_labels):
    """labels: integer, shaped `lead`, on `device` (the range: _check_label_range)."""
    check.integer("labels", labels)
    if check_labels is not None and not isinstance(check_labels, bool):
        raise TypeError(f"check_labels must be None, True or False, got {check_labels!r}")
    if labels.shape != lead:
        raise ValueError(f"labels has shape {tuple(labels.shape)} but {lead_name} needs {tuple(lead)}")
    if labels.device != device:
        raise ValueError(
            f"labels is on {labels.device} but the logits are on {device}; move it with labels.to({device!r})"
        )


def _check_label_range(labels, vocab, ignore_index, check_labels):
    """With the range check (see _range_check_wanted), ValueError unless every label lies in [0, vocab) or equals
    ignore_index. It reads the labels on the host (a device sync for CUDA tensors) and is left out under
    torch.compile; without it the kernels give a NaN log-prob for a label out of range (and never read past a
    row)."""
    if torch.compiler.is_compiling() or labels.numel() == 0 or not _range_check_wanted(check_labels, labels.device):
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        first = int(bad.reshape(-1).nonzero()[0])
        raise ValueError(
            f"labels must lie in [0, {vocab}) or equal ignore_index={ignore_index}; "
            f"labels.reshape(-1)[{first}] = {int(labels.reshape(-1)[first])}"
        )


def _check_label_range_of(logp, labels, vocab, ignore_index, check_labels):
    """_check_label_range after the log-probs are computed: every backend gives a label out of range a NaN
    log-prob, and log-probs are otherwise <= 0 or NaN (from a NaN logit), so the labels are read only when the
    log-probs sum to NaN; the common case costs one reduction instead of the range check's five ops."""
    if (
        torch.compiler.is_compiling()
        or labels.numel() == 0
        or not _range_check_wanted(check_labels, logp.device)
        or not math.isnan(logp.detach().sum().item())
    ):
        return
    _check_label_range(labels, vocab, ignore_index, check_labels)


def _as_rows(logits):
    """logits (..., V) as a 3-D (A, B, V) tensor with a contiguous last dim, a view whenever the leading dims
    fold into two strided ones (logits[:, :-1] of a (B, T, V) tensor does), else a contiguous copy."""
    if logits.shape[-1] > 1 and logits.stride(-1) != 1:
        logits = logits.contiguous()
    elif logits.dim() == 3:  # the kernels take any strides of the two leading dims
        return logits
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


_LOGPROBS_FORWARD = _ops.SPECS["logprobs"]["logprobs_forward"]


class _InplaceBackward(torch.autograd.Function):
    """logprobs_forward whose backward writes d(logits) over the logits buffer and returns it: the op's spec
    (rlhf_fast._ops) with logprobs_backward_ as its backward op."""

    @staticmethod
    def forward(ctx, logits, labels, temperature, ignore_index, name):
        inputs = (logits, labels, temperature, ignore_index)
        output = _ops.call(_kernels(name).logprobs_forward, *inputs)
        _LOGPROBS_FORWARD.setup_context(ctx, inputs, output)
        ctx.name = name
        return output

    @staticmethod
    def backward(ctx, *grads):
        ops = _kernels(ctx.name)

        def write_over_logits(grad_logp, grad_entropy, logits, *rest):
            ops.logprobs_backward_(grad_logp, grad_entropy, logits, *rest)
            return logits

        return *_LOGPROBS_FORWARD.backward(write_over_logits, ctx, *grads), None


def _forward(logits, labels, temperature, ignore_index, inplace_backward, name):
    """(logp, entropy) (...) fp32 from the kernels of backend `name`; labels may be None (entropy only)."""
    lead = logits.shape[:-1]
    rows = _as_rows(logits)
    row_labels = None if labels is None else labels.reshape(rows.shape[:2]).long().contiguous()
    if inplace_backward and rows.requires_grad and torch.is_grad_enabled():
        logp, entropy, _ = _InplaceBackward.apply(rows, row_labels, float(temperature), ignore_index, name)
    else:
        logp, entropy, _ = _ops.call(
            _kernels(name).logprobs_forward, rows, row_labels, float(temperature), ignore_index
        )
    return (None if labels is None else logp.view(lead)), entropy.view(lead)


def logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    inplace_backward: bool = False,
    check_labels: bool | None = None,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``log softmax(logits / temperature)`` at `labels`, and optionally the entropy of that softmax.

    Parameters
    ----------
    logits : torch.Tensor
        ``(..., V)`` float32 / bfloat16 / float16 / float64. Rows need not be contiguous:
        ``logits[:, :-1]`` of a ``(B, T, V)`` tensor is read in place (the kernels take the row strides); only
        a non-contiguous vocab dim is copied.
    labels : torch.Tensor
        ``(...)`` int, shaped ``logits.shape[:-1]``, on the logits' device.
    temperature : float
        Positive finite float T.
    ignore_index : int
        Label of positions to leave out: log-prob 0 there, and no gradient through it.
    return_entropy : bool
        Also return the entropy (the same pass computes both).
    inplace_backward : bool
        The backward writes ``d logits`` into the logits buffer itself, saving the second ``(N, V)`` tensor;
        the logits' values are destroyed by the backward (autograd raises if another op saved them for its
        own backward). The torch backend ignores it.
    check_labels : bool or None
        Whether labels outside ``[0, V)`` (other than `ignore_index`) raise. None (default): checked on CPU
        tensors (free there), not on CUDA tensors, so that the call and its backward never sync with the
        device; ``RLHF_FAST_CHECK_LABELS=1`` makes the default check on CUDA too. True: checked everywhere, at
        one device sync per call on CUDA. False: never checked.
    backend : str or None
        ``"auto" | "triton" | "cuda" | "cpu" | "torch"``; None: ``RLHF_FAST_BACKEND`` or ``"auto"``.

    Returns
    -------
    logp : torch.Tensor
        ``(...)`` float32 log-probs of the labels (alone when `return_entropy` is False).
    entropy : torch.Tensor
        ``(...)`` float32 entropy of ``softmax(logits / T)``, only with ``return_entropy=True``.

    Raises
    ------
    TypeError
        Non-float logits, non-integer labels, a non-int `ignore_index`, a `check_labels` other than
        None / True / False.
    ValueError
        Logits without a non-empty vocab dim, labels of another shape or device, a non-positive or non-finite
        temperature, and (with the range check) a label out of range, naming its flat index and value.
    rlhf_fast.BackendUnavailable
        A backend asked for by name cannot run these tensors.

    Notes
    -----
    The entropy is computed at every position, ignored ones included: mask it with your loss mask, as verl
    does. A NaN logit makes its row's log-prob and entropy NaN; an all ``-inf`` row gives NaN as torch does;
    a ``+inf`` logit makes the whole row NaN (torch gives ``-inf`` log-probs for the other labels).

    A label out of range reaching a kernel gives a NaN log-prob (never a read past the row, never a crash).
    The range check reads one reduction of the result and looks at the labels only when a log-prob is NaN;
    under ``torch.compile`` it is left out.

    Nothing of size ``(N, V)`` in float32 is allocated: the forward keeps one log-sum-exp and one entropy
    per row (float32, saved for the backward). Gradients flow to the logits, in their dtype, written in one
    pass: ``d logits = (onehot - p) g_logp / T - p (log p + H) g_entropy / T``, the true-class term added in
    float32 before rounding.
    """
    _check_logits(logits)
    _check_options(temperature, ignore_index)
    _check_labels(labels, logits.shape[:-1], logits.device, "logits.shape[:-1]", check_labels)
    name = _backend.select("logprobs", backend, logits.device)
    if name == "torch":
        out = reference.logprobs(
            logits, labels, temperature=temperature, ignore_index=ignore_index, return_entropy=return_entropy
        )
        out = tuple(t.float() for t in out) if return_entropy else out.float()
    else:
        logp, entropy = _forward(logits, labels, temperature, ignore_index, inplace_backward, name)
        out = (logp, entropy) if return_entropy else logp
    _check_label_range_of(out[0] if return_entropy else out, labels, logits.shape[-1], ignore_index, check_labels)
    return out


def entropy(logits: torch.Tensor, *, temperature: float = 1.0, backend: str | None = None) -> torch.Tensor:
    """Entropy of ``softmax(logits / temperature)`` over the last dim.

    Parameters
    ----------
    logits : torch.Tensor
        ``(..., V)`` float32 / bfloat16 / float16 / float64, row strides as in `logprobs`.
    temperature : float
        Positive finite float T.
    backend : str or None
        As in `logprobs`.

    Returns
    -------
    torch.Tensor
        ``(...)`` float32; differentiable in the logits.

    Raises
    ------
    TypeError
        Non-float logits.
    ValueError
        An empty vocab dim, a non-positive or non-finite temperature.
    """
    _check_logits(logits)
    _check_options(temperature, -100)
    name = _backend.select("entropy", backend, logits.device)
    if name == "torch":
        return reference.entropy(logits, temperature=temperature).float()
    return _forward(logits, None, temperature, -100, False, name)[1]


# ---------------------------------------------------------------- linear_logprobs


def _chunk_bytes_per_logit(dtype, softcap):
    """Workspace per logit of a chunk: the lm_head output in `dtype`; with a soft cap, the backward's tanh(.) and
    capped logits in float32 (float64 for float64 inputs), and for 16-bit inputs the gradient rounded back."""
    itemsize = torch.tensor([], dtype=dtype).element_size()
    wide = max(4, itemsize)
    return itemsize if softcap is None else 2 * wide + (itemsize if itemsize < wide else 0)


def _vocab_chunks(tokens, vocab, itemsize, budget=None):
    """[start, end) vocab chunks of at most `budget` bytes (default LINEAR_CHUNK_BYTES) of tokens x chunk."""
    budget = LINEAR_CHUNK_BYTES if budget is None else budget
    chunk = max(1, min(vocab, budget // max(1, tokens * itemsize)))
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


def _cap_tanh(raw, logit_scale, softcap):
    """tanh(logit_scale * raw / softcap) in float32 (float64 for float64 raw logits), written over `raw` when it
    has that dtype already (its values are not needed afterwards)."""
    return raw.to(torch.promote_types(raw.dtype, torch.float32)).mul_(logit_scale / softcap).tanh_()


def _row_temperature(temperature, logit_scale, softcap):
    """The temperature the row kernels divide the (capped) logits by: a logit scale without a cap folds into it,
    logit_scale * y / T = y / (T / logit_scale); with a cap it is applied inside the tanh."""
    return temperature if softcap is not None else temperature / logit_scale


def _chunked_linear_forward(
    hidden, weight, bias, labels, temperature, ignore_index, chunks, ops, logit_scale=1.0, softcap=None
):
    """(logp, entropy, lse) (tokens,) fp32 from one vocab chunk of logits at a time, merged exactly: lse over the
    chunks' lse, entropy = lse - sum_c e^(lse_c - lse) E_c[z] with E_c[z] = lse_c - H_c."""
    if len(chunks) == 1:  # the whole vocab at once: the kernel's own results, nothing to merge
        logits = _slice_logits(hidden, weight, bias, 0, weight.shape[0])
        if softcap is not None:
            logits = _cap_tanh(logits, logit_scale, softcap).mul_(softcap)
        logp, entropy, lse = _ops.call(
            ops.logprobs_forward,
            logits[None],
            labels.contiguous()[None],
            _row_temperature(temperature, logit_scale, softcap),
            ignore_index,
        )
        return logp[0], entropy[0], lse[0]
    chunk_lse, chunk_mean = [], []
    label_logit = torch.full((hidden.shape[0],), float("nan"), dtype=torch.float32, device=hidden.device)
    row_temperature = _row_temperature(temperature, logit_scale, softcap)
    for start, end in chunks:
        logits = _slice_logits(hidden, weight, bias, start, end)
        if softcap is not None:
            logits = _cap_tanh(logits, logit_scale, softcap).mul_(softcap)
        local = _slice_labels(labels, ignore_index, start)
        logp, ent, lse = ops.logprobs_forward(logits[None], local[None], row_temperature, _SLICE_IGNORE)
        inside = (local >= 0) & (local < end - start)
        label_logit = torch.where(inside, logp[0] + lse[0], label_logit)
        chunk_lse.append(lse[0])
        chunk_mean.append(lse[0] - ent[0])
        del logits  # before the next chunk is allocated: one chunk alive at a time
    chunk_lse = torch.stack(chunk_lse)
    lse = torch.logsumexp(chunk_lse, dim=0)
    share = torch.exp(chunk_lse - lse)
    # a chunk of -inf logits (a padded vocab masked by a -inf bias) has share 0 and a NaN mean: it adds nothing
    entropy = lse - torch.where(share > 0, share * torch.stack(chunk_mean), 0.0).sum(0)
    logp = torch.where(labels == ignore_index, torch.zeros_like(lse), label_logit - lse)
    return logp, entropy, lse


class _LinearLogprobs(torch.autograd.Function):
    """linear_logprobs over (tokens, H) x (V, H): forward fused (Triton) or in vocab chunks; the backward
    recomputes each chunk's logits."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature, logit_scale, softcap, ignore_index, name):
        ctx.chunks = _vocab_chunks(hidden.shape[0], weight.shape[0], _chunk_bytes_per_logit(hidden.dtype, softcap))
        if name == "triton" and hidden.dtype != torch.float64:
            # Tiled matmul with the transform and log-sum-exp / entropy epilogue: the logits never reach memory.
            logp, entropy, lse = _kernels(name).linear_logprobs_forward(
                _last_dim_contiguous(hidden),
                _last_dim_contiguous(weight),
                bias,
                labels,
                temperature,
                ignore_index,
                logit_scale,
                softcap,
            )
        else:
            logp, entropy, lse = _chunked_linear_forward(
                hidden,
                weight,
                bias,
                labels,
                temperature,
                ignore_index,
                ctx.chunks,
                _kernels(name),
                logit_scale,
                softcap,
            )
        ctx.save_for_backward(hidden, weight, bias, labels, lse, entropy)
        ctx.temperature, ctx.logit_scale, ctx.softcap = temperature, logit_scale, softcap
        ctx.ignore_index, ctx.name = ignore_index, name
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, labels, lse, entropy = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_logp, grad_entropy = _per_row(grad_logp), _per_row(grad_entropy)
        whole = len(ctx.chunks) == 1
        # several chunks add their parts of d(hidden) in fp32; one chunk writes it directly
        grad_hidden = (
            torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_hidden and not whole else None
        )
        grad_weight = torch.empty_like(weight) if need_weight else None
        grad_bias = torch.empty_like(bias) if need_bias else None
        rows = lambda t: None if t is None else t[None]  # noqa: E731
        ops = _kernels(ctx.name)
        row_temperature = _row_temperature(ctx.temperature, ctx.logit_scale, ctx.softcap)
        for start, end in ctx.chunks:
            grad_logits = _slice_logits(hidden, weight, bias, start, end)  # the slice's logits, then their gradient
            chunk_labels = labels.contiguous() if whole else _slice_labels(labels, ctx.ignore_index, start)
            tanh = None
            if ctx.softcap is not None:  # the kernels differentiate the capped logits c t, t = tanh(s y / c)
                tanh = _cap_tanh(grad_logits, ctx.logit_scale, ctx.softcap)
                grad_logits = tanh * ctx.softcap
            ops.logprobs_backward_(
                rows(grad_logp),
                rows(grad_entropy),
                grad_logits[None],
                chunk_labels[None],
                lse[None],
                entropy[None],
                row_temperature,
                ctx.ignore_index if whole else _SLICE_IGNORE,
            )
            if tanh is not None:  # d(y) = d(c t) s (1 - t^2)
                grad_logits.addcmul_(grad_logits, tanh.square_(), value=-1.0)
                del tanh
                if ctx.logit_scale != 1.0:
                    grad_logits.mul_(ctx.logit_scale)
                grad_logits = grad_logits.to(hidden.dtype)
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
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None


def check_linear(hidden, weight, bias):
    """hidden (..., H), weight (V, H) with V >= 1, bias (V,) or None: one float dtype, one device."""
    check.floating("hidden", hidden)
    check.floating("weight", weight)
    if hidden.dim() < 1:
        raise ValueError("hidden must be (..., H)")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        raise ValueError(
            f"weight must be (V, H) with H = hidden.shape[-1] = {hidden.shape[-1]} and V >= 1, "
            f"got shape {tuple(weight.shape)}"
        )
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        check.floating(name, t)
        check.same_device(name, t, "hidden", hidden)
        if t.dtype != hidden.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but hidden has {hidden.dtype}; they must match")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    return_entropy: bool = False,
    check_labels: bool | None = None,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`logprobs` of the lm-head logits ``hidden @ weight.T + bias``, never holding them.

    Parameters
    ----------
    hidden : torch.Tensor
        ``(..., H)`` float: the lm head's input.
    weight : torch.Tensor
        ``(V, H)`` with V >= 1, an lm head's weight, the same dtype and device as `hidden`.
    labels : torch.Tensor
        ``(...)`` int, shaped ``hidden.shape[:-1]``.
    bias : torch.Tensor or None
        ``(V,)``, same dtype.
    temperature : float
        Positive finite float T.
    logit_scale : float
        Positive finite float: ``z = logit_scale * y`` (Cohere's ``logit_scale``).
    softcap : float or None
        Positive finite float: ``z = softcap * tanh(z / softcap)`` after the scale (Gemma 2/3's
        ``final_logit_softcapping``); None: no cap.
    ignore_index : int
        As in `logprobs`.
    return_entropy : bool
        Also return the entropy.
    check_labels : bool or None
        As in `logprobs`.
    backend : str or None
        As in `logprobs`.

    Returns
    -------
    logp : torch.Tensor
        ``(...)`` float32 (alone when `return_entropy` is False).
    entropy : torch.Tensor
        ``(...)`` float32, only with ``return_entropy=True``.

    Raises
    ------
    TypeError
        Non-float hidden / weight / bias, or their dtypes differing; non-integer labels.
    ValueError
        A weight not ``(V, H)`` with ``H = hidden.shape[-1]`` and V >= 1, a bias not ``(V,)``, mismatched
        devices or label shape, a non-positive or non-finite temperature / logit_scale / softcap, and labels out
        of range as in `logprobs`.
    rlhf_fast.BackendUnavailable
        A backend asked for by name cannot run these tensors.

    Notes
    -----
    The head is the one Hugging Face's Cohere and Gemma 2 models apply, followed by a sampling temperature:
    ``y = hidden @ weight.T + bias`` rounded to the inputs' dtype (as an lm head's output is), then
    ``z = logit_scale * y``, then with a cap ``z = softcap * tanh(z / softcap)``, then ``softmax(z / T)``; the
    transform is computed in float32. `head_transform` gives both keywords from a model's config.

    Forward and backward walk the vocab in chunks of at most ``LINEAR_CHUNK_BYTES`` (128 MiB) of logits
    (tokens x chunk in the inputs' dtype; with a cap counting its float32 working copies) and merge the
    chunks' log-sum-exps and entropies exactly. On the Triton backend the forward is one fused kernel instead
    (float64 inputs take the chunked path). The backward recomputes each chunk's logits. Gradients flow to
    hidden, weight and bias. The torch backend is the eager reference (it builds the full logits).
    """
    check_linear(hidden, weight, bias)
    _check_options(temperature, ignore_index)
    logit_scale = check.positive_float("logit_scale", logit_scale)
    softcap = None if softcap is None else check.positive_float("softcap", softcap)
    _check_labels(labels, hidden.shape[:-1], hidden.device, "hidden.shape[:-1]", check_labels)
    name = _backend.select("linear_logprobs", backend, hidden.device)
    if name == "torch":
        out = reference.linear_logprobs(
            hidden,
            weight,
            labels,
            bias=bias,
            temperature=temperature,
            logit_scale=logit_scale,
            softcap=softcap,
            ignore_index=ignore_index,
            return_entropy=return_entropy,
        )
        out = tuple(t.float() for t in out) if return_entropy else out.float()
    else:
        lead = hidden.shape[:-1]
        flat_hidden = hidden.reshape(-1, hidden.shape[-1])
        flat_labels = labels.reshape(-1).long()
        logp, entropy = _LinearLogprobs.apply(
            flat_hidden, weight, bias, flat_labels, float(temperature), logit_scale, softcap, ignore_index, name
        )
        out = (logp.view(lead), entropy.view(lead)) if return_entropy else logp.view(lead)
    _check_label_range_of(out[0] if return_entropy else out, labels, weight.shape[0], ignore_index, check_labels)
    return out
