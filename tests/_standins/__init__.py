"""Stand-ins for the GPU-only packages OpenRLHF imports at import time (flash_attn, deepspeed, vllm).

They cannot be installed here (vllm would replace torch; the others build CUDA code), and OpenRLHF's functions
under test never call them: its log-probs fall back to torch when flash_attn's cross-entropy does not import,
exactly as on a machine without it. Nothing else is stood in for.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

GPU_ONLY = ("flash_attn", "deepspeed", "vllm")


class _EmptyPackages(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds `root` and every submodule of it as an empty package. A `from ... import name` of it therefore
    gives an empty module, not an ImportError: only imports that need no callable from it (OpenRLHF's) may run
    while the stand-ins are in place."""

    def __init__(self, roots):
        self.roots = tuple(roots)

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.roots:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name, "stand-in for a GPU-only package (tests only)")
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def import_openrlhf():
    """Imports the OpenRLHF modules rlhf_fast patches (they keep the stand-ins they bind), then takes the
    stand-ins away, as the OpenRLHF tests do; a Ray worker's setup hook in the tests. (Kept for good, the
    stand-ins would turn every `from flash_attn... import f` that verl and OpenRLHF try at call time or import
    time into an empty module instead of the ImportError they fall back on.)"""
    from rlhf_fast.integrations import openrlhf as rf_openrlhf

    with gpu_only_modules():
        for name in rf_openrlhf.SCAN:
            importlib.import_module(name)


@contextlib.contextmanager
def gpu_only_modules():
    """While active, each of GPU_ONLY that is not installed imports as an empty package; afterwards the
    stand-ins leave sys.modules (modules imported meanwhile keep their references)."""
    missing = [name for name in GPU_ONLY if name not in sys.modules and importlib.util.find_spec(name) is None]
    finder = _EmptyPackages(missing)
    sys.meta_path.append(finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
        for name in list(sys.modules):
            if name.split(".")[0] in missing:
                del sys.modules[name]
