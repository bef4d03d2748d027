"""reward_kl.png: the sampled reward and KL(policy || ref) per PPO step (with the adaptive controller's target)."""

from __future__ import annotations

from pathlib import Path


def reward_kl(metrics: list[dict], path: Path, cfg) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in metrics]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    top.plot(steps, [m["reward_mean"] for m in metrics])
    top.set_ylabel("reward (mean)")
    bottom.plot(steps, [m["kl"] for m in metrics], color="tab:red", label="KL(policy || ref), nats")
    if cfg.adaptive_kl:
        bottom.axhline(cfg.kl_target, color="gray", linestyle="--", label=f"adaptive KL target {cfg.kl_target:g}")
        bottom.legend(loc="upper left")
    bottom.set_ylabel("KL(policy || ref)")
    bottom.set_xlabel("PPO step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
