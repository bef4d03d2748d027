"""Linear losses family: linear_ppo_policy_loss (the full PPO policy objective from hidden states and the lm-head
weight) against the eager code trainers run: the lm_head logits, log_softmax + gather, the entropy, the clipped
loss, the entropy bonus and the KL term, forward and backward (gradients of hidden and weight)."""

from __future__ import annotations

import torch

import rlhf_fast as rf
from rlhf_fast import reference

from .harness import Case, compiled, kernel_providers

OPTIONS = dict(
    clip_low=0.2, clip_high=0.28, dual_clip=3.0, agg="token-mean", entropy_coef=0.01, kl_coef=0.05, kl_kind="k3"
)


def _eager(hidden, weight, labels, old_logp, advantages, mask, ref_logp):
    """As verl writes it: logits, log-probs by log_softmax + gather, entropy = logsumexp - Σ softmax·logits."""
    logits = torch.nn.functional.linear(hidden, weight).float()
    logp = torch.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    entropy = torch.logsumexp(logits, dim=-1) - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    pg_loss, stats = reference.ppo_policy_loss(
        logp,
        old_logp,
        advantages,
        mask,
        clip_low=OPTIONS["clip_low"],
        clip_high=OPTIONS["clip_high"],
        dual_clip=OPTIONS["dual_clip"],
    )
    kl = reference.agg_loss(reference.kl_penalty(logp, ref_logp, OPTIONS["kl_kind"]), mask)
    return pg_loss - OPTIONS["entropy_coef"] * reference.agg_loss(entropy, mask) + OPTIONS["kl_coef"] * kl


def _cases(tokens, hidden_size, vocab, dtype, device):
    hidden = torch.randn(1, tokens, hidden_size, device=device).to(dtype)
    weight = (torch.randn(vocab, hidden_size, device=device) / hidden_size**0.5).to(dtype)
    labels = torch.randint(0, vocab, (1, tokens), device=device)
    with torch.no_grad():
        logp = rf.linear_logprobs(hidden, weight, labels)
    old_logp = logp + 0.2 * torch.randn_like(logp)
    ref_logp = logp + 0.3 * torch.randn_like(logp)
    advantages = torch.randn_like(logp)
    mask = torch.rand(1, tokens, device=device) > 0.1
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()

    def fwd_bwd(fn):
        def run():
            loss = fn(h, w)
            loss.backward()
            grads = (h.grad, w.grad)
            h.grad = w.grad = None
            return loss, *grads

        return run

    eager = lambda a, b: _eager(a, b, labels, old_logp, advantages, mask, ref_logp)  # noqa: E731

    def ours(a, b, name):
        return rf.linear_ppo_policy_loss(
            a, b, labels, old_logp, advantages, mask, ref_logp=ref_logp, backend=name, **OPTIONS
        )[0]

    both = {"eager": fwd_bwd(eager), "compile": fwd_bwd(compiled(eager))}
    both.update(kernel_providers(device, lambda name: fwd_bwd(lambda a, b: ours(a, b, name))()))
    flops = 2 * tokens * hidden_size * vocab
    return [
        Case(
            "linear_ppo_policy_loss",
            f"N={tokens},H={hidden_size},V={vocab}",
            dtype,
            "fwd+bwd",
            both,
            flops=3 * flops,
            atol=1e-3,
        )
    ]


def cases(device: torch.device, quick: bool) -> list[Case]:
    if quick:
        return _cases(64, 64, 4096, torch.float32, device)
    if device.type == "cuda":
        return _cases(16384, 1024, 151936, torch.bfloat16, device) + _cases(4096, 256, 151936, torch.float32, device)
    return _cases(4096, 256, 151936, torch.float32, device)
