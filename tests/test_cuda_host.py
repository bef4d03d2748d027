"""The CUDA log-prob forward's row math, run on the host.

tests/native/logprobs_block_replay.cpp is compiled with the host C++ compiler against csrc/logprobs_common.h,
the same Moments / thread_moments / row_stats code the CUDA kernel runs, and replays one 256-thread block per
row: each thread's share of the row (head elements before the first 16-byte boundary, every 256th 16-byte pack,
the tail) and the kernel's merge order (warp butterflies, then warp 0 merging the others). Only the hardware
2^x differs: the host takes the exact exp2 where the GPU takes ex2.approx (relative error ~2^-22). Skipped only
without a C++ compiler.
"""

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from rlhf_fast import backend

ROOT = Path(__file__).resolve().parents[1]
PACK = {torch.float32: 4, torch.bfloat16: 8}  # elements per 16-byte pack
THREADS = 256
VOCAB = 2 * THREADS * 8 + 13  # a head, two rounds of packs for every thread, and a tail


@pytest.fixture(scope="module")
def replay(tmp_path_factory):
    compiler = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    exe = tmp_path_factory.mktemp("replay") / "logprobs_block_replay"
    subprocess.run(
        [
            compiler,
            "-O2",
            "-std=c++20",
            "-Wall",
            f"-I{ROOT / 'csrc'}",
            str(ROOT / "tests" / "native" / "logprobs_block_replay.cpp"),
            "-o",
            str(exe),
        ],
        check=True,
    )

    def run(rows, misalignment, temperature=1.0):
        """(lse, entropy) float32 per row of `rows` (R, V) float32 / bfloat16, each row placed `misalignment`
        elements past a 16-byte boundary."""
        bits = rows.contiguous().view(torch.int16 if rows.dtype == torch.bfloat16 else torch.int32)
        out = subprocess.run(
            [
                str(exe),
                "bf16" if rows.dtype == torch.bfloat16 else "f32",
                str(misalignment),
                str(rows.shape[1]),
                repr(temperature),
            ],
            input=bits.numpy().tobytes(),
            capture_output=True,
            check=True,
        ).stdout
        result = torch.from_numpy(np.frombuffer(out, dtype=np.float32).copy()).view(-1, 2)
        assert result.shape[0] == rows.shape[0]
        return result[:, 0], result[:, 1]

    return run


def _float64_stats(rows, temperature=1.0):
    scaled = rows.double() / temperature
    log_p = torch.log_softmax(scaled, dim=-1)
    return torch.logsumexp(scaled, dim=-1), -(log_p.exp() * log_p.nan_to_num(0.0)).sum(-1)


def _nan_positions(head, pack):
    """Positions of the row that land in each part of a thread's work for a row with `head` head elements."""
    first_pack, packs = head, (VOCAB - head) // pack
    tail = head + packs * pack
    positions = {
        0,
        max(head - 1, 0),
        first_pack,
        first_pack + pack - 1,
        first_pack + (THREADS - 1) * pack,
        first_pack + THREADS * pack,
        tail - 1,
        tail,
        VOCAB - 1,
    }
    return sorted(p for p in positions if 0 <= p < VOCAB)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_propagates_at_every_misalignment(replay, dtype):
    pack = PACK[dtype]
    for misalignment in range(8):
        head = min((pack - misalignment % pack) % pack, VOCAB)
        rows, kinds = [], []
        for pos in _nan_positions(head, pack):
            row = torch.randn(VOCAB) * 3
            row[pos] = float("nan")
            rows.append(row)
            kinds.append(f"NaN at {pos}")
            row = torch.randn(VOCAB) * 3  # everything before the NaN -inf: the NaN is its thread's first value
            row[:pos] = float("-inf")
            row[pos] = float("nan")
            rows.append(row)
            kinds.append(f"-inf before a NaN at {pos}")
        rows.append(torch.full((VOCAB,), float("nan")))
        kinds.append("all NaN")
        lse, entropy = replay(torch.stack(rows).to(dtype), misalignment)
        for kind, row_lse, row_entropy in zip(kinds, lse.tolist(), entropy.tolist()):
            assert np.isnan(row_lse) and np.isnan(row_entropy), (
                f"{dtype} misalignment {misalignment}, {kind}: lse {row_lse}, entropy {row_entropy}"
            )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_infinite_logits_behave_like_torch(replay, dtype):
    rows = torch.randn(4, VOCAB) * 3
    rows[0] = float("-inf")  # torch: lse -inf, entropy NaN (0 * -inf)
    rows[1, :2500] = float("-inf")  # a masked prefix: finite results
    rows[2, 1::3] = float("-inf")
    rows[3, 777] = float("inf")  # torch: entropy NaN, lse +inf; here lse NaN too (every log-prob NaN)
    rows = rows.to(dtype)
    exp_lse, exp_entropy = _float64_stats(rows)
    exp_lse[3] = float("nan")
    for misalignment in (0, 3):
        lse, entropy = replay(rows, misalignment)
        torch.testing.assert_close(lse.double(), exp_lse, rtol=1e-6, atol=1e-6, equal_nan=True)
        torch.testing.assert_close(entropy.double(), exp_entropy, rtol=1e-5, atol=1e-6, equal_nan=True)
        assert lse[0] == float("-inf") and entropy[0].isnan() and lse[3].isnan() and entropy[3].isnan()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_temperature_accuracy(replay, dtype):
    """T = 0.05: logits - max is taken in logit units, then scaled, so the error stays at float32 rounding of
    lse (~1 ulp) and of the entropy; scaling first (x log2(e) / T - m) loses ~40x on the entropy."""
    temperature = 0.05
    rows = (torch.randn(48, VOCAB) * 3).to(dtype)
    exp_lse, exp_entropy = _float64_stats(rows, temperature)
    cpu_entropy = None
    if backend.compiled() is not None:  # the CPU kernel on the same rows: the bar not to fall behind
        cpu_entropy = torch.ops.rlhf_fast.logprobs_forward(rows[None], None, temperature, -100)[1][0]
    for misalignment in (0, 1, 5):
        lse, entropy = replay(rows, misalignment, temperature)
        lse_error = ((lse.double() - exp_lse).abs() / exp_lse.abs()).max().item()
        entropy_error = (entropy.double() - exp_entropy).abs().max().item()
        assert lse_error < 2**-23, f"lse relative error {lse_error:.2e}"
        assert entropy_error < 4e-7, f"entropy error {entropy_error:.2e}"
        if cpu_entropy is not None:
            cpu_error = (cpu_entropy.double() - exp_entropy).abs().max().item()
            assert entropy_error < 2 * cpu_error + 1e-7, f"entropy error {entropy_error:.2e}, CPU's {cpu_error:.2e}"
