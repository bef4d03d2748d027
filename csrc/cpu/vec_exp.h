// exp(x) and exp(x) - 1 for the CPU kernels' inner loops: no libm call (glibc's expf / expm1f are scalar calls
// that keep a loop from vectorising). x = n ln2 + r with |r| <= ln2/2, exp(r) = 1 + r + r^2 P(r) with a degree-5
// P (Cephes' coefficients, about 1 ulp), 2^n built from the integer that rounding left in the mantissa bits (no
// float-to-int conversion, so a NaN input gives NaN, not undefined behaviour). Valid for x in [-87, 88]: callers
// clamp or guard outside it. Always inlined: a kernel loop that calls them out of line does not vectorise, and
// GCC stops inlining plain `inline` functions once a translation unit has grown past its limits (the many
// instantiations of the divergence kernels did: a 4x slower forward).
#pragma once
#include <bit>
#include <cstdint>

namespace rlhf_fast {

namespace vec_exp_detail {

struct Reduced {
  float r;      // x - n ln2, |r| <= ln2/2
  float p;      // P(r): exp(r) = 1 + r + r^2 P(r)
  float scale;  // 2^n
};

inline __attribute__((always_inline)) Reduced reduce(float x) {
  constexpr float kRound = 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer, held in the low mantissa bits
  const float shifted = x * 1.44269504088896341f + kRound;
  const float n = shifted - kRound;
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const uint32_t scale = (std::bit_cast<uint32_t>(shifted) - std::bit_cast<uint32_t>(kRound) + 127u) << 23;
  return {r, p, std::bit_cast<float>(scale)};
}

}  // namespace vec_exp_detail

inline __attribute__((always_inline)) float exp_poly(float x) {
  const auto [r, p, scale] = vec_exp_detail::reduce(x);
  return (p * r * r + r + 1.f) * scale;
}

// exp(x) - 1 = 2^n expm1(r) + (2^n - 1), expm1(r) = r + r^2 P(r) carrying r's relative accuracy: about 2 ulp
// for any x in range, also near 0 (n = 0 for |x| < ln2/2, where exp(x) - 1 would cancel).
inline __attribute__((always_inline)) float expm1_poly(float x) {
  const auto [r, p, scale] = vec_exp_detail::reduce(x);
  return scale * (p * r * r + r) + (scale - 1.f);
}

}  // namespace rlhf_fast
