"""The rlhf_fast ops outside their kernels: one spec per op (fake kernel, setup_context, backward), registered in
one place, and how the family modules reach and call a backend's ops.

Compiled ops live under torch.ops.rlhf_fast (csrc/registration.cpp) and get their specs when this module is
imported. The Triton triton_ops of rlhf_fast.triton.<family> (torch.ops.rlhf_fast_triton, the same schemas) get
their family's specs when `kernels` first loads that module; a triton_op needs no fake kernel (torch traces its
launcher).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import NamedTuple

import torch

from . import backend

COMPILED = "rlhf_fast"
TRITON = "rlhf_fast_triton"


class OpSpec(NamedTuple):
    """What the dispatcher needs of an op besides its kernels.

    fake(*inputs): the outputs' shapes and dtypes (compiled ops). setup_context(ctx, inputs, output) and
    backward(backward_op, ctx, *grads): its autograd, where backward_op is the op named `backward_op` of the same
    backend (None: the backward runs no op of its own)."""

    fake: Callable | None = None
    setup_context: Callable | None = None
    backward: Callable | None = None
    backward_op: str | None = None


# ---------------------------------------------------------------- advantages


def _gae_fake(rewards, values, mask, last_value, cu_seqlens, gamma, lam):
    out = rewards.new_empty(rewards.shape, dtype=torch.float32)
    return out, torch.empty_like(out)


def _gae_setup_context(ctx, inputs, output):
    rewards, values, mask, last_value, cu_seqlens, gamma, lam = inputs
    ctx.save_for_backward(mask, cu_seqlens)
    ctx.gamma, ctx.lam = gamma, lam
    ctx.dtypes = rewards.dtype, values.dtype
    ctx.has_last_value = last_value is not None


def _gae_backward(gae_op, ctx, grad_advantages, grad_returns):
    """Backward of packed GAE through the forward kernel itself.

    returns = A + V, so A receives g = gA + gR. A_t = sum over later valid k of (g*l)^n delta_k, hence
    g_delta_k = sum over earlier valid t of (g*l)^n g_t: the same recurrence run forward in time, which is the
    forward kernel on the reversed tokens with values = 0, gamma' = gamma*lam, lam' = 1.
    delta_t = r_t + gamma V_next(t) - V_t gives g_r = g_delta, g_V_t = gR_t - g_delta_t + gamma g_delta_prev(t)
    (prev(t): the valid token whose successor is t), g_last_value = gamma g_delta at each segment's last valid token.
    """
    mask, cu_seqlens = ctx.saved_tensors
    gamma = ctx.gamma
    n = grad_advantages.numel()
    upstream = (grad_advantages + grad_returns).float().flip(0)
    flipped_mask = mask.flip(0) if mask is not None else None
    grad_delta, _ = gae_op(
        upstream, torch.zeros_like(upstream), flipped_mask, None, n - cu_seqlens.flip(0), gamma * ctx.lam, 1.0
    )
    grad_delta = grad_delta.flip(0)
    grad_rewards = grad_values = grad_last_value = None
    if ctx.needs_input_grad[0]:
        grad_rewards = grad_delta.to(ctx.dtypes[0])
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[3]:
        position = torch.arange(n, device=grad_delta.device)
        valid = mask if mask is not None else torch.ones(n, dtype=torch.bool, device=grad_delta.device)
        latest_valid = torch.where(valid, position, torch.full_like(position, -1)).cummax(0).values
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        if ctx.needs_input_grad[1]:
            segment_start = torch.repeat_interleave(cu_seqlens[:-1], lengths, output_size=n)
            prev = torch.cat([latest_valid.new_full((1,), -1), latest_valid[:-1]])
            has_prev = valid & (prev >= segment_start)
            from_prev = torch.where(has_prev, grad_delta[prev.clamp(min=0)], torch.zeros_like(grad_delta))
            own = torch.where(valid, grad_returns.float() - grad_delta, torch.zeros_like(grad_delta))
            grad_values = (own + gamma * from_prev).to(ctx.dtypes[1])
        if ctx.needs_input_grad[3]:
            last = latest_valid[(cu_seqlens[1:] - 1).clamp(min=0)] if n else cu_seqlens.new_full(lengths.shape, -1)
            has_last = (lengths > 0) & (last >= cu_seqlens[:-1])
            grad_last_value = torch.where(
                has_last,
                gamma * grad_delta[last.clamp(min=0)] if n else 0.0,
                torch.zeros(lengths.shape, device=grad_delta.device),
            )
    return grad_rewards, grad_values, None, grad_last_value, None, None, None


def _group_advantages_fake(scores, group_size, norm_std, leave_one_out, eps):
    return scores.new_empty(scores.shape, dtype=torch.float32)


def _masked_moments_fake(x, mask):
    return x.new_empty((3,), dtype=torch.float64)


# ---------------------------------------------------------------- logprobs


def _logprobs_forward_fake(logits, labels, temperature, ignore_index):
    rows = logits.shape[:2]
    logp = logits.new_empty(rows if labels is not None else (0,), dtype=torch.float32)
    return logp, logits.new_empty(rows, dtype=torch.float32), logits.new_empty(rows, dtype=torch.float32)


def _logprobs_backward_fake(grad_logp, grad_entropy, logits, labels, lse, entropy, temperature, ignore_index):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _logprobs_backward_inplace_fake(grad_logp, grad_entropy, logits, labels, lse, entropy, temperature, ignore_index):
    return None


def _logprobs_setup_context(ctx, inputs, output):
    logits, labels, temperature, ignore_index = inputs
    _, entropy, lse = output
    ctx.save_for_backward(logits, labels, lse, entropy)
    ctx.temperature, ctx.ignore_index = temperature, ignore_index
    ctx.set_materialize_grads(False)


def _logprobs_backward(backward_op, ctx, grad_logp, grad_entropy, grad_lse):
    """d(logits) from the saved lse and entropy, one pass over the logits (grad_lse: lse is an internal output)."""
    logits, labels, lse, entropy = ctx.saved_tensors
    grad_logp = None if grad_logp is None or labels is None else grad_logp.float().contiguous()
    grad_entropy = None if grad_entropy is None else grad_entropy.float().contiguous()
    if grad_logp is None and grad_entropy is None:
        return None, None, None, None
    grad = backward_op(grad_logp, grad_entropy, logits, labels, lse, entropy, ctx.temperature, ctx.ignore_index)
    return grad, None, None, None


# ---------------------------------------------------------------- divergence


def _f_divergence_fake(logits_p, logits_q, mask, kind, alpha, temperature):
    rows = logits_p.shape[0]
    return logits_p.new_empty((rows,), dtype=torch.float32), logits_p.new_empty((rows, 3), dtype=torch.float32)


def _f_divergence_backward_fake(
    grad_out, logits_p, logits_q, mask, out, stats, kind, alpha, temperature, need_grad_p, need_grad_q
):
    return (
        logits_p.new_empty(logits_p.shape if need_grad_p else (0,)),
        logits_q.new_empty(logits_q.shape if need_grad_q else (0,)),
    )


def _f_divergence_second_pass_fake(logits_p, logits_q, mask, stats, kind, temperature):
    return logits_p.new_empty((logits_p.shape[0], 2), dtype=torch.float32)


def _f_divergence_setup_context(ctx, inputs, output):
    logits_p, logits_q, mask, kind, alpha, temperature = inputs
    out, stats = output
    ctx.save_for_backward(logits_p, logits_q, mask, out, stats)
    ctx.divergence = kind, alpha, temperature
    ctx.mark_non_differentiable(stats)


def _f_divergence_backward(backward_op, ctx, grad_out, _grad_stats):
    """One kernel reads both logits once and writes the gradients that are needed, from the per-row (lse_p,
    lse_q, aux) statistics the forward saved."""
    logits_p, logits_q, mask, out, stats = ctx.saved_tensors
    need_p, need_q = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_p, grad_q = backward_op(
        grad_out.float().contiguous(), logits_p, logits_q, mask, out, stats, *ctx.divergence, need_p, need_q
    )
    return grad_p if need_p else None, grad_q if need_q else None, None, None, None, None


# ---------------------------------------------------------------- losses


def _kl_penalty_fake(logp, ref_logp, kind):
    return logp.new_empty(logp.shape, dtype=torch.float32)


def _kl_penalty_backward_fake(grad, logp, ref_logp, kind):
    return torch.empty_like(logp)


def _kl_penalty_setup_context(ctx, inputs, output):
    logp, ref_logp, kind = inputs
    ctx.save_for_backward(logp, ref_logp)
    ctx.kind = kind


def _kl_penalty_backward(backward_op, ctx, grad):
    """Every kind depends on logp - ref_logp only, so d/dref_logp = -d/dlogp: one kernel gives both."""
    logp, ref_logp = ctx.saved_tensors
    grad_logp = backward_op(grad.float().contiguous(), logp, ref_logp, ctx.kind)
    return (grad_logp if ctx.needs_input_grad[0] else None, -grad_logp if ctx.needs_input_grad[1] else None, None)


def _ppo_loss_fake(a, b, c, mask, *params):
    return a.new_empty((), dtype=torch.float32), a.new_empty((5,), dtype=torch.float32)


def _ppo_loss_backward_fake(grad_loss, a, *rest):
    return torch.empty_like(a)


def _ppo_loss_setup_context(ctx, inputs, output):
    a, b, c, mask, *params = inputs
    ctx.save_for_backward(a, b, c, mask, output[1])
    ctx.params = params


def _ppo_loss_backward(backward_op, ctx, grad_loss, grad_stats):
    """Gradient of the first input only (logp / values); the others are detached by contract. The stats are not
    differentiable: their gradient is ignored."""
    a, b, c, mask, stats = ctx.saved_tensors
    grad = backward_op(grad_loss.float().reshape(()).contiguous(), a, b, c, mask, stats, *ctx.params)
    return (grad,) + (None,) * (3 + len(ctx.params))


# ---------------------------------------------------------------- quant
# qmatmul_* (x (M, K), quantized weight tensors..., bias) -> (M, N) in x's dtype. Backward: the quantized weight
# is frozen; x gets grad @ W_deq (for w8a8 the activation rounding passes the gradient through), bias grad.sum(0).


def _qmatmul_fake(x, qweight, *args):
    return x.new_empty((x.shape[0], qweight.shape[0]))


def _qmatmul_setup_context(ctx, inputs, output):
    is_int4 = len(inputs) == 6  # (x, qweight, scales, zeros, group_size, bias)
    ctx.save_for_backward(*inputs[1 : 4 if is_int4 else 3])
    ctx.group_size = inputs[4] if is_int4 else None
    ctx.x_dtype = inputs[0].dtype
    ctx.n_inputs = len(inputs)


def _qmatmul_backward(_no_op, ctx, grad):
    from . import reference

    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        if ctx.group_size is None:
            qweight, scales = ctx.saved_tensors
            weight = reference.dequantize_int8(qweight, scales)
        else:
            qweight, scales, zeros = ctx.saved_tensors
            weight = reference.dequantize_int4(qweight, scales, zeros, ctx.group_size)
        grad_x = (grad.float() @ weight).to(ctx.x_dtype)
    if ctx.needs_input_grad[-1]:
        grad_bias = grad.float().sum(0)
    return (grad_x,) + (None,) * (ctx.n_inputs - 2) + (grad_bias,)


# ---------------------------------------------------------------- sampling


def _sample_fake(logits, uniforms, temperature, top_k, top_p, min_p):
    shape = logits.shape[:2]
    return (
        logits.new_empty(shape, dtype=torch.long),
        logits.new_empty(shape, dtype=torch.float32),
        logits.new_empty(shape, dtype=torch.float32),
    )


# ---------------------------------------------------------------- the specs, by family

_QMATMUL = OpSpec(_qmatmul_fake, _qmatmul_setup_context, _qmatmul_backward)

SPECS: dict[str, dict[str, OpSpec]] = {
    "advantages": {
        "gae": OpSpec(_gae_fake, _gae_setup_context, _gae_backward, backward_op="gae"),
        "group_advantages": OpSpec(_group_advantages_fake),
        "masked_moments": OpSpec(_masked_moments_fake),
    },
    "logprobs": {
        "logprobs_forward": OpSpec(
            _logprobs_forward_fake, _logprobs_setup_context, _logprobs_backward, backward_op="logprobs_backward"
        ),
        "logprobs_backward": OpSpec(_logprobs_backward_fake),
        "logprobs_backward_": OpSpec(_logprobs_backward_inplace_fake),
    },
    "divergence": {
        "f_divergence": OpSpec(
            _f_divergence_fake, _f_divergence_setup_context, _f_divergence_backward, backward_op="f_divergence_backward"
        ),
        "f_divergence_backward": OpSpec(_f_divergence_backward_fake),
        "f_divergence_second_pass": OpSpec(_f_divergence_second_pass_fake),
    },
    "losses": {
        "kl_penalty": OpSpec(
            _kl_penalty_fake, _kl_penalty_setup_context, _kl_penalty_backward, backward_op="kl_penalty_backward"
        ),
        "kl_penalty_backward": OpSpec(_kl_penalty_backward_fake),
        "ppo_policy_loss": OpSpec(
            _ppo_loss_fake, _ppo_loss_setup_context, _ppo_loss_backward, backward_op="ppo_policy_loss_backward"
        ),
        "ppo_policy_loss_backward": OpSpec(_ppo_loss_backward_fake),
        "ppo_value_loss": OpSpec(
            _ppo_loss_fake, _ppo_loss_setup_context, _ppo_loss_backward, backward_op="ppo_value_loss_backward"
        ),
        "ppo_value_loss_backward": OpSpec(_ppo_loss_backward_fake),
    },
    "quant": {"qmatmul_int8": _QMATMUL, "qmatmul_int4": _QMATMUL, "qmatmul_w8a8": _QMATMUL},
    "sampling": {"sample": OpSpec(_sample_fake)},
}


# ---------------------------------------------------------------- registration

# op -> the autograd Function that `call` runs it through when a gradient is needed in eager mode
_eager_functions: dict = {}


def _autograd_function(op, setup_context, backward) -> type[torch.autograd.Function]:
    """`op` as a plain torch.autograd.Function with this setup_context and backward (those of its spec).

    In eager mode it costs less per call than the autograd kernel that torch.library.register_autograd installs,
    which does the same work through the dispatcher and its Python argument handling (~20 us for a forward and
    backward at 256 tokens)."""

    def forward(ctx, *args):
        with torch._C._AutoDispatchBelowAutograd():
            out = op(*args)
        setup_context(ctx, args, out)
        return out

    return type(
        f"Eager_{getattr(op, '__name__', 'op')}",
        (torch.autograd.Function,),
        {"forward": staticmethod(forward), "backward": staticmethod(backward)},
    )


def _register(family: str, ops, namespace: str) -> None:
    """Registers the specs of `family` for its ops in `ops`, the namespace `namespace` (COMPILED:
    torch.ops.rlhf_fast, with the fake kernels; TRITON: a module of rlhf_fast.triton): the autograd through the
    dispatcher (torch.compile, direct torch.ops calls) and as the autograd Function that `call` uses."""
    for name, spec in SPECS[family].items():
        qualname = f"{namespace}::{name}"
        if namespace == COMPILED and spec.fake is not None:
            torch.library.register_fake(qualname)(spec.fake)
        if spec.backward is None:
            continue
        backward_op = None if spec.backward_op is None else getattr(ops, spec.backward_op)
        backward = functools.partial(spec.backward, backward_op)
        torch.library.register_autograd(qualname, backward, setup_context=spec.setup_context)
        op = getattr(ops, name)
        _eager_functions[op] = _autograd_function(op, spec.setup_context, backward)


# family -> rlhf_fast.triton.<family>, registered. Two threads loading a family at once both register it, which
# is harmless: a triton_op's autograd is replaced, not added to.
_triton_modules: dict = {}


def kernels(name: str, family: str):
    """The ops of kernel backend `name` for `family`: torch.ops.rlhf_fast for the compiled cpu and cuda kernels,
    or the triton_ops of rlhf_fast.triton.<family>, imported and registered (`_register`) on first use."""
    if name != "triton":
        return torch.ops.rlhf_fast
    module = _triton_modules.get(family)
    if module is None:
        module = importlib.import_module(f"rlhf_fast.triton.{family}")
        _register(family, module, TRITON)
        _triton_modules[family] = module
    return module


def _needs_grad(args) -> bool:
    if not torch.is_grad_enabled():
        return False
    for a in args:
        if isinstance(a, torch.Tensor) and a.requires_grad:
            return True
    return False


def call(op, *args):
    """op(*args) for a compiled or Triton op. When no tensor argument needs a gradient, below the autograd layer
    (the Python autograd kernel that torch.library.register_autograd installs costs ~2 us a call even then, as
    much as a small kernel itself); when one does, through the op's autograd Function (`_autograd_function`).
    Under torch.compile, the plain call (the graph sees the op as it is)."""
    if torch.compiler.is_compiling():
        return op(*args)
    if _needs_grad(args):
        function = _eager_functions.get(op)
        return op(*args) if function is None else function.apply(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def _register_compiled() -> None:
    for family in SPECS:
        _register(family, torch.ops.rlhf_fast, COMPILED)


if backend.compiled() is not None:
    _register_compiled()
