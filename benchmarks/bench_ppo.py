"""PPO loop: time per PPO step and phase of real runs, kernels off (`eager`: the torch references) vs on
(`rlhf_fast`: the fused ops). The per-call cost of each op the loop uses is bench_tiny.py's.

The step cases run two training runs, one per mode, each in its own process (stepper.py), stepped in
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

from .harness import Case, Result
from .stepper import PREFIX

PHASES = ("generate", "score", "advantages", "update", "step")
STEPPER = Path(__file__).resolve().with_name("stepper.py")
ROOT = STEPPER.parent.parent  # the checkout: its rlhf_fast for the training processes


# ---------------------------------------------------------------- PPO steps, kernels off and on in turn


def _start(kernels: str, folder: str, overrides: dict) -> subprocess.Popen:
    cfg = dict(
        out=str(Path(folder) / kernels),
        kernels=kernels,
        total_steps=10**6,
        save_every=10**6,
        critic_warmup_steps=0,
        progress=False,
        plot=False,
        **overrides,
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(
        [sys.executable, str(STEPPER), json.dumps(cfg)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )


def _step(proc: subprocess.Popen) -> dict:
    proc.stdin.write("\n")
    proc.stdin.flush()
    for line in proc.stdout:
        if line.startswith(PREFIX):
            return json.loads(line[len(PREFIX) :])
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
        return [
            Result(
                phase_cases[phase],
                provider,
                _quantiles([r[f"time_{phase}"] * 1e3 for r in provider_rows]),
                provider_rows[-1]["peak_rss_mb"],
            )
            for phase in PHASES
            for provider, provider_rows in rows.items()
        ]

    return Case("ppo_step", label, dtype, "fwd+bwd", {}, measure=measure)


def cases(device: torch.device, quick: bool) -> list[Case]:
    run = dict(device=device.type, eval_size=16, warmup_steps=2)
    default = _interleaved("default task (Llama h64 L2, B=64)", torch.float32, (5, 20), **run)
    qwen = _interleaved(
        "qwen-shape (V=151936 tied, h128 L2, B=64, 8 tokens)", torch.float32, (2, 6), preset="qwen-shape", **run
    )
    if quick:
        return [default]
    if device.type == "cuda":  # ~0.47 B parameters, Qwen-sized vocabulary, 128-token responses, bf16
        return [
            default,
            qwen,
            _interleaved(
                "Llama h1024 L16 V=151936, B=64, 128 tokens",
                torch.bfloat16,
                (2, 6),
                hidden_size=1024,
                num_layers=16,
                num_heads=16,
                vocab_size=151936,
                max_new_tokens=128,
                dtype="bf16",
                **run,
            ),
        ]
    return [default, qwen]
