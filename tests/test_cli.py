import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _cli(*args, timeout=300, **options):
    return subprocess.run(
        [sys.executable, "-m", "rlhf_fast.cli", *args], capture_output=True, text=True, timeout=timeout, **options
    )


def test_info_lists_backends():
    out = _cli("info")
    assert out.returncode == 0, out.stderr
    for name in ("torch", "cpu", "cuda", "triton"):
        assert f"  {name}" in out.stdout
    assert "torch " in out.stdout and "compiled library" in out.stdout


def test_bench_quick_writes_long_format_rows(tmp_path):
    out = _cli("bench", "--quick", "--family", "advantages", "--device", "cpu", "--results", str(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "vs eager" in out.stdout and "gae" in out.stdout
    files = list(tmp_path.glob("*.csv"))
    assert len(files) == 1
    rows = list(csv.DictReader(files[0].open()))
    assert list(rows[0]) == [
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
    gae_times = {r["provider"]: float(r["p50"]) for r in rows if r["op"] == "gae" and r["metric"] == "time"}
    assert {"eager", "cpu"} <= set(gae_times) and all(v > 0 for v in gae_times.values())
    assert any(r["metric"] == "peak_mem" and r["unit"] == "MB" for r in rows)


def test_bench_rejects_unknown_family():
    out = _cli("bench", "--quick", "--family", "nope", "--no-save")
    assert out.returncode != 0 and "unknown --family nope" in out.stderr


def test_bench_finds_the_checkout_of_the_package_from_elsewhere(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = _cli("bench", "--quick", "--family", "nope", "--no-save", cwd=tmp_path, env=env)
    assert out.returncode != 0 and "unknown --family nope" in out.stderr  # the suite was found: its families


def test_bench_outside_a_checkout_says_how_to_get_the_suite(tmp_path, monkeypatch):
    from rlhf_fast import cli

    monkeypatch.setattr(cli, "__file__", str(tmp_path / "site-packages" / "rlhf_fast" / "cli.py"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="Clone the repository and run `rlhf-fast bench` from its root"):
        cli._benchmarks_package()


def test_help_of_every_command():
    for command in ("info", "bench", "train"):
        out = _cli(command, "--help")
        assert out.returncode == 0 and "usage" in out.stdout, out.stderr
    assert "--rollout-logprobs" in _cli("train", "--help").stdout
