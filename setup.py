"""Build of rlhf_fast._C: CPU kernels always, CUDA kernels when nvcc and a CUDA build of torch are present.

Switches (environment):
  RLHF_FAST_CUDA=0/1     force the CUDA sources off / on (on: fail if they cannot be built)
  MAX_JOBS               parallel compile jobs (ninja)
  TORCH_CUDA_ARCH_LIST   CUDA architectures; with no GPU visible the default is 9.0a (H100/H200), not
                         torch's list of every architecture, which would multiply the build time.
"""

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# No --use_fast_math: it would flush subnormals to zero and approximate every division, square root, exp and
# log in every kernel. Kernels that want a hardware approximation ask for it where they use it (an intrinsic
# or inline PTX, with a comment); tests/test_cuda_ptx.py lists which approximate instructions each kernel may
# contain and fails on any other.
NVCC_FLAGS = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]


def _default_cuda_home():
    # nvcc may be a wrapper script outside the toolkit (here /usr/local/bin/nvcc); torch would then guess
    # CUDA_HOME=/usr/local, which lacks the CUDA headers.
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    for candidate in ("/usr/local/cuda",):
        if os.path.isfile(os.path.join(candidate, "bin", "nvcc")):
            os.environ["CUDA_HOME"] = candidate
            return


_default_cuda_home()

import torch  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _want_cuda():
    flag = os.environ.get("RLHF_FAST_CUDA", "").strip()
    available = (
        torch.version.cuda is not None
        and CUDA_HOME is not None
        and (shutil.which("nvcc") is not None or os.path.isfile(os.path.join(CUDA_HOME, "bin", "nvcc")))
    )
    if flag == "0":
        return False
    if flag == "1" and not available:
        sys.exit(
            f"RLHF_FAST_CUDA=1 but the CUDA sources cannot be built: need nvcc (CUDA_HOME={CUDA_HOME}) and a "
            f"CUDA build of torch (torch.version.cuda={torch.version.cuda})."
        )
    return available


def _nvidia_wheel_includes():
    # nvcc's own include dir lacks cusparse.h etc.; the nvidia wheels that come with a CUDA torch have them.
    try:
        import nvidia
    except ImportError:
        return []
    dirs = []
    for base in nvidia.__path__:
        dirs += sorted(glob.glob(os.path.join(base, "cu*", "include")))
    return dirs


def _extension():
    cpu_sources = ["csrc/registration.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # the C++ standard is torch's choice (C++20 from torch 2.13); no-trapping-math lets GCC if-convert (and so
    # vectorise) loops with guarded float terms; results are unchanged (only FP exception flags could differ)
    cxx_flags = ["-O3", "-fopenmp", "-fno-trapping-math"]
    link_flags = ["-fopenmp"]
    if not _want_cuda():
        return CppExtension(
            "rlhf_fast._C", cpu_sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags
        )
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0a"
    return CUDAExtension(
        "rlhf_fast._C",
        cpu_sources + sorted(glob.glob("csrc/cuda/*.cu")),
        include_dirs=_nvidia_wheel_includes(),
        define_macros=[("RLHF_FAST_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx_flags + ["-DRLHF_FAST_WITH_CUDA=1"], "nvcc": NVCC_FLAGS},
        extra_link_args=link_flags,
    )


setup(ext_modules=[_extension()], cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
