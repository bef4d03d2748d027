"""`python benchmarks/stepper.py CONFIG_JSON`: one PPO training run, advanced by one step per line read from stdin.

After each step it writes one line `STEP <json>` to stdout: the step's metrics row and the process's peak
resident memory so far (`peak_rss_mb`, set-up and warm-up included). bench_ppo.py runs two of these (kernels off
and on) and steps them in turn, so both see the same machine load and each has its own peak memory.
"""

from __future__ import annotations

import json
import resource
import sys

from rlhf_fast.ppo.config import PPOConfig
from rlhf_fast.ppo.trainer import training_steps

PREFIX = "STEP "


def peak_rss_mb() -> float:
    """This process's peak resident set size (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    run = training_steps(PPOConfig(**json.loads(argv[0])))
    for _ in sys.stdin:
        row = next(run)
        print(PREFIX + json.dumps({**row, "peak_rss_mb": peak_rss_mb()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
