"""Sampling family: one token per row at a decode step's shape. eager = what generation runs today,
torch.multinomial(softmax(logits / T)) (and Hugging Face's top-k / top-p warpers in front of it); rlhf_fast's
sample draws the same law in one pass and returns the token's log-prob too. Draws are random, so the providers'
outputs are not compared here (tests/test_sampling.py checks the distributions)."""

from __future__ import annotations

import torch

import rlhf_fast as rf
from rlhf_fast import reference

from .harness import Case, compiled, kernel_providers


def _draw_only(fn):
    def run():
        fn()

    return run


def _sample_case(rows, vocab, dtype, device, **filters):
    logits = (torch.randn(rows, vocab, device=device) * 3).to(dtype)
    temperature = filters.pop("temperature", 0.8)
    if filters:
        eager = lambda: reference.sample_with_warpers(logits, temperature=temperature, **filters)  # noqa: E731
    else:
        eager = lambda: torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1)  # noqa: E731
    providers = {"eager": _draw_only(eager)}
    if not filters:
        compiled_eager = compiled(lambda x: torch.multinomial(torch.softmax(x / temperature, dim=-1), 1))
        providers["compile"] = _draw_only(lambda: compiled_eager(logits))
    providers.update(
        {
            name: _draw_only(fn)
            for name, fn in kernel_providers(
                device, lambda name: rf.sample(logits, temperature=temperature, backend=name, **filters)
            ).items()
        }
    )
    label = ",".join(f"{k}={v}" for k, v in filters.items())
    return Case(
        "sample" + (f"[{label}]" if label else ""),
        f"N={rows},V={vocab}",
        dtype,
        "fwd",
        providers,
        bytes_moved=rows * vocab * logits.element_size(),
    )


def _linear_case(rows, hidden_size, vocab, device):
    hidden = torch.randn(rows, hidden_size, device=device)
    weight = torch.randn(vocab, hidden_size, device=device) / hidden_size**0.5
    eager = lambda: torch.multinomial(torch.softmax(hidden @ weight.T / 0.8, dim=-1), 1)  # noqa: E731
    providers = {"eager": _draw_only(eager)}
    providers.update(
        {
            name: _draw_only(fn)
            for name, fn in kernel_providers(
                device, lambda name: rf.linear_sample(hidden, weight, temperature=0.8, backend=name)
            ).items()
        }
    )
    return Case(
        "linear_sample",
        f"N={rows},H={hidden_size},V={vocab}",
        torch.float32,
        "fwd",
        providers,
        flops=2 * rows * hidden_size * vocab,
    )


def cases(device: torch.device, quick: bool) -> list[Case]:
    if quick:
        return [
            _sample_case(16, 32000, torch.float32, device),
            _sample_case(16, 32000, torch.float32, device, top_k=50, top_p=0.9),
        ]
    rows, vocab = 64, 151936
    return [
        _sample_case(rows, vocab, torch.float32, device),
        _sample_case(rows, vocab, torch.bfloat16, device),
        _sample_case(rows, vocab, torch.float32, device, top_k=50, top_p=0.9),
        _sample_case(rows, vocab, torch.float32, device, top_p=0.9),
        _sample_case(rows, vocab, torch.float32, device, min_p=0.05),
        _linear_case(rows, 128, vocab, device),
    ]
