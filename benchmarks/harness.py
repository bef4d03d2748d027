"""The one benchmark harness.

A family's bench file (benchmarks/bench_<family>.py) defines

    def cases(device: torch.device, quick: bool) -> list[Case]

Each Case names an op, a shape, a dtype and a mode ("fwd" or "fwd+bwd") and maps provider names to zero-argument
callables that do the work on prebuilt inputs (for "fwd+bwd" the callable runs the backward too). Providers:
`eager` (the way TRL/OpenRLHF/verl write it; every case needs it: speedups are ratios against it from the same
run), `compile` (torch.compile of the same; `compiled(fn)`), each live rlhf_fast backend (`kernel_providers`),
and peers when installed. A provider that returns tensors is checked before timing against the case's float64
`reference` if it has one (low-precision cases), else against eager's output; a disagreement is shown as
MISMATCH, never hidden.

Timing: CUDA with triton.testing.do_bench (CUDA events, warm-up, median and 20/80% quantiles); CPU with
time.perf_counter over repeated calls after warm-up. Peak memory: CUDA max_memory_allocated above the baseline;
CPU the harness's own accounting from the profiler's allocation events (peak of live bytes allocated by the call).
A case with `interleaved=R` (a trainer step) is timed R rounds, the providers in alternation, one call each per
round.
Rows append to benchmarks/results/<device-slug>.csv in the long format of DESIGN.md.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from rlhf_fast import backend as _backend

CSV_COLUMNS = [
    "op",
    "provider",
    "mode",
    "shape",
    "dtype",
    "metric",
    "unit",
    "p50",
    "p20",
    "p80",
    "device",
    "torch",
    "triton",
    "git_commit",
    "timestamp",
]


@dataclasses.dataclass
class Case:
    op: str
    shape: str
    dtype: torch.dtype
    mode: str
    providers: dict[str, Callable[[], Any]]
    bytes_moved: int | None = None  # bytes that must move at the floor (for GB/s and % of peak bandwidth)
    flops: int | None = None  # useful FLOPs (for TFLOP/s)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)  # provider -> why it was not run
    atol: float = 1e-2  # output agreement (absolute + relative) with `reference`, else with eager
    # float64 ground truth for low-precision cases, where eager's own rounding error would flag correct kernels
    reference: Callable[[], Any] | None = None
    # provider -> [(metric, unit, value)]: measured quantities other than time (e.g. an accuracy), written as rows
    metrics: dict[str, list[tuple[str, str, float]]] = dataclasses.field(default_factory=dict)
    # > 0: the providers are timed in alternation, one call each per round, for this many rounds (long calls
    # such as a trainer step, where drift of a shared machine would bias providers timed one after another)
    interleaved: int = 0
    # measures the case its own way instead (e.g. providers stepped in turn): quick -> results, each naming its case
    measure: Callable[[bool], list[Result]] | None = None


@dataclasses.dataclass
class Result:
    case: Case
    provider: str
    ms: tuple[float, float, float] | None  # p50, p20, p80
    peak_mb: float | None
    status: str = "ok"  # ok | MISMATCH | error: ... | skipped: ...


def kernel_providers(device: torch.device, fn: Callable[[str], Any]) -> dict[str, Callable[[], Any]]:
    """{backend: lambda: fn(backend)} for each rlhf_fast kernel backend that runs on `device` (the Triton
    interpreter on the CPU is left out: it measures Python, not a kernel)."""
    names = ("cuda", "triton") if device.type == "cuda" else ("cpu",)
    return {name: (lambda name=name: fn(name)) for name in names if _backend.why_not(name, device) is None}


def compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """torch.compile of `fn`, compiled on its first call (the harness's warm-up)."""
    return torch.compile(fn)


def device_slug(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1]
                    break
        except OSError:
            pass
        name = f"cpu-{name}-{os.cpu_count()}c"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _quantiles(samples: list[float]) -> tuple[float, float, float]:
    samples = sorted(samples)

    def q(p):
        return samples[min(len(samples) - 1, int(p * (len(samples) - 1) + 0.5))]

    return q(0.5), q(0.2), q(0.8)


def _time_cpu(fn, min_time_s: float, max_reps: int) -> tuple[float, float, float]:
    samples = []
    start = time.perf_counter()
    while len(samples) < max_reps and (len(samples) < 3 or time.perf_counter() - start < min_time_s):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return _quantiles(samples)


def _time_cuda(fn, quick: bool) -> tuple[float, float, float]:
    import triton.testing

    p50, p20, p80 = triton.testing.do_bench(
        fn, warmup=10 if quick else 25, rep=40 if quick else 200, quantiles=[0.5, 0.2, 0.8]
    )
    return p50, p20, p80


def _peak_mb(fn, device: torch.device) -> float:
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Every allocation and free is a "[memory]" record with its own timestamp; replayed in time order, the
    # running sum peaks where the most bytes were live. (The per-op self memory of prof.events() is net per op
    # and places frees made inside a parent op, such as an autograd.Function dropping a temporary, at the
    # parent's start, before the allocations they undo.)
    records = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for record in sorted(records, key=lambda e: e.start_ns()):
        live += record.nbytes()
        peak = max(peak, live)
    return peak / 2**20


@contextlib.contextmanager
def _quiet_stderr():
    """Silences the profiler backend's start/stop lines, which it writes straight to file descriptor 2."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in _tensors(item)]
    if isinstance(out, dict):
        return [t for item in out.values() for t in _tensors(item)]
    return []


def _agrees(out, expected, atol: float) -> bool:
    got, exp = _tensors(out), _tensors(expected)
    if len(got) != len(exp):
        return False
    for g, e in zip(got, exp):
        if g.shape != e.shape:
            return False
        g, e = g.detach().double(), e.detach().double()
        if not torch.allclose(g, e, rtol=atol, atol=atol, equal_nan=True):
            return False
    return True


def measure_bandwidth_gbs(device: torch.device) -> float:
    """Measured copy bandwidth (read + write bytes per second), the 'peak' that % of bandwidth is quoted against."""
    n = (1 << 28) if device.type == "cuda" else (1 << 25)  # 1 GiB on GPU, 128 MiB on CPU, float32
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    fn = lambda: dst.copy_(src)  # noqa: E731
    ms = _time_cuda(fn, quick=False)[0] if device.type == "cuda" else _time_cpu(fn, 0.5, 20)[0]
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def _run_interleaved(case: Case, device: torch.device, checked: dict[str, str]) -> list[Result]:
    """Times the providers that passed the warm-up (`checked`: provider -> status) in alternation, then measures
    each one's peak memory as any case's."""
    samples = {provider: [] for provider in checked}
    errors = {}
    for _ in range(case.interleaved):
        for provider in list(samples):
            try:
                _sync(device)
                t0 = time.perf_counter()
                case.providers[provider]()
                _sync(device)
                samples[provider].append((time.perf_counter() - t0) * 1e3)
            except Exception as exc:
                errors[provider] = f"error: {type(exc).__name__}: {exc}"[:160]
                del samples[provider]
    results = []
    for provider, times in samples.items():
        try:
            results.append(
                Result(case, provider, _quantiles(times), _peak_mb(case.providers[provider], device), checked[provider])
            )
        except Exception as exc:
            errors[provider] = f"error: {type(exc).__name__}: {exc}"[:160]
    return results + [Result(case, provider, None, None, why) for provider, why in errors.items()]


def run_case(case: Case, device: torch.device, quick: bool) -> list[Result]:
    if case.measure is not None:
        return case.measure(quick)
    if "eager" not in case.providers:
        raise ValueError(f"benchmark case {case.op} {case.shape} has no 'eager' provider")
    results = []
    expected = case.reference() if case.reference is not None else None
    skipped = dict(case.skipped)
    checked = {}  # interleaved cases: provider -> status after the warm-up, timed together afterwards
    for provider, fn in case.providers.items():
        if quick and provider == "compile":
            skipped[provider] = "quick mode (compilation alone outlasts the quick budget)"
            continue
        try:
            out = fn()  # warm-up (and compilation for `compile`)
            _sync(device)
            if provider == "eager":
                expected = out if case.reference is None else expected
                status = "ok"
            else:
                status = "ok" if expected is None or _agrees(out, expected, case.atol) else "MISMATCH"
            del out
            if case.interleaved:
                checked[provider] = status
                continue
            fn()
            if device.type == "cuda":
                ms = _time_cuda(fn, quick)
            else:
                ms = _time_cpu(fn, 0.2 if quick else 1.0, 5 if quick else 50)
            peak = _peak_mb(fn, device)
            results.append(Result(case, provider, ms, peak, status))
        except Exception as exc:  # a failing provider is reported, the suite goes on
            results.append(Result(case, provider, None, None, f"error: {type(exc).__name__}: {exc}"[:160]))
    if checked:
        results += _run_interleaved(case, device, checked)
    for provider, why in skipped.items():
        results.append(Result(case, provider, None, None, f"skipped: {why}"))
    return results


def _git_commit() -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def default_results_dir() -> Path:
    """benchmarks/results of the checkout: results are committed beside the benches."""
    return Path(__file__).resolve().parent / "results"


def _versions() -> tuple[str, str]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return torch.__version__, triton_version


def write_rows(results: list[Result], device: torch.device, path: Path) -> int:
    """Appends the long-format rows (time, peak_mem, and bandwidth / throughput where known); returns the count."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch_version, triton_version = _versions()
    commit, stamp = _git_commit(), datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else device_slug(device)
    new_file = not path.exists()
    rows = 0
    with path.open("a", newline="") as handle:
        writer = csv.writer(handle)
        if new_file:
            writer.writerow(CSV_COLUMNS)
        for res in results:
            if res.ms is None or res.status != "ok":
                continue
            case = res.case
            p50, p20, p80 = res.ms
            metrics = [("time", "ms", p50, p20, p80), ("peak_mem", "MB", res.peak_mb, res.peak_mb, res.peak_mb)]
            if case.bytes_moved:
                metrics.append(("bandwidth", "GB/s", *(case.bytes_moved / (ms * 1e-3) / 1e9 for ms in (p50, p80, p20))))
            if case.flops:
                metrics.append(("throughput", "TFLOP/s", *(case.flops / (ms * 1e-3) / 1e12 for ms in (p50, p80, p20))))
            metrics += [
                (metric, unit, value, value, value) for metric, unit, value in case.metrics.get(res.provider, [])
            ]
            for metric, unit, v50, v20, v80 in metrics:
                writer.writerow(
                    [
                        case.op,
                        res.provider,
                        case.mode,
                        case.shape,
                        str(case.dtype).replace("torch.", ""),
                        metric,
                        unit,
                        f"{v50:.6g}",
                        f"{v20:.6g}",
                        f"{v80:.6g}",
                        device_name,
                        torch_version,
                        triton_version,
                        commit,
                        stamp,
                    ]
                )
                rows += 1
    return rows


def format_table(results: list[Result], peak_gbs: float | None) -> str:
    """One line per (case, provider): time, speedup vs eager of the same run, GB/s and % of measured peak."""
    header = ["op", "shape", "dtype", "mode", "provider", "ms (p50)", "vs eager", "GB/s", "% peak", "peak MB", "status"]
    lines = []
    eager_ms = {}
    for res in results:
        if res.provider == "eager" and res.ms:
            eager_ms[id(res.case)] = res.ms[0]
    for res in results:
        case = res.case
        ms = res.ms[0] if res.ms else None
        speedup = eager_ms.get(id(case)) / ms if ms and id(case) in eager_ms else None
        gbs = case.bytes_moved / (ms * 1e-3) / 1e9 if ms and case.bytes_moved else None
        lines.append(
            [
                case.op,
                case.shape,
                str(case.dtype).replace("torch.", ""),
                case.mode,
                res.provider,
                f"{ms:.4g}" if ms else "-",
                f"{speedup:.1f}x" if speedup else "-",
                f"{gbs:.1f}" if gbs else "-",
                f"{100 * gbs / peak_gbs:.0f}%" if gbs and peak_gbs else "-",
                f"{res.peak_mb:.1f}" if res.peak_mb is not None else "-",
                res.status,
            ]
        )
    widths = [max(len(str(row[i])) for row in [header] + lines) for i in range(len(header))]
    fmt = lambda row: "  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip()  # noqa: E731
    extra = [
        f"  {res.case.op} {res.case.shape} {res.provider}: {metric} = {value:.4g} {unit}"
        for res in results
        if res.status == "ok"
        for metric, unit, value in res.case.metrics.get(res.provider, [])
    ]
    return "\n".join(
        [fmt(header), fmt(["-" * w for w in widths])]
        + [fmt(row) for row in lines]
        + (["", "other metrics:"] + extra if extra else [])
    )


def run_suite(modules, device: torch.device, quick: bool, progress: Callable[[str], None] = print) -> list[Result]:
    """Runs every case of the given bench modules; `progress` gets one line per case."""
    results = []
    for module in modules:
        for case in module.cases(device, quick):
            progress(f"  {case.op} {case.shape} {str(case.dtype).replace('torch.', '')} {case.mode}")
            results += run_case(case, device, quick)
    return results
