#!/usr/bin/env bash
# Downloads, on a machine with a package index, the pure-Python wheels that the GPU machine lacks for the peer
# rows of the benchmarks (liger-kernel, cut-cross-entropy, TRL 1.16 and the parts of its import chain that
# machine's image does not hold), for its Python 3.12, into .whl/ (ignored by git; carried with the run).
# benchmarks/run_gpu.sh installs whatever is in .whl/ into /tmp/site before its stages.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  liger-kernel==0.8.5 cut-cross-entropy==25.1.1 trl==1.16.0 datasets==4.7.0 dill==0.4.0 multiprocess==0.70.18
du -sh .whl
