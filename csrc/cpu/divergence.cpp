// CPU kernels of the f-divergence family (math in ../divergence_common.h).
// Rows are spread over threads (at::parallel_for on OpenMP). A row is walked in chunks of kChunk entries: a
// chunk is converted to float once into stack buffers, its maxima found, its sums taken against them and merged
// into the row's online state, so the inputs are read from memory once (js / tv read the row a second time,
// mostly from cache). exp / log are polynomials in plain float arithmetic, so that the chunk loops vectorise;
// the loops are compiled for AVX-512, AVX2 and baseline x86-64 and picked at load time (target_clones).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../divergence_common.h"
#include "float_rows.h"
#include "simd_clones.h"
#include "vec_exp.h"

#include <algorithm>
#include <cstring>

namespace rlhf_fast {
namespace {

using namespace divergence;

constexpr int64_t kChunk = 1024;

// expf (cpu/vec_exp.h) and a Cephes-style logf (about 1 ulp on the ranges used here), both vectorisable.
struct VecMath {
  static RLHF_FAST_ELEMENTWISE float exp(float x) {
    const bool underflow = x < -87.3f;       // also -inf: exactly 0, so that 0 * (-inf) guards hold
    x = std::max(std::min(x, 88.f), -88.f);  // keeps the polynomial finite; the underflow select gives the 0
    return underflow ? 0.f : exp_poly(x);
  }

  // For x > 0 and normal (callers guard the x == 0 terms, whose weight is 0).
  static RLHF_FAST_ELEMENTWISE float log(float x) {
    const int32_t bits = __builtin_bit_cast(int32_t, x);
    float e = static_cast<float>((bits >> 23) - 126);
    float m = __builtin_bit_cast(float, (bits & 0x007fffff) | 0x3f000000);  // x = m 2^e, m in [0.5, 1)
    const bool small = m < 0.707106781186547524f;
    const float doubled = m + m;
    e -= small ? 1.f : 0.f;
    m = (small ? doubled : m) - 1.f;
    const float z = m * m;
    float poly = 7.0376836292e-2f;
    poly = poly * m - 1.1514610310e-1f;
    poly = poly * m + 1.1676998740e-1f;
    poly = poly * m - 1.2420140846e-1f;
    poly = poly * m + 1.4249322787e-1f;
    poly = poly * m - 1.6668057665e-1f;
    poly = poly * m + 2.0000714765e-1f;
    poly = poly * m - 2.4999993993e-1f;
    poly = poly * m + 3.3333331174e-1f;
    const float y = poly * m * z - 2.12194440e-4f * e - 0.5f * z;
    return m + y + 0.693359375f * e;
  }
};

template <typename scalar_t>
RLHF_FAST_ELEMENTWISE void load_scaled(const scalar_t* xp, const scalar_t* xq, int64_t n, float inv_temperature,
                                       float* a, float* b) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    a[i] = static_cast<float>(xp[i]) * inv_temperature;
    b[i] = static_cast<float>(xq[i]) * inv_temperature;
  }
}

// Merges entries [0, n) of one row (n <= kChunk) into `state`.
template <int Kind, typename scalar_t>
RLHF_FAST_SIMD_CLONES void first_pass_chunk(const scalar_t* xp, const scalar_t* xq, int64_t n, const Params& p,
                                            RowState& state) {
  float a[kChunk], b[kChunk];
  load_scaled(xp, xq, n, p.inv_temperature, a, b);
  const float exponent = p.exponent;
  float ma = -INFINITY, mb = -INFINITY, mc = -INFINITY;
#pragma omp simd reduction(max : ma, mb, mc)
  for (int64_t i = 0; i < n; ++i) {
    ma = std::max(ma, a[i]);
    mb = std::max(mb, b[i]);
    if (Kind == kPower) mc = std::max(mc, power_logit(a[i], b[i], exponent));
  }
  const float sma = safe_max(ma), smb = safe_max(mb), smc = safe_max(mc);
  float sa = 0.f, wa = 0.f, sb = 0.f, wb = 0.f, sc = 0.f;
#pragma omp simd reduction(+ : sa, wa, sb, wb, sc)
  for (int64_t i = 0; i < n; ++i) {
    const FirstPassTerms t = first_pass_terms<Kind, VecMath>(a[i], b[i], exponent, sma, smb, smc);
    sa += t.sa;
    wa += t.wa;
    sb += t.sb;
    wb += t.wb;
    sc += t.sc;
  }
  state.merge<VecMath>(RowState{{ma, sa, wa}, {mb, sb, wb}, {mc, sc, 0.f}});
}

template <int Kind, typename scalar_t>
RLHF_FAST_SIMD_CLONES void second_pass_chunk(const scalar_t* xp, const scalar_t* xq, int64_t n, const Params& p,
                                             float lse_a, float lse_b, float& t1, float& t2) {
  float a[kChunk], b[kChunk];
  load_scaled(xp, xq, n, p.inv_temperature, a, b);
  float u1 = 0.f, u2 = 0.f;
#pragma omp simd reduction(+ : u1, u2)
  for (int64_t i = 0; i < n; ++i) {
    const Pair t = second_pass_terms<Kind, VecMath>(a[i], b[i], lse_a, lse_b);
    u1 += t.first;
    u2 += t.second;
  }
  t1 += u1;
  t2 += u2;
}

// The second-pass sums of one row (or part of one) of n entries against the given log-normalisers.
template <int Kind, typename scalar_t>
Pair second_pass_row(const scalar_t* rp, const scalar_t* rq, int64_t n, const Params& p, float lse_a, float lse_b) {
  float t1 = 0.f, t2 = 0.f;
  for (int64_t c = 0; c < n; c += kChunk) {
    second_pass_chunk<Kind>(rp + c, rq + c, std::min(kChunk, n - c), p, lse_a, lse_b, t1, t2);
  }
  return {t1, t2};
}

// NeedP / NeedQ: which gradients to write; the other side's terms (e.g. an exp) then compile away.
template <int Kind, bool NeedP, bool NeedQ, typename scalar_t>
RLHF_FAST_SIMD_CLONES void grad_chunk(const scalar_t* xp, const scalar_t* xq, int64_t n, const Params& p,
                                      const RowGrad& r, scalar_t* gp, scalar_t* gq) {
  float a[kChunk], b[kChunk];
  load_scaled(xp, xq, n, p.inv_temperature, a, b);
  const Params params = p;
  const RowGrad row = r;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const Pair d = grad_entry<Kind, VecMath>(a[i], b[i], params, row);
    if (NeedP) a[i] = d.first;  // the buffers now hold the gradients
    if (NeedQ) b[i] = d.second;
  }
  if (NeedP) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) gp[i] = static_cast<scalar_t>(a[i]);
  }
  if (NeedQ) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) gq[i] = static_cast<scalar_t>(b[i]);
  }
}

template <int Kind, typename scalar_t>
void forward_rows(const at::Tensor& logits_p, const at::Tensor& logits_q, const bool* mask, const Params& p, float* out,
                  float* stats) {
  const int64_t rows = logits_p.size(0), vocab = logits_p.size(1);
  const int64_t stride_p = logits_p.stride(0), stride_q = logits_q.stride(0);
  const scalar_t* xp = logits_p.data_ptr<scalar_t>();
  const scalar_t* xq = logits_q.data_ptr<scalar_t>();
  at::parallel_for(0, rows, rlhf_fast::rows::grain_rows(vocab), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      float* row_stats = stats + 3 * row;
      if (mask && !mask[row]) {
        out[row] = row_stats[0] = row_stats[1] = row_stats[2] = 0.f;
        continue;
      }
      const scalar_t* rp = xp + row * stride_p;
      const scalar_t* rq = xq + row * stride_q;
      RowState state = RowState::empty();
      for (int64_t c = 0; c < vocab; c += kChunk) {
        first_pass_chunk<Kind>(rp + c, rq + c, std::min(kChunk, vocab - c), p, state);
      }
      RowResult r = finish_first_pass(p, state);
      if (two_pass(Kind)) {
        const Pair t = second_pass_row<Kind>(rp, rq, vocab, p, r.lse_a, r.lse_b);
        finish_second_pass(Kind, t.first, t.second, r);
      }
      out[row] = r.out;
      row_stats[0] = r.lse_a;
      row_stats[1] = r.lse_b;
      row_stats[2] = r.aux;
    }
  });
}

template <int Kind, typename scalar_t>
void second_pass_rows(const at::Tensor& logits_p, const at::Tensor& logits_q, const bool* mask, const float* stats,
                      const Params& p, float* sums) {
  const int64_t rows = logits_p.size(0), vocab = logits_p.size(1);
  const int64_t stride_p = logits_p.stride(0), stride_q = logits_q.stride(0);
  const scalar_t* xp = logits_p.data_ptr<scalar_t>();
  const scalar_t* xq = logits_q.data_ptr<scalar_t>();
  at::parallel_for(0, rows, rlhf_fast::rows::grain_rows(vocab), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      Pair t{0.f, 0.f};
      if (!mask || mask[row]) {
        t = second_pass_row<Kind>(xp + row * stride_p, xq + row * stride_q, vocab, p, stats[3 * row],
                                  stats[3 * row + 1]);
      }
      sums[2 * row] = t.first;
      sums[2 * row + 1] = t.second;
    }
  });
}

template <int Kind, typename scalar_t>
void backward_rows(const float* grad_out, const at::Tensor& logits_p, const at::Tensor& logits_q, const bool* mask,
                   const float* out, const float* stats, const Params& p, scalar_t* grad_p, scalar_t* grad_q) {
  const int64_t rows = logits_p.size(0), vocab = logits_p.size(1);
  const int64_t stride_p = logits_p.stride(0), stride_q = logits_q.stride(0);
  const scalar_t* xp = logits_p.data_ptr<scalar_t>();
  const scalar_t* xq = logits_q.data_ptr<scalar_t>();
  if (!grad_p && !grad_q) return;
  at::parallel_for(0, rows, rlhf_fast::rows::grain_rows(vocab), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      scalar_t* gp = grad_p ? grad_p + row * vocab : nullptr;
      scalar_t* gq = grad_q ? grad_q + row * vocab : nullptr;
      if (mask && !mask[row]) {
        if (gp) std::memset(static_cast<void*>(gp), 0, vocab * sizeof(scalar_t));
        if (gq) std::memset(static_cast<void*>(gq), 0, vocab * sizeof(scalar_t));
        continue;
      }
      const RowGrad r{stats[3 * row], stats[3 * row + 1], stats[3 * row + 2], out[row],
                      grad_out[row] * p.inv_temperature};
      for (int64_t c = 0; c < vocab; c += kChunk) {
        const scalar_t* rp = xp + row * stride_p + c;
        const scalar_t* rq = xq + row * stride_q + c;
        const int64_t n = std::min(kChunk, vocab - c);
        if (gp && gq)
          grad_chunk<Kind, true, true>(rp, rq, n, p, r, gp + c, gq + c);
        else if (gp)
          grad_chunk<Kind, true, false>(rp, rq, n, p, r, gp + c, gq);
        else
          grad_chunk<Kind, false, true>(rp, rq, n, p, r, gp, gq + c);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> f_divergence_cpu(const at::Tensor& logits_p, const at::Tensor& logits_q,
                                                    const c10::optional<at::Tensor>& mask, c10::string_view kind,
                                                    double alpha, double temperature) {
  const Params p = check_forward_inputs(logits_p, logits_q, mask, std::string(kind), alpha, temperature);
  const int64_t rows = logits_p.size(0);
  auto out = at::empty({rows}, logits_p.options().dtype(at::kFloat));
  auto stats = at::empty({rows, 3}, logits_p.options().dtype(at::kFloat));
  const bool* m = mask.has_value() ? mask->data_ptr<bool>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits_p.scalar_type(), "f_divergence_cpu", [&] {
    with_kind(p.kind, [&](auto kind_constant) {
      forward_rows<decltype(kind_constant)::value, scalar_t>(logits_p, logits_q, m, p, out.data_ptr<float>(),
                                                             stats.data_ptr<float>());
    });
  });
  return {out, stats};
}

at::Tensor f_divergence_second_pass_cpu(const at::Tensor& logits_p, const at::Tensor& logits_q,
                                        const c10::optional<at::Tensor>& mask, const at::Tensor& stats,
                                        c10::string_view kind, double temperature) {
  const Params p = check_second_pass_inputs(logits_p, logits_q, mask, stats, std::string(kind), temperature);
  auto sums = at::empty({logits_p.size(0), 2}, logits_p.options().dtype(at::kFloat));
  const bool* m = mask.has_value() ? mask->data_ptr<bool>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits_p.scalar_type(), "f_divergence_second_pass_cpu", [&] {
        if (p.kind == kJS) {
          second_pass_rows<kJS, scalar_t>(logits_p, logits_q, m, stats.data_ptr<float>(), p, sums.data_ptr<float>());
        } else {
          second_pass_rows<kTV, scalar_t>(logits_p, logits_q, m, stats.data_ptr<float>(), p, sums.data_ptr<float>());
        }
      });
  return sums;
}

std::tuple<at::Tensor, at::Tensor> f_divergence_backward_cpu(const at::Tensor& grad_out, const at::Tensor& logits_p,
                                                             const at::Tensor& logits_q,
                                                             const c10::optional<at::Tensor>& mask,
                                                             const at::Tensor& out, const at::Tensor& stats,
                                                             c10::string_view kind, double alpha, double temperature,
                                                             bool need_grad_p, bool need_grad_q) {
  const Params p = check_forward_inputs(logits_p, logits_q, mask, std::string(kind), alpha, temperature);
  check_backward_inputs(grad_out, logits_p, out, stats);
  auto grad_p = need_grad_p ? at::empty(logits_p.sizes(), logits_p.options()) : at::empty({0}, logits_p.options());
  auto grad_q = need_grad_q ? at::empty(logits_q.sizes(), logits_q.options()) : at::empty({0}, logits_q.options());
  const bool* m = mask.has_value() ? mask->data_ptr<bool>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits_p.scalar_type(), "f_divergence_backward_cpu", [&] {
    with_kind(p.kind, [&](auto kind_constant) {
      backward_rows<decltype(kind_constant)::value, scalar_t>(
          grad_out.data_ptr<float>(), logits_p, logits_q, m, out.data_ptr<float>(), stats.data_ptr<float>(), p,
          need_grad_p ? grad_p.data_ptr<scalar_t>() : nullptr, need_grad_q ? grad_q.data_ptr<scalar_t>() : nullptr);
    });
  });
  return {grad_p, grad_q};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_fast, CPU, m) {
  m.impl("f_divergence", &f_divergence_cpu);
  m.impl("f_divergence_second_pass", &f_divergence_second_pass_cpu);
  m.impl("f_divergence_backward", &f_divergence_backward_cpu);
}

}  // namespace rlhf_fast
