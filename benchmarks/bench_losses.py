"""Losses family: the fused PPO policy / value losses and the KL penalty against verl-style eager torch code."""

from __future__ import annotations

import torch

import rlhf_fast as rf
from rlhf_fast import reference

from .harness import Case, compiled, kernel_providers


def _inputs(batch, steps, dtype, device):
    logp = -torch.rand(batch, steps, device=device) * 4
    old_logp = logp + 0.3 * torch.randn(batch, steps, device=device)
    advantages = torch.randn(batch, steps, device=device)
    lengths = torch.randint(steps // 2, steps + 1, (batch,), device=device)
    mask = torch.arange(steps, device=device)[None] < lengths[:, None]
    return logp.to(dtype), old_logp.to(dtype), advantages.to(dtype), mask


def _fwd_bwd(fn, x):
    """A provider that runs fn(x) -> (loss, stats) forward and backward and returns (loss, stats, grad)."""

    def run():
        x.grad = None
        loss, stats = fn(x)
        loss.backward()
        return loss, stats, x.grad

    return run


def _loss_cases(op, batch, steps, dtype, device, eager_fn, kernel_fn):
    a, b, c, mask = _inputs(batch, steps, dtype, device)
    x = a.clone().requires_grad_()
    tokens, size = batch * steps, a.element_size()
    float64 = None
    if dtype != torch.float32:

        def float64():
            x64 = a.double().requires_grad_()
            loss, stats = eager_fn(x64, b.double(), c.double(), mask)
            loss.backward()
            return loss, stats, x64.grad

    shape = f"B={batch},T={steps}"
    forward = {"eager": lambda: eager_fn(a, b, c, mask), "compile": lambda fn=compiled(eager_fn): fn(a, b, c, mask)}
    forward.update(kernel_providers(device, lambda name: kernel_fn(a, b, c, mask, name)))
    both = {
        "eager": _fwd_bwd(lambda t: eager_fn(t, b, c, mask), x),
        "compile": _fwd_bwd(lambda t, fn=compiled(eager_fn): fn(t, b, c, mask), x),
    }
    both.update(kernel_providers(device, lambda name: _fwd_bwd(lambda t: kernel_fn(t, b, c, mask, name), x)()))
    fwd_bytes = tokens * (3 * size + 1)
    return [
        Case(
            op,
            shape,
            dtype,
            "fwd",
            forward,
            bytes_moved=fwd_bytes,
            atol=1e-4,
            reference=None if float64 is None else lambda: float64()[:2],
        ),
        Case(
            op, shape, dtype, "fwd+bwd", both, bytes_moved=2 * fwd_bytes + tokens * size, atol=1e-4, reference=float64
        ),
    ]


def _policy_cases(batch, steps, dtype, device):
    def eager(logp, old_logp, advantages, mask):
        return reference.ppo_policy_loss(logp, old_logp, advantages, mask, clip_low=0.2, clip_high=0.28)

    def kernel(logp, old_logp, advantages, mask, name):
        return rf.ppo_policy_loss(logp, old_logp, advantages, mask, clip_low=0.2, clip_high=0.28, backend=name)

    return _loss_cases("ppo_policy_loss", batch, steps, dtype, device, eager, kernel)


def _value_cases(batch, steps, dtype, device):
    def eager(values, old_values, returns, mask):
        return reference.ppo_value_loss(values, old_values, returns, mask, clip=0.2)

    def kernel(values, old_values, returns, mask, name):
        return rf.ppo_value_loss(values, old_values, returns, mask, clip=0.2, backend=name)

    return _loss_cases("ppo_value_loss", batch, steps, dtype, device, eager, kernel)


def _kl_case(batch, steps, dtype, device):
    logp, ref_logp, _, _ = _inputs(batch, steps, dtype, device)
    eager = lambda: reference.kl_penalty(logp, ref_logp, "k3")  # noqa: E731
    providers = {"eager": eager, "compile": lambda fn=compiled(reference.kl_penalty): fn(logp, ref_logp, "k3")}
    providers.update(kernel_providers(device, lambda name: rf.kl_penalty(logp, ref_logp, "k3", backend=name)))
    float64 = None
    if dtype != torch.float32:
        float64 = lambda: reference.kl_penalty(logp.double(), ref_logp.double(), "k3")  # noqa: E731
    return Case(
        "kl_penalty(k3)",
        f"B={batch},T={steps}",
        dtype,
        "fwd",
        providers,
        bytes_moved=batch * steps * (2 * logp.element_size() + 4),
        atol=1e-4,
        reference=float64,
    )


def cases(device: torch.device, quick: bool) -> list[Case]:
    if quick:
        return (
            _policy_cases(16, 256, torch.float32, device)
            + _value_cases(16, 256, torch.float32, device)
            + [_kl_case(16, 256, torch.float32, device)]
        )
    return (
        _policy_cases(512, 4096, torch.float32, device)
        + _policy_cases(512, 4096, torch.bfloat16, device)
        + _value_cases(512, 4096, torch.float32, device)
        + _policy_cases(64, 512, torch.float32, device)
        + [_kl_case(512, 4096, torch.float32, device), _kl_case(512, 4096, torch.bfloat16, device)]
    )
