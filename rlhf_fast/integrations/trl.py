"""TRL 1.16 on rlhf_fast's kernels.

    from rlhf_fast.integrations import trl as rf_trl
    rf_trl.patch()                   # or: with rf_trl.patch(): trainer.train()

Patched, with TRL's signatures and semantics (output dtype = the logits' dtype, as TRL returns it):
- `trl.trainer.utils.selective_log_softmax` -> `rf.logprobs` (temperature; `row_mask` zeros give 0 and no
  gradient), and every trainer module's binding of it;
- `trl.trainer.utils.entropy_from_logits` -> `rf.entropy` (`chunk_size` is ignored: ours never holds more
  than a row's worth of fp32);
- `trl.trainer.utils.selective_log_softmax_and_entropy` -> one `rf.logprobs(..., return_entropy=True)` pass
  (`entropy_requires_grad=False` detaches the entropy);
- `trl.kernels.chunked_logprob.ChunkedLogProbFunction` (TRL's fused LM head, `add_fused_lm_head`, which
  GRPOTrainer uses for its log-probs and entropies) -> `rf.linear_logprobs`; the logit scale folds into the
  temperature, autocast is honoured as TRL does (the head runs in the autocast dtype).

With `patch(generate=True)` (the default) TRL's generation samples through `rlhf_fast.integrations.transformers`
(transformers' warpers + multinomial step on `rf.sample`).

Patched on CPU tensors only: on CUDA/XPU tensors TRL 1.16 runs its own Triton kernels, and those stay until
ours are measured faster there. TRL's original also runs for every input outside what our kernels do: an
index of shape (..., K), float64 logits, indices that are not int64 or not in [0, V) (TRL raises its own error),
autocast around the three logits functions, a logit softcap, the fused head's extra outputs
(`log_sum_sq_probs`, `mean_logits`, `is_top1`).
"""

from __future__ import annotations

import inspect
import math

import torch

import rlhf_fast as rf

from ._patching import Adapter, Target, dispatching, known_arguments

PINNED = "1.16"
_UTILS = "trl.trainer.utils"
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Label given to positions whose row_mask is 0: our ignore_index (0 and no gradient there, as TRL's masked_fill).
_MASKED = -1


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _all_in_range(index: torch.Tensor, size: int) -> bool:
    return bool(((index >= 0) & (index < size)).all())


def _logits_ours(logits) -> bool:
    """Logits our kernels take where TRL's own code would run: CPU, fp32/bf16/fp16, not under autocast."""
    return (
        isinstance(logits, torch.Tensor)
        and logits.device.type == "cpu"
        and logits.dtype in _DTYPES
        and logits.dim() >= 1
        and logits.numel() > 0
        and not torch.is_autocast_enabled("cpu")
    )


def _gather_ours(logits, index, temperature, row_mask) -> bool:
    """One int64 index per position, in range, a positive temperature, a row_mask shaped like the index."""
    return (
        _logits_ours(logits)
        and logits.dim() >= 2
        and isinstance(index, torch.Tensor)
        and index.dtype == torch.int64
        and index.shape == logits.shape[:-1]
        and index.device == logits.device
        and _positive(temperature)
        and (
            row_mask is None
            or (
                isinstance(row_mask, torch.Tensor)
                and row_mask.shape == index.shape
                and row_mask.device == logits.device
            )
        )
        and _all_in_range(index, logits.shape[-1])
    )


def _logprobs(logits, index, temperature, row_mask, return_entropy):
    """(logp, entropy or None) in the logits' dtype; zero where row_mask is 0."""
    labels = index if row_mask is None else index.masked_fill(row_mask == 0, _MASKED)
    out = rf.logprobs(
        logits, labels, temperature=float(temperature), ignore_index=_MASKED, return_entropy=return_entropy
    )
    logp, entropy = out if return_entropy else (out, None)
    if entropy is not None and row_mask is not None:
        entropy = entropy.masked_fill(row_mask == 0, 0.0)
    return logp.to(logits.dtype), None if entropy is None else entropy.to(logits.dtype)


def _selective_log_softmax(original):
    def ours(a):
        if not _gather_ours(a["logits"], a["index"], a["temperature"], a["row_mask"]):
            return NotImplemented
        return _logprobs(a["logits"], a["index"], a["temperature"], a["row_mask"], return_entropy=False)[0]

    return dispatching(original, ours, _SELECTIVE)


def _entropy_from_logits(original):
    def ours(a):
        if not _logits_ours(a["logits"]):
            return NotImplemented
        return rf.entropy(a["logits"]).to(a["logits"].dtype)

    return dispatching(original, ours, _ENTROPY)


def _selective_log_softmax_and_entropy(original):
    def ours(a):
        if not (
            _gather_ours(a["logits"], a["index"], a["temperature"], a["row_mask"])
            and isinstance(a["entropy_requires_grad"], bool)
        ):
            return NotImplemented
        logp, entropy = _logprobs(a["logits"], a["index"], a["temperature"], a["row_mask"], return_entropy=True)
        return logp, entropy if a["entropy_requires_grad"] else entropy.detach()

    return dispatching(original, ours, _SELECTIVE_AND_ENTROPY)


def _head_ours(a, compute_dtype) -> bool:
    """The fused head's call is one our linear_logprobs does: CPU, no softcap, a positive logit scale, only
    log-probs and entropy requested, targets in range."""
    hidden, weight, bias, targets = a["hidden"], a["weight"], a["bias"], a["targets"]
    tensors = [hidden, weight, targets] + ([] if bias is None else [bias])
    return (
        all(isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in tensors)
        and compute_dtype in _DTYPES
        and hidden.dim() == 2
        and weight.dim() == 2
        and weight.shape[1] == hidden.shape[1]
        and weight.shape[0] > 0
        and (bias is None or bias.shape == weight.shape[:1])
        and targets.dtype == torch.int64
        and targets.shape == hidden.shape[:1]
        and a["final_logit_softcapping"] is None
        and _positive(a["logit_scale"])
        and _positive(a["temperature"])
        and set(a["outputs"]) <= {"log_probs", "entropy"}
        and _all_in_range(targets, weight.shape[0])
    )


def _chunked_logprob_function(original):
    forward = inspect.signature(original.forward)
    ctx = next(iter(forward.parameters))

    class ChunkedLogProbFunction(original):
        """TRL's fused LM head; apply() runs rf.linear_logprobs where the call is one it does (see the module)."""

        @classmethod
        def apply(cls, *args, **kwargs):
            a = known_arguments(forward, (ctx, *_HEAD), (None, *args), kwargs)  # None fills forward's ctx
            if a is None or not isinstance(a["hidden"], torch.Tensor):
                return original.apply(*args, **kwargs)
            autocast = torch.is_autocast_enabled("cpu")
            compute_dtype = torch.get_autocast_dtype("cpu") if autocast else a["hidden"].dtype
            if not _head_ours(a, compute_dtype):
                return original.apply(*args, **kwargs)
            cast = lambda t: None if t is None else t.to(compute_dtype)  # noqa: E731  (TRL's head runs in this dtype)
            with torch.autocast("cpu", enabled=False):
                logp, entropy = rf.linear_logprobs(
                    cast(a["hidden"]),
                    cast(a["weight"]),
                    a["targets"],
                    bias=cast(a["bias"]),
                    temperature=a["temperature"] / a["logit_scale"],
                    return_entropy=True,
                )
            return logp, entropy if "entropy" in a["outputs"] else None, None, None, None

    ChunkedLogProbFunction.__qualname__ = original.__qualname__
    ChunkedLogProbFunction.__module__ = original.__module__
    return ChunkedLogProbFunction


_SELECTIVE = ("logits", "index", "temperature", "row_mask")
_ENTROPY = ("logits", "chunk_size")
_SELECTIVE_AND_ENTROPY = ("logits", "index", "entropy_requires_grad", "temperature", "row_mask")
_HEAD = (
    "hidden",
    "weight",
    "bias",
    "targets",
    "temperature",
    "chunk_size",
    "final_logit_softcapping",
    "logit_scale",
    "outputs",
)

TARGETS = (
    Target(_UTILS, "selective_log_softmax", _selective_log_softmax, _SELECTIVE),
    Target(_UTILS, "entropy_from_logits", _entropy_from_logits, _ENTROPY),
    Target(_UTILS, "selective_log_softmax_and_entropy", _selective_log_softmax_and_entropy, _SELECTIVE_AND_ENTROPY),
    Target("trl.kernels.chunked_logprob", "ChunkedLogProbFunction", _chunked_logprob_function, _HEAD),
)


# Trainer modules bind these by name when imported; those loaded before patch() are found in sys.modules, those
# imported later bind the patched function, and unpatch() finds both.
def _generate_hook():
    """GRPOTrainer samples its completions with transformers' generate: its warpers + multinomial step on
    rf.sample too (rlhf_fast.integrations.transformers), unless that is patched already or not wanted."""
    from . import transformers as rf_transformers

    if not _options["generate"] or rf_transformers._ADAPTER.handle is not None:
        return lambda: None
    rf_transformers.patch()
    return rf_transformers.unpatch


_options = {"generate": True}
_ADAPTER = Adapter("trl", PINNED, TARGETS, hooks=(_generate_hook,))
unpatch = _ADAPTER.unpatch


def patch(*, generate: bool = True):
    """Runs TRL 1.16 on rlhf_fast's kernels, in this process (see the module docstring for what is patched).

    Parameters
    ----------
    generate : bool
        Also run the sampling of transformers' ``generate``, which TRL's trainers call for their completions,
        on `rlhf_fast.sample` (`rlhf_fast.integrations.transformers`: the same law, one pass over the
        vocabulary, but other random numbers than ``torch.multinomial`` draws, so not the same completions as
        unpatched for a seed).

    Returns
    -------
    rlhf_fast.integrations._patching.Patch
        The handle: a context manager whose with-block ends with ``unpatch()``. Idempotent: while patched it
        returns the same handle.
    """
    _options["generate"] = generate
    return _ADAPTER.patch()
