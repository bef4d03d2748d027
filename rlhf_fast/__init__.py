"""rlhf_fast: fused kernels for RLHF training (log-probs, GAE, divergences, quantized matmuls) and a lean PPO loop.

    import rlhf_fast as rf
    advantages, returns = rf.gae(rewards, values, mask, gamma=1.0, lam=0.95)

Every op takes ``backend=`` ("auto", "triton", "cuda", "cpu", "torch"); see rlhf_fast.backend.
"""

from __future__ import annotations

import warnings

from . import backend
from .backend import BackendUnavailable

__version__ = "0.1.0"

if backend.compiled() is None:
    warnings.warn(
        f"rlhf_fast: {backend.compiled_error()}. Only the torch and triton backends are available; "
        f"reinstall with `pip install --no-build-isolation -e .` to build the C++/CUDA kernels.",
        RuntimeWarning,
        stacklevel=2,
    )

from . import _ops  # noqa: E402,F401  (fake kernels and autograd of the compiled ops)
from .advantages import gae, gae_packed, grpo_advantages, masked_mean, masked_whiten, rloo_advantages  # noqa: E402
from .divergence import f_divergence, linear_f_divergence  # noqa: E402
from .linear_losses import linear_ppo_policy_loss  # noqa: E402
from .logprobs import entropy, linear_logprobs, logprobs  # noqa: E402
from .losses import agg_loss, kl_penalty, masked_sum, ppo_policy_loss, ppo_value_loss  # noqa: E402
from .quant import QuantizedLinear, QuantizedWeight, qmatmul, quantize_model, quantize_weight  # noqa: E402
from .sampling import linear_sample, sample  # noqa: E402

__all__ = [
    "BackendUnavailable",
    "backend",
    # advantages
    "gae",
    "gae_packed",
    "grpo_advantages",
    "masked_mean",
    "masked_whiten",
    "rloo_advantages",
    # divergence
    "f_divergence",
    "linear_f_divergence",
    # linear_losses
    "linear_ppo_policy_loss",
    # logprobs
    "entropy",
    "linear_logprobs",
    "logprobs",
    # losses
    "agg_loss",
    "kl_penalty",
    "masked_sum",
    "ppo_policy_loss",
    "ppo_value_loss",
    # sampling
    "linear_sample",
    "sample",
    # quant
    "QuantizedLinear",
    "QuantizedWeight",
    "qmatmul",
    "quantize_model",
    "quantize_weight",
]
