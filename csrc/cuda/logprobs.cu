// CUDA kernels of the log-prob family.
//
// Forward: one block per row, one pass over the row. Each thread keeps the online moments (max m of its
// logits, s = sum 2^u, t = sum 2^u u with u = (x - m) log2(e) / T: the difference in logit units first, then
// the scaling; base 2 so that exp is one ex2 instruction) over its elements, reading 16-byte packs; the
// per-thread moments merge through warp shuffles and shared memory. From the merged moments:
// lse = m / T + ln s, entropy = ln s - ln2 t / s. The logits are read once. The moments' math and a thread's
// share of the row live in logprobs_common.h, compiled for the host too (tests/test_cuda_host.py replays a
// block on the CPU). A NaN logit makes the row's lse and entropy NaN; a label outside [0, V) gives a NaN
// log-prob (never a read past the row).
// Backward: one block per row, d(logits) = (onehot - p) g_lp / T - p (log p + H) g_H / T from the saved lse
// and entropy, read once and written once (in place when asked), 16-byte packs where the input and output
// rows share their alignment.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../logprobs_common.h"

#include <cstdint>

namespace rlhf_fast {
namespace {

using logprobs::kLog2e;
using logprobs::kThreads;
using logprobs::Moments;
constexpr int kWarps = kThreads / 32;

template <typename scalar_t>
using Pack = logprobs::Pack<scalar_t>;

// The block's moments, valid in thread 0: a butterfly of shuffles within each warp (offsets 16, 8, 4, 2, 1),
// then thread 0 merges the warps in order.
__device__ __forceinline__ Moments block_merge(Moments acc, float scale) {
  __shared__ Moments warp_moments[kWarps];
  for (int offset = 16; offset > 0; offset >>= 1) {
    const Moments other{__shfl_xor_sync(0xffffffffu, acc.m, offset), __shfl_xor_sync(0xffffffffu, acc.s, offset),
                        __shfl_xor_sync(0xffffffffu, acc.t, offset)};
    acc = logprobs::merge(acc, other, scale);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_moments[warp] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kWarps; ++w) acc = logprobs::merge(acc, warp_moments[w], scale);
  }
  return acc;  // valid in thread 0
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    logprobs_forward_kernel(const scalar_t* __restrict__ logits, logprobs::RowLayout layout,
                            const int64_t* __restrict__ labels, float inv_t, int64_t ignore_index,
                            float* __restrict__ logp, float* __restrict__ entropy, float* __restrict__ lse) {
  const int64_t r = blockIdx.x;
  const int64_t vocab = layout.vocab;
  const scalar_t* row = logits + layout.offset(r);
  const float scale = inv_t * kLog2e;
  const Moments acc = block_merge(logprobs::thread_moments(row, vocab, threadIdx.x, scale), scale);
  if (threadIdx.x == 0) {
    const logprobs::RowStats stats = logprobs::row_stats(acc, inv_t);
    lse[r] = stats.lse;
    entropy[r] = stats.entropy;
    if (labels != nullptr) {
      const int64_t label = labels[r];
      if (label == ignore_index) {
        logp[r] = 0.f;
      } else {  // a label outside [0, V) gives NaN; never read past the row
        logp[r] = label >= 0 && label < vocab ? static_cast<float>(row[label]) * inv_t - stats.lse : NAN;
      }
    }
  }
}

struct GradRow {
  float inv_t, lse, alpha, beta, entropy;
  int64_t label;  // -1: no label term

  // -p (alpha + beta (log p + H)) [+ alpha at the label], log p = x / T - lse (exact to an ulp of lse near
  // the max, as on the CPU).
  __device__ __forceinline__ float operator()(float x, int64_t index) const {
    const float log_p = x * inv_t - lse;
    const float p = logprobs::fast_exp2(log_p * kLog2e);
    const float soft = p > 0.f ? -p * (alpha + beta * (log_p + entropy)) : 0.f;
    return index == label ? soft + alpha : soft;
  }
};

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    logprobs_backward_kernel(const scalar_t* logits, logprobs::RowLayout layout, scalar_t* grad,
                             logprobs::RowLayout grad_layout, const int64_t* __restrict__ labels,
                             const float* __restrict__ lse, const float* __restrict__ entropy,
                             const float* __restrict__ grad_logp, const float* __restrict__ grad_entropy, float inv_t,
                             int64_t ignore_index) {
  using P = Pack<scalar_t>;
  const int64_t r = blockIdx.x;
  const int64_t vocab = layout.vocab;
  const scalar_t* row = logits + layout.offset(r);
  scalar_t* grad_row = grad + grad_layout.offset(r);
  const int64_t label = labels != nullptr ? labels[r] : ignore_index;
  const bool counted = label != ignore_index && grad_logp != nullptr;  // outside [0, V): no one-hot term here
  const GradRow f{inv_t,
                  lse[r],
                  counted ? grad_logp[r] * inv_t : 0.f,
                  grad_entropy != nullptr ? grad_entropy[r] * inv_t : 0.f,
                  grad_entropy != nullptr ? entropy[r] : 0.f,
                  counted && label >= 0 && label < vocab ? label : -1};

  const int64_t head = logprobs::pack_head(row, vocab);
  const bool same_alignment = logprobs::pack_head(grad_row, vocab) == head;
  const int64_t packs = same_alignment ? (vocab - head) / P::kSize : 0;
  const int64_t tail = same_alignment ? head + packs * P::kSize : 0;
  if (same_alignment) {
    for (int64_t i = threadIdx.x; i < head; i += kThreads) {
      grad_row[i] = static_cast<scalar_t>(f(static_cast<float>(row[i]), i));
    }
    const P* in = reinterpret_cast<const P*>(row + head);
    P* out = reinterpret_cast<P*>(grad_row + head);
#pragma unroll 4
    for (int64_t k = threadIdx.x; k < packs; k += kThreads) {
      const P pack = in[k];
      P result;
      const int64_t first = head + k * P::kSize;
#pragma unroll
      for (int i = 0; i < P::kSize; ++i) {
        result.v[i] = static_cast<scalar_t>(f(static_cast<float>(pack.v[i]), first + i));
      }
      out[k] = result;
    }
  }
  for (int64_t i = tail + threadIdx.x; i < vocab; i += kThreads) {
    grad_row[i] = static_cast<scalar_t>(f(static_cast<float>(row[i]), i));
  }
}

void check_rows_fit(const logprobs::RowLayout& layout, const char* op) {
  TORCH_CHECK(layout.rows <= INT32_MAX, op, ": too many rows for one launch");
}

template <typename T>
const T* optional_ptr(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> logprobs_forward_cuda(const at::Tensor& logits,
                                                                     const c10::optional<at::Tensor>& labels,
                                                                     double temperature, int64_t ignore_index) {
  const char* op = "logprobs_forward";
  const auto layout = logprobs::row_layout(logits, op);
  logprobs::check_optional_per_row(labels, logits, at::kLong, "labels", op);
  logprobs::check_temperature(temperature, op);
  check_rows_fit(layout, op);
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto row_options = logits.options().dtype(at::kFloat);
  auto logp = labels.has_value() ? at::empty(logits.sizes().slice(0, 2), row_options) : at::empty({0}, row_options);
  auto entropy = at::empty(logits.sizes().slice(0, 2), row_options);
  auto lse = at::empty_like(entropy);
  if (layout.rows == 0) return {logp, entropy, lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "logprobs_forward_cuda", [&] {
    logprobs_forward_kernel<scalar_t>
        <<<static_cast<unsigned>(layout.rows), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
            logits.const_data_ptr<scalar_t>(), layout, optional_ptr<int64_t>(labels),
            static_cast<float>(1.0 / temperature), ignore_index, labels.has_value() ? logp.data_ptr<float>() : nullptr,
            entropy.data_ptr<float>(), lse.data_ptr<float>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {logp, entropy, lse};
}

void logprobs_backward_launch(const c10::optional<at::Tensor>& grad_logp, const c10::optional<at::Tensor>& grad_entropy,
                              const at::Tensor& logits, const c10::optional<at::Tensor>& labels, const at::Tensor& lse,
                              const at::Tensor& entropy, double temperature, int64_t ignore_index, at::Tensor& grad,
                              const char* op) {
  const auto layout = logprobs::row_layout(logits, op);
  const auto grad_layout = logprobs::row_layout(grad, op);
  check_rows_fit(layout, op);
  if (layout.rows == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "logprobs_backward_cuda", [&] {
    logprobs_backward_kernel<scalar_t>
        <<<static_cast<unsigned>(layout.rows), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
            logits.const_data_ptr<scalar_t>(), layout, grad.mutable_data_ptr<scalar_t>(), grad_layout,
            optional_ptr<int64_t>(labels), lse.data_ptr<float>(),
            grad_entropy.has_value() ? entropy.data_ptr<float>() : nullptr, optional_ptr<float>(grad_logp),
            optional_ptr<float>(grad_entropy), static_cast<float>(1.0 / temperature), ignore_index);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor logprobs_backward_cuda(const c10::optional<at::Tensor>& grad_logp,
                                  const c10::optional<at::Tensor>& grad_entropy, const at::Tensor& logits,
                                  const c10::optional<at::Tensor>& labels, const at::Tensor& lse,
                                  const at::Tensor& entropy, double temperature, int64_t ignore_index) {
  const char* op = "logprobs_backward";
  logprobs::row_layout(logits, op);
  logprobs::check_backward_inputs(grad_logp, grad_entropy, logits, labels, lse, entropy, temperature, op);
  const c10::cuda::CUDAGuard guard(logits.device());
  auto grad = at::empty(logits.sizes(), logits.options());
  logprobs_backward_launch(grad_logp, grad_entropy, logits, labels, lse, entropy, temperature, ignore_index, grad, op);
  return grad;
}

void logprobs_backward_inplace_cuda(const c10::optional<at::Tensor>& grad_logp,
                                    const c10::optional<at::Tensor>& grad_entropy, at::Tensor& logits,
                                    const c10::optional<at::Tensor>& labels, const at::Tensor& lse,
                                    const at::Tensor& entropy, double temperature, int64_t ignore_index) {
  const char* op = "logprobs_backward_";
  logprobs::row_layout(logits, op);
  logprobs::check_backward_inputs(grad_logp, grad_entropy, logits, labels, lse, entropy, temperature, op);
  const c10::cuda::CUDAGuard guard(logits.device());
  logprobs_backward_launch(grad_logp, grad_entropy, logits, labels, lse, entropy, temperature, ignore_index, logits,
                           op);
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_fast, CUDA, m) {
  m.impl("logprobs_forward", &logprobs_forward_cuda);
  m.impl("logprobs_backward", &logprobs_backward_cuda);
  m.impl("logprobs_backward_", &logprobs_backward_inplace_cuda);
}

}  // namespace rlhf_fast
