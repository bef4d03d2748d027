"""--fsdp: the loop with FSDP2-sharded models, two processes under torchrun (gloo), against the same run with DDP.

The runs are short (3 PPO steps of the default task at the TINY shapes of test_ppo.py); each module-scoped run is
shared by the tests that read it.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rlhf_fast.ppo import PPOConfig, sharding

ROOT = Path(__file__).resolve().parent.parent
ARGS = [
    "--total-steps",
    "3",
    "--warmup-steps",
    "3",
    "--eval-size",
    "8",
    "--batch-size",
    "8",
    "--minibatch-size",
    "4",
    "--ppo-epochs",
    "2",
    "--critic-warmup-steps",
    "0",
    "--max-new-tokens",
    "7",
    "--no-progress",
    "--no-plot",
]
COMPARED = (
    "reward_mean",
    "kl",
    "entropy",
    "response_len",
    "policy_loss",
    "value_loss",
    "clipfrac",
    "approx_kl",
    "ratio_mean",
    "policy_grad_norm",
    "value_clipfrac",
)


def _command(out, flags, nproc=2):
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc else []
    return [sys.executable, *launcher, "-m", "rlhf_fast.ppo", "--out", str(out), *ARGS, *flags]


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _run(out, *flags, nproc=2):
    done = subprocess.run(
        _command(out, flags, nproc), capture_output=True, text=True, timeout=300, cwd=ROOT, env=_env()
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return _metrics(out), json.loads((Path(out) / "summary.json").read_text())


def _metrics(folder):
    return [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines()]


def _assert_same_run(rows, expected, rel):
    assert [r["step"] for r in rows] == [r["step"] for r in expected]
    for row, want in zip(rows, expected):
        for key in COMPARED:
            assert (row[key] is None) == (want[key] is None), key
            if want[key] is not None:
                assert row[key] == pytest.approx(want[key], rel=rel, abs=rel), (row["step"], key)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("fsdp")
    return {name: (base / name, *_run(base / name, *flags)) for name, flags in {"ddp": [], "fsdp": ["--fsdp"]}.items()}


def test_fsdp_run_equals_the_ddp_run(runs):
    _, ddp_rows, ddp_summary = runs["ddp"]
    _, fsdp_rows, fsdp_summary = runs["fsdp"]
    assert fsdp_summary["fsdp"] is True and ddp_summary["fsdp"] is False and fsdp_summary["world_size"] == 2
    # the warm-up ran through the sharded (or replicated) policy on both processes' demonstrations
    assert fsdp_summary["warmup_loss"] == pytest.approx(ddp_summary["warmup_loss"], rel=1e-5)
    assert fsdp_summary["eval_reward_before"] == pytest.approx(ddp_summary["eval_reward_before"], abs=1e-6)
    _assert_same_run(fsdp_rows, ddp_rows, rel=1e-4)
    assert fsdp_summary["eval_reward_after"] == pytest.approx(ddp_summary["eval_reward_after"], abs=1e-6)


def test_fsdp_holds_half_the_parameter_and_optimiser_bytes_per_process(runs):
    """Measured by the run itself (local shards of every model and AdamW state, each storage once)."""
    _, _, ddp = runs["ddp"]
    _, _, fsdp = runs["fsdp"]
    for rank in range(2):
        ddp_total = ddp["param_mb_per_rank"][rank] + ddp["optimizer_mb_per_rank"][rank]
        fsdp_total = fsdp["param_mb_per_rank"][rank] + fsdp["optimizer_mb_per_rank"][rank]
        # a little over 1/2: dim 0 of odd-sized tables is padded, and the critic keeps its own frozen embedding
        assert 0.45 < fsdp_total / ddp_total < 0.56, (rank, fsdp_total, ddp_total)
        assert fsdp["optimizer_mb_per_rank"][rank] / ddp["optimizer_mb_per_rank"][rank] == pytest.approx(0.5, abs=0.03)


def test_fsdp_saves_the_whole_policy_in_hugging_face_format(runs):
    from transformers import AutoModelForCausalLM

    ddp_policy = AutoModelForCausalLM.from_pretrained(runs["ddp"][0] / "policy")
    fsdp_policy = AutoModelForCausalLM.from_pretrained(runs["fsdp"][0] / "policy")
    ddp_weights, fsdp_weights = ddp_policy.state_dict(), fsdp_policy.state_dict()
    assert ddp_weights.keys() == fsdp_weights.keys()
    for name, weight in ddp_weights.items():
        torch.testing.assert_close(fsdp_weights[name], weight, rtol=1e-4, atol=1e-5, msg=name)


def _kill_workers(launcher: int) -> None:
    """SIGKILL to every child process of `launcher` (torchrun's workers are not in its process group)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == launcher:
            os.kill(int(stat.parent.name), signal.SIGKILL)


def test_fsdp_killed_mid_run_resumes_to_the_uninterrupted_metrics(runs, tmp_path):
    out = tmp_path / "killed"
    log = tmp_path / "killed.log"
    with log.open("w") as sink:
        run = subprocess.Popen(
            _command(out, ["--fsdp", "--save-every", "1"]), cwd=ROOT, env=_env(), stdout=sink, stderr=subprocess.STDOUT
        )
        state = out / "checkpoint" / "state.pt"
        deadline = time.monotonic() + 240
        while not state.is_file() and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        _kill_workers(run.pid)  # as a crash would: the workers die at once, torchrun then ends the run
        run.wait(timeout=60)
    assert state.is_file(), log.read_text()[-3000:]
    assert not (out / "summary.json").exists(), "the run finished before it could be killed"
    saved = torch.load(state, weights_only=False)["step"]
    assert 1 <= saved < 3

    resumed = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "rlhf_fast.ppo",
            "--resume",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=_env(),
    )
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_at_step"] == saved and summary["fsdp"] is True
    _, uninterrupted, expected = runs["fsdp"]
    _assert_same_run(_metrics(out), uninterrupted, rel=1e-6)
    assert summary["eval_reward_after"] == expected["eval_reward_after"]
    assert sorted(p.name for p in (out / "checkpoint").glob("sharded-*")) == ["sharded-3"]


def test_fsdp_equals_ddp_with_the_fused_head_off(tmp_path):
    ddp_rows, _ = _run(tmp_path / "ddp", "--no-fused-head")
    fsdp_rows, _ = _run(tmp_path / "fsdp", "--no-fused-head", "--fsdp")
    _assert_same_run(fsdp_rows, ddp_rows, rel=1e-4)


def test_fsdp_alone_with_bf16_mixed_precision_and_the_full_vocabulary_kl(tmp_path):
    """`rlhf-fast train --fsdp` without torchrun (a one-process group), bf16 gathered weights (FSDP2's
    MixedPrecisionPolicy), and the fused --kl-full-vocab term, which reads the reference's sharded head."""
    rows, summary = _run(tmp_path, "--fsdp", "--dtype", "bf16", "--kl-full-vocab", "kl", nproc=0)
    assert summary["world_size"] == 1 and summary["fsdp"] is True
    for row in rows:
        for key in ("reward_mean", "kl", "policy_loss", "value_loss", "kl_full_vocab"):
            assert math.isfinite(row[key]), key


def test_fsdp_refuses_quantized_frozen_models():
    with pytest.raises(ValueError, match="--fsdp"):
        PPOConfig(fsdp=True, ref_quant="int8").validate()


def test_copy_weights_between_unsharded_models_and_its_errors():
    src, dst = torch.nn.Linear(3, 4), torch.nn.Linear(3, 4).to(torch.bfloat16)
    sharding.copy_weights(dst, src)
    torch.testing.assert_close(dst.weight, src.weight.detach().to(torch.bfloat16))
    with pytest.raises(KeyError, match="no parameter"):
        sharding.copy_weights(torch.nn.Sequential(torch.nn.Linear(3, 4)), src)
