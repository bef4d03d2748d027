// CPU kernels of the advantages family: GAE over packed segments, group advantages, masked moments.
// Segments are independent, so they are spread over threads (at::parallel_for runs on OpenMP);
// within a segment the reversed recurrence is walked once, reading each input once.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/TensorIterator.h>  // at::internal::GRAIN_SIZE
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../advantages_common.h"

#include <cmath>
#include <limits>

namespace rlhf_fast {
namespace {

void check_gae_inputs(const at::Tensor& rewards, const at::Tensor& values, const c10::optional<at::Tensor>& mask,
                      const c10::optional<at::Tensor>& last_value, const at::Tensor& cu_seqlens) {
  TORCH_CHECK(rewards.dim() == 1 && rewards.is_contiguous(), "gae: rewards must be 1-D contiguous (packed tokens)");
  TORCH_CHECK(values.sizes() == rewards.sizes() && values.is_contiguous(), "gae: values must match rewards");
  TORCH_CHECK(values.scalar_type() == rewards.scalar_type(), "gae: values and rewards must share a dtype");
  TORCH_CHECK(cu_seqlens.dim() == 1 && cu_seqlens.numel() >= 1 && cu_seqlens.scalar_type() == at::kLong &&
                  cu_seqlens.is_contiguous(),
              "gae: cu_seqlens must be a contiguous 1-D int64 tensor");
  if (mask.has_value()) {
    TORCH_CHECK(mask->sizes() == rewards.sizes() && mask->scalar_type() == at::kBool && mask->is_contiguous(),
                "gae: mask must be a contiguous bool tensor shaped like rewards");
  }
  if (last_value.has_value()) {
    TORCH_CHECK(last_value->dim() == 1 && last_value->numel() == cu_seqlens.numel() - 1 &&
                    last_value->scalar_type() == at::kFloat && last_value->is_contiguous(),
                "gae: last_value must be contiguous float32 with one entry per segment");
  }
}

std::tuple<at::Tensor, at::Tensor> gae_cpu(const at::Tensor& rewards, const at::Tensor& values,
                                           const c10::optional<at::Tensor>& mask,
                                           const c10::optional<at::Tensor>& last_value, const at::Tensor& cu_seqlens,
                                           double gamma, double lam) {
  check_gae_inputs(rewards, values, mask, last_value, cu_seqlens);
  auto advantages = at::empty(rewards.sizes(), rewards.options().dtype(at::kFloat));
  auto returns = at::empty_like(advantages);
  const int64_t segments = cu_seqlens.numel() - 1;
  const int64_t* cu = cu_seqlens.data_ptr<int64_t>();
  const bool* m = mask.has_value() ? mask->data_ptr<bool>() : nullptr;
  const float* boot = last_value.has_value() ? last_value->data_ptr<float>() : nullptr;
  float* adv = advantages.data_ptr<float>();
  float* ret = returns.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rewards.scalar_type(), "gae_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* r = rewards.data_ptr<scalar_t>();
    const scalar_t* v = values.data_ptr<scalar_t>();
    const acc_t g = static_cast<acc_t>(gamma), gl = static_cast<acc_t>(gamma * lam);
    // about at::internal::GRAIN_SIZE tokens per thread: small batches run inline, without a parallel region
    const int64_t tokens_per_segment = std::max<int64_t>(1, rewards.numel() / std::max<int64_t>(1, segments));
    const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / tokens_per_segment);
    at::parallel_for(0, segments, grain, [&](int64_t s_begin, int64_t s_end) {
      for (int64_t s = s_begin; s < s_end; ++s) {
        acc_t next_value = boot ? static_cast<acc_t>(boot[s]) : acc_t(0);
        acc_t running = 0;
        for (int64_t t = cu[s + 1] - 1; t >= cu[s]; --t) {
          if (m && !m[t]) {
            adv[t] = 0.f;
            ret[t] = 0.f;
            continue;
          }
          const acc_t value = static_cast<acc_t>(v[t]);
          running = static_cast<acc_t>(r[t]) + g * next_value - value + gl * running;
          adv[t] = static_cast<float>(running);
          ret[t] = static_cast<float>(running + value);
          next_value = value;
        }
      }
    });
  });
  return {advantages, returns};
}

at::Tensor group_advantages_cpu(const at::Tensor& scores, int64_t group_size, bool norm_std, bool leave_one_out,
                                double eps) {
  TORCH_CHECK(scores.dim() == 1 && scores.is_contiguous(), "group_advantages: scores must be 1-D contiguous");
  TORCH_CHECK(group_size >= 1 && scores.numel() % group_size == 0,
              "group_advantages: group_size must divide the number of scores");
  auto out = at::empty(scores.sizes(), scores.options().dtype(at::kFloat));
  const int64_t groups = scores.numel() / group_size;
  float* o = out.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "group_advantages_cpu", [&] {
    const scalar_t* s = scores.data_ptr<scalar_t>();
    at::parallel_for(0, groups, 64, [&](int64_t g_begin, int64_t g_end) {
      for (int64_t g = g_begin; g < g_end; ++g) {
        group_advantages_row(s + g * group_size, group_size, norm_std, leave_one_out, eps, o + g * group_size);
      }
    });
  });
  return out;
}

template <typename scalar_t>
void accumulate_moments(const scalar_t* x, const bool* mask, int64_t n, double* out) {
  double count = 0, sum = 0, sumsq = 0;
#pragma omp parallel for reduction(+ : count, sum, sumsq) schedule(static) if (n >= at::internal::GRAIN_SIZE)
  for (int64_t i = 0; i < n; ++i) {
    if (mask && !mask[i]) continue;  // a branch, not a multiply: masked entries may hold inf/nan
    const double value = static_cast<double>(x[i]);
    count += 1;
    sum += value;
    sumsq += value * value;
  }
  out[0] = count;
  out[1] = sum;
  out[2] = sumsq;
}

at::Tensor masked_moments_cpu(const at::Tensor& x, const c10::optional<at::Tensor>& mask) {
  TORCH_CHECK(x.is_contiguous(), "masked_moments: x must be contiguous");
  if (mask.has_value()) {
    TORCH_CHECK(mask->sizes() == x.sizes() && mask->scalar_type() == at::kBool && mask->is_contiguous(),
                "masked_moments: mask must be a contiguous bool tensor shaped like x");
  }
  auto out = at::empty({3}, x.options().dtype(at::kDouble));
  const bool* m = mask.has_value() ? mask->data_ptr<bool>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "masked_moments_cpu", [&] {
    accumulate_moments(x.data_ptr<scalar_t>(), m, x.numel(), out.data_ptr<double>());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_fast, CPU, m) {
  m.impl("gae", &gae_cpu);
  m.impl("group_advantages", &group_advantages_cpu);
  m.impl("masked_moments", &masked_moments_cpu);
}

}  // namespace rlhf_fast
