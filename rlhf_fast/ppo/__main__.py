"""`python -m rlhf_fast.ppo [flags]` (also under torchrun); the same flags as `rlhf-fast train`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import config


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(
        prog="rlhf-fast train",
        description="PPO on Hugging Face models with rlhf_fast kernels; with no flags, the embedded digit-sorting task",
    )
    config.add_arguments(parser)
    return parser


def config_from_args(args: argparse.Namespace) -> config.PPOConfig:
    """The flags given over the defaults, or, with --resume DIR, over DIR's saved config."""
    given = config.given(args)
    if given.get("resume"):
        saved = Path(given["resume"]) / "config.json"
        if not saved.is_file():
            raise SystemExit(f"--resume {given['resume']}: no config.json there (not a run folder)")
        given = {**json.loads(saved.read_text()), **given, "out": given["resume"]}
    cfg = config.PPOConfig(**given)
    try:
        cfg.validate()
    except ValueError as exc:
        raise SystemExit(f"rlhf-fast train: {exc}") from None
    return cfg


def run(args: argparse.Namespace) -> int:
    from .trainer import SetupError, train

    cfg = config_from_args(args)
    try:
        train(cfg)
    except SetupError as exc:
        raise SystemExit(f"rlhf-fast train: {exc}") from None
    return 0


def main(argv=None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
