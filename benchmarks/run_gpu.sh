#!/usr/bin/env bash
# On a CUDA machine: build with the CUDA sources, run the whole test suite (gpu tests included), run
# compute-sanitizer memcheck over the GPU tests of each family, then the full benchmark suite.
# Logs and results go to ${OUT:-gpu_run}/. Usage: bash benchmarks/run_gpu.sh [pytest -k expression]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_run}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=${MAX_JOBS:-16}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
RLHF_FAST_CUDA=1 python setup.py build_ext --inplace > "$out/build.log" 2>&1 || { tail -50 "$out/build.log"; exit 1; }
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python -m rlhf_fast.cli info | tee "$out/info.txt"
python -m pytest -q -x ${1:+-k "$1"} 2>&1 | tee "$out/tests.log"
if command -v compute-sanitizer >/dev/null 2>&1; then
  for family in tests/test_*.py; do
    compute-sanitizer --tool memcheck --error-exitcode 9 python -m pytest -q -k "cuda or triton or gpu" "$family" \
      > "$out/memcheck_$(basename "$family" .py).log" 2>&1
    echo "memcheck $family: exit $?" | tee -a "$out/memcheck_summary.txt"
  done
fi
python -m rlhf_fast.cli bench --device cuda --results "$out" 2>&1 | tee "$out/bench.log"
