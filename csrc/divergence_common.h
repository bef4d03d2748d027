// Math (host and device) and argument checks of the f-divergence family, shared by the CPU and CUDA kernels.
//
// Per row, with a = x_p / T, b = x_q / T, lse_a = log sum e^a, lp = a - lse_a, P = e^lp (likewise b, lq, Q):
//   kl         = sum P (a - b) - lse_a + lse_b       one pass: sum e^(a - m_a) (a - b) rescaled online with m_a
//   reverse_kl = sum Q (b - a) - lse_b + lse_a       the same with the roles swapped
//   power kinds = scale * (S - 1), S = sum P^e Q^(1-e) = exp(lse_c - e lse_a - (1-e) lse_b), c = e a + (1-e) b
//                 (hellinger e=1/2, scale=-1; chi2 e=2, scale=1; alpha e=alpha, scale=1/(alpha(alpha-1)))
//   js, tv need P and Q themselves, so a second pass over the row once lse_a and lse_b are known.
// The forward keeps per row (lse_a, lse_b, aux), aux being the row statistic the backward needs:
//   kl, reverse_kl: the value; power kinds: S; js: K_p = KL(P || M); tv: A_p = sum P sign(P - Q).
// Backward, with G = upstream gradient / T:
//   kl:    dp = G P (lp - lq - kl),   dq = G (Q - P)
//   rkl:   dq = G Q (lq - lp - rkl),  dp = G (P - Q)
//   power: w = P^e Q^(1-e),  dp = G scale e (w - P S),  dq = G scale (1-e) (w - Q S)
//   js:    lm = log((P+Q)/2),  dp = G/2 P (lp - lm - K_p),  dq = G/2 Q (lq - lm - K_q),  K_q = 2 js - K_p
//   tv:    s = sign(P - Q),  dp = G/2 P (s - A_p),  dq = -G/2 Q (s - A_q),  A_q = A_p - 2 tv
// Vocab entries where both logits are -inf are absent: they contribute 0 and get 0 gradient.
#pragma once
#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

#ifdef __CUDACC__
#ifndef RLHF_FAST_HOST_DEVICE
#define RLHF_FAST_HOST_DEVICE __host__ __device__
#endif
#define RLHF_FAST_ELEMENTWISE __host__ __device__ __forceinline__
#else
#ifndef RLHF_FAST_HOST_DEVICE
#define RLHF_FAST_HOST_DEVICE
#endif
// Per-entry functions must be inlined into the CPU kernels' loops, or those loops do not vectorise.
#define RLHF_FAST_ELEMENTWISE inline __attribute__((always_inline))
#endif

namespace rlhf_fast {
namespace divergence {

// Kinds as the kernels see them; the same numbers are used by rlhf_fast/triton/divergence.py.
constexpr int kKL = 0, kReverseKL = 1, kJS = 2, kTV = 3, kPower = 4;
constexpr float kLn2 = 0.693147180559945309f;

struct Params {
  int kind;
  float exponent;  // power kinds: e
  float scale;     // power kinds: divergence = scale * (S - 1)
  float inv_temperature;
};

constexpr bool two_pass(int kind) { return kind == kJS || kind == kTV; }

// Maps (kind, alpha, temperature) to the kernels' parameters; false for an unknown kind or alpha in {0, 1}.
inline bool make_params(const std::string& kind, double alpha, double temperature, Params* out) {
  const float inv_t = static_cast<float>(1.0 / temperature);
  if (kind == "kl")
    *out = {kKL, 0.f, 0.f, inv_t};
  else if (kind == "reverse_kl")
    *out = {kReverseKL, 0.f, 0.f, inv_t};
  else if (kind == "js")
    *out = {kJS, 0.f, 0.f, inv_t};
  else if (kind == "tv")
    *out = {kTV, 0.f, 0.f, inv_t};
  else if (kind == "hellinger")
    *out = {kPower, 0.5f, -1.f, inv_t};
  else if (kind == "chi2")
    *out = {kPower, 2.f, 1.f, inv_t};
  else if (kind == "alpha" && alpha != 0.0 && alpha != 1.0)
    *out = {kPower, static_cast<float>(alpha), static_cast<float>(1.0 / (alpha * (alpha - 1.0))), inv_t};
  else
    return false;
  return true;
}

// Calls f(std::integral_constant<int, kind>{}) so that kernels can take the kind as a template argument.
template <typename F>
void with_kind(int kind, F&& f) {
  switch (kind) {
    case kKL:
      f(std::integral_constant<int, kKL>{});
      break;
    case kReverseKL:
      f(std::integral_constant<int, kReverseKL>{});
      break;
    case kJS:
      f(std::integral_constant<int, kJS>{});
      break;
    case kTV:
      f(std::integral_constant<int, kTV>{});
      break;
    default:
      f(std::integral_constant<int, kPower>{});
      break;
  }
}

RLHF_FAST_ELEMENTWISE float safe_max(float m) { return m == -INFINITY ? 0.f : m; }

// c = e a + (1-e) b; -inf (absent) where both logits are -inf instead of NaN (inf - inf).
RLHF_FAST_ELEMENTWISE float power_logit(float a, float b, float e) {
  const float c = e * a + (1.f - e) * b;
  return (a == -INFINITY && b == -INFINITY) ? -INFINITY : c;
}

// sum e^(x - max) and sum e^(x - max) * w for a stream of logits x with weights w, mergeable in any order.
struct Stream {
  float max, sum, weighted;

  RLHF_FAST_HOST_DEVICE static Stream empty() { return {-INFINITY, 0.f, 0.f}; }

  template <class Math>
  RLHF_FAST_HOST_DEVICE void merge(const Stream& other) {
    const float m = fmaxf(max, other.max);
    if (m == -INFINITY) return;
    const float mine = Math::exp(max - m), theirs = Math::exp(other.max - m);
    sum = sum * mine + other.sum * theirs;
    weighted = weighted * mine + other.weighted * theirs;
    max = m;
  }

  RLHF_FAST_HOST_DEVICE float lse() const { return max + logf(sum); }
};

// The online state of one row (or part of one) for the one-pass kinds and for the first pass of js / tv.
struct RowState {
  Stream a, b, c;  // c: the power logits (power kinds only)

  RLHF_FAST_HOST_DEVICE static RowState empty() { return {Stream::empty(), Stream::empty(), Stream::empty()}; }

  template <class Math>
  RLHF_FAST_HOST_DEVICE void merge(const RowState& other) {
    a.merge<Math>(other.a);
    b.merge<Math>(other.b);
    c.merge<Math>(other.c);
  }
};

// One vocab entry's terms of the first-pass sums, taken against fixed maxima (ma, mb, mc: safe_max of the
// running maxima): e^(a - ma), e^(a - ma) (a - b) [kl], e^(b - mb), e^(b - mb) (b - a) [reverse_kl], e^(c - mc).
// Returned by value (not accumulated through references), and every guard selects between values computed
// unconditionally (never a conditional product), so that the callers' loops vectorise (with -fno-trapping-math).
struct FirstPassTerms {
  float sa, wa, sb, wb, sc;
};

template <int Kind, class Math>
RLHF_FAST_ELEMENTWISE FirstPassTerms first_pass_terms(float a, float b, float exponent, float ma, float mb, float mc) {
  const float ea = Math::exp(a - ma), eb = Math::exp(b - mb);
  FirstPassTerms t{ea, 0.f, eb, 0.f, 0.f};
  const float d = a - b;
  if (Kind == kKL) t.wa = ea * (ea > 0.f ? d : 0.f);
  if (Kind == kReverseKL) t.wb = eb * (eb > 0.f ? -d : 0.f);
  if (Kind == kPower) t.sc = Math::exp(power_logit(a, b, exponent) - mc);
  return t;
}

struct RowResult {
  float out, lse_a, lse_b, aux;
};

// The row's value from its one-pass state (for js / tv: only lse_a and lse_b are meaningful).
RLHF_FAST_HOST_DEVICE inline RowResult finish_first_pass(const Params& p, const RowState& s) {
  RowResult r;
  r.lse_a = s.a.lse();
  r.lse_b = s.b.lse();
  r.aux = 0.f;
  if (p.kind == kKL) r.aux = s.a.weighted / s.a.sum - r.lse_a + r.lse_b;
  if (p.kind == kReverseKL) r.aux = s.b.weighted / s.b.sum - r.lse_b + r.lse_a;
  r.out = r.aux;
  if (p.kind == kPower) {
    // One exponential for both: the value scale (S - 1) and the backward's S are taken from the same expm1
    // (accurate near S = 1, also under nvcc's --use_fast_math, which would turn an expf into the approximate
    // __expf and let S disagree with the value).
    const float log_s = s.c.lse() - p.exponent * r.lse_a - (1.f - p.exponent) * r.lse_b;
    const float s_minus_1 = expm1f(log_s);
    r.aux = 1.f + s_minus_1;
    r.out = p.scale * s_minus_1;
  }
  return r;
}

struct Pair {
  float first, second;
};

// One vocab entry's terms of the second-pass sums: js (P (lp - lm), Q (lq - lm)); tv (|P - Q|, P sign(P - Q)).
template <int Kind, class Math>
RLHF_FAST_ELEMENTWISE Pair second_pass_terms(float a, float b, float lse_a, float lse_b) {
  const float lp = a - lse_a, lq = b - lse_b;
  const float P = Math::exp(lp), Q = Math::exp(lq);
  if (Kind == kJS) {
    const float lm = Math::log(P + Q) - kLn2;
    const float dp = lp - lm, dq = lq - lm;
    return {P * (P > 0.f ? dp : 0.f), Q * (Q > 0.f ? dq : 0.f)};
  }
  const float d = P - Q;
  return {fabsf(d), P * (d > 0.f ? 1.f : (d < 0.f ? -1.f : 0.f))};
}

RLHF_FAST_HOST_DEVICE inline void finish_second_pass(int kind, float t1, float t2, RowResult& r) {
  r.out = kind == kJS ? 0.5f * (t1 + t2) : 0.5f * t1;
  r.aux = kind == kJS ? t1 : t2;
}

// What the backward of one row needs besides its logits.
struct RowGrad {
  float lse_a, lse_b, aux, out, g;  // g = upstream gradient / T (0 for masked rows)
};

// (d divergence / d x_p, d divergence / d x_q) of one vocab entry (the upstream gradient and 1/T are in r.g).
template <int Kind, class Math>
RLHF_FAST_ELEMENTWISE Pair grad_entry(float a, float b, const Params& p, const RowGrad& r) {
  const float lp = a - r.lse_a, lq = b - r.lse_b;
  const float P = Math::exp(lp), Q = Math::exp(lq);
  const float log_ratio = lp - lq;
  const float centred_p = log_ratio - r.aux, centred_q = -log_ratio - r.aux;
  if (Kind == kKL) return {r.g * P * (P > 0.f ? centred_p : 0.f), r.g * (Q - P)};
  if (Kind == kReverseKL) return {r.g * (P - Q), r.g * Q * (Q > 0.f ? centred_q : 0.f)};
  if (Kind == kPower) {
    const float w = Math::exp(power_logit(lp, lq, p.exponent));
    const float gs = r.g * p.scale;
    return {gs * p.exponent * (w - P * r.aux), gs * (1.f - p.exponent) * (w - Q * r.aux)};
  }
  const float half_g = 0.5f * r.g;
  if (Kind == kJS) {
    const float lm = Math::log(P + Q) - kLn2;
    const float dp = lp - lm - r.aux, dq = lq - lm - (2.f * r.out - r.aux);
    return {half_g * P * (P > 0.f ? dp : 0.f), half_g * Q * (Q > 0.f ? dq : 0.f)};
  }
  const float d = P - Q;
  const float s = d > 0.f ? 1.f : (d < 0.f ? -1.f : 0.f);
  return {half_g * P * (s - r.aux), -half_g * Q * (s - (r.aux - 2.f * r.out))};
}

// Host-side checks of the compiled ops' arguments (the public Python API has already given friendly errors).
inline Params check_forward_inputs(const at::Tensor& logits_p, const at::Tensor& logits_q,
                                   const c10::optional<at::Tensor>& mask, const std::string& kind, double alpha,
                                   double temperature) {
  TORCH_CHECK(logits_p.dim() == 2 && logits_p.stride(1) == 1,
              "f_divergence: logits_p must be 2-D (rows, vocab) with a unit vocab stride");
  TORCH_CHECK(logits_q.sizes() == logits_p.sizes() && logits_q.stride(1) == 1 &&
                  logits_q.scalar_type() == logits_p.scalar_type() && logits_q.device() == logits_p.device(),
              "f_divergence: logits_q must match logits_p in shape, dtype and device, with a unit vocab stride");
  TORCH_CHECK(logits_p.size(1) > 0 || logits_p.size(0) == 0, "f_divergence: the vocab dim must not be empty");
  if (mask.has_value()) {
    TORCH_CHECK(mask->dim() == 1 && mask->size(0) == logits_p.size(0) && mask->scalar_type() == at::kBool &&
                    mask->is_contiguous() && mask->device() == logits_p.device(),
                "f_divergence: mask must be a contiguous bool tensor with one entry per row");
  }
  TORCH_CHECK(temperature > 0, "f_divergence: temperature must be positive");
  Params params;
  TORCH_CHECK(make_params(kind, alpha, temperature, &params), "f_divergence: unknown kind '", kind,
              "' (or alpha in {0, 1} for kind 'alpha')");
  return params;
}

// The second pass alone (js, tv over some vocab columns, the rows' lse_p and lse_q given in stats (rows, 3)).
inline Params check_second_pass_inputs(const at::Tensor& logits_p, const at::Tensor& logits_q,
                                       const c10::optional<at::Tensor>& mask, const at::Tensor& stats,
                                       const std::string& kind, double temperature) {
  const Params p = check_forward_inputs(logits_p, logits_q, mask, kind, 0.0, temperature);
  TORCH_CHECK(two_pass(p.kind), "f_divergence_second_pass: kind must be 'js' or 'tv', got '", kind, "'");
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == logits_p.size(0) && stats.size(1) == 3 &&
                  stats.scalar_type() == at::kFloat && stats.is_contiguous() && stats.device() == logits_p.device(),
              "f_divergence_second_pass: stats must be contiguous float32 (rows, 3) holding (lse_p, lse_q, unused)");
  return p;
}

inline void check_backward_inputs(const at::Tensor& grad_out, const at::Tensor& logits_p, const at::Tensor& out,
                                  const at::Tensor& stats) {
  const int64_t rows = logits_p.size(0);
  for (const at::Tensor* t : {&grad_out, &out}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == rows && t->scalar_type() == at::kFloat && t->is_contiguous() &&
                    t->device() == logits_p.device(),
                "f_divergence_backward: grad_out and out must be contiguous float32 with one entry per row");
  }
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == rows && stats.size(1) == 3 && stats.scalar_type() == at::kFloat &&
                  stats.is_contiguous() && stats.device() == logits_p.device(),
              "f_divergence_backward: stats must be the contiguous float32 (rows, 3) from the forward");
}

}  // namespace divergence
}  // namespace rlhf_fast
