"""Hugging Face `generate` sampling on `rlhf_fast.sample`.

    from rlhf_fast.integrations import transformers as rf_transformers
    rf_transformers.patch()          # or: with rf_transformers.patch(): model.generate(..., do_sample=True)

In sampling mode `generate` runs its logits warpers (temperature, top-k, top-p, min-p: each a full sort or
softmax of the vocabulary) and then `softmax` + `torch.multinomial` over (batch, V). Patched, the run of those
warpers at the end of the processor list becomes one `FusedSampling` processor that draws the token with
`rf.sample` (same law, one pass over the vocabulary) and returns scores that put all the mass on it, so
whatever follows picks exactly that token; the `torch.multinomial` call of `generate`'s sampling loop then
returns that token without its own pass over the probabilities. Processors before the warpers (repetition
penalty, bad words, ...) are untouched. Left as Hugging Face has it: greedy and beam search, a warper list
with typical-p, epsilon or eta warpers, `min_tokens_to_keep` > 1, and a transformers whose sampling loop no
longer calls `torch.multinomial` (the version guard says so). The random numbers come from torch's global
generator, as `torch.multinomial` takes them: the same seed gives the same text, but not the same text as
unpatched.

`head_transform(model.config)` gives the `linear_logprobs` keywords for the head of a Hugging Face model (its
logit scale and soft cap). Importing this module imports no transformers: only `patch()` does.
"""

from __future__ import annotations

import functools
import inspect
import math
import threading
import types

import torch

import rlhf_fast as rf

from ._patching import Adapter

PINNED = "5"
_GENERATION = "transformers.generation.utils"

# Head-scaling settings of other Hugging Face models (Granite, HyperCLOVA X, MiniCPM3, Falcon-H1, ...), each applied
# its own way: head_transform refuses a config that sets one rather than give that model's log-probs wrongly.
_UNREAD_HEAD_SCALES = ("logits_scaling", "output_multiplier", "lm_head_multiplier")


def head_transform(config: object) -> dict:
    """The `linear_logprobs` keywords ``{"logit_scale", "softcap"}`` for a Hugging Face causal LM's head.

    Parameters
    ----------
    config : object
        A Hugging Face model config, or a multimodal one (its ``get_text_config()`` is read).

    Returns
    -------
    dict
        ``{"logit_scale": float, "softcap": float | None}``: the config's ``logit_scale`` (Cohere; absent or
        None: 1.0) and ``final_logit_softcapping`` (Gemma 2/3; absent or None: no cap), which the models'
        forward applies to ``lm_head(hidden)`` in that order (scale, then cap). Pass them with ``**`` to
        `linear_logprobs`, `linear_f_divergence` or the PPO loop's fused head.

    Raises
    ------
    ValueError
        A config that rescales its logits another way (``logits_scaling``, ``output_multiplier`` or
        ``lm_head_multiplier`` other than 1: Granite, Falcon-H1, ...); compute that model's log-probs from its
        own logits instead (PPO loop: ``--no-fused-head``).
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in _UNREAD_HEAD_SCALES:
        value = getattr(text, name, None)
        if value is not None and value != 1:
            raise ValueError(
                f"{type(text).__name__} sets {name}={value}, a rescaling of the logits that "
                f"head_transform does not read; compute the log-probs from the model's own logits "
                f"(PPO loop: --no-fused-head)"
            )
    scale = getattr(text, "logit_scale", None)
    cap = getattr(text, "final_logit_softcapping", None)
    return {"logit_scale": 1.0 if scale is None else float(scale), "softcap": None if cap is None else float(cap)}


class FusedSampling:
    """The temperature / top-k / top-p / min-p warpers in one processor: draws a token per row with `rf.sample`
    and returns scores that are 0 at the drawn token and -inf elsewhere (so softmax + multinomial give it)."""

    def __init__(self, temperature=1.0, top_k=None, top_p=None, min_p=None):
        self.temperature, self.top_k, self.top_p, self.min_p = temperature, top_k, top_p, min_p

    def __call__(self, input_ids, scores):
        tokens, _ = rf.sample(
            scores, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p
        )
        _drawn.tokens = tokens
        return torch.full_like(scores, -math.inf).scatter_(-1, tokens[:, None], 0.0)

    def __repr__(self):
        return (
            f"FusedSampling(temperature={self.temperature}, top_k={self.top_k}, top_p={self.top_p}, min_p={self.min_p})"
        )


_drawn = threading.local()  # the tokens FusedSampling drew last, until the multinomial call takes them


def _warper_settings(processor):
    """(field, value) that a trailing warper stands for, or None if FusedSampling cannot stand in for it."""
    from transformers.generation import logits_process as lp

    if getattr(processor, "min_tokens_to_keep", 1) != 1 or getattr(processor, "filter_value", -math.inf) != -math.inf:
        return None
    if type(processor) is lp.TemperatureLogitsWarper:
        return "temperature", float(processor.temperature)
    if type(processor) is lp.TopKLogitsWarper:
        return "top_k", int(processor.top_k)
    if type(processor) is lp.TopPLogitsWarper:
        return "top_p", float(processor.top_p)
    if type(processor) is lp.MinPLogitsWarper:
        return "min_p", float(processor.min_p)
    return None


_ORDER = ("temperature", "top_k", "top_p", "min_p")


def fuse_warpers(processors):
    """The processor list with its trailing temperature/top-k/top-p/min-p warpers (in Hugging Face's order; none
    for plain sampling) replaced by one FusedSampling; unchanged when another warper (typical-p, epsilon, eta, or
    one keeping more than one token) sits at or before the end of that run, since sampling must come after it."""
    settings, start = {}, len(processors)
    while start > 0:
        found = _warper_settings(processors[start - 1])
        if found is None or found[0] in settings or any(_ORDER.index(found[0]) > _ORDER.index(k) for k in settings):
            break
        settings[found[0]] = found[1]
        start -= 1
    if start > 0 and type(processors[start - 1]).__name__.endswith("LogitsWarper"):
        return processors
    fused = type(processors)(list(processors[:start]))
    fused.append(FusedSampling(**settings))
    return fused


def _multinomial(input, num_samples, replacement=False, *, generator=None, out=None):
    """torch.multinomial, except right after FusedSampling: its token, when `input` is the one-hot it made."""
    tokens = getattr(_drawn, "tokens", None)
    _drawn.tokens = None
    if (
        tokens is not None
        and out is None
        and num_samples == 1
        and input.dim() == 2
        and input.shape[0] == tokens.shape[0]
        and input.device == tokens.device
        and (input.device.type != "cpu" or bool((input.gather(1, tokens[:, None]) == 1).all()))
    ):
        return tokens[:, None]
    return torch.multinomial(input, num_samples, replacement, generator=generator, out=out)


def _torch_with_fused_draw():
    """A stand-in for the `torch` module in transformers' generation code: everything is torch's, but
    `multinomial`, which takes the token FusedSampling drew."""
    proxy = types.ModuleType("torch")
    proxy.__getattr__ = lambda name: getattr(torch, name)
    proxy.multinomial = _multinomial
    return proxy


def _install():
    """Wraps GenerationMixin._get_logits_processor and gives the generation module the torch stand-in."""
    import importlib

    generation = importlib.import_module(_GENERATION)
    mixin = generation.GenerationMixin
    if "torch.multinomial" not in inspect.getsource(mixin._sample):
        raise _Unsupported("its sampling loop no longer calls torch.multinomial")
    original = mixin.__dict__["_get_logits_processor"]
    signature = inspect.signature(original)

    @functools.wraps(original)
    def _get_logits_processor(self, *args, **kwargs):
        processors = original(self, *args, **kwargs)
        config = signature.bind(self, *args, **kwargs).arguments.get("generation_config")
        if config is None or not config.do_sample or (config.num_beams or 1) > 1:
            return processors
        return fuse_warpers(processors)

    mixin._get_logits_processor = _get_logits_processor
    generation.torch = _torch_with_fused_draw()

    def undo():
        mixin._get_logits_processor = original
        generation.torch = torch
        _drawn.tokens = None

    return undo


class _Unsupported(RuntimeError):
    pass


def _guarded_install():
    try:
        return _install()
    except _Unsupported as exc:
        import warnings

        warnings.warn(
            f"rlhf_fast.integrations.transformers: generate is left as Hugging Face has it: {exc}",
            RuntimeWarning,
            stacklevel=4,
        )
        return lambda: None


_ADAPTER = Adapter("transformers", PINNED, (), hooks=(_guarded_install,))
patch = _ADAPTER.patch
unpatch = _ADAPTER.unpatch
