"""Every Triton kernel compiles for an H100 (sm_90) through ptxas, without spilling, in the shared memory it has.

The interpreter that runs the Triton kernels in CPU CI accepts code the GPU compiler rejects and says nothing of
registers or shared memory, so tests/sm90_compile.py builds each kernel for sm_90 at the launch configuration its
own launcher picks for the shapes of a real run (vocab 151936, lm_head 16384 x 4096, qmatmul 4096 x 4096 at
M = 1, 16, 256, 8192; float32 and bfloat16 inputs), in a subprocess without TRITON_INTERPRET and with an empty
Triton cache. No GPU needed; skipped only where Triton's nvidia backend or ptxas is missing.
"""
import json
import os
import subprocess
import sys

import pytest

import sm90_compile

# Bytes of spill stores (and of stack frame) per thread that a kernel may have, with the reason; all others: 0.
SPILL_BOUNDS = {
    # ptxas 13 keeps one 8-byte value on the stack in the bfloat16 policy-loss forward with several rows per
    # program (BLOCK_R = 8, BLOCK_T = 128) at 80 registers: one store and one load per program, not per token.
    "_loss_forward_kernel": 8,
}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """case -> (records of its kernels, compile errors), from one run of tests/sm90_compile.py for all cases."""
    missing = sm90_compile.missing_toolchain()
    if missing is not None:
        pytest.skip(missing)
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "TRITON_ALLOW_NON_CONSTEXPR_GLOBALS")}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton_cache"))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, os.path.join(root, "tests", "sm90_compile.py")], cwd=root, env=env,
                          capture_output=True, text=True, timeout=1200)
    if done.returncode != 0:
        pytest.fail(f"tests/sm90_compile.py exited with {done.returncode}:\n{done.stderr[-6000:]}")
    results = {name: ([], []) for name in sm90_compile.CASES}
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            results[record["case"]][1 if "error" in record else 0].append(record)
    return results


@pytest.mark.parametrize("case", list(sm90_compile.CASES))
def test_kernels_compile_for_sm90(compiled, case):
    kernels, errors = compiled[case]
    assert not errors, f"{case} does not compile for sm_90:\n{errors[0]['error']}"
    assert kernels, f"{case} compiled no kernel (launchers not reached?)"
    for k in kernels:
        where = f"{k['kernel']} {k['options']}: {k}"
        bound = SPILL_BOUNDS.get(k["kernel"], 0)
        assert k["spill_stores"] <= bound and k["stack"] <= bound, f"spills on sm_90: {where}"
        assert k["shared"] <= sm90_compile.H100_SHARED_BYTES, f"needs more shared memory than an H100 has: {where}"
