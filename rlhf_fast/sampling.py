"""Sampling with its log-prob: one token per row of logits, and the log-prob PPO needs, in one pass over the vocab.

`sample(logits)` draws from softmax(logits / T) restricted by top-k, top-p and min-p exactly as Hugging Face's
logits warpers define them (applied in that order), without the sort of the vocabulary and the (N, V)
probability tensor that the warpers and `torch.multinomial` make. `linear_sample(hidden, weight)` does the same
from the lm-head input, one vocab chunk of logits at a time.

Every op takes ``backend=`` (``auto | triton | cpu | torch``; see rlhf_fast.backend). There is no CUDA C++
kernel: on CUDA tensors ``auto`` runs the Triton kernel.
"""

from __future__ import annotations

import math

import torch

from . import _ops, reference
from . import _validate as check
from . import backend as _backend
from .logprobs import LINEAR_CHUNK_BYTES, _as_rows, _check_logits, _vocab_chunks

LOGPROB_KINDS = ("filtered", "full")


def _check_filters(temperature, top_k, top_p, min_p, logprob):
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not (math.isfinite(temperature) and temperature >= 0)
    ):
        raise ValueError(f"temperature must be a finite float >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None:
        check.positive_int("top_k", top_k)
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be a float in (0, 1] or None, got {top_p!r}")
    if min_p is not None and (isinstance(min_p, bool) or not isinstance(min_p, (int, float)) or not 0 <= min_p <= 1):
        raise ValueError(f"min_p must be a float in [0, 1] or None, got {min_p!r}")
    if logprob not in LOGPROB_KINDS:
        raise ValueError(f"logprob must be one of {LOGPROB_KINDS}, got {logprob!r}")


def _check_generator(generator, device):
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator is not None and generator.device.type != device.type:
        raise ValueError(
            f"generator is on {generator.device} but the logits are on {device}; make it with "
            f"torch.Generator(device={str(device)!r})"
        )


def _select(op, backend, device):
    name = _backend.select(op, backend, device)
    if name == "cuda":  # no CUDA C++ kernel: auto's GPU order for these ops never names it
        raise _backend.BackendUnavailable(
            f"{op}: backend 'cuda' has no sampling kernel yet; use backend='triton' (or 'auto') on CUDA tensors"
        )
    return name


def _raise_on_invalid_rows(logp, where):
    """On CPU tensors (no device sync): a row with a NaN or no finite logit cannot be sampled."""
    if logp.device.type == "cpu" and logp.numel() and bool(torch.isnan(logp).any()):
        row = int(torch.isnan(logp).reshape(-1).nonzero()[0])
        raise ValueError(f"{where}: row {row} (flattened) has a NaN logit or no finite logit; it cannot be sampled")


def sample(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    generator: torch.Generator | None = None,
    logprob: str = "filtered",
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draws one token per row of `logits`, with its log-prob, in one pass over the vocab.

    Parameters
    ----------
    logits : torch.Tensor
        ``(..., V)`` float32 / bfloat16 / float16 / float64, any row strides (``logits[:, -1]`` of a
        ``(B, T, V)`` tensor is read in place).
    temperature : float
        Finite float >= 0; 0 is greedy decoding (argmax, the first on ties; log-prob 0).
    top_k : int or None
        Positive int: keep the entries >= the k-th largest logit (ties included).
    top_p : float or None
        In (0, 1]: remove the entries whose probability mass, counted from the smallest up, is <= 1 - top_p
        (the largest entry always stays).
    min_p : float or None
        In [0, 1]: keep the entries with probability >= min_p times the largest.
    generator : torch.Generator or None
        Source of the one float64 uniform per row (``torch.rand``), on the logits' device type.
    logprob : str
        ``"filtered"``: the log-prob under the distribution the token was drawn from (after the filters'
        renormalisation). ``"full"``: under the whole ``softmax(logits / T)``, what a trainer that recomputes
        log-probs sees. The two agree when no filter is set.
    backend : str or None
        ``"auto" | "triton" | "cpu" | "torch"``; None: ``RLHF_FAST_BACKEND`` or ``"auto"``. There is no CUDA
        C++ sampling kernel: on CUDA tensors ``"auto"`` runs Triton and ``"cuda"`` raises.

    Returns
    -------
    tokens : torch.Tensor
        ``(...)`` int64.
    logp : torch.Tensor
        ``(...)`` float32, exact.

    Raises
    ------
    TypeError
        Non-float logits, a `generator` that is not a ``torch.Generator``.
    ValueError
        A bad temperature / top_k / top_p / min_p / logprob, a generator on another device type, and, on CPU
        tensors, a row with a NaN or no finite logit (on CUDA, where raising would need a device sync, such a
        row gives token 0 and a NaN log-prob).
    rlhf_fast.BackendUnavailable
        A backend asked for by name cannot run these tensors (``"cuda"`` always).

    Notes
    -----
    The distribution is ``softmax(logits / T)`` after Hugging Face's top-k, top-p and min-p warpers, in that
    order. Equal logits at a top-p boundary are kept or removed together (the warper itself splits such a tie
    in its sort order). The draw is an inverse-CDF walk with one float64 uniform per row, so the same
    generator state gives the same tokens, and on CUDA the Philox seed and offset make it CUDA-graph safe. No
    ``(N, V)`` temporary and no sort of the vocabulary on the cpu backend.
    """
    _check_logits(logits)
    _check_filters(temperature, top_k, top_p, min_p, logprob)
    _check_generator(generator, logits.device)
    if temperature == 0:
        tokens = logits.argmax(dim=-1)
        return tokens, torch.zeros(tokens.shape, dtype=torch.float32, device=logits.device)
    name = _select("sample", backend, logits.device)
    uniforms = torch.rand(logits.shape[:-1], dtype=torch.float64, device=logits.device, generator=generator)
    if name == "torch":
        tokens, kept, full = reference.sample(
            logits, uniforms, temperature=float(temperature), top_k=top_k, top_p=top_p, min_p=min_p
        )
    else:
        rows = _as_rows(logits)
        tokens, kept, full = _ops.kernels(name, "sampling").sample(
            rows,
            uniforms.reshape(rows.shape[:2]),
            float(temperature),
            top_k or 0,
            1.0 if top_p is None else float(top_p),
            0.0 if min_p is None else float(min_p),
        )
        lead = logits.shape[:-1]
        tokens, kept, full = tokens.view(lead), kept.view(lead), full.view(lead)
    logp = kept if logprob == "filtered" else full
    _raise_on_invalid_rows(logp, "sample")
    return tokens, logp


# ---------------------------------------------------------------- linear_sample

# Candidates kept per vocab chunk for top-p / min-p without top-k: rows whose nucleus reaches past them are
# redrawn from their full logits (exact either way; see _filtered_candidates).
_CANDIDATES_PER_CHUNK = 256


def linear_sample(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    generator: torch.Generator | None = None,
    logprob: str = "filtered",
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`sample` of the lm-head logits ``hidden @ weight.T + bias``, never holding a row's full logits.

    Parameters
    ----------
    hidden : torch.Tensor
        ``(..., H)`` float: the lm head's input.
    weight : torch.Tensor
        ``(V, H)`` with V >= 1, the same dtype and device.
    bias : torch.Tensor or None
        ``(V,)``, the same dtype.
    temperature : float
        As in `sample`.
    top_k : int or None
        As in `sample`.
    top_p : float or None
        As in `sample`.
    min_p : float or None
        As in `sample`.
    generator : torch.Generator or None
        As in `sample`.
    logprob : str
        As in `sample`.
    backend : str or None
        As in `sample`.

    Returns
    -------
    tokens : torch.Tensor
        ``(...)`` int64.
    logp : torch.Tensor
        ``(...)`` float32, with the semantics of `sample`.

    Raises
    ------
    TypeError
        Non-float tensors or differing dtypes, a bad `generator`.
    ValueError
        A weight not ``(V, H)`` matching `hidden`, a bias not ``(V,)``, mismatched devices, the filter errors
        of `sample`, and rows that cannot be sampled (CPU tensors).

    Notes
    -----
    The vocab is walked in chunks of at most 128 MiB of logits. Without filters each chunk draws a candidate
    and its log-sum-exp, and the row picks a chunk with probability ``exp(lse_chunk - lse)`` (exact:
    P(token) = P(chunk) P(token | chunk)). With top-k (and top-p / min-p on top of it) the chunks' top
    candidates are merged. Top-p or min-p alone keep 256 candidates per chunk, which hold the nucleus unless
    the distribution is flat; rows whose nucleus reaches past them are redrawn from their full logits (in
    chunks of rows). No gradient: sampling is not differentiable.
    """
    check.floating("hidden", hidden)
    check.floating("weight", weight)
    if weight.dim() != 2 or hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1] or weight.shape[0] == 0:
        raise ValueError(
            f"hidden must be (..., H) and weight (V, H) with V >= 1; got hidden "
            f"{tuple(hidden.shape)} and weight {tuple(weight.shape)}"
        )
    check.same_device("weight", weight, "hidden", hidden)
    if bias is not None:
        check.floating("bias", bias)
        check.same_device("bias", bias, "hidden", hidden)
        if bias.shape != weight.shape[:1]:
            raise ValueError(f"bias must be (V,) = ({weight.shape[0]},), got {tuple(bias.shape)}")
    if weight.dtype != hidden.dtype or (bias is not None and bias.dtype != hidden.dtype):
        raise TypeError(
            f"hidden, weight and bias must share one dtype, got {hidden.dtype}, {weight.dtype}"
            f"{'' if bias is None else ', ' + str(bias.dtype)}; cast weight with weight.to(hidden.dtype)"
        )
    _check_filters(temperature, top_k, top_p, min_p, logprob)
    _check_generator(generator, hidden.device)
    lead = hidden.shape[:-1]
    flat = hidden.reshape(-1, hidden.shape[-1])
    vocab = weight.shape[0]
    chunks = _vocab_chunks(flat.shape[0], vocab, hidden.element_size())
    with torch.no_grad():
        if temperature == 0:
            tokens = _greedy(flat, weight, bias, chunks)
            return tokens.view(lead), torch.zeros(lead, dtype=torch.float32, device=hidden.device)
        options = dict(temperature=float(temperature), backend=backend, generator=generator)
        if top_k is None and top_p is None and (min_p is None or min_p == 0):
            tokens, logp = _unfiltered(flat, weight, bias, chunks, **options)
        else:
            tokens, logp = _filtered(
                flat, weight, bias, chunks, top_k=top_k, top_p=top_p, min_p=min_p, logprob=logprob, **options
            )
    _raise_on_invalid_rows(logp, "linear_sample")
    return tokens.view(lead), logp.view(lead)


def _chunk_logits(hidden, weight, bias, start, end):
    return torch.nn.functional.linear(hidden, weight[start:end], None if bias is None else bias[start:end])


def _greedy(hidden, weight, bias, chunks):
    best = torch.full((hidden.shape[0],), -math.inf, device=hidden.device)
    tokens = torch.zeros(hidden.shape[0], dtype=torch.long, device=hidden.device)
    for start, end in chunks:
        value, index = _chunk_logits(hidden, weight, bias, start, end).float().max(dim=-1)
        better = value > best  # strict: the first maximum wins, as argmax
        best = torch.where(better, value, best)
        tokens = torch.where(better, index + start, tokens)
    return tokens


def _unfiltered(hidden, weight, bias, chunks, *, temperature, backend, generator):
    """Each chunk draws a candidate from its own softmax; the row then picks a chunk by its share of the mass."""
    candidates, candidate_logp, chunk_lse = [], [], []
    for start, end in chunks:
        logits = _chunk_logits(hidden, weight, bias, start, end)
        token, logp = sample(logits, temperature=temperature, generator=generator, logprob="full", backend=backend)
        candidates.append(token + start)
        candidate_logp.append(logp)
        chunk_lse.append(logits.gather(-1, token[:, None])[:, 0].float() / temperature - logp)
        del logits
    chunk_lse = torch.stack(chunk_lse, dim=-1)  # (N, chunks)
    which = _inverse_cdf(torch.softmax(chunk_lse.double(), dim=-1), generator)[:, None]
    tokens = torch.stack(candidates, dim=-1).gather(-1, which)[:, 0]
    share = chunk_lse.gather(-1, which)[:, 0] - torch.logsumexp(chunk_lse, dim=-1)
    return tokens, torch.stack(candidate_logp, dim=-1).gather(-1, which)[:, 0] + share


def _inverse_cdf(probs, generator):
    """Index per row of `probs` (N, K) float64 drawn by one uniform each."""
    u = torch.rand(probs.shape[0], dtype=torch.float64, device=probs.device, generator=generator)
    cumulative = probs.cumsum(-1)
    index = torch.searchsorted(cumulative, (u * cumulative[:, -1])[:, None], right=True)[:, 0]
    return index.clamp_max(probs.shape[-1] - 1)


def _filtered(hidden, weight, bias, chunks, *, temperature, top_k, top_p, min_p, logprob, backend, generator):
    per_chunk = top_k if top_k is not None else _CANDIDATES_PER_CHUNK
    values, indices, chunk_lse, complete_above = [], [], [], []
    for start, end in chunks:
        logits = _chunk_logits(hidden, weight, bias, start, end).float()
        k = min(per_chunk, end - start)
        top = torch.topk(logits, k, dim=-1)
        values.append(top.values)
        indices.append(top.indices + start)
        chunk_lse.append(torch.logsumexp(logits / temperature, dim=-1))
        # every entry of the chunk above this value is a candidate (-inf: the whole chunk is)
        complete_above.append(top.values[:, -1] if k < end - start else torch.full_like(top.values[:, 0], -math.inf))
        del logits
    values = torch.cat(values, dim=-1)
    indices = torch.cat(indices, dim=-1)
    lse_full = torch.logsumexp(torch.stack(chunk_lse, dim=-1), dim=-1)
    floor = torch.stack(complete_above, dim=-1).amax(-1)  # candidates hold every entry > floor
    logp, exact = _filtered_candidates(
        values, floor, lse_full, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p
    )
    pick = _inverse_cdf(logp.exp(), generator)
    tokens = indices.gather(-1, pick[:, None])[:, 0]
    z = values.gather(-1, pick[:, None])[:, 0] / temperature
    out = logp.gather(-1, pick[:, None])[:, 0] if logprob == "filtered" else z - lse_full
    redo = (~exact).nonzero()[:, 0]
    if redo.numel():
        rows_per_batch = max(1, LINEAR_CHUNK_BYTES // (weight.shape[0] * hidden.element_size()))
        for begin in range(0, redo.numel(), rows_per_batch):
            rows = redo[begin : begin + rows_per_batch]
            full_logits = torch.nn.functional.linear(hidden[rows], weight, bias)
            token, lp = sample(
                full_logits,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                min_p=min_p,
                generator=generator,
                logprob=logprob,
                backend=backend,
            )
            tokens[rows], out[rows] = token, lp.to(out.dtype)
    return tokens, out.float()


def _filtered_candidates(values, floor, lse_full, *, temperature, top_k, top_p, min_p):
    """The filtered log-probs (N, C) float64 of the candidate logits `values` (N, C), and per row whether they
    are exact. The candidates hold every entry of the row above `floor` (N,); lse_full (N,) is the log-sum-exp
    of the whole row / T. Top-k is exact when the k-th value lies above the floor (a value tied with it could
    sit past its chunk's candidates otherwise); without top-k, top-p is exact when the candidates above the
    floor already hold top_p of the row's mass (everything below the floor is then removed), and min-p when
    its threshold lies above the floor."""
    z = values.double() / temperature
    z_floor = floor.double()[:, None] / temperature
    exact = torch.zeros(z.shape[0], dtype=torch.bool, device=z.device)
    if top_k is not None:
        k = min(top_k, z.shape[-1])
        kth = torch.topk(z, k, dim=-1).values[:, -1:]
        exact = (kth > z_floor)[:, 0] | (k == z.shape[-1]) & torch.isinf(z_floor[:, 0])
        z = z.masked_fill(z < kth, -math.inf)
        log_mass = torch.logsumexp(z, dim=-1, keepdim=True)
    else:
        log_mass = lse_full.double()[:, None]
    if top_p is not None and top_p < 1.0:
        descending, order = torch.sort(z, dim=-1, descending=True)
        share = torch.exp(descending - log_mass)
        ascending_neg = (-descending).contiguous()
        first_of_tie = torch.searchsorted(ascending_neg, ascending_neg, right=False)
        mass_above = (share.cumsum(-1) - share).gather(-1, first_of_tie)  # mass of strictly larger entries
        removed = torch.zeros_like(share, dtype=torch.bool).scatter(-1, order, mass_above >= top_p)
        z = z.masked_fill(removed, -math.inf)
        if top_k is None:
            above_floor = values.double() / temperature > z_floor
            exact |= (torch.exp(values.double() / temperature - log_mass) * above_floor).sum(-1) >= top_p
    if min_p is not None and min_p > 0:
        threshold = z.amax(-1, keepdim=True) + math.log(min_p)
        z = z.masked_fill(z < threshold, -math.inf)
        if top_k is None:
            exact |= (threshold > z_floor)[:, 0]
    return torch.log_softmax(z, dim=-1), exact
