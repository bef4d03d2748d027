// Code of the advantages family shared by the CPU and CUDA kernels (host and device).
#pragma once
#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define RLHF_FAST_HOST_DEVICE __host__ __device__
#else
#define RLHF_FAST_HOST_DEVICE
#endif

namespace rlhf_fast {

// One group of scores -> advantages: (x - mean) * scale, with scale n/(n-1) for leave-one-out (RLOO),
// 1/(unbiased std + eps) for normalised GRPO, 1 otherwise; a group of one has no baseline and gets 0.
template <typename scalar_t>
RLHF_FAST_HOST_DEVICE inline void group_advantages_row(const scalar_t* x, int64_t n, bool norm_std, bool leave_one_out,
                                                       double eps, float* out) {
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += static_cast<double>(x[i]);
  const double mean = sum / n;
  double scale = 1.0;
  if (leave_one_out) {
    scale = n > 1 ? static_cast<double>(n) / (n - 1) : 0.0;
  } else if (norm_std) {
    double sq = 0;
    for (int64_t i = 0; i < n; ++i) {
      const double d = static_cast<double>(x[i]) - mean;
      sq += d * d;
    }
    const double std = n > 1 ? sqrt(sq / (n - 1)) : 0.0;
    scale = 1.0 / (std + eps);
  }
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>((static_cast<double>(x[i]) - mean) * scale);
}

}  // namespace rlhf_fast
