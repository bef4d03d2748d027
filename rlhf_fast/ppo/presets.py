"""Named model shapes for `rlhf-fast train --preset NAME` and `rlhf-fast bench --family ppo`.

A preset fills the config fields left at their defaults; fields set explicitly (flags, or keyword arguments of
PPOConfig) keep their values, so `--preset qwen-shape --hidden-size 256` widens the preset's model.
"""

from __future__ import annotations

import dataclasses

PRESETS: dict[str, dict] = {
    # Qwen2.5-0.5B's vocabulary (151936 rows) and tied input/output embeddings, on a trunk small enough for a
    # 2-core CPU: the lm head and the embedding dominate, as they do in the small Qwen models.
    "qwen-shape": dict(vocab_size=151936, tie_embeddings=True, hidden_size=128, num_layers=2, num_heads=4),
}


def apply(cfg) -> None:
    """Sets the fields of cfg (a PPOConfig) that still hold their defaults to the preset's values."""
    if cfg.preset is None:
        return
    if cfg.preset not in PRESETS:
        raise ValueError(f"--preset must be one of {sorted(PRESETS)}, got {cfg.preset!r}")
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    for name, value in PRESETS[cfg.preset].items():
        if getattr(cfg, name) == defaults[name]:
            setattr(cfg, name, value)
