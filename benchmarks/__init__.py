"""Benchmark suite: one bench_<family>.py per kernel family plus the shared harness (installed as
rlhf_fast.benchmarks; run with `rlhf-fast bench`)."""
