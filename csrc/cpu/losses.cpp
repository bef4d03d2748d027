// CPU kernels of the losses family: the elementwise KL penalty (forward and backward) and the fused PPO policy
// and value losses. A PPO loss is one pass over the tokens: per-token loss, clip decision and statistics, then
// the masked aggregation; the per-token loops are branch-free (selects as integer blends, a polynomial exp) so
// that they vectorise under omp simd. The extension is otherwise built for baseline x86-64 (SSE2): the loops are
// compiled for AVX-512, AVX2 and baseline and picked at load time (target_clones), and bf16 is converted by inline
// bit operations (through c10's conversions GCC left the bf16 backward loop scalar: 5x slower). The PPO token
// loops walk a row in blocks of kBlock tokens converted to float, the mask widened to int32.
// Rows are grouped into chunks of about kChunkTokens tokens; each chunk's running sums
// go to its own slot and the slots are added in order afterwards, so the result does not depend on the
// number of threads. The backward is one more pass writing d loss / d input.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <bit>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../losses_common.h"
#include "simd_clones.h"

namespace rlhf_fast {
namespace {

using namespace losses;

template <typename scalar_t>
inline float to_float(scalar_t x) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    return std::bit_cast<float>(static_cast<uint32_t>(x.x) << 16);
  } else {
    return static_cast<float>(x);
  }
}

// bf16: round to nearest even, nan to the quiet nan 0x7fc0 (as c10), the nan case an integer blend.
template <typename scalar_t>
inline scalar_t from_float(float v) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    const uint32_t bits = std::bit_cast<uint32_t>(v);
    const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    const uint32_t is_nan = 0u - static_cast<uint32_t>((bits & 0x7fffffffu) > 0x7f800000u);
    return c10::BFloat16(static_cast<uint16_t>((rounded & ~is_nan) | (0x7fc0u & is_nan)), c10::BFloat16::from_bits());
  } else {
    return static_cast<scalar_t>(v);
  }
}

template <KlKind K, typename scalar_t>
RLHF_FAST_SIMD_CLONES void kl_values(const scalar_t* a, const scalar_t* b, float* out, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = kl_value<K>(to_float(a[i]), to_float(b[i]));
}

template <KlKind K, typename scalar_t>
RLHF_FAST_SIMD_CLONES void kl_grads(const float* grad, const scalar_t* a, const scalar_t* b, scalar_t* out, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = from_float<scalar_t>(grad[i] * kl_grad<K>(to_float(a[i]), to_float(b[i])));
}

constexpr int64_t kChunkTokens = 16384;
constexpr int64_t kElementGrain = 32768;

void check_pair(const char* op, const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name) {
  TORCH_CHECK(a.is_contiguous() && b.is_contiguous(), op, ": ", a_name, " and ", b_name, " must be contiguous");
  TORCH_CHECK(a.sizes() == b.sizes(), op, ": ", b_name, " must have the shape of ", a_name);
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": ", b_name, " must have the dtype of ", a_name);
}

at::Tensor kl_penalty_cpu(const at::Tensor& logp, const at::Tensor& ref_logp, c10::string_view kind) {
  check_pair("kl_penalty", logp, "logp", ref_logp, "ref_logp");
  const KlKind k = parse_kl_kind(std::string(kind));
  auto out = at::empty(logp.sizes(), logp.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logp.scalar_type(), "kl_penalty_cpu", [&] {
    const scalar_t* a = logp.data_ptr<scalar_t>();
    const scalar_t* b = ref_logp.data_ptr<scalar_t>();
    dispatch_kl_kind(k, [&](auto tag) {
      at::parallel_for(0, logp.numel(), kElementGrain, [&](int64_t begin, int64_t end) {
        kl_values<decltype(tag)::value>(a + begin, b + begin, o + begin, end - begin);
      });
    });
  });
  return out;
}

// grad_logp = grad * d kl / d logp, in the inputs' dtype; grad_ref is its negative (taken by the caller).
at::Tensor kl_penalty_backward_cpu(const at::Tensor& grad, const at::Tensor& logp, const at::Tensor& ref_logp,
                                   c10::string_view kind) {
  check_pair("kl_penalty_backward", logp, "logp", ref_logp, "ref_logp");
  TORCH_CHECK(grad.sizes() == logp.sizes() && grad.scalar_type() == at::kFloat && grad.is_contiguous(),
              "kl_penalty_backward: grad must be contiguous float32 shaped like logp");
  const KlKind k = parse_kl_kind(std::string(kind));
  auto out = at::empty_like(logp);
  const float* g = grad.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logp.scalar_type(), "kl_penalty_backward_cpu", [&] {
    const scalar_t* a = logp.data_ptr<scalar_t>();
    const scalar_t* b = ref_logp.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    dispatch_kl_kind(k, [&](auto tag) {
      at::parallel_for(0, logp.numel(), kElementGrain, [&](int64_t begin, int64_t end) {
        kl_grads<decltype(tag)::value>(g + begin, a + begin, b + begin, o + begin, end - begin);
      });
    });
  });
  return out;
}

// The three same-shaped float inputs of a PPO loss, as (rows, steps), and the optional bool mask.
struct LossInputs {
  int64_t rows, steps;
  const bool* mask;
};

LossInputs check_loss_inputs(const char* op, const at::Tensor& a, const char* a_name, const at::Tensor& b,
                             const char* b_name, const at::Tensor& c, const char* c_name,
                             const c10::optional<at::Tensor>& mask) {
  TORCH_CHECK(a.dim() == 2, op, ": ", a_name, " must be 2-D (rows, steps)");
  check_pair(op, a, a_name, b, b_name);
  check_pair(op, a, a_name, c, c_name);
  if (mask.has_value())
    TORCH_CHECK(mask->sizes() == a.sizes() && mask->scalar_type() == at::kBool && mask->is_contiguous(), op,
                ": mask must be a contiguous bool tensor shaped like ", a_name);
  return {a.size(0), a.size(1), mask.has_value() ? mask->data_ptr<bool>() : nullptr};
}

// The token loops run over blocks of a row whose inputs are float and whose mask is widened to 32 bits: with
// byte loads in them GCC vectorises them 4 wide whatever the vector unit, and with bf16 loads in part 8 wide.
constexpr int64_t kBlock = 256;

inline void widen_mask(const bool* mask, int64_t n, int32_t* keep) {
  for (int64_t i = 0; i < n; ++i) keep[i] = reinterpret_cast<const uint8_t*>(mask)[i];
}

// The float values of x[0, n): x itself for float, else converted into buf.
template <typename scalar_t>
inline const float* as_float(const scalar_t* x, int64_t n, float* buf) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return x;
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = to_float(x[i]);
    return buf;
  }
}

// (loss sum, valid tokens, clipped, -log-ratio sum, ratio sum) of one row. Branch-free so that it vectorises:
// every token is evaluated and masked ones (which may hold inf/nan) are dropped by a select, never multiplied.
template <bool kHasMask, typename scalar_t, typename Math>
RLHF_FAST_SIMD_CLONES std::array<float, 5> row_sums(const scalar_t* a, const scalar_t* b, const scalar_t* c,
                                                    const bool* mask, int64_t steps, const Math& math_in) {
  const Math math = math_in;  // a local copy: its fields stay in registers instead of being reloaded per token
  float loss = 0.f, valid = 0.f, clipped = 0.f, neg_log_ratio = 0.f, ratio = 0.f;
  float a_buf[kBlock], b_buf[kBlock], c_buf[kBlock];
  int32_t keep[kBlock];
  for (int64_t start = 0; start < steps; start += kBlock) {
    const int64_t n = std::min(kBlock, steps - start);
    const float* fa = as_float(a + start, n, a_buf);
    const float* fb = as_float(b + start, n, b_buf);
    const float* fc = as_float(c + start, n, c_buf);
    if constexpr (kHasMask) widen_mask(mask + start, n, keep);
#pragma omp simd reduction(+ : loss, valid, clipped, neg_log_ratio, ratio)
    for (int64_t i = 0; i < n; ++i) {
      bool take = true;
      if constexpr (kHasMask) take = keep[i] != 0;
      const TokenLoss token = math.eval(fa[i], fb[i], fc[i], nullptr);
      loss += select(take, token.loss, 0.f);
      valid += select(take, 1.f, 0.f);
      clipped += select(take & token.clipped, 1.f, 0.f);
      neg_log_ratio += select(take, token.neg_log_ratio, 0.f);
      ratio += select(take, token.ratio, 0.f);
    }
  }
  return {loss, valid, clipped, neg_log_ratio, ratio};
}

template <typename scalar_t, typename Math>
void loss_forward(const LossInputs& in, const scalar_t* a, const scalar_t* b, const scalar_t* c, const Math& math,
                  Agg agg, float* loss, float* stats) {
  const int64_t rows_per_chunk = std::max<int64_t>(1, kChunkTokens / std::max<int64_t>(1, in.steps));
  const int64_t chunks = (in.rows + rows_per_chunk - 1) / rows_per_chunk;
  std::vector<std::array<double, kTotals>> partial(chunks);
  at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      std::array<double, kTotals> acc{};
      const int64_t row_end = std::min(in.rows, (chunk + 1) * rows_per_chunk);
      for (int64_t row = chunk * rows_per_chunk; row < row_end; ++row) {
        const int64_t begin = row * in.steps;
        const auto sums = in.mask ? row_sums<true>(a + begin, b + begin, c + begin, in.mask + begin, in.steps, math)
                                  : row_sums<false>(a + begin, b + begin, c + begin, nullptr, in.steps, math);
        const double row_sum = sums[0], row_valid = sums[1];
        acc[kLossSum] += row_sum;
        acc[kValidTokens] += row_valid;
        acc[kClipped] += sums[2];
        acc[kNegLogRatio] += sums[3];
        acc[kRatio] += sums[4];
        if (row_valid > 0) {
          acc[kRowMeanSum] += row_sum / row_valid;
          acc[kValidRows] += 1;
        }
      }
      partial[chunk] = acc;
    }
  });
  std::array<double, kTotals> totals{};
  for (const auto& acc : partial)
    for (int k = 0; k < kTotals; ++k) totals[k] += acc[k];
  finalize(totals.data(), agg, in.steps, loss, stats);
}

// grad[t] = w * d loss_t / d a[t] over one row, 0 where the mask is false.
template <bool kHasMask, typename scalar_t, typename Math>
RLHF_FAST_SIMD_CLONES void row_grads(const scalar_t* a, const scalar_t* b, const scalar_t* c, const bool* mask,
                                     int64_t steps, const Math& math_in, float w, scalar_t* grad) {
  const Math math = math_in;
  float a_buf[kBlock], b_buf[kBlock], c_buf[kBlock], grad_buf[kBlock];
  int32_t keep[kBlock];
  for (int64_t start = 0; start < steps; start += kBlock) {
    const int64_t n = std::min(kBlock, steps - start);
    const float* fa = as_float(a + start, n, a_buf);
    const float* fb = as_float(b + start, n, b_buf);
    const float* fc = as_float(c + start, n, c_buf);
    if constexpr (kHasMask) widen_mask(mask + start, n, keep);
    float* out = grad_buf;
    if constexpr (std::is_same_v<scalar_t, float>) out = grad + start;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      float d = 0.f;
      math.eval(fa[i], fb[i], fc[i], &d);
      bool take = true;
      if constexpr (kHasMask) take = keep[i] != 0;
      out[i] = select(take, w * d, 0.f);
    }
    if constexpr (!std::is_same_v<scalar_t, float>)
      for (int64_t i = 0; i < n; ++i) grad[start + i] = from_float<scalar_t>(grad_buf[i]);
  }
}

template <typename scalar_t, typename Math>
void loss_backward(const LossInputs& in, const scalar_t* a, const scalar_t* b, const scalar_t* c, const Math& math,
                   Agg agg, float grad_loss, const float* stats, scalar_t* grad) {
  const float scale = grad_loss * token_weight(agg, in.steps, stats);
  const int64_t grain = std::max<int64_t>(1, kChunkTokens / std::max<int64_t>(1, in.steps));
  at::parallel_for(0, in.rows, grain, [&](int64_t row_begin, int64_t row_end) {
    for (int64_t row = row_begin; row < row_end; ++row) {
      const int64_t begin = row * in.steps, end = begin + in.steps;
      float row_valid = static_cast<float>(in.steps);
      if (in.mask && agg == Agg::SeqMeanTokenMean) {
        row_valid = 0;
#pragma omp simd reduction(+ : row_valid)
        for (int64_t t = begin; t < end; ++t) row_valid += static_cast<float>(in.mask[t]);
      }
      const float w = scale * row_weight(agg, row_valid);
      if (in.mask)
        row_grads<true>(a + begin, b + begin, c + begin, in.mask + begin, in.steps, math, w, grad + begin);
      else
        row_grads<false>(a + begin, b + begin, c + begin, nullptr, in.steps, math, w, grad + begin);
    }
  });
}

template <typename Math>
std::tuple<at::Tensor, at::Tensor> loss_forward_cpu(const char* op, const at::Tensor& a, const char* a_name,
                                                    const at::Tensor& b, const char* b_name, const at::Tensor& c,
                                                    const char* c_name, const c10::optional<at::Tensor>& mask,
                                                    const Math& math, c10::string_view agg) {
  const LossInputs in = check_loss_inputs(op, a, a_name, b, b_name, c, c_name, mask);
  const Agg mode = parse_agg(std::string(agg));
  auto loss = at::empty({}, a.options().dtype(at::kFloat));
  auto stats = at::empty({kStats}, a.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "ppo_loss_forward_cpu", [&] {
    loss_forward(in, a.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(), math, mode,
                 loss.data_ptr<float>(), stats.data_ptr<float>());
  });
  return {loss, stats};
}

template <typename Math>
at::Tensor loss_backward_cpu(const char* op, const at::Tensor& grad_loss, const at::Tensor& a, const char* a_name,
                             const at::Tensor& b, const char* b_name, const at::Tensor& c, const char* c_name,
                             const c10::optional<at::Tensor>& mask, const at::Tensor& stats, const Math& math,
                             c10::string_view agg) {
  const LossInputs in = check_loss_inputs(op, a, a_name, b, b_name, c, c_name, mask);
  TORCH_CHECK(grad_loss.numel() == 1 && grad_loss.scalar_type() == at::kFloat, op,
              ": grad_loss must be a float32 scalar");
  TORCH_CHECK(stats.numel() == kStats && stats.scalar_type() == at::kFloat && stats.is_contiguous(), op,
              ": stats must be the float32 (", kStats, ",) statistics of the forward");
  const Agg mode = parse_agg(std::string(agg));
  auto grad = at::empty_like(a);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "ppo_loss_backward_cpu", [&] {
    loss_backward(in, a.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(), math, mode,
                  grad_loss.item<float>(), stats.data_ptr<float>(), grad.data_ptr<scalar_t>());
  });
  return grad;
}

std::tuple<at::Tensor, at::Tensor> ppo_policy_loss_cpu(const at::Tensor& logp, const at::Tensor& old_logp,
                                                       const at::Tensor& advantages,
                                                       const c10::optional<at::Tensor>& mask, double clip_low,
                                                       double clip_high, c10::optional<double> dual_clip,
                                                       c10::string_view agg) {
  return loss_forward_cpu("ppo_policy_loss", logp, "logp", old_logp, "old_logp", advantages, "advantages", mask,
                          policy_math(clip_low, clip_high, dual_clip), agg);
}

at::Tensor ppo_policy_loss_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& logp, const at::Tensor& old_logp,
                                        const at::Tensor& advantages, const c10::optional<at::Tensor>& mask,
                                        const at::Tensor& stats, double clip_low, double clip_high,
                                        c10::optional<double> dual_clip, c10::string_view agg) {
  return loss_backward_cpu("ppo_policy_loss_backward", grad_loss, logp, "logp", old_logp, "old_logp", advantages,
                           "advantages", mask, stats, policy_math(clip_low, clip_high, dual_clip), agg);
}

std::tuple<at::Tensor, at::Tensor> ppo_value_loss_cpu(const at::Tensor& values, const at::Tensor& old_values,
                                                      const at::Tensor& returns, const c10::optional<at::Tensor>& mask,
                                                      double clip, c10::string_view agg) {
  return loss_forward_cpu("ppo_value_loss", values, "values", old_values, "old_values", returns, "returns", mask,
                          ValueMath{static_cast<float>(clip)}, agg);
}

at::Tensor ppo_value_loss_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& values,
                                       const at::Tensor& old_values, const at::Tensor& returns,
                                       const c10::optional<at::Tensor>& mask, const at::Tensor& stats, double clip,
                                       c10::string_view agg) {
  return loss_backward_cpu("ppo_value_loss_backward", grad_loss, values, "values", old_values, "old_values", returns,
                           "returns", mask, stats, ValueMath{static_cast<float>(clip)}, agg);
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_fast, CPU, m) {
  m.impl("kl_penalty", &kl_penalty_cpu);
  m.impl("kl_penalty_backward", &kl_penalty_backward_cpu);
  m.impl("ppo_policy_loss", &ppo_policy_loss_cpu);
  m.impl("ppo_policy_loss_backward", &ppo_policy_loss_backward_cpu);
  m.impl("ppo_value_loss", &ppo_value_loss_cpu);
  m.impl("ppo_value_loss_backward", &ppo_value_loss_backward_cpu);
}

}  // namespace rlhf_fast
