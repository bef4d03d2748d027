"""Fake (meta) kernels and autograd for the rlhf_fast ops, in one place.

Compiled ops live under torch.ops.rlhf_fast (csrc/registration.cpp); Triton ops under torch.ops.rlhf_fast_triton
share their schemas and register the same backward through `register_triton_autograd`.
"""
from __future__ import annotations

import torch

from . import backend

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
    grad_delta, _ = gae_op(upstream, torch.zeros_like(upstream), flipped_mask, None, n - cu_seqlens.flip(0),
                           gamma * ctx.lam, 1.0)
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
            grad_last_value = torch.where(has_last, gamma * grad_delta[last.clamp(min=0)] if n else 0.0,
                                          torch.zeros(lengths.shape, device=grad_delta.device))
    return grad_rewards, grad_values, None, grad_last_value, None, None, None


def _group_advantages_fake(scores, group_size, norm_std, leave_one_out, eps):
    return scores.new_empty(scores.shape, dtype=torch.float32)


def _masked_moments_fake(x, mask):
    return x.new_empty((3,), dtype=torch.float64)


# ---------------------------------------------------------------- divergence


def _f_divergence_fake(logits_p, logits_q, mask, kind, alpha, temperature):
    rows = logits_p.shape[0]
    return logits_p.new_empty((rows,), dtype=torch.float32), logits_p.new_empty((rows, 3), dtype=torch.float32)


def _f_divergence_backward_fake(grad_out, logits_p, logits_q, mask, out, stats, kind, alpha, temperature,
                                need_grad_p, need_grad_q):
    return (logits_p.new_empty(logits_p.shape if need_grad_p else (0,)),
            logits_q.new_empty(logits_q.shape if need_grad_q else (0,)))


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
    grad_p, grad_q = backward_op(grad_out.float().contiguous(), logits_p, logits_q, mask, out, stats,
                                 *ctx.divergence, need_p, need_q)
    return grad_p if need_p else None, grad_q if need_q else None, None, None, None, None


def _register_divergence() -> None:
    torch.library.register_fake("rlhf_fast::f_divergence")(_f_divergence_fake)
    torch.library.register_fake("rlhf_fast::f_divergence_backward")(_f_divergence_backward_fake)
    torch.library.register_autograd(
        "rlhf_fast::f_divergence",
        lambda ctx, g, gs: f_divergence_backward(torch.ops.rlhf_fast.f_divergence_backward, ctx, g, gs),
        setup_context=_f_divergence_setup_context)


def register_triton_divergence_autograd(module) -> None:
    """Called by rlhf_fast.triton.divergence once its triton_ops exist."""
    module.f_divergence.register_autograd(
        lambda ctx, g, gs: f_divergence_backward(module.f_divergence_backward, ctx, g, gs),
        setup_context=_f_divergence_setup_context)


# ---------------------------------------------------------------- registration


def _register_compiled() -> None:
    torch.library.register_fake("rlhf_fast::gae")(_gae_fake)
    torch.library.register_fake("rlhf_fast::group_advantages")(_group_advantages_fake)
    torch.library.register_fake("rlhf_fast::masked_moments")(_masked_moments_fake)
    torch.library.register_autograd(
        "rlhf_fast::gae", lambda ctx, ga, gr: gae_backward(torch.ops.rlhf_fast.gae, ctx, ga, gr),
        setup_context=_gae_setup_context)
    _register_divergence()


def register_triton_autograd(module) -> None:
    """Called by the Triton family modules once their triton_ops exist."""
    if hasattr(module, "gae"):
        module.gae.register_autograd(lambda ctx, ga, gr: gae_backward(module.gae, ctx, ga, gr),
                                     setup_context=_gae_setup_context)


if backend.compiled() is not None:
    _register_compiled()
