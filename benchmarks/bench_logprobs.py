"""Log-prob family: fused log-softmax + gather (+ entropy) against log_softmax + gather as TRL/OpenRLHF/verl
write it, TRL's per-row loop, torch.compile, and liger-kernel / cut-cross-entropy when installed; forward and
forward+backward, time and peak memory. linear_logprobs against lm_head + log_softmax + gather."""

from __future__ import annotations

import importlib.util

import torch

import rlhf_fast as rf
from rlhf_fast import reference

from .harness import Case, compiled, kernel_providers


def _eager(logits, labels):
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def _eager_with_entropy(logits, labels):
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return log_probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1), -(log_probs.exp() * log_probs).sum(-1)


def _peer_logprobs(device):
    """{name: fn(logits, labels) -> logp fp32} for the peers installed here, and {name: why not} for the others."""
    found, missing = {}, {}
    if device.type == "cuda" and importlib.util.find_spec("liger_kernel") is not None:
        from liger_kernel.transformers.functional import liger_cross_entropy

        def liger(logits, labels):
            out = liger_cross_entropy(logits.flatten(0, -2), labels.flatten(), reduction="none")
            loss = getattr(out, "loss", out[0] if isinstance(out, tuple) else out)  # its return type varies by version
            return -loss.float().view(labels.shape)

        found["liger"] = liger
    else:
        missing["liger"] = "liger-kernel not installed" if device.type == "cuda" else "GPU only"
    return found, missing


def _backward_of(fn, x, upstream):
    """fwd+bwd provider: fn(x) -> outputs, backward with per-token upstream gradients; returns (outputs, grad).
    The gradient is detached from x before returning, so no call frees the previous call's (which would hide
    the new one from the peak-memory count)."""

    def run():
        out = fn(x)
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward(outs, upstream[: len(outs)])
        grad, x.grad = x.grad, None
        return tuple(o.detach() for o in outs), grad

    return run


def _logprobs_cases(batch, steps, vocab, dtype, device, with_entropy=False):
    logits = (torch.randn(batch, steps, vocab, device=device) * 3).to(dtype)
    labels = torch.randint(0, vocab, (batch, steps), device=device)
    n = batch * steps
    shape = f"N={n},V={vocab}"
    op = "logprobs+entropy" if with_entropy else "logprobs"
    eager = _eager_with_entropy if with_entropy else _eager
    ours = lambda x, name: rf.logprobs(x, labels, return_entropy=with_entropy, backend=name)  # noqa: E731
    peers, missing = ({}, {"liger": "no entropy output"}) if with_entropy else _peer_logprobs(device)

    fwd = {"eager": lambda: eager(logits, labels)}
    if not with_entropy:
        fwd["eager-loop"] = lambda: reference.logprobs_per_row_loop(logits, labels)
    fwd["compile"] = lambda fn=compiled(eager): fn(logits, labels)
    fwd.update(kernel_providers(device, lambda name: ours(logits, name)))
    fwd.update({peer: (lambda fn=fn: fn(logits, labels)) for peer, fn in peers.items()})
    read = n * vocab * logits.element_size()
    cases = [Case(op, shape, dtype, "fwd", fwd, bytes_moved=read + n * 16, skipped=dict(missing))]

    x = logits.clone().requires_grad_()
    upstream = (torch.randn(batch, steps, device=device), torch.randn(batch, steps, device=device))
    both = {"eager": _backward_of(lambda t: eager(t, labels), x, upstream)}
    if not with_entropy:
        both["eager-loop"] = _backward_of(lambda t: reference.logprobs_per_row_loop(t, labels), x, upstream)
    both["compile"] = _backward_of(lambda t, fn=compiled(eager): fn(t, labels), x, upstream)
    both.update(kernel_providers(device, lambda name: _backward_of(lambda t: ours(t, name), x, upstream)()))
    # In place: the gradient overwrites inplace_x, so repetitions after the first (which is checked) run on
    # gradients instead of logits; the work per element is the same.
    inplace_x = logits.clone().requires_grad_()
    inplace = lambda name: _backward_of(  # noqa: E731
        lambda t: rf.logprobs(t, labels, return_entropy=with_entropy, inplace_backward=True, backend=name),
        inplace_x,
        upstream,
    )()
    both.update({f"{name}-inplace": fn for name, fn in kernel_providers(device, inplace).items()})
    both.update({peer: _backward_of(lambda t, fn=fn: fn(t, labels), x, upstream) for peer, fn in peers.items()})
    cases.append(Case(op, shape, dtype, "fwd+bwd", both, bytes_moved=3 * read + n * 24, skipped=dict(missing)))
    return cases


def _linear_cases(tokens, hidden_size, vocab, dtype, device):
    hidden = torch.randn(tokens, hidden_size, device=device).to(dtype)
    weight = (torch.randn(vocab, hidden_size, device=device) / hidden_size**0.5).to(dtype)
    labels = torch.randint(0, vocab, (tokens,), device=device)
    shape = f"N={tokens},H={hidden_size},V={vocab}"
    eager = lambda h, w: _eager(torch.nn.functional.linear(h, w), labels)  # noqa: E731
    ours = lambda h, w, name: rf.linear_logprobs(h, w, labels, backend=name)  # noqa: E731
    skipped = {}
    peers = {}
    if device.type == "cuda" and importlib.util.find_spec("cut_cross_entropy") is not None:
        from cut_cross_entropy import linear_cross_entropy

        peers["cut-cross-entropy"] = lambda h, w: -linear_cross_entropy(h, w, labels, reduction="none").float()
    else:
        skipped["cut-cross-entropy"] = "cut-cross-entropy not installed" if device.type == "cuda" else "GPU only"
    flops = 2 * tokens * hidden_size * vocab

    fwd = {"eager": lambda: eager(hidden, weight), "compile": lambda fn=compiled(eager): fn(hidden, weight)}
    fwd.update(kernel_providers(device, lambda name: ours(hidden, weight, name)))
    fwd.update({peer: (lambda fn=fn: fn(hidden, weight)) for peer, fn in peers.items()})

    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    upstream = (torch.randn(tokens, device=device),)

    def with_grads(fn):
        def run():
            out, grad_h = _backward_of(lambda t: fn(t, w), h, upstream)()
            grad_w, w.grad = w.grad, None
            return out, grad_h, grad_w

        return run

    both = {"eager": with_grads(eager), "compile": with_grads(compiled(eager))}
    both.update(kernel_providers(device, lambda name: with_grads(lambda a, b: ours(a, b, name))()))
    both.update({peer: with_grads(fn) for peer, fn in peers.items()})
    return [
        Case("linear_logprobs", shape, dtype, "fwd", fwd, flops=flops, skipped=dict(skipped), atol=2e-2),
        Case("linear_logprobs", shape, dtype, "fwd+bwd", both, flops=3 * flops, skipped=dict(skipped), atol=2e-2),
    ]


def cases(device: torch.device, quick: bool) -> list[Case]:
    if quick:
        return (
            _logprobs_cases(4, 16, 4096, torch.float32, device)
            + _logprobs_cases(4, 16, 4096, torch.bfloat16, device, with_entropy=True)
            + _linear_cases(64, 64, 4096, torch.float32, device)
        )
    if device.type == "cuda":
        return (
            _logprobs_cases(16, 1024, 151936, torch.bfloat16, device)
            + _logprobs_cases(16, 1024, 151936, torch.bfloat16, device, with_entropy=True)
            + _logprobs_cases(8, 1024, 128256, torch.bfloat16, device)
            + _logprobs_cases(4, 1024, 32000, torch.float32, device)
            + _linear_cases(16384, 4096, 151936, torch.bfloat16, device)
        )
    return (
        _logprobs_cases(8, 512, 32000, torch.float32, device)
        + _logprobs_cases(8, 512, 32000, torch.bfloat16, device)
        + _logprobs_cases(8, 512, 32000, torch.float32, device, with_entropy=True)
        + _linear_cases(2048, 256, 32000, torch.float32, device)
    )
