// Per-token math of the losses family, shared by the CPU and CUDA kernels (host and device), so that every
// backend computes the same values, clip decisions and gradients.
#pragma once
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#ifndef __CUDA_ARCH__
#include <bit>

#include "cpu/vec_exp.h"
#endif

#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#ifdef __CUDACC__
#define RLHF_FAST_HOST_DEVICE __host__ __device__
#else
#define RLHF_FAST_HOST_DEVICE
#endif

// The KL estimators must inline into the elementwise loops (GCC otherwise keeps k3_value as a call and the loop
// does not vectorise). Forcing it on the PPO per-token math instead stops GCC vectorising those loops.
#ifdef __CUDACC__
#define RLHF_FAST_TOKEN_FN __host__ __device__ __forceinline__
#else
#define RLHF_FAST_TOKEN_FN inline __attribute__((always_inline))
#endif

namespace rlhf_fast {
namespace losses {

// Branch-free helpers, so that the CPU loops vectorise (under `omp simd`) and the GPU code has no divergence.
// c ? a : b. On the host as an integer blend: GCC turns float ternaries into branches, which mispredict on
// random data and keep the loops from vectorising.
RLHF_FAST_HOST_DEVICE inline float select(bool c, float a, float b) {
#ifdef __CUDA_ARCH__
  return c ? a : b;
#else
  const uint32_t keep = 0u - static_cast<uint32_t>(c);
  return std::bit_cast<float>((std::bit_cast<uint32_t>(a) & keep) | (std::bit_cast<uint32_t>(b) & ~keep));
#endif
}

// clamp that keeps a nan (as torch.clamp does).
RLHF_FAST_HOST_DEVICE inline float clampf(float x, float lo, float hi) {
  return select(x < lo, lo, select(x > hi, hi, x));
}

// exp(x) for |x| <= 20, the only range used here (every argument is clamped first): the hardware exp on the
// device, the vectorisable polynomial of cpu/vec_exp.h on the host.
RLHF_FAST_HOST_DEVICE inline float exp_small(float x) {
#ifdef __CUDA_ARCH__
  return expf(x);
#else
  return exp_poly(x);
#endif
}

// exp(x) - 1 for |x| <= 20 to about 2 ulp, also near 0 where exp(x) - 1 cancels. On the device CUDA's expm1f,
// which nvcc's --use_fast_math leaves accurate (it has no intrinsic to be swapped for, unlike expf); on the host
// the vectorisable polynomial of cpu/vec_exp.h.
RLHF_FAST_HOST_DEVICE inline float expm1_small(float x) {
#ifdef __CUDA_ARCH__
  return expm1f(x);
#else
  return expm1_poly(x);
#endif
}

// (exp(x) - 1 - x) / x^2 by its Taylor series through x^8/8!: within 1e-8 relative for |x| <= ln2/2.
RLHF_FAST_HOST_DEVICE inline float exp_tail(float x) {
  float p = 1.f / 40320.f;
  p = p * x + 1.f / 5040.f;
  p = p * x + 1.f / 720.f;
  p = p * x + 1.f / 120.f;
  p = p * x + 1.f / 24.f;
  p = p * x + 1.f / 6.f;
  return p * x + 0.5f;
}

constexpr float kSeriesBound = 0.25f;

// exp(x) - x - 1 to about 1e-6 relative, given expm1_x = expm1_small(x), |x| <= 20: x^2 exp_tail(x) below
// |x| = 0.25, expm1(x) - x above (where the subtraction loses at most a factor 8). Written as exp(x) - x - 1 it
// loses everything near 0: the result is about x^2/2 while exp(x) carries an absolute error near 1e-7. Both
// branches are computed and one is selected, so that the loops vectorise.
RLHF_FAST_TOKEN_FN float exp_minus_linear(float x, float expm1_x) {
  return select((x < kSeriesBound) & (x > -kSeriesBound), x * x * exp_tail(x), expm1_x - x);
}

// ---- kl_penalty ----

enum class KlKind : int { K1, Abs, K2, K3, K1Plus, K3Plus };

inline KlKind parse_kl_kind(const std::string& kind) {
  if (kind == "k1") return KlKind::K1;
  if (kind == "abs") return KlKind::Abs;
  if (kind == "k2" || kind == "mse") return KlKind::K2;
  if (kind == "k3" || kind == "low_var_kl") return KlKind::K3;
  if (kind == "k1+") return KlKind::K1Plus;
  if (kind == "k3+") return KlKind::K3Plus;
  TORCH_CHECK(false, "kl_penalty: unknown kind '", kind, "' (k1, abs, k2/mse, k3/low_var_kl, k1+, k3+)");
}

// Calls f(std::integral_constant<KlKind, K>{}) so the per-element loop is compiled once per kind.
template <typename F>
inline void dispatch_kl_kind(KlKind kind, F&& f) {
  switch (kind) {
    case KlKind::K1:
      return f(std::integral_constant<KlKind, KlKind::K1>{});
    case KlKind::Abs:
      return f(std::integral_constant<KlKind, KlKind::Abs>{});
    case KlKind::K2:
      return f(std::integral_constant<KlKind, KlKind::K2>{});
    case KlKind::K3:
      return f(std::integral_constant<KlKind, KlKind::K3>{});
    case KlKind::K1Plus:
      return f(std::integral_constant<KlKind, KlKind::K1Plus>{});
    case KlKind::K3Plus:
      return f(std::integral_constant<KlKind, KlKind::K3Plus>{});
  }
}

constexpr float kLogRatioClamp = 20.f;  // verl: the log-ratio is clamped to +-20 before exp
constexpr float kK3Clamp = 10.f;        // verl: the k3 estimate is clamped to +-10

// k3 (low_var_kl) as verl writes it: d = clamp(ref - logp, +-20); clamp(exp(d) - d - 1, +-10).
RLHF_FAST_TOKEN_FN float k3_value(float logp, float ref) {
  const float d = clampf(ref - logp, -kLogRatioClamp, kLogRatioClamp);
  return clampf(exp_minus_linear(d, expm1_small(d)), -kK3Clamp, kK3Clamp);
}

template <KlKind K>
RLHF_FAST_TOKEN_FN float kl_value(float logp, float ref) {
  const float diff = logp - ref;
  if constexpr (K == KlKind::K1 || K == KlKind::K1Plus) return diff;
  if constexpr (K == KlKind::Abs) return select(diff < 0.f, -diff, diff);
  if constexpr (K == KlKind::K2) return 0.5f * diff * diff;
  if constexpr (K == KlKind::K3 || K == KlKind::K3Plus) return k3_value(logp, ref);
  return 0.f;
}

// d kl / d logp; d kl / d ref is its negative for every kind (each depends on logp - ref only).
// The "+" kinds are straight-through: the value of k1 / k3 with the gradient of k2.
template <KlKind K>
RLHF_FAST_TOKEN_FN float kl_grad(float logp, float ref) {
  const float diff = logp - ref;
  if constexpr (K == KlKind::K1) return 1.f;
  if constexpr (K == KlKind::Abs) return select(diff > 0.f, 1.f, select(diff < 0.f, -1.f, 0.f));
  if constexpr (K == KlKind::K2 || K == KlKind::K1Plus || K == KlKind::K3Plus) return diff;
  if constexpr (K == KlKind::K3) {
    // Each clamp passes the gradient inside its closed range, as torch.clamp does; d/dlogp = -d/dd = 1 - exp(d),
    // taken as -expm1(d) (1 - exp(d) cancels for small d as the value does).
    const float d = ref - logp;
    const float clamped = clampf(d, -kLogRatioClamp, kLogRatioClamp);
    const float expm1_d = expm1_small(clamped);
    const float value = exp_minus_linear(clamped, expm1_d);
    const bool passes = (value <= kK3Clamp) & (value >= -kK3Clamp) & (d >= -kLogRatioClamp) & (d <= kLogRatioClamp);
    return select(passes, -expm1_d, 0.f);
  }
  return 0.f;
}

// ---- loss aggregation ----

// verl's loss_agg_mode. Rows without a valid token are left out of every seq-mean mode.
enum class Agg : int { TokenMean, TokenSum, SeqMeanTokenSum, SeqMeanTokenMean, SeqMeanTokenSumNorm };

inline Agg parse_agg(const std::string& mode) {
  if (mode == "token-mean") return Agg::TokenMean;
  if (mode == "token-sum") return Agg::TokenSum;
  if (mode == "seq-mean-token-sum") return Agg::SeqMeanTokenSum;
  if (mode == "seq-mean-token-mean") return Agg::SeqMeanTokenMean;
  if (mode == "seq-mean-token-sum-norm") return Agg::SeqMeanTokenSumNorm;
  TORCH_CHECK(false, "unknown agg mode '", mode,
              "' (token-mean, token-sum, seq-mean-token-sum, seq-mean-token-mean, seq-mean-token-sum-norm)");
}

// Running sums of a loss kernel over its tokens / rows, in this order in every partial buffer.
enum Total : int {
  kLossSum,      // sum of loss over valid tokens
  kRowMeanSum,   // sum over rows with a valid token of (row loss sum / row valid count)
  kValidTokens,  // number of valid tokens
  kValidRows,    // number of rows with at least one valid token
  kClipped,      // valid tokens where the clipped term is the active one
  kNegLogRatio,  // sum of old_logp - logp (log-ratio clamped), policy loss only
  kRatio,        // sum of the ratio, policy loss only
  kTotals
};

// The kernels' second output: (clipfrac, approx_kl, ratio_mean, valid_tokens, valid_rows), fp32.
// The last two feed the backward's normalisation without a host sync.
constexpr int kStats = 5;

// What the aggregate divides by: valid tokens (token-mean), 1 (token-sum), valid rows (seq-mean-token-sum,
// seq-mean-token-mean), valid rows x steps (seq-mean-token-sum-norm); 0 when there is nothing valid (then the
// loss and its gradient are 0). seq-mean-token-mean's numerator is the sum of the row means.
template <typename acc_t>
RLHF_FAST_HOST_DEVICE inline acc_t agg_divisor(Agg agg, acc_t tokens, acc_t valid_rows, int64_t steps) {
  if (agg == Agg::TokenMean) return tokens;
  if (agg == Agg::TokenSum) return tokens > 0 ? acc_t(1) : acc_t(0);
  if (agg == Agg::SeqMeanTokenSumNorm) return valid_rows * static_cast<acc_t>(steps);
  return valid_rows;
}

template <typename acc_t>
RLHF_FAST_HOST_DEVICE inline void finalize(const acc_t* totals, Agg agg, int64_t steps, float* loss, float* stats) {
  const acc_t tokens = totals[kValidTokens], valid_rows = totals[kValidRows];
  const acc_t divisor = agg_divisor(agg, tokens, valid_rows, steps);
  const acc_t numerator = agg == Agg::SeqMeanTokenMean ? totals[kRowMeanSum] : totals[kLossSum];
  *loss = static_cast<float>(divisor > 0 ? numerator / divisor : acc_t(0));
  const acc_t per_token = tokens > 0 ? acc_t(1) / tokens : acc_t(0);
  stats[0] = static_cast<float>(totals[kClipped] * per_token);
  stats[1] = static_cast<float>(totals[kNegLogRatio] * per_token);
  stats[2] = static_cast<float>(totals[kRatio] * per_token);
  stats[3] = static_cast<float>(tokens);
  stats[4] = static_cast<float>(valid_rows);
}

// d loss / d (token loss) for a valid token, except seq-mean-token-mean, whose weight also divides by the
// token's row count (see row_weight).
RLHF_FAST_HOST_DEVICE inline float token_weight(Agg agg, int64_t steps, const float* stats) {
  const float divisor = agg_divisor(agg, stats[3], stats[4], steps);
  return divisor > 0.f ? 1.f / divisor : 0.f;
}

RLHF_FAST_HOST_DEVICE inline float row_weight(Agg agg, float row_valid) {
  return agg != Agg::SeqMeanTokenMean ? 1.f : (row_valid > 0.f ? 1.f / row_valid : 0.f);
}

// ---- per-token PPO losses ----

struct TokenLoss {
  float loss;
  bool clipped;
  float neg_log_ratio;
  float ratio;
};

// pg = max(-A r, -A clamp(r, 1 - clip_low, 1 + clip_high)), r = exp(clamp(logp - old, +-20)); with a dual clip
// c > 1, where A < 0: min(pg, -A c). Inputs (a, b, c) = (logp, old_logp, advantages); gradient to logp.
struct PolicyMath {
  float clip_low, clip_high, dual_clip;
  bool has_dual_clip;

  RLHF_FAST_HOST_DEVICE inline TokenLoss eval(float logp, float old_logp, float adv, float* grad) const {
    const float log_ratio = logp - old_logp;
    const float clamped = clampf(log_ratio, -kLogRatioClamp, kLogRatioClamp);
    const float ratio = exp_small(clamped);
    const float unclipped = -adv * ratio;
    const float clipped = -adv * clampf(ratio, 1.f - clip_low, 1.f + clip_high);
    const bool clip_active = clipped > unclipped;  // then ratio lies outside the clip range: no gradient
    const float pg = select(clip_active, clipped, unclipped);
    const float dual_bound = -adv * dual_clip;
    const bool dual_active = has_dual_clip & (adv < 0.f) & (pg > dual_bound);
    if (grad) {
      const bool in_clamp = (log_ratio >= -kLogRatioClamp) & (log_ratio <= kLogRatioClamp);
      *grad = select((!clip_active) & (!dual_active) & in_clamp, unclipped, 0.f);  // d(-A r)/dlogp = -A r
    }
    return {select(dual_active, dual_bound, pg), clip_active, -clamped, ratio};
  }
};

// The op arguments (clip_low, clip_high, dual_clip or none) as the PolicyMath of the kernels.
inline PolicyMath policy_math(double clip_low, double clip_high, c10::optional<double> dual_clip) {
  return {static_cast<float>(clip_low), static_cast<float>(clip_high), static_cast<float>(dual_clip.value_or(0.0)),
          dual_clip.has_value()};
}

// 0.5 max((V - R)^2, (clamp(V, old - clip, old + clip) - R)^2); (a, b, c) = (values, old_values, returns);
// gradient to values.
struct ValueMath {
  float clip;

  RLHF_FAST_HOST_DEVICE inline TokenLoss eval(float value, float old_value, float ret, float* grad) const {
    const float err = value - ret;
    const float clipped_err = clampf(value, old_value - clip, old_value + clip) - ret;
    const float unclipped = err * err, clipped = clipped_err * clipped_err;
    const bool clip_active = clipped > unclipped;  // then V lies outside old +- clip: no gradient
    if (grad) *grad = select(clip_active, 0.f, err);
    return {0.5f * select(clip_active, clipped, unclipped), clip_active, 0.f, 0.f};
  }
};

}  // namespace losses
}  // namespace rlhf_fast
