"""PPO loop: time per PPO step of a real run on the default task, kernels off (`eager`: the torch references)
vs on (`rlhf_fast`: the fused ops). Each call of a provider runs the next step of one live run (rollout,
scoring, advantages, 4 epochs of minibatch updates); the harness's warm-up call pays for the set-up."""
from __future__ import annotations

import tempfile

import torch

from rlhf_fast.ppo import PPOConfig
from rlhf_fast.ppo.trainer import training_steps

from .harness import Case


def _stepper(device: torch.device, kernels: str, **model):
    """A zero-argument callable that advances one training run by one PPO step per call."""
    folder = tempfile.TemporaryDirectory(prefix="bench_ppo_")
    cfg = PPOConfig(out=folder.name, device=device.type, kernels=kernels, warmup_steps=5, eval_size=8,
                    total_steps=10**6, save_every=10**6, critic_warmup_steps=0, progress=False, plot=False,
                    **model)
    run = training_steps(cfg)

    def step():
        folder  # noqa: B018  (keeps the run folder alive as long as the run)
        return next(run)["time_step"]
    return step


def _case(device, label, **model):
    providers = {"eager": _stepper(device, "off", **model), "rlhf_fast": _stepper(device, "on", **model)}
    # a provider returns its step time (no tensors): the harness has no output to compare, by design
    return Case("ppo_step", label, torch.float32, "fwd+bwd", providers)


def cases(device: torch.device, quick: bool) -> list[Case]:
    default = _case(device, "default task (Llama h64 L2, B=64)")
    if quick:
        return [default]
    if device.type == "cuda":  # ~0.47 B parameters, Qwen-sized vocabulary, 128-token responses
        return [default, _case(device, "Llama h1024 L16 V=151936, B=64, 128 tokens", hidden_size=1024, num_layers=16,
                               num_heads=16, vocab_size=151936, max_new_tokens=128)]
    return [default, _case(device, "Llama h256 L4, B=64", hidden_size=256, num_layers=4, num_heads=8)]
