// CPU kernels of the log-prob family: fused log-softmax + gather + entropy, and its backward.
//
// Rows are spread over threads (at::parallel_for, OpenMP). A row is read twice: once for its max, once for
// sum exp(u) and sum exp(u) * u (u = x / T - max / T), from which lse = max / T + log s and
// entropy = log s - t / s. The second read hits the core's L2 for rows up to ~100k fp32 logits, so memory
// traffic is one read of the logits; no (N, V) temporary exists. bf16 / fp16 rows go through a float buffer of
// kChunk elements. The inner loops are plain float loops that the compiler vectorises; on x86-64 Linux with
// GCC they are cloned for AVX-512 and AVX2 and picked at load time (target_clones), since the extension is
// otherwise built for baseline x86-64 (SSE2).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../logprobs_common.h"

#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define RLHF_FAST_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define RLHF_FAST_SIMD_CLONES
#endif

namespace rlhf_fast {
namespace {

constexpr int64_t kChunk = 2048;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// exp(x) with a few ulp of error, written so that loops over it vectorise (no libm call): x = k ln2 + r with
// |r| <= ln2 / 2, exp(r) by a degree-6 polynomial, 2^k through the exponent bits. Underflows to 0 below
// -87.3 (and for -inf), saturates above 88.3 (never reached: u <= 0 here); NaN stays NaN.
inline float exp_approx(float x) {
  const float clamped = x < -87.3f ? -87.3f : (x > 88.3f ? 88.3f : x);
  const float magic = 12582912.f;  // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer
  const float k = (clamped * 1.44269504f + magic) - magic;
  const float r = (clamped - k * 0.693145752f) - k * 1.42860677e-6f;
  float p = 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const float scale = std::bit_cast<float>((static_cast<int32_t>(k) + 127) << 23);
  const float result = x < -87.3f ? 0.f : p * scale;
  return x != x ? x : result;
}

RLHF_FAST_SIMD_CLONES float max_of(const float* x, int64_t n) {
  float m = kNegInf;
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

// s += sum exp(u), t += sum exp(u) * u over u = x * scale - shift (terms with exp(u) = 0 add 0, also for -inf).
RLHF_FAST_SIMD_CLONES void add_exp_moments(const float* x, int64_t n, float scale, float shift, float* s,
                                           float* t) {
  float sum = 0.f, weighted = 0.f;
#pragma omp simd reduction(+ : sum, weighted)
  for (int64_t i = 0; i < n; ++i) {
    const float u = x[i] * scale - shift;
    const float e = exp_approx(u);
    sum += e;
    weighted += e > 0.f ? e * u : 0.f;
  }
  *s += sum;
  *t += weighted;
}

// out = -p (alpha + beta (log p + entropy)), p = exp(x * scale - lse): the softmax part of d(logits)
// (the label's +alpha is added by the caller).
RLHF_FAST_SIMD_CLONES void softmax_grad(const float* x, float* out, int64_t n, float scale, float lse, float alpha,
                                        float beta, float entropy) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float u = x[i] * scale - lse;
    const float p = exp_approx(u);
    out[i] = p > 0.f ? -p * (alpha + beta * (u + entropy)) : 0.f;
  }
}

// The float values of x[0, n): x itself for float, else converted into buf.
template <typename scalar_t>
const float* as_float(const scalar_t* x, int64_t n, float* buf) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return x;
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(x[i]);
    return buf;
  }
}

// Where float results for dst[0, n) are written: dst itself for float, else buf (then store_from_float).
template <typename scalar_t>
float* float_target(scalar_t* dst, float* buf) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return dst;
  } else {
    return buf;
  }
}

template <typename scalar_t>
void store_from_float(const float* src, scalar_t* dst, int64_t n) {
  if constexpr (!std::is_same_v<scalar_t, float>) {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
  }
}

int64_t grain_rows(int64_t vocab) { return std::max<int64_t>(1, 32768 / vocab); }

bool valid_label(int64_t label, int64_t vocab) { return label >= 0 && label < vocab; }

std::tuple<at::Tensor, at::Tensor, at::Tensor> logprobs_forward_cpu(const at::Tensor& logits,
                                                                    const c10::optional<at::Tensor>& labels,
                                                                    double temperature, int64_t ignore_index) {
  const char* op = "logprobs_forward";
  const auto layout = logprobs::row_layout(logits, op);
  logprobs::check_optional_per_row(labels, logits, at::kLong, "labels", op);
  logprobs::check_temperature(temperature, op);
  const auto row_options = logits.options().dtype(at::kFloat);
  auto logp = labels.has_value() ? at::empty(logits.sizes().slice(0, 2), row_options) : at::empty({0}, row_options);
  auto entropy = at::empty(logits.sizes().slice(0, 2), row_options);
  auto lse = at::empty_like(entropy);
  const int64_t* y = labels.has_value() ? labels->data_ptr<int64_t>() : nullptr;
  float* logp_out = labels.has_value() ? logp.data_ptr<float>() : nullptr;
  float* entropy_out = entropy.data_ptr<float>();
  float* lse_out = lse.data_ptr<float>();
  const float inv_t = static_cast<float>(1.0 / temperature);
  const int64_t vocab = layout.vocab;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "logprobs_forward_cpu", [&] {
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    at::parallel_for(0, layout.rows, grain_rows(vocab), [&](int64_t begin, int64_t end) {
      float buf[kChunk];
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* row = x + layout.offset(r);
        float m = kNegInf;
        for (int64_t j = 0; j < vocab; j += kChunk) {
          const int64_t n = std::min(kChunk, vocab - j);
          m = std::max(m, max_of(as_float(row + j, n, buf), n));
        }
        const float shift = m * inv_t;
        float s = 0.f, t = 0.f;
        for (int64_t j = 0; j < vocab; j += kChunk) {
          const int64_t n = std::min(kChunk, vocab - j);
          add_exp_moments(as_float(row + j, n, buf), n, inv_t, shift, &s, &t);
        }
        const float log_s = std::log(s);
        lse_out[r] = shift + log_s;
        entropy_out[r] = log_s - t / s;
        if (y) {
          const int64_t label = y[r];
          if (label == ignore_index) {
            logp_out[r] = 0.f;
          } else {  // out-of-range labels are rejected by the caller; never read past the row
            logp_out[r] = valid_label(label, vocab) ? static_cast<float>(row[label]) * inv_t - lse_out[r]
                                                    : std::numeric_limits<float>::quiet_NaN();
          }
        }
      }
    });
  });
  return {logp, entropy, lse};
}

// d(logits) for every row into `grad` (laid out like `grad_layout`; may be the logits themselves).
void logprobs_backward_into(const c10::optional<at::Tensor>& grad_logp, const c10::optional<at::Tensor>& grad_entropy,
                            const at::Tensor& logits, const c10::optional<at::Tensor>& labels, const at::Tensor& lse,
                            const at::Tensor& entropy, double temperature, int64_t ignore_index, at::Tensor& grad,
                            const logprobs::RowLayout& layout, const logprobs::RowLayout& grad_layout) {
  const int64_t* y = labels.has_value() ? labels->data_ptr<int64_t>() : nullptr;
  const float* g_lp = grad_logp.has_value() ? grad_logp->data_ptr<float>() : nullptr;
  const float* g_h = grad_entropy.has_value() ? grad_entropy->data_ptr<float>() : nullptr;
  const float* h = g_h ? entropy.data_ptr<float>() : nullptr;
  const float* lse_in = lse.data_ptr<float>();
  const float inv_t = static_cast<float>(1.0 / temperature);
  const int64_t vocab = layout.vocab;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "logprobs_backward_cpu", [&] {
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    scalar_t* dx = grad.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, layout.rows, grain_rows(vocab), [&](int64_t begin, int64_t end) {
      float in_buf[kChunk], out_buf[kChunk];
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* row = x + layout.offset(r);
        scalar_t* grad_row = dx + grad_layout.offset(r);
        const int64_t label = y ? y[r] : ignore_index;
        const bool counted = y && label != ignore_index;  // a label outside [0, V) has no one-hot term here
        const bool has_onehot = counted && valid_label(label, vocab);
        const float alpha = counted && g_lp ? g_lp[r] * inv_t : 0.f;
        const float beta = g_h ? g_h[r] * inv_t : 0.f;
        const float row_entropy = h ? h[r] : 0.f;
        for (int64_t j = 0; j < vocab; j += kChunk) {
          const int64_t n = std::min(kChunk, vocab - j);
          float* out = float_target(grad_row + j, out_buf);
          softmax_grad(as_float(row + j, n, in_buf), out, n, inv_t, lse_in[r], alpha, beta, row_entropy);
          if (has_onehot && label >= j && label < j + n) out[label - j] += alpha;
          store_from_float(out, grad_row + j, n);
        }
      }
    });
  });
}

at::Tensor logprobs_backward_cpu(const c10::optional<at::Tensor>& grad_logp,
                                 const c10::optional<at::Tensor>& grad_entropy, const at::Tensor& logits,
                                 const c10::optional<at::Tensor>& labels, const at::Tensor& lse,
                                 const at::Tensor& entropy, double temperature, int64_t ignore_index) {
  const char* op = "logprobs_backward";
  const auto layout = logprobs::row_layout(logits, op);
  logprobs::check_backward_inputs(grad_logp, grad_entropy, logits, labels, lse, entropy, temperature, op);
  auto grad = at::empty(logits.sizes(), logits.options());
  logprobs_backward_into(grad_logp, grad_entropy, logits, labels, lse, entropy, temperature, ignore_index, grad, layout,
                         logprobs::row_layout(grad, op));
  return grad;
}

void logprobs_backward_inplace_cpu(const c10::optional<at::Tensor>& grad_logp,
                                   const c10::optional<at::Tensor>& grad_entropy, at::Tensor& logits,
                                   const c10::optional<at::Tensor>& labels, const at::Tensor& lse,
                                   const at::Tensor& entropy, double temperature, int64_t ignore_index) {
  const char* op = "logprobs_backward_";
  const auto layout = logprobs::row_layout(logits, op);
  logprobs::check_backward_inputs(grad_logp, grad_entropy, logits, labels, lse, entropy, temperature, op);
  logprobs_backward_into(grad_logp, grad_entropy, logits, labels, lse, entropy, temperature, ignore_index, logits,
                         layout, layout);
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_fast, CPU, m) {
  m.impl("logprobs_forward", &logprobs_forward_cpu);
  m.impl("logprobs_backward", &logprobs_backward_cpu);
  m.impl("logprobs_backward_", &logprobs_backward_inplace_cpu);
}

}  // namespace rlhf_fast
