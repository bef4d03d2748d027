"""PPO loop: per-call cost of every op the loop uses at the default task's shapes, and time per PPO step and
phase of real runs, kernels off (`eager`: the torch references) vs on (`rlhf_fast`: the fused ops).

The step cases run two training runs, one per mode, each in its own process (rlhf_fast.ppo.stepper), stepped in
turn (off, on, off, on, ...) so both see the same machine load; the first step (set-up, warm-up, evaluation) is
not timed. Rows per phase (generate, score, advantages, update, step) give the median and 20/80% quantiles over
the timed steps; peak_mem is the peak resident memory of each whole run (set-up and warm-up included).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import rlhf_fast as rf
from rlhf_fast import reference
from rlhf_fast.ppo import stepper

from .harness import Case, Result

PHASES = ("generate", "score", "advantages", "update", "step")
ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- per-call cost of the loop's ops


def _op_cases(device: torch.device) -> list[Case]:
    """Each op of rlhf_fast.ppo.ops at the default task's shapes (64 sequences x 8 response tokens, vocab 46,
    hidden 64; minibatches of 32) against its eager reference: at these sizes the time is the per-call cost."""
    g = torch.Generator(device="cpu").manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(device)  # noqa: E731
    batch, steps, vocab, hidden_size, mini = 64, 8, 46, 64, 32
    logits, hidden, weight = rand(batch, steps, vocab), rand(batch, steps, hidden_size), rand(vocab, hidden_size)
    labels = torch.randint(0, vocab, (batch, steps), generator=g).to(device)
    mask = (torch.rand(batch, steps, generator=g) > 0.2).to(device)
    labels = torch.where(mask, labels, torch.full_like(labels, -100))
    logp, ref_logp, adv = rand(batch, steps), rand(batch, steps), rand(batch, steps)
    mlogp, mold, madv, mmask = logp[:mini], ref_logp[:mini], adv[:mini], mask[:mini]
    trained = lambda *ts: [t.detach().clone().requires_grad_() for t in ts]  # noqa: E731
    g_hidden, g_weight = trained(hidden, weight)
    (g_logits,) = trained(logits)
    (g_logp,) = trained(mlogp)
    shape = f"B={batch} T={steps} V={vocab} H={hidden_size}"

    def both(op, eager, ours, mode="fwd"):
        return Case(f"loop:{op}", shape, torch.float32, mode, {"eager": eager, "rlhf_fast": ours})

    def backward(fn):
        def run():
            out = fn()
            (out[0] if isinstance(out, tuple) else out).sum().backward()
        return run
    eager_lp = lambda lg: torch.log_softmax(lg.float(), -1).gather(  # noqa: E731
        -1, labels.clamp(min=0)[..., None]).squeeze(-1) * mask
    return [
        both("logprobs", lambda: eager_lp(logits), lambda: rf.logprobs(logits, labels) * mask),
        both("logprobs", backward(lambda: eager_lp(g_logits)), backward(lambda: rf.logprobs(g_logits, labels) * mask),
             "fwd+bwd"),
        both("linear_logprobs+entropy", lambda: reference.linear_logprobs(hidden, weight, labels, return_entropy=True),
             lambda: rf.linear_logprobs(hidden, weight, labels, return_entropy=True)),
        both("linear_logprobs", backward(lambda: reference.linear_logprobs(g_hidden, g_weight, labels)),
             backward(lambda: rf.linear_logprobs(g_hidden, g_weight, labels)), "fwd+bwd"),
        both("kl_penalty", lambda: reference.kl_penalty(logp, ref_logp, "k1"), lambda: rf.kl_penalty(logp, ref_logp)),
        both("gae", lambda: reference.gae(logp, ref_logp, mask), lambda: rf.gae(logp, ref_logp, mask)),
        both("masked_whiten", lambda: reference.masked_whiten(adv, mask), lambda: rf.masked_whiten(adv, mask)),
        both("ppo_policy_loss", backward(lambda: reference.ppo_policy_loss(g_logp, mold, madv, mmask)),
             backward(lambda: rf.ppo_policy_loss(g_logp, mold, madv, mmask)), "fwd+bwd"),
        both("ppo_value_loss", backward(lambda: reference.ppo_value_loss(g_logp, mold, madv, mmask)),
             backward(lambda: rf.ppo_value_loss(g_logp, mold, madv, mmask)), "fwd+bwd"),
        both("agg_loss", lambda: reference.agg_loss(logp, mask), lambda: rf.agg_loss(logp, mask)),
    ]


# ---------------------------------------------------------------- PPO steps, kernels off and on in turn


def _start(kernels: str, folder: str, overrides: dict) -> subprocess.Popen:
    cfg = dict(out=str(Path(folder) / kernels), kernels=kernels, total_steps=10**6, save_every=10**6,
               critic_warmup_steps=0, progress=False, plot=False, **overrides)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "rlhf_fast.ppo.stepper", json.dumps(cfg)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)


def _step(proc: subprocess.Popen) -> dict:
    proc.stdin.write("\n")
    proc.stdin.flush()
    for line in proc.stdout:
        if line.startswith(stepper.PREFIX):
            return json.loads(line[len(stepper.PREFIX):])
    raise RuntimeError(f"the training process stopped (exit code {proc.wait()}); its errors are above")


def _quantiles(values: list[float]) -> tuple[float, float, float]:
    ordered = sorted(values)
    pick = lambda p: ordered[min(len(ordered) - 1, int(p * (len(ordered) - 1) + 0.5))]  # noqa: E731
    return statistics.median(ordered), pick(0.2), pick(0.8)


def _interleaved(label: str, dtype: torch.dtype, steps: tuple[int, int], **overrides) -> Case:
    """A case measured by stepping an off and an on run in turn: steps = (quick, full) timed steps."""
    phase_cases = {phase: Case(f"ppo_{phase}", label, dtype, "fwd+bwd", {}) for phase in PHASES}

    def measure(quick: bool) -> list[Result]:
        timed = steps[0] if quick else steps[1]
        rows = {"eager": [], "rlhf_fast": []}
        with tempfile.TemporaryDirectory(prefix="bench_ppo_") as folder:
            procs = {"eager": _start("off", folder, overrides), "rlhf_fast": _start("on", folder, overrides)}
            try:
                for i in range(timed + 1):
                    for provider, proc in procs.items():
                        row = _step(proc)
                        if i:  # the first call includes set-up, warm-up and the first evaluation
                            rows[provider].append(row)
            finally:
                for proc in procs.values():
                    proc.stdin.close()
                    proc.kill()
                    proc.wait()
        return [Result(phase_cases[phase], provider, _quantiles([r[f"time_{phase}"] * 1e3 for r in provider_rows]),
                       provider_rows[-1]["peak_rss_mb"])
                for phase in PHASES for provider, provider_rows in rows.items()]

    return Case("ppo_step", label, dtype, "fwd+bwd", {}, measure=measure)


def cases(device: torch.device, quick: bool) -> list[Case]:
    run = dict(device=device.type, eval_size=16, warmup_steps=2)
    default = _interleaved("default task (Llama h64 L2, B=64)", torch.float32, (5, 20), **run)
    qwen = _interleaved("qwen-shape (V=151936 tied, h128 L2, B=64, 8 tokens)", torch.float32, (2, 6),
                        preset="qwen-shape", **run)
    if quick:
        return _op_cases(device) + [default]
    if device.type == "cuda":  # ~0.47 B parameters, Qwen-sized vocabulary, 128-token responses, bf16
        return _op_cases(device) + [default, qwen, _interleaved(
            "Llama h1024 L16 V=151936, B=64, 128 tokens", torch.bfloat16, (2, 6), hidden_size=1024, num_layers=16,
            num_heads=16, vocab_size=151936, max_new_tokens=128, dtype="bf16", **run)]
    return _op_cases(device) + [default, qwen]
