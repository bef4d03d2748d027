// Building blocks of the CPU row kernels (log-probs, sampling): rows of any float dtype read as float blocks,
// a vectorisable 2^x, and a block max. The loops are plain float loops that GCC vectorises; they are cloned
// for AVX-512 and AVX2 (simd_clones.h) since the extension is otherwise built for baseline x86-64.
#pragma once
#include <ATen/ATen.h>
#include <ATen/TensorIterator.h>  // at::internal::GRAIN_SIZE

#include "simd_clones.h"

#include <algorithm>
#include <bit>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace rlhf_fast {
namespace rows {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// 2^v for v <= 0 with ~2e-7 relative error, written so that loops over it vectorise (no libm call):
// v = k + r with k = round(v), |r| <= 1/2, 2^r by a degree-5 minimax polynomial, 2^k built in the exponent
// bits. 0 below -125 (and for -inf); NaN stays NaN. About 11 vector instructions.
inline float exp2_approx(float v) {
  // 1.5 * 2^23 + 127: adding it rounds v to an integer and leaves k + 127 (the biased exponent of 2^k) in
  // the low mantissa bits, so 2^k needs no float-to-int conversion
  const float magic = 12583039.f;
  const float shifted = v + magic;
  const float r = v - (shifted - magic);
  float p = 1.32647238e-3f;
  p = p * r + 9.67151299e-3f;
  p = p * r + 5.55073358e-2f;
  p = p * r + 2.40222424e-1f;
  p = p * r + 6.93147004e-1f;
  p = p * r + 1.f;
  const float scale = std::bit_cast<float>(std::bit_cast<uint32_t>(shifted) << 23);
  return v < -125.f ? 0.f : p * scale;
}

// Rows per thread of at::parallel_for: about at::internal::GRAIN_SIZE logits, so that small batches run inline
// (a parallel region costs microseconds, and far more when another process holds the other cores).
inline int64_t grain_rows(int64_t vocab) { return std::max<int64_t>(1, at::internal::GRAIN_SIZE / vocab); }

// The largest of x[0, n) (-inf for n = 0; NaN entries are skipped: callers that must see NaN test for it).
RLHF_FAST_SIMD_CLONES inline float max_of(const float* x, int64_t n) {
  float m = kNegInf;
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

// bf16 widened a vector at a time (its bits are a float's top half); other dtypes by plain conversion.
RLHF_FAST_SIMD_CLONES inline void widen(const c10::BFloat16* x, int64_t n, float* out) {
  const auto* bits = reinterpret_cast<const uint16_t*>(x);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = std::bit_cast<float>(static_cast<uint32_t>(bits[i]) << 16);
}

template <typename scalar_t>
void widen(const scalar_t* x, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(x[i]);
}

// The float values of x[0, n): x itself for float, else converted into buf.
template <typename scalar_t>
const float* as_float(const scalar_t* x, int64_t n, float* buf) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return x;
  } else {
    widen(x, n, buf);
    return buf;
  }
}

}  // namespace rows
}  // namespace rlhf_fast
