"""Benchmark suite: one bench_<family>.py per kernel family plus the shared harness. Not part of the installed
package: `rlhf-fast bench` imports it from the source checkout as the package `benchmarks`."""
