// CUDA kernels of the advantages family.
//
// GAE is a reversed linear recurrence. Per token the state x = (running advantage a, next value nv) moves by
// an affine map: a valid token sends (a, nv) -> (gl*a + g*nv + r - v, v); a masked token is the identity.
// Affine maps compose associatively, so one block per segment scans tiles of the segment from the end:
// each thread folds its ITEMS tokens into one map, the block scans the maps (warp shuffles, then warp
// totals), and every thread replays its tokens from the state it receives. Inputs are read once, outputs
// written once.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../advantages_common.h"

namespace rlhf_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kItems = 4;
constexpr int kTile = kThreads * kItems;
constexpr int kWarps = kThreads / 32;

// x' = [[p, q], [0, s]] x + [c1, c2], x = (a, nv).
struct Affine {
  float p, q, c1, s, c2;
};

__device__ __forceinline__ Affine identity_map() { return {1.f, 0.f, 0.f, 1.f, 0.f}; }

// The map that applies `first`, then `second`.
__device__ __forceinline__ Affine then(const Affine& first, const Affine& second) {
  return {second.p * first.p, second.p * first.q + second.q * first.s,
          second.p * first.c1 + second.q * first.c2 + second.c1, second.s * first.s, second.s * first.c2 + second.c2};
}

__device__ __forceinline__ Affine shfl_down(const Affine& x, int offset) {
  const unsigned all = 0xffffffffu;
  return {__shfl_down_sync(all, x.p, offset), __shfl_down_sync(all, x.q, offset), __shfl_down_sync(all, x.c1, offset),
          __shfl_down_sync(all, x.s, offset), __shfl_down_sync(all, x.c2, offset)};
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    gae_kernel(const scalar_t* __restrict__ rewards, const scalar_t* __restrict__ values, const bool* __restrict__ mask,
               const float* __restrict__ last_value, const int64_t* __restrict__ cu_seqlens, float gamma,
               float gamma_lam, float* __restrict__ advantages, float* __restrict__ returns) {
  __shared__ Affine warp_total[kWarps];
  __shared__ Affine later_warps[kWarps];
  __shared__ float carry[2];

  const int seg = blockIdx.x;
  const int64_t start = cu_seqlens[seg], end = cu_seqlens[seg + 1];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (threadIdx.x == 0) {
    carry[0] = 0.f;
    carry[1] = last_value ? last_value[seg] : 0.f;
  }

  for (int64_t tile_end = end; tile_end > start; tile_end -= kTile) {
    const int64_t tile_start = tile_end - kTile > start ? tile_end - kTile : start;
    const int64_t first = tile_start + static_cast<int64_t>(threadIdx.x) * kItems;

    float r[kItems], v[kItems];
    bool valid[kItems];
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      const int64_t t = first + j;
      valid[j] = t < tile_end && (mask == nullptr || mask[t]);
      r[j] = valid[j] ? static_cast<float>(rewards[t]) : 0.f;
      v[j] = valid[j] ? static_cast<float>(values[t]) : 0.f;
    }
    // This thread's tokens, latest first.
    Affine mine = identity_map();
#pragma unroll
    for (int j = kItems - 1; j >= 0; --j) {
      if (valid[j]) mine = then(mine, Affine{gamma_lam, gamma, r[j] - v[j], 0.f, v[j]});
    }
    // Inclusive scan towards lower lanes: lane i gets lanes 31..i applied in that order.
    Affine inclusive = mine;
#pragma unroll
    for (int offset = 1; offset < 32; offset <<= 1) {
      const Affine later = shfl_down(inclusive, offset);
      if (lane + offset < 32) inclusive = then(later, inclusive);
    }
    Affine exclusive = shfl_down(inclusive, 1);
    if (lane == 31) exclusive = identity_map();
    if (lane == 0) warp_total[warp] = inclusive;
    __syncthreads();
    if (threadIdx.x == 0) {
      Affine acc = identity_map();
      for (int w = kWarps - 1; w >= 0; --w) {
        later_warps[w] = acc;
        acc = then(acc, warp_total[w]);
      }
    }
    __syncthreads();
    const Affine before_me = then(later_warps[warp], exclusive);
    float a = before_me.p * carry[0] + before_me.q * carry[1] + before_me.c1;
    float nv = before_me.s * carry[1] + before_me.c2;
    __syncthreads();  // everyone has read the carry before thread 0 overwrites it

#pragma unroll
    for (int j = kItems - 1; j >= 0; --j) {
      const int64_t t = first + j;
      if (t >= tile_end) continue;
      if (valid[j]) {
        a = gamma_lam * a + gamma * nv + r[j] - v[j];
        nv = v[j];
        advantages[t] = a;
        returns[t] = a + v[j];
      } else {
        advantages[t] = 0.f;
        returns[t] = 0.f;
      }
    }
    if (threadIdx.x == 0) {  // thread 0 holds the tile's earliest tokens: its state is the next carry
      carry[0] = a;
      carry[1] = nv;
    }
    __syncthreads();
  }
}

std::tuple<at::Tensor, at::Tensor> gae_cuda(const at::Tensor& rewards, const at::Tensor& values,
                                            const c10::optional<at::Tensor>& mask,
                                            const c10::optional<at::Tensor>& last_value, const at::Tensor& cu_seqlens,
                                            double gamma, double lam) {
  TORCH_CHECK(rewards.dim() == 1 && rewards.is_contiguous(), "gae: rewards must be 1-D contiguous (packed tokens)");
  TORCH_CHECK(
      values.sizes() == rewards.sizes() && values.is_contiguous() && values.scalar_type() == rewards.scalar_type(),
      "gae: values must match rewards in shape and dtype");
  TORCH_CHECK(cu_seqlens.dim() == 1 && cu_seqlens.numel() >= 1 && cu_seqlens.scalar_type() == at::kLong &&
                  cu_seqlens.is_contiguous() && cu_seqlens.device() == rewards.device(),
              "gae: cu_seqlens must be contiguous 1-D int64 on the inputs' device");
  if (mask.has_value())
    TORCH_CHECK(mask->sizes() == rewards.sizes() && mask->scalar_type() == at::kBool && mask->is_contiguous() &&
                    mask->device() == rewards.device(),
                "gae: mask must be a contiguous bool tensor shaped like rewards");
  if (last_value.has_value())
    TORCH_CHECK(last_value->numel() == cu_seqlens.numel() - 1 && last_value->scalar_type() == at::kFloat &&
                    last_value->is_contiguous() && last_value->device() == rewards.device(),
                "gae: last_value must be contiguous float32 with one entry per segment");
  const c10::cuda::CUDAGuard guard(rewards.device());
  auto advantages = at::empty(rewards.sizes(), rewards.options().dtype(at::kFloat));
  auto returns = at::empty_like(advantages);
  const int64_t segments = cu_seqlens.numel() - 1;
  if (segments == 0 || rewards.numel() == 0) return {advantages, returns};
  TORCH_CHECK(segments <= INT32_MAX, "gae: too many segments");
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rewards.scalar_type(), "gae_cuda", [&] {
    gae_kernel<scalar_t><<<static_cast<unsigned>(segments), kThreads, 0, stream>>>(
        rewards.data_ptr<scalar_t>(), values.data_ptr<scalar_t>(), mask.has_value() ? mask->data_ptr<bool>() : nullptr,
        last_value.has_value() ? last_value->data_ptr<float>() : nullptr, cu_seqlens.data_ptr<int64_t>(),
        static_cast<float>(gamma), static_cast<float>(gamma * lam), advantages.data_ptr<float>(),
        returns.data_ptr<float>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {advantages, returns};
}

// One thread per group: groups are small (a handful to a few hundred samples) and so is the op.
template <typename scalar_t>
__global__ void group_advantages_kernel(const scalar_t* __restrict__ scores, int64_t groups, int64_t group_size,
                                        bool norm_std, bool leave_one_out, double eps, float* __restrict__ out) {
  const int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (g >= groups) return;
  group_advantages_row(scores + g * group_size, group_size, norm_std, leave_one_out, eps, out + g * group_size);
}

at::Tensor group_advantages_cuda(const at::Tensor& scores, int64_t group_size, bool norm_std, bool leave_one_out,
                                 double eps) {
  TORCH_CHECK(scores.dim() == 1 && scores.is_contiguous(), "group_advantages: scores must be 1-D contiguous");
  TORCH_CHECK(group_size >= 1 && scores.numel() % group_size == 0,
              "group_advantages: group_size must divide the number of scores");
  const c10::cuda::CUDAGuard guard(scores.device());
  auto out = at::empty(scores.sizes(), scores.options().dtype(at::kFloat));
  const int64_t groups = scores.numel() / group_size;
  if (groups == 0) return out;
  const int threads = 128;
  const auto blocks = static_cast<unsigned>((groups + threads - 1) / threads);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "group_advantages_cuda", [&] {
    group_advantages_kernel<scalar_t><<<blocks, threads, 0, at::cuda::getCurrentCUDAStream()>>>(
        scores.data_ptr<scalar_t>(), groups, group_size, norm_std, leave_one_out, eps, out.data_ptr<float>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// Per-block partial (count, sum, sum of squares) in float64; summed on the device afterwards (deterministic).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    masked_moments_kernel(const scalar_t* __restrict__ x, const bool* __restrict__ mask, int64_t n, int64_t per_block,
                          double* __restrict__ partial) {
  double count = 0, sum = 0, sumsq = 0;
  const int64_t begin = blockIdx.x * per_block;
  const int64_t stop = begin + per_block < n ? begin + per_block : n;
  for (int64_t i = begin + threadIdx.x; i < stop; i += kThreads) {
    if (mask && !mask[i]) continue;
    const double value = static_cast<double>(x[i]);
    count += 1;
    sum += value;
    sumsq += value * value;
  }
  for (int offset = 16; offset > 0; offset >>= 1) {
    count += __shfl_down_sync(0xffffffffu, count, offset);
    sum += __shfl_down_sync(0xffffffffu, sum, offset);
    sumsq += __shfl_down_sync(0xffffffffu, sumsq, offset);
  }
  __shared__ double warp_sums[kWarps][3];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    warp_sums[warp][0] = count;
    warp_sums[warp][1] = sum;
    warp_sums[warp][2] = sumsq;
  }
  __syncthreads();
  if (threadIdx.x < 3) {
    double total = 0;
    for (int w = 0; w < kWarps; ++w) total += warp_sums[w][threadIdx.x];
    partial[blockIdx.x * 3 + threadIdx.x] = total;
  }
}

at::Tensor masked_moments_cuda(const at::Tensor& x, const c10::optional<at::Tensor>& mask) {
  TORCH_CHECK(x.is_contiguous(), "masked_moments: x must be contiguous");
  if (mask.has_value())
    TORCH_CHECK(mask->sizes() == x.sizes() && mask->scalar_type() == at::kBool && mask->is_contiguous() &&
                    mask->device() == x.device(),
                "masked_moments: mask must be a contiguous bool tensor shaped like x");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.numel();
  const int64_t per_block = 16 * kTile;
  const int64_t blocks = n == 0 ? 1 : (n + per_block - 1) / per_block;
  auto partial = at::empty({blocks, 3}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "masked_moments_cuda", [&] {
    masked_moments_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        x.data_ptr<scalar_t>(), mask.has_value() ? mask->data_ptr<bool>() : nullptr, n, per_block,
        partial.data_ptr<double>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return partial.sum(0);
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_fast, CUDA, m) {
  m.impl("gae", &gae_cuda);
  m.impl("group_advantages", &group_advantages_cuda);
  m.impl("masked_moments", &masked_moments_cuda);
}

}  // namespace rlhf_fast
