"""Compile every Triton kernel of rlhf_fast for an H100 (sm_90) without a GPU, launching nothing.

Run as a script, in a process without TRITON_INTERPRET and with a fresh TRITON_CACHE_DIR (Triton's cache key
ignores some switches, so a cached build could hide a compile error):

    python tests/sm90_compile.py [CASE ...]

A stand-in driver reports an sm_90 device, and `JITFunction.run` compiles instead of launching: each case calls
the real launchers in rlhf_fast/triton/ with tensors of the shapes and dtypes it names (never read), so every kernel
is built (TTIR -> TTGIR -> LLVM -> PTX -> cubin through ptxas) with exactly the grid, constexprs and num_warps its
launcher picks. One JSON line per distinct compiled kernel (registers, stack frame and spills from ptxas -v,
shared memory), or one line with the error of a case that failed to compile. tests/test_triton_sm90.py runs it and
checks them. A kernel found in Triton's cache is not compiled, hence not reported: use an empty cache.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sys

import torch

V = 151936  # Qwen2's vocab
HIDDEN = 4096
TOKENS = 16384
QMATMUL_FEATURES = 4096
QMATMUL_ROWS = (1, 16, 256, 8192)  # decode (split-K GEMV) and prefill/training (tiled GEMM)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
H100_SMS = 132  # H100 SXM
H100_SHARED_BYTES = 227 * 1024  # the most shared memory one block may use on sm_90


def missing_toolchain() -> str | None:
    """Why kernels cannot be compiled for sm_90 here (no nvidia backend in triton, or no ptxas), or None."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        _ = get_ptxas(90).path  # raises when neither TRITON_PTXAS_PATH nor the bundled binary exists
    except (ImportError, RuntimeError) as exc:
        return f"cannot compile Triton kernels for sm_90: {type(exc).__name__}: {exc}"
    return None


# ---------------------------------------------------------------- cases: launcher calls at the target shapes


def _empty(*shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype)


def _labels(*shape):
    return torch.zeros(shape, dtype=torch.long)


def _logprobs(dtype):
    from rlhf_fast.triton import logprobs as ops

    logits = _empty(2, 8, V, dtype=dtype)
    rows = _empty(2, 8)
    for labels in (_labels(2, 8), None):
        ops.logprobs_forward(logits, labels, 1.0, -100)
    for grad_logp, grad_entropy in ((rows, rows), (rows, None), (None, rows)):
        ops.logprobs_backward(grad_logp, grad_entropy, logits, _labels(2, 8), rows, rows, 1.0, -100)


def _linear_logprobs(dtype, logit_scale=1.0, softcap=None):
    from rlhf_fast.triton import logprobs as ops

    hidden, weight = _empty(TOKENS, HIDDEN, dtype=dtype), _empty(V, HIDDEN, dtype=dtype)
    for bias in (None, _empty(V, dtype=dtype)):
        ops.linear_logprobs_forward(hidden, weight, bias, _labels(TOKENS), 1.0, -100, logit_scale, softcap)


def _advantages(dtype):
    from rlhf_fast.triton import advantages as ops

    batch, steps = 64, 8192
    tokens = _empty(batch * steps, dtype=dtype)
    cu_seqlens = torch.arange(0, batch * steps + 1, steps)
    ops.gae(
        tokens, tokens, torch.ones(batch * steps, dtype=torch.bool), _empty(batch, dtype=dtype), cu_seqlens, 1.0, 0.95
    )
    ops.gae(tokens, tokens, None, None, cu_seqlens, 1.0, 0.95)
    for group_size in (16, 64):
        for norm_std, leave_one_out in ((True, False), (False, False), (False, True)):
            ops.group_advantages(_empty(512 * group_size, dtype=dtype), group_size, norm_std, leave_one_out, 1e-6)
    ops.masked_moments(tokens, torch.ones(batch * steps, dtype=torch.bool))
    ops.masked_moments(tokens, None)


def _divergence(dtype):
    from rlhf_fast.triton import divergence as ops

    rows = 16
    logits = _empty(rows, V, dtype=dtype)
    mask = torch.ones(rows, dtype=torch.bool)
    per_row, stats = _empty(rows), _empty(rows, 3)
    for kind in ("kl", "reverse_kl", "js", "tv", "alpha"):  # hellinger and chi2 share alpha's kernel code
        ops.f_divergence(logits, logits, mask, kind, 0.5, 1.0)
        ops.f_divergence(logits, logits, None, kind, 0.5, 1.0)
        if kind in ("js", "tv"):  # linear_f_divergence's second pass over a vocab chunk
            ops.f_divergence_second_pass(logits, logits, mask, stats, kind, 1.0)
            ops.f_divergence_second_pass(logits, logits, None, stats, kind, 1.0)
        for need_p, need_q in ((True, True), (True, False), (False, True)):
            ops.f_divergence_backward(per_row, logits, logits, mask, per_row, stats, kind, 0.5, 1.0, need_p, need_q)


def _losses(dtype):
    from rlhf_fast.triton import losses as ops

    for kind in ("k1", "abs", "k2", "k3", "k1+", "k3+"):
        x = _empty(64, 8192, dtype=dtype)
        ops.kl_penalty(x, x, kind)
        ops.kl_penalty_backward(_empty(64, 8192, dtype=dtype), x, x, kind)
    for rows, steps in ((64, 8192), (512, 100)):  # long rows (one row per program) and short ones (several)
        x = _empty(rows, steps, dtype=dtype)
        mask = torch.ones(rows, steps, dtype=torch.bool)
        grad_loss = _empty()
        for agg in ops.AGG_CODES:
            _, stats = ops.ppo_policy_loss(x, x, x, mask, 0.2, 0.28, 3.0, agg)
            ops.ppo_policy_loss_backward(grad_loss, x, x, x, mask, stats, 0.2, 0.28, 3.0, agg)
            ops.ppo_policy_loss_backward(grad_loss, x, x, x, None, stats, 0.2, 0.28, None, agg)
            ops.ppo_value_loss(x, x, x, None, 0.2, agg)
            ops.ppo_value_loss_backward(grad_loss, x, x, x, mask, stats, 0.2, agg)
        ops.ppo_policy_loss(x, x, x, None, 0.2, 0.28, None, "token-mean")


def _sampling(dtype):
    from rlhf_fast.triton import sampling as ops

    logits = _empty(1, 64, V, dtype=dtype)
    uniforms = _empty(1, 64, dtype=torch.float64)
    ops.sample(logits, uniforms, 1.0, 0, 1.0, 0.0)  # plain
    ops.sample(logits, uniforms, 0.7, 50, 0.9, 0.05)  # every filter


def _qmatmul(scheme, dtype):
    import rlhf_fast.triton.quant as ops  # off the GPU its split-K plans for an H100's 132 SMs

    for rows, k, n, group_size in [(rows, QMATMUL_FEATURES, QMATMUL_FEATURES, 128) for rows in QMATMUL_ROWS] + [
        (rows, 736, 1000, 32) for rows in (8, 512)
    ]:  # and an odd shape (int4 groups of 32)
        x = _empty(rows, k, dtype=dtype)
        bias = _empty(n, dtype=dtype)
        if scheme == "int8":
            ops.qmatmul_int8(x, _empty(n, k, dtype=torch.int8), _empty(n, dtype=dtype), bias)
        elif scheme == "int4":
            ops.qmatmul_int4(
                x,
                _empty(n, k // 2, dtype=torch.uint8),
                _empty(n, k // group_size, dtype=dtype),
                _empty(n, k // group_size, dtype=torch.uint8),
                group_size,
                bias,
            )
        else:
            ops.qmatmul_w8a8(x, _empty(n, k, dtype=torch.int8), _empty(n), bias)


CASES = {}
for _dtype in DTYPES:
    CASES[f"logprobs-{_dtype}"] = (_logprobs, DTYPES[_dtype])
    CASES[f"linear_logprobs-{_dtype}"] = (_linear_logprobs, DTYPES[_dtype])
    CASES[f"linear_logprobs_softcap-{_dtype}"] = (lambda dtype: _linear_logprobs(dtype, 0.0625, 30.0), DTYPES[_dtype])
    CASES[f"advantages-{_dtype}"] = (_advantages, DTYPES[_dtype])
    CASES[f"divergence-{_dtype}"] = (_divergence, DTYPES[_dtype])
    CASES[f"losses-{_dtype}"] = (_losses, DTYPES[_dtype])
    CASES[f"sampling-{_dtype}"] = (_sampling, DTYPES[_dtype])
    for _scheme in ("int8", "int4", "w8a8"):
        CASES[f"qmatmul_{_scheme}-{_dtype}"] = (lambda dtype, scheme=_scheme: _qmatmul(scheme, dtype), DTYPES[_dtype])


# ---------------------------------------------------------------- compile-only launches


class _Sm90Driver:
    """Reports one sm_90 device with stream 0; enough for Triton to compile, not to launch."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_benchmarker(self):
        raise NotImplementedError("compile only: nothing runs")

    def map_python_to_cpp_type(self, t):
        return t


def _compile_instead_of_launching(compiled):
    """Make every `kernel[grid](...)` compile (Triton's warm-up path) instead of launching, and append
    (kernel name, launch options, compiled kernel, ptxas log) to `compiled` for each kernel built anew."""
    from triton import knobs
    from triton.runtime.jit import JITFunction

    knobs.nvidia.dump_ptxas_log = True  # ptxas -v: registers, stack frame, spill stores and loads
    run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        if "ptxas info" in log.getvalue():  # empty when Triton's in-memory cache had it already
            options = {k: v for k, v in kwargs.items() if k not in ("debug", "instrumentation_mode")}
            compiled.append((self.__name__, options, kernel, log.getvalue()))
        return kernel

    JITFunction.run = compile_only


def resources(kernel, ptxas_log: str) -> dict:
    """Registers, stack frame and spill stores/loads (bytes per thread, from ptxas -v) and shared memory per
    block (Triton's dynamic shared memory plus any static smem ptxas reports) of a compiled kernel."""
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", ptxas_log)
    registers = re.search(r"Used (\d+) registers", ptxas_log)
    if frame is None or registers is None:
        raise RuntimeError(f"unexpected ptxas -v log:\n{ptxas_log}")
    smem = re.search(r"(\d+) bytes smem", ptxas_log)
    stack, spill_stores, spill_loads = map(int, frame.groups())
    return {
        "registers": int(registers.group(1)),
        "stack": stack,
        "spill_stores": spill_stores,
        "spill_loads": spill_loads,
        "shared": kernel.metadata.shared + (int(smem.group(1)) if smem else 0),
        "num_warps": kernel.metadata.num_warps,
    }


def main(names):
    os.environ.pop("TRITON_INTERPRET", None)
    from triton.runtime.driver import driver

    driver.set_active(_Sm90Driver())
    compiled = []
    _compile_instead_of_launching(compiled)
    for name in names or CASES:
        fn, dtype = CASES[name]
        del compiled[:]
        try:
            fn(dtype)
        except Exception as exc:  # a compile error: reported, and the other cases still compile
            print(json.dumps({"case": name, "error": f"{type(exc).__name__}: {exc}"[-4000:]}), flush=True)
        for kernel_name, options, kernel, ptxas_log in compiled:
            ptx = kernel.asm["ptx"]
            print(
                json.dumps(
                    {
                        "case": name,
                        "kernel": kernel_name,
                        "options": options,
                        "fma_or_ftz": bool(re.search(r"\bfma\.|\.ftz\b", ptx)),
                        **resources(kernel, ptxas_log),
                    },
                    default=str,
                ),
                flush=True,
            )


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main(sys.argv[1:])
