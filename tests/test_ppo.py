"""The PPO loop: CLI smoke run and outputs, kernels on/off agreement, resume, torchrun, learning, user paths."""

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhf_fast.ppo import PPOConfig, models, precision, tasks, train
from rlhf_fast.ppo.__main__ import build_parser, config_from_args
from rlhf_fast.ppo.ops import OP_NAMES, get_ops
from rlhf_fast.ppo.policy_loss import minibatch_policy_loss
from rlhf_fast.ppo.trainer import (
    Dist,
    RunningLogZ,
    RunningMoments,
    encode_prompts,
    encode_responses,
    fdpg_pseudo_reward,
    join,
    whiten,
)

ROOT = Path(__file__).resolve().parent.parent
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
TIMING_KEYS = ("tokens_per_s", "time_")


def _run(*args, timeout=300, env=None):
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )


def _metrics(folder):
    return [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines()]


def _without_timings(rows):
    return [{k: v for k, v in row.items() if not k.startswith(TIMING_KEYS)} for row in rows]


# ---------------------------------------------------------------- command line and outputs


def test_cli_two_step_smoke_run_writes_every_output(tmp_path):
    out = _run(
        "-m",
        "rlhf_fast.cli",
        "train",
        "--out",
        str(tmp_path),
        "--total-steps",
        "2",
        "--warmup-steps",
        "2",
        "--eval-size",
        "16",
        "--batch-size",
        "8",
        "--minibatch-size",
        "4",
        "--critic-warmup-steps",
        "0",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "eval reward" in out.stdout
    rows = _metrics(tmp_path)
    assert [r["step"] for r in rows] == [0, 1]
    for key in (
        "reward_mean",
        "kl",
        "policy_loss",
        "value_loss",
        "entropy",
        "clipfrac",
        "tokens_per_s",
        "time_generate",
        "time_score",
        "time_advantages",
        "time_update",
    ):
        assert isinstance(rows[-1][key], float) and math.isfinite(rows[-1][key]), key
    summary = json.loads((tmp_path / "summary.json").read_text())
    for key in ("eval_reward_before", "eval_reward_after", "wall_time_s", "config"):
        assert key in summary
    assert 0 <= summary["eval_reward_before"] <= 1 and summary["config"]["total_steps"] == 2
    assert (tmp_path / "reward_kl.png").stat().st_size > 1000
    assert (tmp_path / "checkpoint" / "state.pt").is_file()
    assert (tmp_path / "policy" / "config.json").is_file()


def test_every_config_field_is_a_flag_with_help():
    parser = build_parser()
    flags = {a.dest: a for a in parser._actions}
    for name in PPOConfig.__dataclass_fields__:
        assert name in flags and flags[name].help, name
    cfg = config_from_args(
        parser.parse_args(["--no-reward-norm", "--dual-clip", "3", "--divergence", "js", "--total-steps", "5"])
    )
    assert cfg.reward_norm is False and cfg.dual_clip == 3.0 and cfg.divergence == "js" and cfg.total_steps == 5
    assert config_from_args(parser.parse_args([])) == PPOConfig()


# ---------------------------------------------------------------- bad input fails before any work


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "/nonexistent/model"], "--model /nonexistent/model: no such directory"),
        (["--reward-model", "/nonexistent/rm"], "--reward-model /nonexistent/rm: no such directory"),
        (["--prompts", "/nonexistent.jsonl", "--reward", "os:getcwd"], "no such file"),
        (["--reward", "not_a_module_xyz:f"], "cannot import module"),
        (["--reward", "os"], "expected module:function"),
        (["--algo", "grpo"], "--group-size >= 2"),
        (["--ref-quant", "int3"], "invalid choice"),
        (["--critic-init", "reward-model"], "--critic-init reward-model needs --reward-model"),
        (["--ref-quant", "int4"], "--ref-quant int4: model.layers.0.self_attn.q_proj: group_size=128 does not divide"),
    ],
)
def test_bad_flags_fail_with_a_clear_message(tmp_path, args, message):
    out = _run("-m", "rlhf_fast.ppo", "--out", str(tmp_path / "run"), *args, timeout=120)
    assert out.returncode != 0 and message in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"prompt": "12="}\n{"prompt": 3}\n', "line 2: expected an object"),
        ('{"prompt": "12="}\nnot json\n', "line 2: not valid JSON"),
        ('{"prompt": "12="}\n', "at least 2 prompts"),
    ],
)
def test_malformed_prompt_files_name_the_line(tmp_path, content, message):
    path = tmp_path / "prompts.jsonl"
    path.write_text(content)
    cfg = PPOConfig(out=str(tmp_path / "run"), prompts=str(path), reward="os:getcwd", **TINY)
    with pytest.raises(Exception, match=message):
        train(cfg)


def test_prompt_file_and_reward_function_run(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(
        "".join(
            json.dumps({"prompt": f"{a}{b}=", "response": "".join(sorted(f"{a}{b}"))}) + "\n"
            for a in range(10)
            for b in range(3)
        )
    )
    module = tmp_path / "my_reward_mod.py"
    module.write_text("def score(prompts, responses):\n    return [float(len(r) == 2) for r in responses]\n")
    sys.path.insert(0, str(tmp_path))
    try:
        summary = train(
            PPOConfig(
                out=str(tmp_path / "run"),
                prompts=str(path),
                reward="my_reward_mod:score",
                total_steps=1,
                ptx_coef=0.1,
                **TINY,
            )
        )
    finally:
        sys.path.remove(str(tmp_path))
    assert 0 <= summary["eval_reward_after"] <= 1 and len(_metrics(tmp_path / "run")) == 1


# ---------------------------------------------------------------- the ops of one update, kernels on vs off


def _rollout(tokenizer, batch=6):
    prompts = [f"{i}3{i % 4}1=" for i in range(batch)]
    responses = ["0123"[: 1 + i % 4] for i in range(batch)]
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, "cpu")
    response, response_mask = encode_responses(tokenizer, responses, "cpu")
    return (*join(prompt_ids, prompt_mask, response, response_mask), prompt_ids.shape[1], response_mask)


def _one_update(kernels: bool):
    """Policy + value loss and their gradients on a fixed rollout, with the op namespace of one mode."""
    torch.manual_seed(0)
    tokenizer = tasks.CharTokenizer()
    cfg = PPOConfig(hidden_size=32, num_layers=1, num_heads=2)
    policy = models.tiny_llama(tokenizer.vocab_size, cfg)
    reference = models.frozen_copy(policy)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    critic = models.ValueModel.from_policy(policy)
    torch.nn.init.normal_(critic.head.weight, std=0.1)
    ops = get_ops(kernels)
    policy_lp = models.LogProbModel(policy, ops, fused=kernels, temperature=0.9)
    ref_lp = models.LogProbModel(reference, ops, fused=kernels, temperature=0.9)
    input_ids, attention, labels, n_prompt, mask = _rollout(tokenizer)
    with torch.no_grad():
        old_logp = policy_lp(input_ids, attention, labels, n_prompt) + 0.1 * torch.randn(mask.shape) * mask
        ref_logp = ref_lp(input_ids, attention, labels, n_prompt)
        old_values = critic(input_ids, attention, n_prompt) + 0.3 * torch.randn(mask.shape)
    rewards = -0.02 * ops.kl_penalty(old_logp, ref_logp, "k1") * mask
    rewards[torch.arange(len(mask)), mask.sum(-1) - 1] += torch.rand(len(mask))
    advantages, returns = ops.gae(rewards, old_values, mask, gamma=1.0, lam=0.95)
    advantages = ops.masked_whiten(advantages, mask) * mask
    logp, entropy = policy_lp(input_ids, attention, labels, n_prompt, return_entropy=True)
    pg, stats = ops.ppo_policy_loss(logp, old_logp, advantages, mask, clip_low=0.2, clip_high=0.2, dual_clip=3.0)
    values = critic(input_ids, attention, n_prompt)
    vl, vstats = ops.ppo_value_loss(values, old_values, returns, mask, clip=0.2)
    ent = ops.agg_loss(entropy, mask, "token-mean")
    kl = ops.agg_loss(ops.kl_penalty(logp, ref_logp, "k3"), mask, "seq-mean-token-mean")
    (pg + 0.5 * vl - 0.01 * ent + 0.1 * kl).backward()
    pg, vl, ent, kl = pg.detach(), vl.detach(), ent.detach(), kl.detach()
    grads = [p.grad.clone() for p in [*policy.parameters(), *critic.parameters()]]
    numbers = {"pg": pg, "vl": vl, "ent": ent, "kl": kl, **stats, **{"v_" + k: v for k, v in vstats.items()}}
    return {k: v.item() for k, v in numbers.items()}, grads, advantages


def test_kernels_on_and_off_agree_on_one_update():
    on, grads_on, adv_on = _one_update(True)
    off, grads_off, adv_off = _one_update(False)
    assert on.keys() == off.keys()
    for key in on:
        assert on[key] == pytest.approx(off[key], rel=1e-4, abs=1e-5), key
    torch.testing.assert_close(adv_on, adv_off.float(), rtol=1e-4, atol=1e-5)
    for g_on, g_off in zip(grads_on, grads_off):
        torch.testing.assert_close(g_on, g_off, rtol=1e-4, atol=1e-6)
    assert on["clipfrac"] > 0 and any(g.abs().sum() > 0 for g in grads_on)


@pytest.mark.parametrize(
    "extra",
    [{}, dict(entropy_coef=0.01, kl_in_loss=True, kl_estimator="k3", dual_clip=3.0, loss_agg="seq-mean-token-mean")],
)
def test_fused_policy_loss_matches_the_unfused_on_one_minibatch(extra):
    """--fused-head's linear_ppo_policy_loss against log-probs from the model's logits + ppo_policy_loss (and
    the entropy / KL terms): the same loss, metrics and policy gradients."""
    torch.manual_seed(0)
    tokenizer = tasks.CharTokenizer()
    cfg = PPOConfig(hidden_size=32, num_layers=1, num_heads=2, **extra)
    policy = models.tiny_llama(tokenizer.vocab_size, cfg)
    ops = get_ops(True)
    input_ids, attention, labels, n_prompt, mask = _rollout(tokenizer)
    with torch.no_grad():
        old_logp = models.LogProbModel(policy, ops, fused=False, temperature=0.9)(
            input_ids, attention, labels, n_prompt
        )
    old_logp = (old_logp + 0.2 * torch.randn(mask.shape)) * mask
    ref_logp = (old_logp + 0.3 * torch.randn(mask.shape)) * mask
    advantages = torch.randn(mask.shape) * mask
    results = []
    for fused in (True, False):
        policy.zero_grad(set_to_none=True)
        policy_lp = models.LogProbModel(policy, ops, fused=fused, temperature=0.9)
        loss, metrics = minibatch_policy_loss(
            policy_lp,
            ops,
            cfg,
            0.1,
            fused=fused,
            input_ids=input_ids,
            attention=attention,
            labels=labels,
            n_prompt=n_prompt,
            old_logp=old_logp,
            advantages=advantages,
            mask=mask,
            ref_logp=ref_logp,
        )
        loss.backward()
        results.append((loss.item(), metrics, [p.grad.clone() for p in policy.parameters()]))
    (loss_fused, metrics_fused, grads_fused), (loss_plain, metrics_plain, grads_plain) = results
    assert loss_fused == pytest.approx(loss_plain, rel=1e-5, abs=1e-6)
    assert metrics_fused.keys() == metrics_plain.keys() and ("kl_loss" in metrics_fused) == bool(extra)
    for key in metrics_fused:
        assert metrics_fused[key] == pytest.approx(metrics_plain[key], rel=1e-5, abs=1e-6), key
    for got, want in zip(grads_fused, grads_plain):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert metrics_fused["clipfrac"] > 0 and any(g.abs().sum() > 0 for g in grads_fused)


def test_ops_namespace_has_every_op_in_both_modes():
    for kernels in (True, False):
        ops = get_ops(kernels)
        assert all(callable(getattr(ops, name)) for name in OP_NAMES)


def test_training_step_same_with_kernels_on_and_off(tmp_path):
    runs = {}
    for mode in ("on", "off"):
        train(PPOConfig(out=str(tmp_path / mode), kernels=mode, total_steps=2, **TINY))
        runs[mode] = _without_timings(_metrics(tmp_path / mode))
    for row_on, row_off in zip(runs["on"], runs["off"]):
        for key, value in row_on.items():
            assert value == pytest.approx(row_off[key], rel=1e-3, abs=1e-4), key


# ---------------------------------------------------------------- determinism and resume


def test_resume_gives_the_metrics_of_an_uninterrupted_run(tmp_path):
    full = tmp_path / "full"
    train(PPOConfig(out=str(full), total_steps=4, save_every=2, **TINY))
    part = tmp_path / "part"
    train(PPOConfig(out=str(part), total_steps=2, save_every=2, **TINY))
    parser = build_parser()
    cfg = config_from_args(parser.parse_args(["--resume", str(part), "--total-steps", "4"]))
    assert cfg.out == str(part) and cfg.warmup_steps == TINY["warmup_steps"]
    summary = train(cfg)
    assert summary["resumed_at_step"] == 2
    assert _without_timings(_metrics(part)) == _without_timings(_metrics(full))
    assert summary["eval_reward_after"] == json.loads((full / "summary.json").read_text())["eval_reward_after"]


def test_same_seed_same_result(tmp_path):
    a = train(PPOConfig(out=str(tmp_path / "a"), total_steps=2, **TINY))
    b = train(PPOConfig(out=str(tmp_path / "b"), total_steps=2, **TINY))
    assert _without_timings(_metrics(tmp_path / "a")) == _without_timings(_metrics(tmp_path / "b"))
    assert a["eval_reward_after"] == b["eval_reward_after"]


def test_generation_is_deterministic_for_a_generator_state():
    tokenizer = tasks.CharTokenizer()
    policy = models.tiny_llama(tokenizer.vocab_size, PPOConfig(hidden_size=32, num_layers=1, num_heads=2))
    ids, mask = encode_prompts(tokenizer, ["12=", "3456="], "cpu")
    outs = [
        models.generate(
            policy,
            ids,
            mask,
            max_new_tokens=6,
            eos_token_id=1,
            pad_token_id=0,
            generator=torch.Generator().manual_seed(5),
        )
        for _ in range(2)
    ]
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    response, valid = outs[0]
    assert valid[:, 0].all() and (response[~valid] == 0).all()


# ---------------------------------------------------------------- algorithms and switches


@pytest.mark.parametrize(
    "extra",
    [
        dict(algo="grpo", group_size=4, kl_in_loss=True, kl_estimator="k3"),
        dict(algo="rloo", group_size=2),
        dict(divergence="rkl"),
        dict(divergence="fkl"),
        dict(divergence="js"),
        dict(divergence="tv"),
        dict(
            adaptive_kl=True,
            target_kl=0.01,
            dual_clip=3.0,
            entropy_coef=0.01,
            ptx_coef=0.5,
            loss_agg="seq-mean-token-sum-norm",
            value_clip=None,
        ),
        dict(ref_quant="int8"),
        dict(ref_quant="int4", quant_group_size=32),
        dict(ref_quant="w8a8"),
        dict(critic_embedding="trainable"),
    ],
)
def test_algorithms_and_switches_run(tmp_path, extra):
    train(PPOConfig(out=str(tmp_path), total_steps=2, **{**TINY, **extra}))
    rows = _metrics(tmp_path)
    assert len(rows) == 2 and all(math.isfinite(r["reward_mean"]) for r in rows)
    if extra.get("adaptive_kl"):
        assert rows[1]["kl_coef"] != rows[0]["kl_coef"]


def test_fdpg_reverse_kl_is_the_kl_penalised_reward():
    scores, logp, ref = torch.rand(16), -5 * torch.rand(16), -5 * torch.rand(16)
    beta, log_z = 0.05, 1.7
    pseudo = fdpg_pseudo_reward("rkl", scores, logp, ref, beta, log_z)
    shaped = scores - beta * (logp - ref)
    torch.testing.assert_close(pseudo - shaped, torch.full_like(pseudo, -beta * (log_z + 1)))
    # every divergence against f'(t) written out, at t = pi / p = e^0.5 and e^-0.5
    f_prime = {
        "rkl": lambda t: math.log(t) + 1,
        "fkl": lambda t: -1 / t,
        "js": lambda t: math.log(2 * t / (1 + t)),
        "tv": lambda t: math.copysign(0.5, t - 1),
    }
    at_target = ref + scores / beta - log_z
    for kind, fn in f_prime.items():
        for log_t in (0.5, -0.5):
            got = fdpg_pseudo_reward(kind, scores, at_target + log_t, ref, beta, log_z)
            torch.testing.assert_close(got, torch.full_like(got, -beta * fn(math.exp(log_t))), atol=1e-5, rtol=1e-4)


def test_running_moments_match_the_pooled_statistics():
    moments, seen = RunningMoments(), []
    for size in (5, 1, 9):
        batch = torch.randn(size) * 3 + 2
        moments.update(batch, Dist())
        seen.append(batch)
    pooled = torch.cat(seen).double()
    assert moments.mean == pytest.approx(pooled.mean().item())
    assert moments.std == pytest.approx(pooled.std().item())
    constant = RunningMoments()
    constant.update(torch.zeros(4), Dist())
    assert constant.std > 0


def test_running_log_z_is_the_log_mean_weight_of_every_sample():
    estimate, seen = RunningLogZ(), []
    for size in (3, 7, 1):
        log_weights = torch.randn(size) * 20 + 30  # exp() would overflow float32
        estimate.update(log_weights, Dist())
        seen.append(log_weights)
    pooled = torch.cat(seen).double()
    assert estimate.value == pytest.approx((pooled.logsumexp(0) - math.log(pooled.numel())).item())


class _TwoProcesses(Dist):
    """Stands in for a 2-process group: the other process's contribution to every sum is `other`."""

    def __init__(self, other):
        super().__init__(rank=0, world=2)
        self.other = other

    def sum(self, t):
        return t + self.other


def test_whitening_under_ddp_uses_the_whole_batch():
    advantages, mask = torch.randn(8, 11) * 2 + 1, torch.rand(8, 11) > 0.3
    ops = get_ops(kernels=True)
    expected = ops.masked_whiten(advantages, mask) * mask
    second = mask[4:].double(), advantages[4:].double() * mask[4:]
    other = torch.stack([second[0].sum(), second[1].sum(), (second[1] ** 2).sum()])
    got = whiten(advantages[:4], mask[:4], _TwoProcesses(other), ops)
    torch.testing.assert_close(got, expected[:4], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, (ops.masked_whiten(advantages[:4], mask[:4]) * mask[:4]), atol=1e-3)


# ---------------------------------------------------------------- scale-out and learning


def test_torchrun_two_processes(tmp_path):
    out = _run(
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port=29731",
        "-m",
        "rlhf_fast.ppo",
        "--out",
        str(tmp_path),
        "--total-steps",
        "2",
        "--warmup-steps",
        "2",
        "--eval-size",
        "8",
        "--batch-size",
        "8",
        "--minibatch-size",
        "4",
        "--critic-warmup-steps",
        "0",
        "--no-progress",
        "--save-every",
        "1",
        "--ptx-coef",
        "0.1",
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 2 and len(_metrics(tmp_path)) == 2
    assert {p.name for p in (tmp_path / "checkpoint").iterdir()} >= {"state.pt", "rng_rank0.pt", "rng_rank1.pt"}


@pytest.mark.gpu
def test_cuda_run_same_with_kernels_on_and_off(tmp_path):
    runs = {}
    for mode in ("on", "off"):
        train(PPOConfig(out=str(tmp_path / mode), device="cuda", kernels=mode, total_steps=3, **TINY))
        runs[mode] = _without_timings(_metrics(tmp_path / mode))
    for row_on, row_off in zip(runs["on"], runs["off"]):
        for key in ("reward_mean", "kl", "policy_loss", "value_loss", "entropy"):
            assert row_on[key] == pytest.approx(row_off[key], rel=1e-2, abs=1e-3), key


def test_short_run_learns_the_default_task(tmp_path):
    """100 PPO steps (0.4 of the default run, at a higher learning rate): the held-out greedy reward and the
    sampled reward both rise."""
    summary = train(
        PPOConfig(
            out=str(tmp_path),
            total_steps=100,
            eval_size=128,
            lr=5e-4,
            critic_warmup_steps=0,
            progress=False,
            plot=False,
        )
    )
    rows = _metrics(tmp_path)
    first, last = (sum(r["reward_mean"] for r in part) / len(part) for part in (rows[:10], rows[-10:]))
    assert last > first + 0.1, (first, last)
    assert summary["eval_reward_after"] > summary["eval_reward_before"] + 0.1, summary


def _save_hf_tokenizer(folder):
    """A character-level fast tokenizer saved like a Hub tokenizer (built here: no download)."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["<pad>", "<eos>", *"0123456789="])}
    core = Tokenizer(tok_models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>")
    tokenizer.save_pretrained(folder)
    return len(vocab)


def test_local_model_reward_model_and_prompt_file(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    vocab = _save_hf_tokenizer(tmp_path / "policy")
    _save_hf_tokenizer(tmp_path / "rm")
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        pad_token_id=0,
        eos_token_id=1,
        num_labels=1,
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path / "policy")
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "rm")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{i}{i + 1}="}) + "\n" for i in range(8)))
    out = _run(
        "-m",
        "rlhf_fast.ppo",
        "--out",
        str(tmp_path / "run"),
        "--model",
        str(tmp_path / "policy"),
        "--reward-model",
        str(tmp_path / "rm"),
        "--prompts",
        str(prompts),
        "--total-steps",
        "2",
        "--batch-size",
        "4",
        "--minibatch-size",
        "2",
        "--eval-size",
        "4",
        "--critic-warmup-steps",
        "0",
        "--max-new-tokens",
        "4",
        "--no-progress",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = _metrics(tmp_path / "run")
    assert len(rows) == 2 and all(math.isfinite(r["policy_loss"]) for r in rows)
    assert (tmp_path / "run" / "policy" / "tokenizer_config.json").is_file()
    assert "critic: starts from the policy" not in out.stdout  # same tokenizer: PPO-max's critic from the RM


def test_critic_from_the_reward_model_starts_at_its_scores():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(
        vocab_size=13,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        pad_token_id=0,
        num_labels=1,
    )
    reward_model = LlamaForSequenceClassification(config).eval()
    critic = models.ValueModel.from_reward_model(reward_model).eval()
    ids, attention = torch.randint(2, 13, (3, 9)), torch.ones(3, 9, dtype=torch.long)
    with torch.no_grad():
        values = critic(ids, attention, n_prompt=4)
        hidden = reward_model.model(input_ids=ids, attention_mask=attention).last_hidden_state
        scores = reward_model.score(hidden)[..., 0]
    torch.testing.assert_close(values, scores[:, 3:-1], rtol=1e-5, atol=1e-5)
    assert next(critic.trunk.parameters()).data_ptr() != next(reward_model.model.parameters()).data_ptr()


# ---------------------------------------------------------------- precision, presets, generation


def test_preset_fills_the_fields_left_at_their_defaults():
    cfg = PPOConfig(preset="qwen-shape", hidden_size=256)
    assert (cfg.vocab_size, cfg.tie_embeddings, cfg.num_layers, cfg.hidden_size) == (151936, True, 2, 256)
    assert config_from_args(build_parser().parse_args(["--preset", "qwen-shape"])) == PPOConfig(preset="qwen-shape")
    with pytest.raises(ValueError, match="--preset must be one of"):
        PPOConfig(preset="nope")
    policy = models.tiny_llama(64, PPOConfig(tie_embeddings=True, hidden_size=16, num_heads=2, num_layers=1))
    assert policy.get_output_embeddings().weight is policy.get_input_embeddings().weight


def test_generation_with_last_logits_only_equals_full_logits(monkeypatch):
    tokenizer = tasks.CharTokenizer()
    policy = models.tiny_llama(tokenizer.vocab_size, PPOConfig(hidden_size=32, num_layers=1, num_heads=2))
    ids, mask = encode_prompts(tokenizer, ["12=", "3456=", "7="], "cpu")

    def sample():
        return models.generate(
            policy,
            ids,
            mask,
            max_new_tokens=6,
            eos_token_id=1,
            pad_token_id=0,
            generator=torch.Generator().manual_seed(3),
        )

    assert models._last_logits_kwarg(policy) == {"logits_to_keep": 1}
    last_only = sample()
    monkeypatch.setattr(models, "_last_logits_kwarg", lambda model: {})
    full = sample()
    assert torch.equal(last_only[0], full[0]) and torch.equal(last_only[1], full[1])


def test_grad_checkpointing_keeps_generation_and_gradients():
    tokenizer = tasks.CharTokenizer()
    torch.manual_seed(0)
    plain = models.tiny_llama(tokenizer.vocab_size, PPOConfig(hidden_size=32, num_layers=2, num_heads=2))
    checkpointed = precision.trainable(copy.deepcopy(plain), PPOConfig(grad_checkpointing=True))
    input_ids, attention, labels, n_prompt, mask = _rollout(tokenizer)
    grads = []
    for model in (plain, checkpointed):
        lp = models.LogProbModel(model, get_ops(True), fused=True, temperature=1.0)
        lp(input_ids, attention, labels, n_prompt).sum().backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    ids, prompt_mask = encode_prompts(tokenizer, ["12=", "3456="], "cpu")
    outs = [
        models.generate(
            m.train(),
            ids,
            prompt_mask,
            max_new_tokens=6,
            eos_token_id=1,
            pad_token_id=0,
            generator=torch.Generator().manual_seed(5),
        )
        for m in (plain, checkpointed)
    ]
    assert torch.equal(outs[0][0], outs[1][0])


def test_bf16_models_give_float32_log_probs_and_values():
    tokenizer = tasks.CharTokenizer()
    cfg = PPOConfig(hidden_size=32, num_layers=1, num_heads=2, dtype="bf16")
    policy = models.tiny_llama(tokenizer.vocab_size, cfg)
    reference = models.frozen_copy(policy, precision.DTYPES[cfg.dtype])
    critic = precision.critic(models.ValueModel.from_policy(policy), cfg, torch.device("cpu"))
    assert next(reference.parameters()).dtype == torch.bfloat16
    assert next(policy.parameters()).dtype == torch.float32 and next(critic.parameters()).dtype == torch.float32
    input_ids, attention, labels, n_prompt, mask = _rollout(tokenizer)
    for kernels in (True, False):
        policy_lp = models.LogProbModel(
            policy, get_ops(kernels), fused=kernels, temperature=1.0, autocast=precision.compute_dtype(cfg)
        )
        ref_lp = models.LogProbModel(reference, get_ops(kernels), fused=kernels, temperature=1.0)
        logp, ref_logp = (
            policy_lp(input_ids, attention, labels, n_prompt),
            ref_lp(input_ids, attention, labels, n_prompt),
        )
        assert logp.dtype == ref_logp.dtype == torch.float32
        torch.testing.assert_close(logp, ref_logp, rtol=0.05, atol=0.05)  # the same weights, rounded to bf16
        logp.sum().backward()
        assert all(p.grad.dtype == torch.float32 for p in policy.parameters() if p.grad is not None)
    assert critic(input_ids, attention, n_prompt).dtype == torch.float32


def test_bf16_run_learns_the_default_task(tmp_path):
    """A short bf16 run (autocast policy and critic, bf16 reference): the held-out greedy reward rises."""
    summary = train(
        PPOConfig(
            out=str(tmp_path),
            dtype="bf16",
            total_steps=60,
            eval_size=128,
            lr=5e-4,
            critic_warmup_steps=0,
            progress=False,
            plot=False,
        )
    )
    assert summary["eval_reward_after"] > summary["eval_reward_before"] + 0.05, summary


def test_rollout_logprobs_match_the_recomputed_ones_and_learn(tmp_path):
    """--rollout-logprobs: the sampler's log-probs and entropies of the drawn tokens equal a second forward pass's
    (the update's old log-probs), and a short run with them learns the default task."""
    torch.manual_seed(0)
    tokenizer = tasks.CharTokenizer()
    cfg = PPOConfig(hidden_size=32, num_layers=1, num_heads=2, temperature=0.8)
    policy = models.tiny_llama(tokenizer.vocab_size, cfg)
    prompt_ids, prompt_mask = encode_prompts(tokenizer, ["725760=", "12=", "9081="], "cpu")
    for kernels in (True, False):
        ops = get_ops(kernels)
        response, mask, logp, entropy = models.generate(
            policy,
            prompt_ids,
            prompt_mask,
            max_new_tokens=8,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            temperature=0.8,
            generator=torch.Generator().manual_seed(1),
            ops=ops,
            return_logprobs=True,
        )
        input_ids, attention, labels = join(prompt_ids, prompt_mask, response, mask)
        with torch.no_grad():
            again, again_entropy = models.LogProbModel(policy, ops, fused=kernels, temperature=0.8)(
                input_ids, attention, labels, prompt_ids.shape[1], return_entropy=True
            )
        torch.testing.assert_close(logp, again * mask, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(entropy, again_entropy * mask, rtol=1e-4, atol=1e-4)
    train(
        PPOConfig(
            out=str(tmp_path),
            total_steps=60,
            eval_size=128,
            lr=5e-4,
            critic_warmup_steps=0,
            rollout_logprobs=True,
            progress=False,
            plot=False,
        )
    )
    rows = _metrics(tmp_path)
    first, last = (sum(r["reward_mean"] for r in part) / len(part) for part in (rows[:10], rows[-10:]))
    assert last > first + 0.05, (first, last)
