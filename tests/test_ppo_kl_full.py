"""--kl-full-vocab: flag checks, the loss term on one minibatch (every op path against a float64 reference from the
full logits), and short runs of the default task that learn with the KL bounded."""

import copy
import json

import pytest
import torch

from rlhf_fast import reference
from rlhf_fast.ppo import PPOConfig, models, precision, tasks, train
from rlhf_fast.ppo.__main__ import build_parser, config_from_args
from rlhf_fast.ppo.kl_full import FullVocabKL
from rlhf_fast.ppo.ops import get_ops
from rlhf_fast.ppo.policy_loss import minibatch_policy_loss
from rlhf_fast.ppo.trainer import encode_prompts, encode_responses, join

TEMPERATURE = 0.9


# ---------------------------------------------------------------- flags


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(kl_full_vocab="kl", kl_in_loss=True), "replaces --kl-in-loss"),
        (dict(kl_full_vocab="js", divergence="rkl"), "--kl-full-vocab with --divergence"),
        (dict(kl_full_vocab="tv", kl_coef=0.0), "--kl-full-vocab needs --kl-coef > 0"),
        (dict(kl_full_vocab="alpha"), "--kl-full-vocab alpha needs a finite --kl-full-vocab-alpha"),
        (dict(kl_full_vocab="alpha", kl_full_vocab_alpha=1.0), "other than 0 and 1"),
        (dict(kl_full_vocab="alpha", kl_full_vocab_alpha=float("inf")), "finite"),
        (dict(kl_full_vocab="kl", kl_full_vocab_alpha=0.5), "only used by --kl-full-vocab alpha, not kl"),
        (dict(kl_full_vocab_alpha=0.5), "only used by --kl-full-vocab alpha"),
    ],
)
def test_bad_combinations_fail_with_a_clear_message(fields, message):
    with pytest.raises(ValueError, match=message):
        PPOConfig(**fields).validate()


def test_flags_parse_and_an_unknown_kind_is_refused(capsys):
    parser = build_parser()
    cfg = config_from_args(parser.parse_args(["--kl-full-vocab", "alpha", "--kl-full-vocab-alpha", "0.5"]))
    assert (cfg.kl_full_vocab, cfg.kl_full_vocab_alpha, cfg.kl_in_reward) == ("alpha", 0.5, False)
    assert PPOConfig().kl_in_reward and not PPOConfig(divergence="js").kl_in_reward
    with pytest.raises(SystemExit):
        parser.parse_args(["--kl-full-vocab", "k3"])
    assert "invalid choice: 'k3'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="replaces --kl-in-loss"):
        config_from_args(parser.parse_args(["--kl-full-vocab", "kl", "--kl-in-loss"]))


# ---------------------------------------------------------------- the term on one minibatch


def _rollout(tokenizer):
    """Six sequences with responses of 1 to 4 tokens plus eos (right padding: holes in the mask)."""
    prompts = [f"{i}3{i % 4}1=" for i in range(6)]
    responses = ["0123"[: 1 + i % 4] for i in range(6)]
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, "cpu")
    response, response_mask = encode_responses(tokenizer, responses, "cpu")
    return (*join(prompt_ids, prompt_mask, response, response_mask), prompt_ids.shape[1], response_mask)


def _models(transform=None, dtype="fp32"):
    """A tiny policy and a perturbed frozen reference (so the divergence is far from 0), the head's logit
    transform set in the config ({logit_scale, final_logit_softcapping})."""
    torch.manual_seed(0)
    tokenizer = tasks.CharTokenizer()
    policy = models.tiny_llama(tokenizer.vocab_size, PPOConfig(hidden_size=32, num_layers=1, num_heads=2))
    for name, value in (transform or {}).items():
        setattr(policy.config, name, value)
    ref = models.frozen_copy(policy)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return tokenizer, policy, models.frozen_copy(ref, precision.DTYPES[dtype])


def _term_and_grads(policy, ref, cfg, batch, *, kernels, fused, advantages=None):
    """(loss, metrics, policy gradients) of minibatch_policy_loss with the term, through the loop's own path."""
    input_ids, attention, labels, n_prompt, mask = batch
    ops = get_ops(kernels)
    policy_lp = models.LogProbModel(
        policy, ops, fused=fused, temperature=TEMPERATURE, autocast=precision.compute_dtype(cfg)
    )
    full_kl = FullVocabKL(cfg, ops, models.LogProbModel(ref, ops, fused=fused, temperature=TEMPERATURE))
    ref_logp, ref_hidden = full_kl.reference_scores(input_ids, attention, labels, n_prompt)
    assert (ref_hidden is not None) == fused  # the fused path keeps (B, R, H), never logits
    if fused:
        assert ref_hidden.shape == (*mask.shape, ref.config.hidden_size)
    with torch.no_grad():
        old_logp = policy_lp(input_ids, attention, labels, n_prompt)
    advantages = torch.zeros(mask.shape) if advantages is None else advantages
    policy.zero_grad(set_to_none=True)
    loss, metrics = minibatch_policy_loss(
        policy_lp,
        ops,
        cfg,
        0.7,
        fused=policy_lp.fuses_policy_loss,
        input_ids=input_ids,
        attention=attention,
        labels=labels,
        n_prompt=n_prompt,
        old_logp=old_logp,
        advantages=advantages,
        mask=mask,
        ref_logp=ref_logp,
        full_kl=full_kl,
        ref_hidden=ref_hidden,
    )
    loss.backward()
    assert all(p.grad is None for p in ref.parameters())  # the reference is frozen
    return loss.item(), metrics, [p.grad.clone() for p in policy.parameters()]


def _float64_term(policy, ref, cfg, batch):
    """kl_coef * agg(D(policy || ref)) and its policy gradients in float64, from the models' full logits with the
    config's head transform (reference.head_logits)."""
    input_ids, attention, _, n_prompt, mask = batch
    policy64, ref64 = copy.deepcopy(policy).double(), models.frozen_copy(ref, torch.float64)
    transform = {
        "logit_scale": getattr(policy.config, "logit_scale", 1.0) or 1.0,
        "softcap": getattr(policy.config, "final_logit_softcapping", None),
    }
    logits = []
    for model in (policy64, ref64):
        hidden = model.base_model(
            input_ids=input_ids, attention_mask=attention, position_ids=models.position_ids(attention)
        ).last_hidden_state
        head = model.get_output_embeddings()
        logits.append(reference.head_logits(hidden[:, n_prompt - 1 : -1], head.weight, head.bias, **transform))
    divergence = reference.f_divergence(
        *logits, cfg.kl_full_vocab, alpha=cfg.kl_full_vocab_alpha, temperature=TEMPERATURE, mask=mask
    )
    term = 0.7 * reference.agg_loss(divergence, mask, cfg.loss_agg)
    term.backward()
    grads = [p.grad.float() for p in policy64.parameters()]
    return term.item(), reference.masked_mean(divergence.detach(), mask).item(), grads


PATHS = [(True, True), (True, False), (False, True), (False, False)]  # (kernels, fused head)


@pytest.mark.parametrize(
    "kind, alpha, agg",
    [
        ("kl", None, "token-mean"),
        ("reverse_kl", None, "seq-mean-token-sum"),
        ("js", None, "seq-mean-token-mean"),
        ("tv", None, "token-mean"),
        ("alpha", 0.5, "token-sum"),
    ],
)
def test_term_and_gradient_match_float64_on_every_path(kind, alpha, agg):
    """With zero advantages the loss is the term alone: kl_coef * agg(D), equal on every path (kernels on / off,
    fused head or logits) to float64 from the full logits, value and policy gradients."""
    tokenizer, policy, ref = _models()
    cfg = PPOConfig(kl_full_vocab=kind, kl_full_vocab_alpha=alpha, loss_agg=agg)
    batch = _rollout(tokenizer)
    want, want_mean, want_grads = _float64_term(policy, ref, cfg, batch)
    assert want_mean > 1e-3
    for kernels, fused in PATHS:
        loss, metrics, grads = _term_and_grads(policy, ref, cfg, batch, kernels=kernels, fused=fused)
        where = f"kernels={kernels} fused={fused}"
        assert loss == pytest.approx(want, rel=1e-5, abs=1e-7), where
        assert metrics["kl_loss"] == pytest.approx(want / 0.7, rel=1e-5, abs=1e-7), where
        assert metrics["kl_full_vocab"] == pytest.approx(want_mean, rel=1e-5, abs=1e-7), where
        scale = max(g.abs().max() for g in want_grads)
        for got, expected in zip(grads, want_grads):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * scale, msg=where)


def test_whole_loss_same_on_every_path():
    """The clipped objective, entropy bonus and term together on one minibatch: one loss, the same metrics and
    gradients with kernels on and off, fused head or not."""
    tokenizer, policy, ref = _models()
    cfg = PPOConfig(kl_full_vocab="js", entropy_coef=0.01, dual_clip=3.0)
    batch = _rollout(tokenizer)
    advantages = torch.randn(batch[-1].shape) * batch[-1]
    results = [_term_and_grads(policy, ref, cfg, batch, kernels=k, fused=f, advantages=advantages) for k, f in PATHS]
    loss0, metrics0, grads0 = results[0]
    assert metrics0["kl_full_vocab"] > 1e-3 and any(g.abs().sum() > 0 for g in grads0)
    for (kernels, fused), (loss, metrics, grads) in zip(PATHS[1:], results[1:]):
        where = f"kernels={kernels} fused={fused}"
        assert loss == pytest.approx(loss0, rel=1e-5, abs=1e-6), where
        assert metrics.keys() == metrics0.keys(), where
        for key in metrics:
            assert metrics[key] == pytest.approx(metrics0[key], rel=1e-5, abs=1e-6), (where, key)
        for got, want in zip(grads, grads0):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=where)


@pytest.mark.parametrize(
    "transform",
    [{"logit_scale": 0.5}, {"final_logit_softcapping": 2.0}, {"logit_scale": 3.0, "final_logit_softcapping": 5.0}],
)
def test_fused_head_with_a_logit_transform_matches_float64(transform):
    """A logit scale and a soft cap from the model's config, passed to linear_f_divergence: the term of the
    transformed logits."""
    tokenizer, policy, ref = _models(transform)
    cfg = PPOConfig(kl_full_vocab="kl")
    batch = _rollout(tokenizer)
    want, want_mean, want_grads = _float64_term(policy, ref, cfg, batch)
    loss, metrics, grads = _term_and_grads(policy, ref, cfg, batch, kernels=True, fused=True)
    assert loss == pytest.approx(want, rel=1e-5, abs=1e-7)
    assert metrics["kl_full_vocab"] == pytest.approx(want_mean, rel=1e-5, abs=1e-7)
    scale = max(g.abs().max() for g in want_grads)
    for got, expected in zip(grads, want_grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * scale)


def test_bf16_term_close_to_float64():
    """--dtype bf16: the policy under bf16 autocast, a bf16 reference (hidden states kept in bf16); the fused and
    logits paths agree with float64 of the bf16-rounded reference within bf16 error."""
    tokenizer, policy, ref = _models(dtype="bf16")
    cfg = PPOConfig(kl_full_vocab="kl", dtype="bf16")
    batch = _rollout(tokenizer)
    want, _, _ = _float64_term(policy, ref, cfg, batch)
    for fused in (True, False):
        loss, _, grads = _term_and_grads(policy, ref, cfg, batch, kernels=True, fused=fused)
        assert loss == pytest.approx(want, rel=0.05), fused
        assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


# ---------------------------------------------------------------- the default task

TINY = dict(
    warmup_steps=3,
    eval_size=8,
    batch_size=8,
    minibatch_size=4,
    ppo_epochs=2,
    critic_warmup_steps=0,
    max_new_tokens=7,
    progress=False,
    plot=False,
)


@pytest.mark.parametrize(
    "extra",
    [
        dict(kl_full_vocab="kl", algo="grpo", group_size=2),
        dict(kl_full_vocab="js", dtype="bf16"),
        dict(kl_full_vocab="reverse_kl", ref_quant="int8", fused_head=False),
        dict(kl_full_vocab="alpha", kl_full_vocab_alpha=0.5, kernels="off", loss_agg="seq-mean-token-sum"),
    ],
)
def test_two_steps_with_other_switches(tmp_path, extra):
    """The term with a critic-free algorithm, bf16, a quantized reference without the fused head, kernels off."""
    train(PPOConfig(out=str(tmp_path), total_steps=2, **{**TINY, **extra}))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["kl_full_vocab"] >= 0 and r["kl_loss"] is not None for r in rows)
    assert rows[-1]["kl_full_vocab"] > 0


@pytest.mark.parametrize("kind, kl_bound", [("kl", 2.5), ("tv", 4.5)])
def test_short_run_learns_with_the_kl_bounded(tmp_path, kind, kl_bound):
    """60 steps of the default task (as the other short learning runs: lr 5e-4, no critic warm-up) with the term
    under the adaptive controller: the held-out greedy and the sampled reward rise, and KL(policy || ref) over the
    last 10 steps stays below a bound. Measured here: kl ends at 2.1 nats, tv at 3.5 (a bounded divergence pulls
    with less force at the same coefficient), the reward-penalty default at 2.8, and the same run without a
    regulariser (--kl-in-loss --kl-coef 1e-6 --no-adaptive-kl) at 5.1: kl stays under the controller's 2.5-nat
    target, tv well under the unregularised KL."""
    summary = train(
        PPOConfig(
            out=str(tmp_path),
            kl_full_vocab=kind,
            total_steps=60,
            eval_size=128,
            lr=5e-4,
            critic_warmup_steps=0,
            progress=False,
            plot=False,
        )
    )
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    first, last = (sum(r["reward_mean"] for r in part) / len(part) for part in (rows[:10], rows[-10:]))
    assert last > first + 0.1, (first, last)
    assert summary["eval_reward_after"] > summary["eval_reward_before"] + 0.05, summary
    final_kl = sum(r["kl"] for r in rows[-10:]) / 10
    assert final_kl < kl_bound, [round(r["kl"], 2) for r in rows]
    assert all(r["kl_full_vocab"] > 0 for r in rows[1:]) and rows[-1]["kl_coef"] != rows[0]["kl_coef"]
