"""Per-call cost of every public op the PPO loop uses, at the default task's exact shapes (`rlhf-fast train` with
no flags: 64 prompts of 7 tokens, 8 response tokens, vocab 45, hidden 64, minibatches of 32), against its eager form.

At these sizes an op's time is its per-call cost (argument checks, dispatch, autograd glue, output allocation),
not its kernel's work; the requirement is every op within 2x of eager. The two providers are timed interleaved
(one call each per round, many rounds, medians), so both see the same load of a shared machine; each row also
records the 1-minute load average (`load_avg`) at the start of its case. Logits and hidden states are the views
the loop passes: `x[:, P - 1:-1]` of the model's (B, P + R, .) output, so not contiguous.
"""

from __future__ import annotations

import dataclasses
import os

import torch

import rlhf_fast as rf
from rlhf_fast import reference

from .harness import Case, run_case

BATCH, PROMPT, RESPONSE, VOCAB, HIDDEN, MINIBATCH, GROUP = 64, 7, 8, 45, 64, 32, 4
ROUNDS = {True: 300, False: 3000}  # interleaved rounds: quick, full


def _with_load(case: Case, device: torch.device, rounds: int) -> Case:
    """`case` timed interleaved for `rounds` rounds, each provider's rows with the load average seen at its start."""

    def measure(quick: bool):
        load = os.getloadavg()[0]
        timed = dataclasses.replace(
            case, interleaved=rounds, measure=None, metrics={p: [("load_avg", "1", load)] for p in case.providers}
        )
        return run_case(timed, device, quick)

    return dataclasses.replace(case, measure=measure)


def _backward(fn):
    """fn's forward, then the backward of the sum of its first output."""

    def run():
        out = fn()
        (out[0] if isinstance(out, tuple) else out).sum().backward()

    return run


def _eager_logprobs(logits, labels, entropy=False):
    """What trainers write: log_softmax in float32, gather at the labels (padding holds a valid id there)."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    logp = log_probs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logp, -(log_probs.exp() * log_probs).sum(-1)) if entropy else logp


def _eager_sample(logits, generator):
    """torch.multinomial over the softmax, and the drawn token's log-prob."""
    tokens = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
    return tokens.squeeze(-1), torch.log_softmax(logits, dim=-1).gather(-1, tokens).squeeze(-1)


def _discard(fn):
    """fn without its result (for outputs that are not comparable, such as draws of two samplers)."""

    def run():
        fn()

    return run


def cases(device: torch.device, quick: bool) -> list[Case]:
    g = torch.Generator(device="cpu").manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(device)  # noqa: E731
    leaf = lambda t: t.detach().clone().requires_grad_()  # noqa: E731
    window = slice(PROMPT - 1, PROMPT + RESPONSE - 1)  # the response positions' predictions
    mask = (torch.rand(BATCH, RESPONSE, generator=g) > 0.2).to(device)
    labels = torch.where(mask, torch.randint(0, VOCAB, (BATCH, RESPONSE), generator=g).to(device), -100)
    model_logits = rand(BATCH, PROMPT + RESPONSE, VOCAB)
    model_hidden = rand(BATCH, PROMPT + RESPONSE, HIDDEN)
    logits, hidden = model_logits[:, window], model_hidden[:, window]
    weight = rand(VOCAB, HIDDEN) * HIDDEN**-0.5
    mini_logits, mini_hidden, mini_weight = leaf(model_logits[:MINIBATCH]), leaf(model_hidden[:MINIBATCH]), leaf(weight)
    mlabels, mmask = labels[:MINIBATCH], mask[:MINIBATCH]
    logp, ref_logp, adv, values = (rand(BATCH, RESPONSE) for _ in range(4))
    mlogp, mold, madv, mret = leaf(logp[:MINIBATCH]), ref_logp[:MINIBATCH], adv[:MINIBATCH], values[:MINIBATCH]
    scores = rand(BATCH)
    last_logits = rand(BATCH, VOCAB)
    q_logits = rand(BATCH, PROMPT + RESPONSE, VOCAB)[:, window]
    gen_eager, gen_ours = (torch.Generator(device=device).manual_seed(1) for _ in range(2))

    full, mini = f"({BATCH}, {RESPONSE})", f"({MINIBATCH}, {RESPONSE})"
    logits_shape = f"({BATCH}, {RESPONSE}, {VOCAB}) view"
    mini_logits_shape = f"({MINIBATCH}, {RESPONSE}, {VOCAB}) view"
    linear_shape = f"({BATCH}, {RESPONSE}, {HIDDEN}) view x ({VOCAB}, {HIDDEN})"
    mini_linear_shape = f"({MINIBATCH}, {RESPONSE}, {HIDDEN}) view x ({VOCAB}, {HIDDEN})"

    def case(op, shape, eager, ours, mode="fwd", expected=None):
        return _with_load(
            Case(f"tiny:{op}", shape, torch.float32, mode, {"eager": eager, "rlhf_fast": ours}, reference=expected),
            device,
            ROUNDS[quick],
        )

    lp_ref = lambda entropy=False: reference.logprobs(logits.double(), labels, return_entropy=entropy)  # noqa: E731
    fdiv_ref = lambda: reference.f_divergence(logits.double(), q_logits.double(), "kl", mask=mask)  # noqa: E731
    return [
        case(
            "logprobs",
            logits_shape,
            lambda: _eager_logprobs(logits, labels),
            lambda: rf.logprobs(logits, labels),
            expected=lp_ref,
        ),
        case(
            "logprobs+entropy",
            logits_shape,
            lambda: _eager_logprobs(logits, labels, True),
            lambda: rf.logprobs(logits, labels, return_entropy=True),
            expected=lambda: lp_ref(True),
        ),
        case(
            "logprobs",
            mini_logits_shape,
            _backward(lambda: _eager_logprobs(mini_logits[:, window], mlabels)),
            _backward(lambda: rf.logprobs(mini_logits[:, window], mlabels)),
            "fwd+bwd",
        ),
        case(
            "logprobs+entropy",
            mini_logits_shape,
            _backward(lambda: _eager_logprobs(mini_logits[:, window], mlabels, True)),
            _backward(lambda: rf.logprobs(mini_logits[:, window], mlabels, return_entropy=True)),
            "fwd+bwd",
        ),
        case("entropy", f"({BATCH}, {VOCAB})", lambda: reference.entropy(last_logits), lambda: rf.entropy(last_logits)),
        case(
            "sample",
            f"({BATCH}, {VOCAB})",
            _discard(lambda: _eager_sample(last_logits, gen_eager)),
            _discard(lambda: rf.sample(last_logits, generator=gen_ours, logprob="full")),
        ),
        case(
            "linear_logprobs",
            linear_shape,
            lambda: reference.linear_logprobs(hidden, weight, labels),
            lambda: rf.linear_logprobs(hidden, weight, labels),
        ),
        case(
            "linear_logprobs+entropy",
            linear_shape,
            lambda: reference.linear_logprobs(hidden, weight, labels, return_entropy=True),
            lambda: rf.linear_logprobs(hidden, weight, labels, return_entropy=True),
        ),
        case(
            "linear_logprobs",
            mini_linear_shape,
            _backward(lambda: reference.linear_logprobs(mini_hidden[:, window], mini_weight, mlabels)),
            _backward(lambda: rf.linear_logprobs(mini_hidden[:, window], mini_weight, mlabels)),
            "fwd+bwd",
        ),
        case(
            "linear_ppo_policy_loss",
            mini_linear_shape,
            _backward(
                lambda: reference.linear_ppo_policy_loss(
                    mini_hidden[:, window], mini_weight, mlabels, mold, madv, mmask
                )
            ),
            _backward(
                lambda: rf.linear_ppo_policy_loss(mini_hidden[:, window], mini_weight, mlabels, mold, madv, mmask)
            ),
            "fwd+bwd",
        ),
        case(
            "kl_penalty",
            full,
            lambda: reference.kl_penalty(logp, ref_logp, "k1"),
            lambda: rf.kl_penalty(logp, ref_logp, "k1"),
        ),
        case(
            "kl_penalty",
            mini,
            _backward(lambda: reference.kl_penalty(mlogp, mold, "k1")),
            _backward(lambda: rf.kl_penalty(mlogp, mold, "k1")),
            "fwd+bwd",
        ),
        case(
            "ppo_policy_loss",
            mini,
            _backward(lambda: reference.ppo_policy_loss(mlogp, mold, madv, mmask)),
            _backward(lambda: rf.ppo_policy_loss(mlogp, mold, madv, mmask)),
            "fwd+bwd",
        ),
        case(
            "ppo_value_loss",
            mini,
            _backward(lambda: reference.ppo_value_loss(mlogp, mold, mret, mmask)),
            _backward(lambda: rf.ppo_value_loss(mlogp, mold, mret, mmask)),
            "fwd+bwd",
        ),
        case("agg_loss", mini, lambda: reference.agg_loss(mold, mmask), lambda: rf.agg_loss(mold, mmask)),
        case("masked_sum", full, lambda: reference.masked_sum(logp, mask), lambda: rf.masked_sum(logp, mask)),
        case("masked_mean", full, lambda: reference.masked_mean(adv, mask), lambda: rf.masked_mean(adv, mask)),
        case("masked_whiten", full, lambda: reference.masked_whiten(adv, mask), lambda: rf.masked_whiten(adv, mask)),
        case("gae", full, lambda: reference.gae(logp, values, mask), lambda: rf.gae(logp, values, mask)),
        case(
            "grpo_advantages",
            f"({BATCH},) groups of {GROUP}",
            lambda: reference.grpo_advantages(scores, GROUP),
            lambda: rf.grpo_advantages(scores, GROUP),
        ),
        case(
            "rloo_advantages",
            f"({BATCH},) groups of {GROUP}",
            lambda: reference.rloo_advantages(scores, GROUP),
            lambda: rf.rloo_advantages(scores, GROUP),
        ),
        case(
            "f_divergence",
            logits_shape,
            lambda: reference.f_divergence_eager(logits, q_logits, "kl", mask=mask),
            lambda: rf.f_divergence(logits, q_logits, "kl", mask=mask),
            expected=fdiv_ref,
        ),
        case(
            "f_divergence",
            mini_logits_shape,
            _backward(
                lambda: reference.f_divergence_eager(mini_logits[:, window], q_logits[:MINIBATCH], "kl", mask=mmask)
            ),
            _backward(lambda: rf.f_divergence(mini_logits[:, window], q_logits[:MINIBATCH], "kl", mask=mmask)),
            "fwd+bwd",
        ),
    ]
