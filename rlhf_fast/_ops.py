"""Fake (meta) kernels and autograd for the rlhf_fast ops, in one place.

Compiled ops live under torch.ops.rlhf_fast (csrc/registration.cpp); Triton ops under torch.ops.rlhf_fast_triton
share their schemas and register the same backward through `register_triton_autograd`.
"""

from __future__ import annotations

import torch

from . import backend


def _register_autograd(name: str, backward, setup_context) -> None:
    """The backward of the compiled op rlhf_fast::<name>, for the dispatcher (torch.compile, direct torch.ops
    calls) and for the eager calls of backend.call."""
    torch.library.register_autograd(f"rlhf_fast::{name}", backward, setup_context=setup_context)
    backend.register_eager_autograd(getattr(torch.ops.rlhf_fast, name), backward, setup_context)


def _register_triton_autograd(op, backward, setup_context) -> None:
    """The same for a Triton triton_op."""
    op.register_autograd(backward, setup_context=setup_context)
    backend.register_eager_autograd(op, backward, setup_context)


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


def gae_backward(gae_op, ctx, grad_advantages, grad_returns):
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


def logprobs_backward(backward_op, ctx, grad_logp, grad_entropy, grad_lse):
    """d(logits) from the saved lse and entropy, one pass over the logits (grad_lse: lse is an internal output)."""
    logits, labels, lse, entropy = ctx.saved_tensors
    grad_logp = None if grad_logp is None or labels is None else grad_logp.float().contiguous()
    grad_entropy = None if grad_entropy is None else grad_entropy.float().contiguous()
    if grad_logp is None and grad_entropy is None:
        return None, None, None, None
    grad = backward_op(grad_logp, grad_entropy, logits, labels, lse, entropy, ctx.temperature, ctx.ignore_index)
    return grad, None, None, None


def register_logprobs_triton_autograd(module) -> None:
    """Called by rlhf_fast.triton.logprobs once its triton_ops exist."""
    _register_triton_autograd(
        module.logprobs_forward,
        lambda ctx, *grads: logprobs_backward(module.logprobs_backward, ctx, *grads),
        _logprobs_setup_context,
    )


def _register_logprobs_compiled() -> None:
    torch.library.register_fake("rlhf_fast::logprobs_forward")(_logprobs_forward_fake)
    torch.library.register_fake("rlhf_fast::logprobs_backward")(_logprobs_backward_fake)
    torch.library.register_fake("rlhf_fast::logprobs_backward_")(_logprobs_backward_inplace_fake)
    _register_autograd(
        "logprobs_forward",
        lambda ctx, *grads: logprobs_backward(torch.ops.rlhf_fast.logprobs_backward, ctx, *grads),
        _logprobs_setup_context,
    )


if backend.compiled() is not None:
    _register_logprobs_compiled()
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


def f_divergence_backward(backward_op, ctx, grad_out, _grad_stats):
    """One kernel reads both logits once and writes the gradients that are needed, from the per-row (lse_p,
    lse_q, aux) statistics the forward saved."""
    logits_p, logits_q, mask, out, stats = ctx.saved_tensors
    need_p, need_q = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_p, grad_q = backward_op(
        grad_out.float().contiguous(), logits_p, logits_q, mask, out, stats, *ctx.divergence, need_p, need_q
    )
    return grad_p if need_p else None, grad_q if need_q else None, None, None, None, None


def _register_divergence() -> None:
    torch.library.register_fake("rlhf_fast::f_divergence")(_f_divergence_fake)
    torch.library.register_fake("rlhf_fast::f_divergence_backward")(_f_divergence_backward_fake)
    torch.library.register_fake("rlhf_fast::f_divergence_second_pass")(_f_divergence_second_pass_fake)
    _register_autograd(
        "f_divergence",
        lambda ctx, g, gs: f_divergence_backward(torch.ops.rlhf_fast.f_divergence_backward, ctx, g, gs),
        _f_divergence_setup_context,
    )


def register_triton_divergence_autograd(module) -> None:
    """Called by rlhf_fast.triton.divergence once its triton_ops exist."""
    _register_triton_autograd(
        module.f_divergence,
        lambda ctx, g, gs: f_divergence_backward(module.f_divergence_backward, ctx, g, gs),
        _f_divergence_setup_context,
    )


# ---------------------------------------------------------------- registration


def _register_compiled() -> None:
    torch.library.register_fake("rlhf_fast::gae")(_gae_fake)
    torch.library.register_fake("rlhf_fast::group_advantages")(_group_advantages_fake)
    torch.library.register_fake("rlhf_fast::masked_moments")(_masked_moments_fake)
    _register_autograd(
        "gae", lambda ctx, ga, gr: gae_backward(torch.ops.rlhf_fast.gae, ctx, ga, gr), _gae_setup_context
    )
    _register_divergence()


def register_triton_autograd(module) -> None:
    """Called by the Triton family modules once their triton_ops exist."""
    if hasattr(module, "gae"):
        _register_triton_autograd(
            module.gae, lambda ctx, ga, gr: gae_backward(module.gae, ctx, ga, gr), _gae_setup_context
        )


if backend.compiled() is not None:
    _register_compiled()

# ---------------------------------------------------------------- losses


def _kl_penalty_fake(logp, ref_logp, kind):
    return logp.new_empty(logp.shape, dtype=torch.float32)


def _kl_penalty_backward_fake(grad, logp, ref_logp, kind):
    return torch.empty_like(logp)


def _kl_penalty_setup_context(ctx, inputs, output):
    logp, ref_logp, kind = inputs
    ctx.save_for_backward(logp, ref_logp)
    ctx.kind = kind


def kl_penalty_backward(backward_op, ctx, grad):
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


def ppo_loss_backward(backward_op, ctx, grad_loss, grad_stats):
    """Gradient of the first input only (logp / values); the others are detached by contract. The stats are not
    differentiable: their gradient is ignored."""
    a, b, c, mask, stats = ctx.saved_tensors
    grad = backward_op(grad_loss.float().reshape(()).contiguous(), a, b, c, mask, stats, *ctx.params)
    return (grad,) + (None,) * (3 + len(ctx.params))


def _register_losses_compiled() -> None:
    ops = torch.ops.rlhf_fast
    torch.library.register_fake("rlhf_fast::kl_penalty")(_kl_penalty_fake)
    torch.library.register_fake("rlhf_fast::kl_penalty_backward")(_kl_penalty_backward_fake)
    _register_autograd(
        "kl_penalty", lambda ctx, g: kl_penalty_backward(ops.kl_penalty_backward, ctx, g), _kl_penalty_setup_context
    )
    for op in ("ppo_policy_loss", "ppo_value_loss"):
        backward_op = getattr(ops, f"{op}_backward")
        torch.library.register_fake(f"rlhf_fast::{op}")(_ppo_loss_fake)
        torch.library.register_fake(f"rlhf_fast::{op}_backward")(_ppo_loss_backward_fake)
        _register_autograd(
            op,
            lambda ctx, gl, gs, backward_op=backward_op: ppo_loss_backward(backward_op, ctx, gl, gs),
            _ppo_loss_setup_context,
        )


def register_losses_triton_autograd(module) -> None:
    """Called by rlhf_fast.triton.losses once its triton_ops exist."""
    _register_triton_autograd(
        module.kl_penalty,
        lambda ctx, g: kl_penalty_backward(module.kl_penalty_backward, ctx, g),
        _kl_penalty_setup_context,
    )
    for op, backward_op in (
        (module.ppo_policy_loss, module.ppo_policy_loss_backward),
        (module.ppo_value_loss, module.ppo_value_loss_backward),
    ):
        _register_triton_autograd(
            op,
            lambda ctx, gl, gs, backward_op=backward_op: ppo_loss_backward(backward_op, ctx, gl, gs),
            _ppo_loss_setup_context,
        )


if backend.compiled() is not None:
    _register_losses_compiled()

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


def _qmatmul_backward(ctx, grad):
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


QMATMUL_OPS = ("qmatmul_int8", "qmatmul_int4", "qmatmul_w8a8")


def _register_quant_compiled() -> None:
    for op in QMATMUL_OPS:
        torch.library.register_fake(f"rlhf_fast::{op}")(_qmatmul_fake)
        torch.library.register_autograd(f"rlhf_fast::{op}", _qmatmul_backward, setup_context=_qmatmul_setup_context)


def register_triton_quant_autograd(module) -> None:
    """Called by rlhf_fast.triton.quant once its triton_ops exist."""
    for op in QMATMUL_OPS:
        getattr(module, op).register_autograd(_qmatmul_backward, setup_context=_qmatmul_setup_context)


if backend.compiled() is not None:
    _register_quant_compiled()


# ---------------------------------------------------------------- sampling


def _sample_fake(logits, uniforms, temperature, top_k, top_p, min_p):
    shape = logits.shape[:2]
    return (
        logits.new_empty(shape, dtype=torch.long),
        logits.new_empty(shape, dtype=torch.float32),
        logits.new_empty(shape, dtype=torch.float32),
    )


if backend.compiled() is not None:
    torch.library.register_fake("rlhf_fast::sample")(_sample_fake)
