// CUDA kernels of the f-divergence family (math in ../divergence_common.h).
//
// A block per row. Each thread walks its part of the row in vectors of kVec entries (16-byte loads when the
// rows are aligned, else one entry at a time), keeping its own running maxima and sums: a rescale only when a
// vector raises a maximum, then the entries' terms against the current maxima. The threads' states are merged
// with warp shuffles, then through shared memory. js and tv make a second pass over the row once the block
// knows lse_p and lse_q. The backward reads each input once and writes each needed gradient once.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../divergence_common.h"

namespace rlhf_fast {
namespace {

using namespace divergence;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

struct DeviceMath {
  static __device__ __forceinline__ float exp(float x) { return __expf(x); }
  static __device__ __forceinline__ float log(float x) { return __logf(x); }
};

template <typename scalar_t, int Vec>
struct alignas(sizeof(scalar_t) * Vec) Pack {
  scalar_t v[Vec];
};

template <typename scalar_t, int Vec>
__device__ __forceinline__ void load_scaled(const scalar_t* __restrict__ x, int64_t i, float inv_t, float* out) {
  const Pack<scalar_t, Vec> pack = *reinterpret_cast<const Pack<scalar_t, Vec>*>(x + i);
#pragma unroll
  for (int j = 0; j < Vec; ++j) out[j] = static_cast<float>(pack.v[j]) * inv_t;
}

__device__ __forceinline__ Stream shfl_down(const Stream& s, int offset) {
  const unsigned all = 0xffffffffu;
  return {__shfl_down_sync(all, s.max, offset), __shfl_down_sync(all, s.sum, offset),
          __shfl_down_sync(all, s.weighted, offset)};
}

// Merges every thread's state; the result is valid in thread 0.
__device__ RowState block_merge(RowState s) {
  __shared__ RowState partial[kWarps];
  for (int offset = 16; offset > 0; offset >>= 1) {
    s.a.merge<DeviceMath>(shfl_down(s.a, offset));
    s.b.merge<DeviceMath>(shfl_down(s.b, offset));
    s.c.merge<DeviceMath>(shfl_down(s.c, offset));
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) partial[warp] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kWarps; ++w) s.merge<DeviceMath>(partial[w]);
  }
  return s;
}

// Sums of two floats over the block; the result is valid in thread 0.
__device__ Pair block_sum(Pair t) {
  __shared__ Pair partial[kWarps];
  for (int offset = 16; offset > 0; offset >>= 1) {
    t.first += __shfl_down_sync(0xffffffffu, t.first, offset);
    t.second += __shfl_down_sync(0xffffffffu, t.second, offset);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) partial[warp] = t;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kWarps; ++w) {
      t.first += partial[w].first;
      t.second += partial[w].second;
    }
  }
  return t;
}

// Raises a thread's running maximum to `tile_max` if it is larger, rescaling the sums kept against it.
__device__ __forceinline__ void raise_max(Stream& s, float tile_max) {
  if (tile_max > s.max) {
    const float f = __expf(s.max - tile_max);  // 0 when the old maximum is -inf
    s.sum *= f;
    s.weighted *= f;
    s.max = tile_max;
  }
}

// The block's second-pass sums of one row against its log-normalisers; the result is valid in thread 0.
template <int Kind, int Vec, typename scalar_t>
__device__ __forceinline__ Pair second_pass_sums(const scalar_t* __restrict__ xp, const scalar_t* __restrict__ xq,
                                                 int64_t vocab, const Params& p, float lse_a, float lse_b) {
  Pair t{0.f, 0.f};
  for (int64_t i = static_cast<int64_t>(threadIdx.x) * Vec; i < vocab; i += kThreads * Vec) {
    float a[Vec], b[Vec];
    load_scaled<scalar_t, Vec>(xp, i, p.inv_temperature, a);
    load_scaled<scalar_t, Vec>(xq, i, p.inv_temperature, b);
#pragma unroll
    for (int j = 0; j < Vec; ++j) {
      const Pair term = second_pass_terms<Kind, DeviceMath>(a[j], b[j], lse_a, lse_b);
      t.first += term.first;
      t.second += term.second;
    }
  }
  return block_sum(t);
}

template <int Kind, int Vec, typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    f_divergence_forward_kernel(const scalar_t* __restrict__ logits_p, const scalar_t* __restrict__ logits_q,
                                const bool* __restrict__ mask, int64_t vocab, int64_t stride_p, int64_t stride_q,
                                Params p, float* __restrict__ out, float* __restrict__ stats) {
  const int64_t row = blockIdx.x;
  if (mask && !mask[row]) {
    if (threadIdx.x == 0) out[row] = stats[3 * row] = stats[3 * row + 1] = stats[3 * row + 2] = 0.f;
    return;
  }
  const scalar_t* xp = logits_p + row * stride_p;
  const scalar_t* xq = logits_q + row * stride_q;
  RowState s = RowState::empty();
  for (int64_t i = static_cast<int64_t>(threadIdx.x) * Vec; i < vocab; i += kThreads * Vec) {
    float a[Vec], b[Vec];
    load_scaled<scalar_t, Vec>(xp, i, p.inv_temperature, a);
    load_scaled<scalar_t, Vec>(xq, i, p.inv_temperature, b);
    float ma = a[0], mb = b[0], mc = power_logit(a[0], b[0], p.exponent);
#pragma unroll
    for (int j = 1; j < Vec; ++j) {
      ma = fmaxf(ma, a[j]);
      mb = fmaxf(mb, b[j]);
      if (Kind == kPower) mc = fmaxf(mc, power_logit(a[j], b[j], p.exponent));
    }
    raise_max(s.a, ma);
    raise_max(s.b, mb);
    if (Kind == kPower) raise_max(s.c, mc);
    const float sma = safe_max(s.a.max), smb = safe_max(s.b.max), smc = safe_max(s.c.max);
#pragma unroll
    for (int j = 0; j < Vec; ++j) {
      const FirstPassTerms t = first_pass_terms<Kind, DeviceMath>(a[j], b[j], p.exponent, sma, smb, smc);
      s.a.sum += t.sa;
      s.a.weighted += t.wa;
      s.b.sum += t.sb;
      s.b.weighted += t.wb;
      s.c.sum += t.sc;
    }
  }
  s = block_merge(s);
  __shared__ RowResult result;
  if (threadIdx.x == 0) result = finish_first_pass(p, s);
  __syncthreads();
  if (two_pass(Kind)) {
    const Pair t = second_pass_sums<Kind, Vec>(xp, xq, vocab, p, result.lse_a, result.lse_b);
    if (threadIdx.x == 0) finish_second_pass(Kind, t.first, t.second, result);
  }
  if (threadIdx.x == 0) {
    out[row] = result.out;
    stats[3 * row] = result.lse_a;
    stats[3 * row + 1] = result.lse_b;
    stats[3 * row + 2] = result.aux;
  }
}

template <int Kind, int Vec, typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    f_divergence_second_pass_kernel(const scalar_t* __restrict__ logits_p, const scalar_t* __restrict__ logits_q,
                                    const bool* __restrict__ mask, const float* __restrict__ stats, int64_t vocab,
                                    int64_t stride_p, int64_t stride_q, Params p, float* __restrict__ sums) {
  const int64_t row = blockIdx.x;
  Pair t{0.f, 0.f};
  if (!mask || mask[row]) {
    t = second_pass_sums<Kind, Vec>(logits_p + row * stride_p, logits_q + row * stride_q, vocab, p, stats[3 * row],
                                    stats[3 * row + 1]);
  }
  if (threadIdx.x == 0) {
    sums[2 * row] = t.first;
    sums[2 * row + 1] = t.second;
  }
}

template <int Kind, int Vec, typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    f_divergence_backward_kernel(const float* __restrict__ grad_out, const scalar_t* __restrict__ logits_p,
                                 const scalar_t* __restrict__ logits_q, const bool* __restrict__ mask,
                                 const float* __restrict__ out, const float* __restrict__ stats, int64_t vocab,
                                 int64_t stride_p, int64_t stride_q, Params p, scalar_t* __restrict__ grad_p,
                                 scalar_t* __restrict__ grad_q) {
  const int64_t row = blockIdx.x;
  const bool valid = mask == nullptr || mask[row];
  const RowGrad r{stats[3 * row], stats[3 * row + 1], stats[3 * row + 2], out[row], grad_out[row] * p.inv_temperature};
  const scalar_t* xp = logits_p + row * stride_p;
  const scalar_t* xq = logits_q + row * stride_q;
  for (int64_t i = static_cast<int64_t>(threadIdx.x) * Vec; i < vocab; i += kThreads * Vec) {
    Pack<scalar_t, Vec> dp, dq;
    if (valid) {
      float a[Vec], b[Vec];
      load_scaled<scalar_t, Vec>(xp, i, p.inv_temperature, a);
      load_scaled<scalar_t, Vec>(xq, i, p.inv_temperature, b);
#pragma unroll
      for (int j = 0; j < Vec; ++j) {
        const Pair d = grad_entry<Kind, DeviceMath>(a[j], b[j], p, r);
        dp.v[j] = static_cast<scalar_t>(d.first);
        dq.v[j] = static_cast<scalar_t>(d.second);
      }
    } else {
#pragma unroll
      for (int j = 0; j < Vec; ++j) dp.v[j] = dq.v[j] = static_cast<scalar_t>(0.f);
    }
    if (grad_p) *reinterpret_cast<Pack<scalar_t, Vec>*>(grad_p + row * vocab + i) = dp;
    if (grad_q) *reinterpret_cast<Pack<scalar_t, Vec>*>(grad_q + row * vocab + i) = dq;
  }
}

// Entries per 16-byte load when every row of both inputs starts 16-byte aligned and the vocab divides; else 1.
template <typename scalar_t>
bool vector_loads_fit(const at::Tensor& logits_p, const at::Tensor& logits_q) {
  constexpr int64_t vec = 16 / sizeof(scalar_t);
  auto aligned = [](const at::Tensor& t) {
    return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && (t.stride(0) * t.element_size()) % 16 == 0;
  };
  return logits_p.size(1) % vec == 0 && aligned(logits_p) && aligned(logits_q);
}

std::tuple<at::Tensor, at::Tensor> f_divergence_cuda(const at::Tensor& logits_p, const at::Tensor& logits_q,
                                                     const c10::optional<at::Tensor>& mask, c10::string_view kind,
                                                     double alpha, double temperature) {
  const Params p = check_forward_inputs(logits_p, logits_q, mask, std::string(kind), alpha, temperature);
  const c10::cuda::CUDAGuard guard(logits_p.device());
  const int64_t rows = logits_p.size(0), vocab = logits_p.size(1);
  auto out = at::empty({rows}, logits_p.options().dtype(at::kFloat));
  auto stats = at::empty({rows, 3}, logits_p.options().dtype(at::kFloat));
  if (rows == 0) return {out, stats};
  TORCH_CHECK(rows <= INT32_MAX, "f_divergence: too many rows");
  const bool* m = mask.has_value() ? mask->data_ptr<bool>() : nullptr;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits_p.scalar_type(), "f_divergence_cuda", [&] {
    constexpr int vec = 16 / sizeof(scalar_t);
    const bool vectorised = vector_loads_fit<scalar_t>(logits_p, logits_q);
    with_kind(p.kind, [&](auto kind_constant) {
      constexpr int K = decltype(kind_constant)::value;
      auto launch = [&](auto kernel) {
        kernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
            logits_p.data_ptr<scalar_t>(), logits_q.data_ptr<scalar_t>(), m, vocab, logits_p.stride(0),
            logits_q.stride(0), p, out.data_ptr<float>(), stats.data_ptr<float>());
      };
      if (vectorised)
        launch(f_divergence_forward_kernel<K, vec, scalar_t>);
      else
        launch(f_divergence_forward_kernel<K, 1, scalar_t>);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, stats};
}

at::Tensor f_divergence_second_pass_cuda(const at::Tensor& logits_p, const at::Tensor& logits_q,
                                         const c10::optional<at::Tensor>& mask, const at::Tensor& stats,
                                         c10::string_view kind, double temperature) {
  const Params p = check_second_pass_inputs(logits_p, logits_q, mask, stats, std::string(kind), temperature);
  const c10::cuda::CUDAGuard guard(logits_p.device());
  const int64_t rows = logits_p.size(0), vocab = logits_p.size(1);
  auto sums = at::empty({rows, 2}, logits_p.options().dtype(at::kFloat));
  if (rows == 0) return sums;
  TORCH_CHECK(rows <= INT32_MAX, "f_divergence_second_pass: too many rows");
  const bool* m = mask.has_value() ? mask->data_ptr<bool>() : nullptr;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits_p.scalar_type(), "f_divergence_second_pass_cuda", [&] {
        constexpr int vec = 16 / sizeof(scalar_t);
        const bool vectorised = vector_loads_fit<scalar_t>(logits_p, logits_q);
        auto launch = [&](auto kernel) {
          kernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
              logits_p.data_ptr<scalar_t>(), logits_q.data_ptr<scalar_t>(), m, stats.data_ptr<float>(), vocab,
              logits_p.stride(0), logits_q.stride(0), p, sums.data_ptr<float>());
        };
        if (p.kind == kJS) {
          if (vectorised)
            launch(f_divergence_second_pass_kernel<kJS, vec, scalar_t>);
          else
            launch(f_divergence_second_pass_kernel<kJS, 1, scalar_t>);
        } else {
          if (vectorised)
            launch(f_divergence_second_pass_kernel<kTV, vec, scalar_t>);
          else
            launch(f_divergence_second_pass_kernel<kTV, 1, scalar_t>);
        }
      });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return sums;
}

std::tuple<at::Tensor, at::Tensor> f_divergence_backward_cuda(const at::Tensor& grad_out, const at::Tensor& logits_p,
                                                              const at::Tensor& logits_q,
                                                              const c10::optional<at::Tensor>& mask,
                                                              const at::Tensor& out, const at::Tensor& stats,
                                                              c10::string_view kind, double alpha, double temperature,
                                                              bool need_grad_p, bool need_grad_q) {
  const Params p = check_forward_inputs(logits_p, logits_q, mask, std::string(kind), alpha, temperature);
  check_backward_inputs(grad_out, logits_p, out, stats);
  const c10::cuda::CUDAGuard guard(logits_p.device());
  auto grad_p = need_grad_p ? at::empty(logits_p.sizes(), logits_p.options()) : at::empty({0}, logits_p.options());
  auto grad_q = need_grad_q ? at::empty(logits_q.sizes(), logits_q.options()) : at::empty({0}, logits_q.options());
  const int64_t rows = logits_p.size(0), vocab = logits_p.size(1);
  if (rows == 0 || !(need_grad_p || need_grad_q)) return {grad_p, grad_q};
  TORCH_CHECK(rows <= INT32_MAX, "f_divergence_backward: too many rows");
  const bool* m = mask.has_value() ? mask->data_ptr<bool>() : nullptr;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits_p.scalar_type(), "f_divergence_backward_cuda", [&] {
    constexpr int vec = 16 / sizeof(scalar_t);
    const bool vectorised = vector_loads_fit<scalar_t>(logits_p, logits_q);  // the gradients are fresh, contiguous
    with_kind(p.kind, [&](auto kind_constant) {
      constexpr int K = decltype(kind_constant)::value;
      auto launch = [&](auto kernel) {
        kernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
            grad_out.data_ptr<float>(), logits_p.data_ptr<scalar_t>(), logits_q.data_ptr<scalar_t>(), m,
            out.data_ptr<float>(), stats.data_ptr<float>(), vocab, logits_p.stride(0), logits_q.stride(0), p,
            need_grad_p ? grad_p.data_ptr<scalar_t>() : nullptr, need_grad_q ? grad_q.data_ptr<scalar_t>() : nullptr);
      };
      if (vectorised)
        launch(f_divergence_backward_kernel<K, vec, scalar_t>);
      else
        launch(f_divergence_backward_kernel<K, 1, scalar_t>);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_p, grad_q};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_fast, CUDA, m) {
  m.impl("f_divergence", &f_divergence_cuda);
  m.impl("f_divergence_second_pass", &f_divergence_second_pass_cuda);
  m.impl("f_divergence_backward", &f_divergence_backward_cuda);
}

}  // namespace rlhf_fast
