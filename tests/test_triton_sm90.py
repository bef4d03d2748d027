"""Triton kernels ready for the GPU: every kernel compiles for an H100 (sm_90) through ptxas, without spilling, in
the shared memory it has; and every launcher runs on its tensors' device, not just the current one.

The interpreter that runs the Triton kernels in CPU CI accepts code the GPU compiler rejects and says nothing of
registers or shared memory, so tests/sm90_compile.py builds each kernel for sm_90 at the launch configuration its
own launcher picks for the shapes of a real run (vocab 151936, lm_head 16384 x 4096 plain and with a logit scale
and soft cap, qmatmul 4096 x 4096 at M = 1, 16, 256, 8192; float32 and bfloat16 inputs), in a subprocess without
TRITON_INTERPRET and with an empty Triton cache. No GPU needed; skipped only where Triton's nvidia backend or ptxas
is missing.
"""

import json
import os
import subprocess
import sys

import pytest
import sm90_compile
import torch

import rlhf_fast as rf

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
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_ALLOW_NON_CONSTEXPR_GLOBALS")}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton_cache"))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(
        [sys.executable, os.path.join(root, "tests", "sm90_compile.py")],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
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
        if k["kernel"] == "_quantize_rows_kernel":
            # an FMA would round x * inv differently from the reference; .ftz would flush subnormal activations
            assert not k["fma_or_ftz"], f"the W8A8 activation quantizer holds an fma or .ftz instruction: {where}"


def _ops_on(device):
    """One call of each Triton family (forward and backward) on `device`: name -> (outputs, input gradients)."""
    gen = torch.Generator().manual_seed(7)
    x = lambda *shape: torch.randn(*shape, generator=gen).to(device)  # noqa: E731
    labels = torch.randint(0, 1000, (4, 8), generator=gen).to(device)
    results = {}

    def run(name, fn, *inputs):
        leaves = [t.clone().requires_grad_() for t in inputs]
        out = fn(*leaves)
        out = out if isinstance(out, tuple) else (out,)
        sum(o.float().sum() for o in out).backward()
        results[name] = [o.detach().cpu() for o in out] + [t.grad.cpu() for t in leaves if t.grad is not None]

    run("logprobs", lambda z: rf.logprobs(z, labels, return_entropy=True, backend="triton"), x(4, 8, 1000))
    run(
        "linear_logprobs",
        lambda h, w: rf.linear_logprobs(h, w, labels, backend="triton"),
        x(4, 8, 64),
        x(1000, 64) * 0.1,
    )
    run("gae", lambda r, v: rf.gae(r, v, gamma=0.99, lam=0.95, backend="triton"), x(4, 300), x(4, 300))
    run("f_divergence", lambda p, q: rf.f_divergence(p, q, "js", backend="triton"), x(4, 8, 1000), x(4, 8, 1000))
    run("kl_penalty", lambda a, b: rf.kl_penalty(a, b, "k3", backend="triton"), x(4, 300), x(4, 300))
    run(
        "ppo_policy_loss",
        lambda a, b, c: rf.ppo_policy_loss(a, b, c, backend="triton")[0],
        x(4, 300),
        x(4, 300),
        x(4, 300),
    )
    qw = rf.quantize_weight(x(96, 128), "int4", group_size=64)
    run("qmatmul", lambda a: rf.qmatmul(a, qw, backend="triton"), x(5, 128))
    return results


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_launchers_run_on_the_tensors_device():
    # tensors on cuda:1 while cuda:0 is current: each launcher makes cuda:1 current for its kernels
    expected = _ops_on("cuda:0")
    with torch.cuda.device(0):
        got = _ops_on("cuda:1")
        torch.cuda.synchronize(1)
    for name, tensors in expected.items():
        assert len(got[name]) == len(tensors), name
        for g, e in zip(got[name], tensors):
            torch.testing.assert_close(g, e, msg=name)
