"""The built-in PPO loop: `rlhf-fast train`, `python -m rlhf_fast.ppo`, `torchrun -m rlhf_fast.ppo`.

from rlhf_fast.ppo import PPOConfig, train
summary = train(PPOConfig(out="runs/sort", total_steps=50))
"""

from .config import PPOConfig
from .trainer import train

__all__ = ["PPOConfig", "train", "main"]


def main(argv: list[str] | None = None) -> int:
    """``rlhf-fast train`` / ``python -m rlhf_fast.ppo`` as a function.

    Parameters
    ----------
    argv : list of str or None
        The flags; None: ``sys.argv[1:]``.

    Returns
    -------
    int
        The exit status, 0 (a bad flag, path or file exits through ``SystemExit`` with a message).
    """
    from .__main__ import main as run

    return run(argv)
