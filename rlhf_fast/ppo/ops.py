"""The one place the PPO loop gets its hot ops from.

`get_ops(kernels=True)` gives the rlhf_fast public ops (fused kernels, backend chosen by rlhf_fast.backend);
`get_ops(kernels=False)` gives the eager references in rlhf_fast.reference with the same names, for A/B runs
(`--kernels off`). The trainer calls nothing else for sampling, log-probs, KL, advantages and losses.
"""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace

import rlhf_fast as rf
from rlhf_fast import reference

OP_NAMES = (
    "logprobs",
    "linear_logprobs",
    "entropy",
    "kl_penalty",
    "masked_sum",
    "agg_loss",
    "ppo_policy_loss",
    "linear_ppo_policy_loss",
    "ppo_value_loss",
    "gae",
    "masked_whiten",
    "masked_mean",
    "grpo_advantages",
    "rloo_advantages",
    "f_divergence",
)


def _sample(logits, *, temperature, generator):
    """One token per row of (N, V) logits from softmax(logits / T), and its log-prob (the full softmax's)."""
    return rf.sample(logits, temperature=temperature, generator=generator, logprob="full")


def get_ops(kernels: bool = True) -> SimpleNamespace:
    """A namespace with every op of OP_NAMES, from rlhf_fast (kernels=True) or rlhf_fast.reference,
    `sample(logits, *, temperature, generator) -> (tokens, logp)` (rf.sample, or its eager form) and
    `linear_f_divergence` (rf's, or its torch backend: the full logits, then the eager f_divergence)."""
    source = rf if kernels else reference
    linear_f_divergence = rf.linear_f_divergence if kernels else partial(rf.linear_f_divergence, backend="torch")
    return SimpleNamespace(
        kernels=kernels,
        sample=_sample if kernels else reference.sample_rows,
        linear_f_divergence=linear_f_divergence,
        **{name: getattr(source, name) for name in OP_NAMES},
    )
