#!/usr/bin/env bash
# One GPU window, in stages that each have a time limit, so that a hang or a slow stage never eats the rest:
#   1. build with the CUDA sources (sm_90a), `rlhf-fast info`
#   2. every test that runs a CUDA or Triton kernel on the GPU (gpu-marked, or a cuda/triton backend), not
#      stopping at failures: a junit report and the log say which failed
#   3. compute-sanitizer memcheck over one small GPU test per family (racecheck on the scan and reductions if
#      time is left)
#   4. the benchmark suite at the target shapes, rows appended under $OUT
# Everything goes to ${OUT:-gpu_run}/. Stage limits in seconds: BUILD_S, TESTS_S, SANITIZER_S, BENCH_S.
# Usage: bash benchmarks/run_gpu.sh [stage ...]   (default: build tests sanitizer bench); carry .whl/ (made by
# benchmarks/gpu_wheels.sh) for the peers' rows.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_run}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=${MAX_JOBS:-16}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if ls .whl/*.whl >/dev/null 2>&1; then  # the peers' wheels of benchmarks/gpu_wheels.sh, when carried
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    > "$out/wheels.log" 2>&1 && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
stages=${*:-build tests sanitizer bench}
log() { echo "[$(date +%T)] $*" | tee -a "$out/stages.txt"; }

for stage in $stages; do
  case $stage in
    build)
      nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
      timeout "${BUILD_S:-300}" env RLHF_FAST_CUDA=1 python setup.py build_ext --inplace > "$out/build.log" 2>&1
      log "build: exit $?"
      python -m rlhf_fast.cli info > "$out/info.txt" 2>&1
      ;;
    tests)
      timeout "${TESTS_S:-240}" python -m pytest -q -rf -p no:cacheprovider -k "gpu or cuda or triton" \
        --junitxml="$out/tests.xml" tests > "$out/tests.log" 2>&1
      log "tests: exit $? ($(tail -1 "$out/tests.log"))"
      ;;
    sanitizer)
      command -v compute-sanitizer >/dev/null || { log "sanitizer: compute-sanitizer not found"; continue; }
      # one small test per family whose kernels run on the GPU
      for pick in "test_advantages.py::test_gae_matches_float64_reference" \
                  "test_logprobs.py::test_backward_matches_autograd_of_reference" \
                  "test_divergence.py::test_forward_and_backward_match_float64_reference" \
                  "test_losses.py::test_ppo_policy_loss_matches_float64_reference" \
                  "test_quant.py::test_qmatmul_matches_dequantized_float64" \
                  "test_sampling.py::test_gpu_sample_matches_reference_draw"; do
        file=${pick%%::*}; name=${pick##*::}
        timeout "${SANITIZER_S:-60}" compute-sanitizer --tool memcheck --error-exitcode 9 \
          python -m pytest -q -x -p no:cacheprovider "tests/$file" -k "$name and (cuda or triton)" \
          > "$out/memcheck_${file%.py}.log" 2>&1
        log "memcheck $pick: exit $?"
      done
      ;;
    bench)
      timeout "${BENCH_S:-300}" python -m rlhf_fast.cli bench --device cuda --results "$out" > "$out/bench.log" 2>&1
      log "bench: exit $?"
      ;;
    *) log "unknown stage $stage" ;;
  esac
done
