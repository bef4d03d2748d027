"""The CUDA kernels' PTX holds no flush-to-zero arithmetic and no approximate instruction beyond the ones each
kernel is meant to use.

Every csrc/cuda/*.cu is compiled to PTX (sm_90a) with the build's nvcc flags (setup.py's NVCC_FLAGS, the
include dirs and defines of the torch extension), and each kernel entry's `.ftz` / `.approx` instructions are
compared with ALLOWED. A global --use_fast_math would put `.ftz` on every float add and multiply and turn
divisions, exp and log into approximations: this test fails on it. Needs nvcc only (no GPU); skipped without.
"""

import ast
import collections
import glob
import os
import re
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parents[1]
LIBDEVICE_EXPF = "expf (libdevice, 2 ulp): its range-reduced core is one ex2.approx.ftz"
DIVERGENCE_FAST = (
    "divergence.cu's exp/log policy calls __expf / __logf on purpose (ex2/lg2.approx, documented "
    "there), plus libdevice expf's core (ex2.approx.ftz)"
)
# kernel -> (the approximate instructions it may contain, why). A kernel not listed may contain none.
ALLOWED = {
    "logprobs_forward_kernel": (
        {"ex2.approx.ftz.f32"},
        "logprobs_common.h fast_exp2: 2^u of u <= 0, rel. error "
        "~2^-22, results below 2^-126 flushed (they change the sums by < 1e-38)",
    ),
    "logprobs_backward_kernel": ({"ex2.approx.ftz.f32"}, "the same fast_exp2 for p = 2^(log p log2 e)"),
    "f_divergence_forward_kernel": ({"ex2.approx.f32", "lg2.approx.f32", "ex2.approx.ftz.f32"}, DIVERGENCE_FAST),
    "f_divergence_backward_kernel": ({"ex2.approx.f32", "lg2.approx.f32", "ex2.approx.ftz.f32"}, DIVERGENCE_FAST),
    "f_divergence_second_pass_kernel": ({"ex2.approx.f32", "lg2.approx.f32", "ex2.approx.ftz.f32"}, DIVERGENCE_FAST),
    "kl_penalty_kernel": (
        {"ex2.approx.ftz.f32", "ex2.approx.f32"},
        LIBDEVICE_EXPF + "; k3's expm1f (libdevice, 1 ulp) scales an ex2.approx core the same way",
    ),
    "kl_penalty_backward_kernel": ({"ex2.approx.ftz.f32", "ex2.approx.f32"}, LIBDEVICE_EXPF + "; and expm1f's"),
    "loss_forward_kernel": ({"ex2.approx.ftz.f32"}, LIBDEVICE_EXPF),
    "loss_backward_kernel": ({"ex2.approx.ftz.f32"}, LIBDEVICE_EXPF),
}
APPROXIMATE = re.compile(r"\b([a-z][a-z0-9]*(?:\.[a-z0-9]+)*\.(?:ftz|approx)(?:\.[a-z0-9]+)*)")
FUNCTION = re.compile(r"^(?:\.visible\s+|\.weak\s+)?\.(?:entry|func)\s+(?:\([^)]*\)\s*)?(\w+)", re.M)


def _nvcc():
    found = shutil.which("nvcc")
    if found is None and cpp_extension.CUDA_HOME:
        candidate = Path(cpp_extension.CUDA_HOME) / "bin" / "nvcc"
        found = str(candidate) if candidate.is_file() else None
    return found


def _build_settings():
    """NVCC_FLAGS and the nvidia wheel include dirs exactly as setup.py defines them (setup.py runs setup() when
    imported, so its two definitions are read out of it)."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    wanted = [
        node
        for node in tree.body
        if (isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "NVCC_FLAGS" for t in node.targets))
        or (isinstance(node, ast.FunctionDef) and node.name == "_nvidia_wheel_includes")
    ]
    namespace = {"glob": glob, "os": os}
    exec(compile(ast.Module(body=wanted, type_ignores=[]), "setup.py", "exec"), namespace)  # noqa: S102
    return namespace["NVCC_FLAGS"], namespace["_nvidia_wheel_includes"]()


def _compile_ptx(nvcc, source, out_dir, flags, includes):
    out = out_dir / (source.stem + ".ptx")
    command = [
        nvcc,
        "-ptx",
        str(source),
        "-o",
        str(out),
        "--gpu-architecture=compute_90a",
        "-std=c++20",
        *cpp_extension.COMMON_NVCC_FLAGS,
        *flags,
        "-DRLHF_FAST_WITH_CUDA=1",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        "-DTORCH_EXTENSION_NAME=_C",
        f"-I{ROOT / 'csrc'}",
        f"-I{sysconfig.get_paths()['include']}",
        *[f"-I{d}" for d in includes + cpp_extension.include_paths(device_type="cuda")],
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{source.name} does not compile with the build's flags:\n{result.stderr[-4000:]}"
    return out.read_text()


@pytest.fixture(scope="module")
def ptx_by_file(tmp_path_factory):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    flags, includes = _build_settings()
    out_dir = tmp_path_factory.mktemp("ptx")
    sources = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        texts = pool.map(lambda s: _compile_ptx(nvcc, s, out_dir, flags, includes), sources)
        return dict(zip((s.name for s in sources), texts))


def _kernel_of(mangled):
    """The ALLOWED key a mangled entry name belongs to (C++ names appear length-prefixed), else the name."""
    for kernel in ALLOWED:
        if f"{len(kernel)}{kernel}" in mangled:
            return kernel
    return mangled


def _approximate_instructions(ptx):
    """{kernel: Counter of its .ftz / .approx instructions} over every entry and function of a PTX file (the
    template instances of a kernel added together)."""
    found = collections.defaultdict(collections.Counter)
    starts = list(FUNCTION.finditer(ptx))
    for match, following in zip(starts, starts[1:] + [None]):
        body = ptx[match.end() : following.start() if following else len(ptx)]
        found[_kernel_of(match.group(1))].update(APPROXIMATE.findall(body))
    return found


def test_no_global_fast_math():
    flags, _ = _build_settings()
    assert not {"--use_fast_math", "-use_fast_math", "--ftz=true", "--prec-div=false", "--prec-sqrt=false"} & set(
        flags
    ), f"setup.py NVCC_FLAGS {flags} turn on fast math for every kernel; use intrinsics where intended"


def test_only_the_intended_approximate_instructions(ptx_by_file):
    problems = []
    for name, ptx in ptx_by_file.items():
        for kernel, counts in _approximate_instructions(ptx).items():
            allowed = ALLOWED.get(kernel, (set(), ""))[0]
            extra = {instr: n for instr, n in counts.items() if instr not in allowed}
            if extra:
                problems.append(f"{name} {kernel}: {extra} (allowed: {sorted(allowed) or 'none'})")
    assert not problems, "approximate or flush-to-zero instructions outside ALLOWED:\n" + "\n".join(problems)


def test_allowed_table_names_existing_kernels(ptx_by_file):
    seen = set()
    for ptx in ptx_by_file.values():
        seen.update(_approximate_instructions(ptx))
    assert set(ALLOWED) <= seen, f"ALLOWED lists kernels not in csrc/cuda: {sorted(set(ALLOWED) - seen)}"


def test_the_check_sees_fast_math():
    """The scanner itself: PTX as --use_fast_math writes it is caught, IEEE PTX passes."""
    fast = (
        ".visible .entry _ZN9rlhf_fast17gae_kernelEv(\n)\n{\n\tadd.ftz.f32 %f1, %f2, %f3;\n"
        "\tdiv.approx.ftz.f32 %f4, %f1, %f2;\n}\n"
    )
    ieee = fast.replace("add.ftz.f32", "add.f32").replace("div.approx.ftz.f32", "div.rn.f32")
    assert _approximate_instructions(fast)["_ZN9rlhf_fast17gae_kernelEv"] == {"add.ftz.f32": 1, "div.approx.ftz.f32": 1}
    assert not any(_approximate_instructions(ieee).values())
