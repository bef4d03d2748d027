// The row math of the log-prob kernels and the host-side argument checks shared by the CPU and CUDA kernels.
//
// The first part (row layout, 16-byte packs, the online moments and one CUDA thread's share of a row) is plain
// C++ marked __host__ __device__: the CUDA kernel runs it, and tests/test_cuda_host.py compiles the same code
// for the host (with RLHF_FAST_LOGPROBS_MATH_ONLY defined, so without ATen) to replay a block's work on the
// CPU. The argument checks below it need ATen.
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define RLHF_FAST_LOGPROBS_HD __host__ __device__
#define RLHF_FAST_LOGPROBS_UNROLL_4 _Pragma("unroll 4")
#else
#define RLHF_FAST_LOGPROBS_HD
#define RLHF_FAST_LOGPROBS_UNROLL_4
#endif

namespace rlhf_fast {
namespace logprobs {

// Rows of a logits tensor (A, B, V) whose last dim is contiguous: row r = (r / inner, r % inner).
struct RowLayout {
  int64_t rows, inner, stride_outer, stride_inner, vocab;

  RLHF_FAST_LOGPROBS_HD int64_t offset(int64_t row) const {
    return (row / inner) * stride_outer + (row % inner) * stride_inner;
  }
};

// Threads per block of the CUDA kernels (one block per row).
constexpr int kThreads = 256;
constexpr float kLog2e = 1.4426950408889634f;

template <typename scalar_t>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / sizeof(scalar_t);
  scalar_t v[kSize];
};

// Elements [0, head) of a row come before its first 16-byte boundary.
template <typename scalar_t>
RLHF_FAST_LOGPROBS_HD inline int64_t pack_head(const scalar_t* row, int64_t vocab) {
  const int64_t misaligned = static_cast<int64_t>(reinterpret_cast<uintptr_t>(row) % 16) / sizeof(scalar_t);
  const int64_t head = misaligned ? Pack<scalar_t>::kSize - misaligned : 0;
  return head < vocab ? head : vocab;
}

// 2^x. On the GPU one ex2.approx.ftz instruction (relative error ~2^-22; a result below 2^-126 flushes to 0,
// which changes sums of terms <= 1 by less than 1e-38); on the host the exact std::exp2.
RLHF_FAST_LOGPROBS_HD inline float fast_exp2(float x) {
#ifdef __CUDA_ARCH__
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return std::exp2(x);
#endif
}

// Online softmax moments of a set of logits x: m = max x (raw logit units), s = sum 2^u, t = sum 2^u u with
// u = (x - m) scale in base-2 units (scale = log2(e) / T). x - m is taken before the scaling, so it is exact
// for the x near the max, which carry the sums. A NaN logit makes s NaN (and so lse and entropy); it never
// becomes m (the max skips NaN), and a set of only -inf has m = -inf, s = t = 0.
struct Moments {
  float m, s, t;
};

// a with its reference max moved from a.m to new_m >= a.m: d = (a.m - new_m) scale, s' = 2^d s,
// t' = 2^d (t + s d). A NaN s stays NaN (also from m = -inf: NaN * 0).
RLHF_FAST_LOGPROBS_HD inline Moments rebase(const Moments& a, float new_m, float scale) {
  if (a.s == 0.f) return {new_m, 0.f, 0.f};
  const float d = (a.m - new_m) * scale;
  const float e = fast_exp2(d);
  return {new_m, a.s * e, e * (a.t + a.s * d)};
}

RLHF_FAST_LOGPROBS_HD inline Moments merge(const Moments& a, const Moments& b, float scale) {
  const float m = a.m > b.m ? a.m : b.m;
  if (m == -INFINITY) return {m, a.s + b.s, a.t + b.t};  // both only -inf (s = 0) or NaN (s NaN)
  const Moments ra = rebase(a, m, scale), rb = rebase(b, m, scale);
  return {m, ra.s + rb.s, ra.t + rb.t};
}

// Adds kCount logits to acc. While everything so far is -inf (m = -inf) the terms are taken against 0
// instead: -inf adds 0, a NaN still makes s NaN.
template <int kCount>
RLHF_FAST_LOGPROBS_HD inline void absorb(Moments& acc, const float (&x)[kCount], float scale) {
  float xmax = -INFINITY;
  for (int i = 0; i < kCount; ++i) xmax = x[i] > xmax ? x[i] : xmax;  // skips NaN
  if (xmax > acc.m) acc = rebase(acc, xmax, scale);
  const float m = acc.m == -INFINITY ? 0.f : acc.m;
  for (int i = 0; i < kCount; ++i) {
    const float u = (x[i] - m) * scale;
    const float e = fast_exp2(u);
    acc.s += e;
    acc.t += e > 0.f ? e * u : 0.f;
  }
}

// The moments of thread `thread` of a kThreads-thread block over one row: the elements before the first
// 16-byte boundary one at a time, then every kThreads-th 16-byte pack, then the ragged tail.
template <typename scalar_t>
RLHF_FAST_LOGPROBS_HD inline Moments thread_moments(const scalar_t* row, int64_t vocab, int thread, float scale) {
  using P = Pack<scalar_t>;
  Moments acc{-INFINITY, 0.f, 0.f};
  const int64_t head = pack_head(row, vocab);
  const int64_t packs = (vocab - head) / P::kSize;
  for (int64_t i = thread; i < head; i += kThreads) {
    const float x[1] = {static_cast<float>(row[i])};
    absorb(acc, x, scale);
  }
  const P* packed = reinterpret_cast<const P*>(row + head);
  RLHF_FAST_LOGPROBS_UNROLL_4  // lets several 16-byte loads per thread be in flight
      for (int64_t k = thread; k < packs; k += kThreads) {
    const P pack = packed[k];
    float x[P::kSize];
    for (int i = 0; i < P::kSize; ++i) x[i] = static_cast<float>(pack.v[i]);
    absorb(acc, x, scale);
  }
  for (int64_t i = head + packs * P::kSize + thread; i < vocab; i += kThreads) {
    const float x[1] = {static_cast<float>(row[i])};
    absorb(acc, x, scale);
  }
  return acc;
}

// lse = m / T + ln s and entropy = ln s - ln2 t / s of a row's moments (inv_t = 1 / T). lse is rounded once:
// the backward's x / T - lse is then exact to an ulp of lse for the x near the max.
struct RowStats {
  float lse, entropy;
};

RLHF_FAST_LOGPROBS_HD inline RowStats row_stats(const Moments& acc, float inv_t) {
  constexpr float kLn2 = 0.6931471805599453f;
  const float log_s = logf(acc.s);
  return {static_cast<float>(static_cast<double>(acc.m) * inv_t + log_s), log_s - kLn2 * acc.t / acc.s};
}

}  // namespace logprobs
}  // namespace rlhf_fast

#ifndef RLHF_FAST_LOGPROBS_MATH_ONLY
#include <ATen/ATen.h>

namespace rlhf_fast {
namespace logprobs {

inline RowLayout row_layout(const at::Tensor& logits, const char* op) {
  TORCH_CHECK(logits.dim() == 3, op, ": logits must be (A, B, V), got ", logits.dim(), " dims");
  TORCH_CHECK(logits.is_floating_point(), op, ": logits must be floating point");
  TORCH_CHECK(logits.size(2) > 0, op, ": logits must have a non-empty vocab dim");
  TORCH_CHECK(logits.stride(2) == 1 || logits.size(2) == 1, op, ": logits must have a contiguous last dim");
  return {logits.size(0) * logits.size(1), logits.size(1) > 0 ? logits.size(1) : 1, logits.stride(0), logits.stride(1),
          logits.size(2)};
}

// An (A, B) tensor of the given dtype, contiguous, on the logits' device.
inline void check_per_row(const at::Tensor& t, const at::Tensor& logits, at::ScalarType dtype, const char* name,
                          const char* op) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == logits.size(0) && t.size(1) == logits.size(1), op, ": ", name,
              " must have shape (A, B) = ", logits.sizes().slice(0, 2), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype && t.is_contiguous(), op, ": ", name, " must be contiguous ", dtype);
  TORCH_CHECK(t.device() == logits.device(), op, ": ", name, " must be on the logits' device");
}

inline void check_optional_per_row(const c10::optional<at::Tensor>& t, const at::Tensor& logits, at::ScalarType dtype,
                                   const char* name, const char* op) {
  if (t.has_value()) check_per_row(*t, logits, dtype, name, op);
}

inline void check_temperature(double temperature, const char* op) {
  TORCH_CHECK(temperature > 0, op, ": temperature must be positive, got ", temperature);
}

inline void check_backward_inputs(const c10::optional<at::Tensor>& grad_logp,
                                  const c10::optional<at::Tensor>& grad_entropy, const at::Tensor& logits,
                                  const c10::optional<at::Tensor>& labels, const at::Tensor& lse,
                                  const at::Tensor& entropy, double temperature, const char* op) {
  check_optional_per_row(labels, logits, at::kLong, "labels", op);
  check_per_row(lse, logits, at::kFloat, "lse", op);
  check_optional_per_row(grad_logp, logits, at::kFloat, "grad_logp", op);
  check_optional_per_row(grad_entropy, logits, at::kFloat, "grad_entropy", op);
  if (grad_entropy.has_value()) check_per_row(entropy, logits, at::kFloat, "entropy", op);
  TORCH_CHECK(!grad_logp.has_value() || labels.has_value(), op, ": grad_logp needs labels");
  check_temperature(temperature, op);
}

}  // namespace logprobs
}  // namespace rlhf_fast
#endif  // RLHF_FAST_LOGPROBS_MATH_ONLY
