"""Command line: `rlhf-fast info | bench | train`."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import platform
import sys
from pathlib import Path

import torch

BENCHMARKS = "benchmarks"  # the benchmark suite: the package of that name at the root of a source checkout


def _source_checkout() -> Path | None:
    """The source checkout to run the benchmarks from (a folder with pyproject.toml and benchmarks/harness.py):
    the one this rlhf_fast is imported from (an editable install, or run from the checkout), else the current
    directory; None when neither is one."""
    for root in (Path(__file__).resolve().parent.parent, Path.cwd()):
        if (root / "pyproject.toml").is_file() and (root / BENCHMARKS / "harness.py").is_file():
            return root
    return None


def _benchmarks_package():
    """The benchmark suite, the package `benchmarks` of the source checkout (the installed package lacks it)."""
    root = _source_checkout()
    if root is None:
        sys.exit(
            "rlhf-fast bench: the benchmark suite is not part of the installed package; it is the benchmarks/ "
            "folder of the rlhf_fast source repository. Clone the repository and run `rlhf-fast bench` from "
            "its root (or install the clone with `pip install --no-build-isolation -e .`)"
        )
    folder = root / BENCHMARKS
    package = sys.modules.get(BENCHMARKS)
    if package is None:
        spec = importlib.util.spec_from_file_location(
            BENCHMARKS, folder / "__init__.py", submodule_search_locations=[str(folder)]
        )
        package = importlib.util.module_from_spec(spec)
        sys.modules[BENCHMARKS] = package
        spec.loader.exec_module(package)
    elif folder not in [Path(p).resolve() for p in getattr(package, "__path__", [])]:
        sys.exit(
            f"rlhf-fast bench: another module named {BENCHMARKS!r} is imported already ({package!r}), not {folder}"
        )
    return package


def bench_families() -> list[str]:
    package = _benchmarks_package()
    return sorted(path.stem[len("bench_") :] for folder in package.__path__ for path in Path(folder).glob("bench_*.py"))


def cmd_info(args) -> int:
    import rlhf_fast
    from rlhf_fast import backend

    print(
        f"rlhf_fast {rlhf_fast.__version__}  python {platform.python_version()}  torch {torch.__version__}"
        f"  (CUDA build: {torch.version.cuda or 'no'})"
    )
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton: not installed")
    lib = backend.compiled()
    print(
        f"compiled library: {'loaded' if lib else backend.compiled_error()}"
        + (f" (CUDA kernels {'compiled in' if backend.cuda_compiled() else 'not compiled in'})" if lib else "")
    )
    if torch.cuda.is_available():
        print(f"GPU: {torch.cuda.get_device_name()} (capability {torch.cuda.get_device_capability()})")
    else:
        print("GPU: none visible")
    print("backends:")
    for name, reason in backend.status().items():
        print(f"  {name:7s} {'live' if reason is None else 'unavailable: ' + reason}")
    print(f"default selection: {backend.requested(None)} (set {backend.ENV_VAR} or pass backend=)")
    return 0


def cmd_bench(args) -> int:
    package = _benchmarks_package()
    harness = importlib.import_module(f"{package.__name__}.harness")
    families = bench_families()
    chosen = args.family or families
    unknown = sorted(set(chosen) - set(families))
    if unknown:
        sys.exit(f"rlhf-fast bench: unknown --family {', '.join(unknown)}; choose from {', '.join(families)}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("rlhf-fast bench: --device cuda but no CUDA device is visible")
    torch.manual_seed(0)
    peak = None
    if device.type == "cuda":
        peak = harness.measure_bandwidth_gbs(device)
        print(f"measured copy bandwidth on {torch.cuda.get_device_name(device)}: {peak:.0f} GB/s")
    print(f"benchmarking {', '.join(chosen)} on {device} ({'quick' if args.quick else 'full'} sizes)")
    modules = [importlib.import_module(f"{package.__name__}.bench_{family}") for family in chosen]
    results = harness.run_suite(modules, device, args.quick, progress=lambda line: print(line, flush=True))
    print()
    print(harness.format_table(results, peak))
    if not args.no_save:
        results_dir = Path(args.results) if args.results else harness.default_results_dir()
        path = results_dir / f"{harness.device_slug(device)}.csv"
        rows = harness.write_rows(results, device, path)
        print(f"\nappended {rows} rows to {path}")
    bad = [r for r in results if r.status == "MISMATCH" or r.status.startswith("error")]
    if bad:
        print(f"\n{len(bad)} provider(s) failed or disagreed with eager (see status column)")
        return 1
    return 0


def cmd_train(args) -> int:
    from .ppo.__main__ import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf-fast", description="Fused kernels and a lean PPO loop for RLHF.")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, live backends and why any is unavailable")
    info.set_defaults(func=cmd_info)
    bench = sub.add_parser("bench", help="benchmark every kernel against eager PyTorch")
    bench.add_argument("--quick", action="store_true", help="small sizes (under a minute on a laptop CPU)")
    bench.add_argument("--family", action="append", help="only this family (repeatable); default: all")
    bench.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when visible, else cpu")
    bench.add_argument("--results", help="folder for <device>.csv (default: benchmarks/results of the checkout)")
    bench.add_argument("--no-save", action="store_true", help="print the table only")
    bench.set_defaults(func=cmd_bench)
    from .ppo.__main__ import build_parser as train_arguments

    train = sub.add_parser(
        "train",
        help="PPO over Hugging Face models with the fused ops; no flags: the embedded "
        "digit-sorting task (CPU, a few minutes)",
    )
    train_arguments(train)
    train.set_defaults(func=cmd_train)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
