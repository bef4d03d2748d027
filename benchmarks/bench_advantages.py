"""Advantages family: GAE against the reversed Python loop of TRL/OpenRLHF/verl, group advantages and whitening."""

from __future__ import annotations

import torch

import rlhf_fast as rf
from rlhf_fast import reference

from .harness import Case, compiled, kernel_providers

# torch.compile unrolls the T-step loop into one graph; past this many steps compiling takes minutes.
COMPILE_MAX_STEPS = 256


def _right_padded(batch, steps, dtype, device):
    lengths = torch.randint(steps // 2, steps + 1, (batch,), device=device)
    mask = torch.arange(steps, device=device)[None] < lengths[:, None]
    rewards = torch.randn(batch, steps, device=device).mul_(mask).to(dtype)
    values = torch.randn(batch, steps, device=device).mul_(mask).to(dtype)
    return rewards, values, mask


def _gae_case(batch, steps, dtype, device):
    rewards, values, mask = _right_padded(batch, steps, dtype, device)
    eager = lambda: reference.gae_right_padded_loop(rewards, values, gamma=1.0, lam=0.95)  # noqa: E731
    providers = {"eager": eager}
    skipped = {}
    if steps <= COMPILE_MAX_STEPS:
        providers["compile"] = lambda fn=compiled(reference.gae_right_padded_loop): fn(
            rewards, values, gamma=1.0, lam=0.95
        )
    else:
        skipped["compile"] = f"T={steps} > {COMPILE_MAX_STEPS}: compiling the unrolled loop takes minutes"
    providers.update(
        kernel_providers(device, lambda name: rf.gae(rewards, values, mask, gamma=1.0, lam=0.95, backend=name))
    )
    n = batch * steps
    float64 = None
    if dtype != torch.float32:
        float64 = lambda: reference.gae(rewards.double(), values.double(), mask, gamma=1.0, lam=0.95)  # noqa: E731
    return Case(
        "gae",
        f"B={batch},T={steps}",
        dtype,
        "fwd",
        providers,
        bytes_moved=n * (2 * rewards.element_size() + 1 + 8),
        skipped=skipped,
        atol=1e-3,
        reference=float64,
    )


def _grpo_case(prompts, group, device):
    scores = torch.randn(prompts * group, device=device)

    def eager():
        groups = scores.view(-1, group)
        return ((groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-6)).view(-1)

    providers = {"eager": eager, "compile": compiled(eager)}
    providers.update(kernel_providers(device, lambda name: rf.grpo_advantages(scores, group, backend=name)))
    return Case(
        "grpo_advantages",
        f"prompts={prompts},G={group}",
        torch.float32,
        "fwd",
        providers,
        bytes_moved=scores.numel() * 8,
    )


def _whiten_case(batch, steps, device):
    x = torch.randn(batch, steps, device=device) * 3 + 1
    mask = torch.rand(batch, steps, device=device) > 0.2

    def eager():  # TRL's masked_whiten
        mean = (x * mask).sum() / mask.sum()
        centred = x - mean
        var = (centred**2 * mask).sum() / mask.sum() * (mask.sum() / (mask.sum() - 1))
        return centred * torch.rsqrt(var + 1e-8)

    providers = {"eager": eager, "compile": compiled(eager)}
    providers.update(kernel_providers(device, lambda name: rf.masked_whiten(x, mask, backend=name)))
    return Case(
        "masked_whiten",
        f"B={batch},T={steps}",
        torch.float32,
        "fwd",
        providers,
        bytes_moved=x.numel() * (4 + 1 + 4 + 4),
        atol=1e-3,
    )


def cases(device: torch.device, quick: bool) -> list[Case]:
    if quick:
        return [_gae_case(64, 256, torch.float32, device), _grpo_case(256, 8, device), _whiten_case(64, 256, device)]
    if device.type == "cuda":
        return [
            _gae_case(1024, 8192, torch.float32, device),
            _gae_case(1024, 8192, torch.bfloat16, device),
            _gae_case(256, 2048, torch.float32, device),
            _gae_case(64, 256, torch.float32, device),
            _grpo_case(4096, 16, device),
            _whiten_case(1024, 8192, device),
        ]
    return [
        _gae_case(256, 2048, torch.float32, device),
        _gae_case(256, 2048, torch.bfloat16, device),
        _gae_case(64, 256, torch.float32, device),
        _grpo_case(4096, 16, device),
        _whiten_case(256, 2048, device),
    ]
