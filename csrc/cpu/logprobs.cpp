// CPU kernels of the log-prob family: fused log-softmax + gather + entropy, and its backward.
//
// Rows are spread over threads (at::parallel_for, OpenMP). The forward reads a row once, in blocks of kChunk
// floats: each block's max (the block then sits in L1), then sum 2^u and sum 2^u u over it (u = (x - m) / T
// in base 2, m the running max; the sums are rescaled when a later block raises m), from which
// lse = m / T + ln s and entropy = ln s - ln2 t / s (the rescale and these last steps are the Moments code of
// logprobs_common.h, which the CUDA kernel runs too). No (N, V) temporary exists; bf16 / fp16 rows are widened
// into a float block. The inner loops are plain float loops with a polynomial 2^x that the compiler
// vectorises; on x86-64 Linux with GCC they are cloned for AVX-512 and AVX2 and picked at load time
// (target_clones), since the extension is otherwise built for baseline x86-64 (SSE2).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../logprobs_common.h"
#include "float_rows.h"
#include "simd_clones.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace rlhf_fast {
namespace {

// Floats per block: 4 KiB of fp32, in L1 between the max and the exp loop (the fastest of 512-4096 here).
constexpr int64_t kChunk = 1024;
// Floats per vector of the widest clone (AVX-512). A block whose length is not a multiple of it is copied and
// padded with -inf (exp 0: adds nothing, gets no gradient) so that the vector loops never end in a scalar
// epilogue: at a vocab of 46, 14 scalar polynomial exps per row took two thirds of the forward's time.
constexpr int64_t kLanes = 16;
static_assert(kChunk % kLanes == 0);
using rows::exp2_approx;
using rows::grain_rows;
using rows::kNegInf;
using rows::max_of;
using rows::widen;
constexpr float kLog2e = 1.44269504f;

// s += sum 2^u, t += sum 2^u u over u = (x - m) * scale (base-2 units; terms with 2^u = 0 add 0, also for
// -inf). x - m before the scaling: exact for the x near the max, which carry the sums.
RLHF_FAST_SIMD_CLONES void add_exp2_moments(const float* x, int64_t n, float scale, float m, float* s, float* t) {
  float sum = 0.f, weighted = 0.f;
#pragma omp simd reduction(+ : sum, weighted)
  for (int64_t i = 0; i < n; ++i) {
    const float u = (x[i] - m) * scale;
    const float e = exp2_approx(u);
    sum += e;
    weighted += e > 0.f ? e * u : 0.f;
  }
  *s += sum;
  *t += weighted;
}

// out = -p (alpha + beta (log p + entropy)), p = exp(x * scale - lse): the softmax part of d(logits) (the
// label's +alpha is added by the caller).
RLHF_FAST_SIMD_CLONES void softmax_grad(const float* x, float* out, int64_t n, float scale, float lse, float alpha,
                                        float beta, float entropy) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float u = x[i] * scale - lse;
    const float p = exp2_approx(u * kLog2e);
    out[i] = p > 0.f ? -p * (alpha + beta * (u + entropy)) : 0.f;
  }
}

// Float blocks back to rows of another dtype (widening: float_rows.h); bf16 a vector at a time, rounded to
// nearest even as c10 does.
RLHF_FAST_SIMD_CLONES void narrow(const float* x, int64_t n, c10::BFloat16* out) {
  auto* bits = reinterpret_cast<uint16_t*>(out);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) bits[i] = c10::detail::round_to_nearest_even(x[i]);
}

template <typename scalar_t>
void narrow(const float* x, int64_t n, scalar_t* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<scalar_t>(x[i]);
}

// The float values of x[0, n) followed by -inf up to `padded` = n rounded up to whole vectors: x itself for a
// float block of whole vectors, else converted or copied into buf (kChunk floats).
template <typename scalar_t>
const float* as_float_padded(const scalar_t* x, int64_t n, float* buf, int64_t* padded) {
  *padded = (n + kLanes - 1) / kLanes * kLanes;
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (*padded == n) return x;
    std::copy(x, x + n, buf);
  } else {
    widen(x, n, buf);
  }
  std::fill(buf + n, buf + *padded, kNegInf);
  return buf;
}

// Where float results for dst[0, padded) are written: dst itself for a float block of whole vectors, else buf
// (then store_from_float copies the first n back).
template <typename scalar_t>
float* float_target(scalar_t* dst, float* buf, int64_t n, int64_t padded) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (padded == n) return dst;
  }
  return buf;
}

template <typename scalar_t>
void store_from_float(const float* src, scalar_t* dst, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (src != dst) std::copy(src, src + n, dst);
  } else {
    narrow(src, n, dst);
  }
}

// A fresh tensor as large as the logits is page-faulted in on its first write, 4 KiB at a time: ~0.15 s of
// kernel time for 500 MB on one core, more than the backward kernel itself. Asking for transparent huge pages
// over its 2 MiB-aligned interior cuts that to a few ms where the system allows them (THP "madvise" or
// "always"); elsewhere the advice does nothing. It is advice only: a failure is ignored.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t{1} << 21;
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t last = (begin + t.nbytes()) & ~(kHugePage - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#endif
}

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
  const float scale2 = static_cast<float>(1.4426950408889634 / temperature);  // log2(e) / T
  const int64_t vocab = layout.vocab;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "logprobs_forward_cpu", [&] {
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    // Rows of one block are read in groups that fill buf: each row's padded float copy (when it needs one) is
    // made for the whole group before the math reads it. Read right after the copy, a vector load waits for the
    // copy's narrower stores to complete (store forwarding fails), which took longer than the math at V=45.
    const int64_t padded = (vocab + kLanes - 1) / kLanes * kLanes;
    const int64_t group = vocab <= kChunk ? kChunk / padded : 1;
    at::parallel_for(0, layout.rows, grain_rows(vocab), [&](int64_t begin, int64_t end) {
      float buf[kChunk];
      const float* grouped[kChunk / kLanes];
      for (int64_t first = begin; first < end; first += group) {
        const int64_t last = std::min(end, first + group);
        for (int64_t r = first; group > 1 && r < last; ++r) {
          int64_t n = vocab;
          grouped[r - first] = as_float_padded(x + layout.offset(r), n, buf + (r - first) * padded, &n);
        }
        for (int64_t r = first; r < last; ++r) {
          const scalar_t* row = x + layout.offset(r);
          // One read of the row: per block, its max (from L1 after the load), a rebase of the running moments
          // when the max grew, then the exp sums. While the row so far is all -inf the terms are taken against 0
          // (-inf adds 0, a NaN still makes s NaN), so a NaN anywhere in the row reaches lse and entropy.
          logprobs::Moments acc{kNegInf, 0.f, 0.f};
          for (int64_t j = 0; j < vocab; j += kChunk) {
            int64_t n = group > 1 ? padded : std::min(kChunk, vocab - j);
            const float* block = group > 1 ? grouped[r - first] : as_float_padded(row + j, n, buf, &n);
            const float block_max = max_of(block, n);
            if (block_max > acc.m) acc = logprobs::rebase(acc, block_max, scale2);
            add_exp2_moments(block, n, scale2, acc.m == kNegInf ? 0.f : acc.m, &acc.s, &acc.t);
          }
          const logprobs::RowStats stats = logprobs::row_stats(acc, inv_t);
          lse_out[r] = stats.lse;
          entropy_out[r] = stats.entropy;
          if (y) {
            const int64_t label = y[r];
            if (label == ignore_index) {
              logp_out[r] = 0.f;
            } else {  // a label outside [0, V) gives NaN; never read past the row
              logp_out[r] = valid_label(label, vocab) ? static_cast<float>(row[label]) * inv_t - stats.lse
                                                      : std::numeric_limits<float>::quiet_NaN();
            }
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
          int64_t padded;
          const float* in = as_float_padded(row + j, n, in_buf, &padded);
          float* out = float_target(grad_row + j, out_buf, n, padded);
          softmax_grad(in, out, padded, inv_t, lse_in[r], alpha, beta, row_entropy);
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
  advise_huge_pages(grad);
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
