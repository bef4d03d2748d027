"""The compiled library: loaded, ops registered, and (where CI expects it) the CUDA sources compiled in."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhf_fast import backend

# Per family: the ops registered under torch.ops.rlhf_fast, and CUDA kernel symbols that must be in the library.
FAMILIES = {
    "advantages": (
        ("gae", "group_advantages", "masked_moments"),
        (b"gae_kernel", b"masked_moments_kernel", b"group_advantages_kernel"),
    ),
    "logprobs": (
        ("logprobs_forward", "logprobs_backward", "logprobs_backward_"),
        (b"logprobs_forward_kernel", b"logprobs_backward_kernel"),
    ),
    "divergence": (
        ("f_divergence", "f_divergence_backward", "f_divergence_second_pass"),
        (b"f_divergence_forward_kernel", b"f_divergence_backward_kernel", b"f_divergence_second_pass_kernel"),
    ),
    "losses": (
        (
            "kl_penalty",
            "kl_penalty_backward",
            "ppo_policy_loss",
            "ppo_policy_loss_backward",
            "ppo_value_loss",
            "ppo_value_loss_backward",
        ),
        (b"kl_penalty_kernel", b"kl_penalty_backward_kernel", b"loss_forward_kernel", b"loss_backward_kernel"),
    ),
    "sampling": (("sample",), ()),  # CPU kernel only so far
    "quant": (
        ("qmatmul_int8", "qmatmul_int4", "qmatmul_w8a8"),
        (b"int8_gemv_kernel", b"int4_gemv_kernel", b"quantize_rows_kernel", b"w8a8_epilogue_kernel"),
    ),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_compiled_library_registers_ops(family):
    assert backend.compiled() is not None, backend.compiled_error()
    for op in FAMILIES[family][0]:
        assert hasattr(torch.ops.rlhf_fast, op), f"torch.ops.rlhf_fast.{op} is not registered"


@pytest.mark.skipif(
    os.environ.get("RLHF_FAST_EXPECT_CUDA") != "1",
    reason="set RLHF_FAST_EXPECT_CUDA=1 where nvcc and a CUDA torch are present (CI does)",
)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_cuda_sources_compiled_in(family):
    assert backend.cuda_compiled(), "rlhf_fast._C was built without csrc/cuda/*.cu"
    library = Path(backend.compiled().__file__).read_bytes()
    for kernel in FAMILIES[family][1]:
        assert kernel in library, f"{kernel.decode()} missing from the compiled library"


def test_package_imports_without_compiled_library():
    code = (
        "import sys, warnings\n"
        "sys.modules['rlhf_fast._C'] = None\n"  # makes `import rlhf_fast._C` fail
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import rlhf_fast as rf\n"
        "assert any('compiled library' in str(w.message) for w in caught), [str(w.message) for w in caught]\n"
        "import torch\n"
        "adv, ret = rf.gae(torch.randn(2, 5), torch.randn(2, 5))\n"
        "assert adv.shape == (2, 5)\n"
        "try:\n"
        "    rf.gae(torch.randn(2, 5), torch.randn(2, 5), backend='cpu')\n"
        "except rf.BackendUnavailable as exc:\n"
        "    assert 'rlhf_fast._C' in str(exc)\n"
        "else:\n"
        "    raise AssertionError('cpu backend should be unavailable')\n"
        "print('ok')\n"
    )
    env = {**os.environ, "RLHF_FAST_BACKEND": "auto"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr
