// CUDA kernels of the losses family.
//
// kl_penalty: one elementwise kernel each way. PPO losses: one launch each way. The forward assigns rows to
// threads (a warp per row for short rows, the whole block per row for long ones), accumulates the per-token
// loss, clip decisions and statistics in registers, reduces them per block into a partial slot, and the last
// block to finish (atomic counter, threadfence) adds the partials in block order and writes the loss and stats:
// deterministic for a given grid. The completion counter is zeroed by a 4-byte memset, not a kernel. The
// backward recomputes the per-token math and writes d loss / d input, scaled by the normalisers the forward
// left in `stats` (no host sync). Parallelism is over rows: a single very long row runs on one block.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include "../losses_common.h"

namespace rlhf_fast {
namespace {

using namespace losses;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kLongRow = 512;  // rows at least this long get a whole block, shorter ones a warp

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the W threads that share a row (W = 32: a warp; W = kThreads: the block, every thread must call).
template <int W>
__device__ __forceinline__ float row_sum(float v, float* scratch) {
  v = warp_sum(v);
  if constexpr (W == 32) {
    return v;
  } else {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) total += scratch[w];
    __syncthreads();  // scratch is reused by the next call
    return total;
  }
}

// ---- kl_penalty ----

template <typename scalar_t, KlKind K>
__global__ void kl_penalty_kernel(const scalar_t* __restrict__ logp, const scalar_t* __restrict__ ref, int64_t n,
                                  float* __restrict__ out) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = kl_value<K>(static_cast<float>(logp[i]), static_cast<float>(ref[i]));
}

template <typename scalar_t, KlKind K>
__global__ void kl_penalty_backward_kernel(const float* __restrict__ grad, const scalar_t* __restrict__ logp,
                                           const scalar_t* __restrict__ ref, int64_t n, scalar_t* __restrict__ out) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = static_cast<scalar_t>(grad[i] * kl_grad<K>(static_cast<float>(logp[i]), static_cast<float>(ref[i])));
}

unsigned elementwise_blocks(int64_t n) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t wanted = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(wanted, sms * 16)));
}

void check_pair(const char* op, const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name) {
  TORCH_CHECK(a.is_contiguous() && b.is_contiguous(), op, ": ", a_name, " and ", b_name, " must be contiguous");
  TORCH_CHECK(a.sizes() == b.sizes(), op, ": ", b_name, " must have the shape of ", a_name);
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": ", b_name, " must have the dtype of ", a_name);
  TORCH_CHECK(a.device() == b.device(), op, ": ", b_name, " must be on the device of ", a_name);
}

at::Tensor kl_penalty_cuda(const at::Tensor& logp, const at::Tensor& ref_logp, c10::string_view kind) {
  check_pair("kl_penalty", logp, "logp", ref_logp, "ref_logp");
  const KlKind k = parse_kl_kind(std::string(kind));
  const c10::cuda::CUDAGuard guard(logp.device());
  auto out = at::empty(logp.sizes(), logp.options().dtype(at::kFloat));
  const int64_t n = logp.numel();
  if (n == 0) return out;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logp.scalar_type(), "kl_penalty_cuda", [&] {
    dispatch_kl_kind(k, [&](auto tag) {
      kl_penalty_kernel<scalar_t, decltype(tag)::value><<<elementwise_blocks(n), kThreads, 0, stream>>>(
          logp.data_ptr<scalar_t>(), ref_logp.data_ptr<scalar_t>(), n, out.data_ptr<float>());
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor kl_penalty_backward_cuda(const at::Tensor& grad, const at::Tensor& logp, const at::Tensor& ref_logp,
                                    c10::string_view kind) {
  check_pair("kl_penalty_backward", logp, "logp", ref_logp, "ref_logp");
  TORCH_CHECK(grad.sizes() == logp.sizes() && grad.scalar_type() == at::kFloat && grad.is_contiguous() &&
                  grad.device() == logp.device(),
              "kl_penalty_backward: grad must be contiguous float32 shaped like logp");
  const KlKind k = parse_kl_kind(std::string(kind));
  const c10::cuda::CUDAGuard guard(logp.device());
  auto out = at::empty_like(logp);
  const int64_t n = logp.numel();
  if (n == 0) return out;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logp.scalar_type(), "kl_penalty_backward_cuda", [&] {
    dispatch_kl_kind(k, [&](auto tag) {
      kl_penalty_backward_kernel<scalar_t, decltype(tag)::value>
          <<<elementwise_blocks(n), kThreads, 0, stream>>>(grad.data_ptr<float>(), logp.data_ptr<scalar_t>(),
                                                           ref_logp.data_ptr<scalar_t>(), n, out.data_ptr<scalar_t>());
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// ---- fused PPO losses ----

template <typename scalar_t, typename Math, int W>
__global__ void __launch_bounds__(kThreads)
    loss_forward_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b, const scalar_t* __restrict__ c,
                        const bool* __restrict__ mask, int64_t rows, int64_t steps, Math math, Agg agg,
                        float* __restrict__ partial, unsigned* __restrict__ blocks_done, float* __restrict__ loss,
                        float* __restrict__ stats) {
  constexpr int kRowsPerBlock = kThreads / W;
  __shared__ float scratch[kWarps];
  __shared__ float block_totals[kWarps][kTotals];
  __shared__ double final_totals[kWarps][kTotals];
  __shared__ bool is_last;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int row_in_block = threadIdx.x / W, thread_in_row = threadIdx.x % W;

  float acc[kTotals] = {};
  for (int64_t first = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock; first < rows;
       first += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
    const int64_t row = first + row_in_block;
    float sum = 0.f, valid = 0.f;
    if (row < rows) {
      const int64_t base = row * steps;
#pragma unroll 4
      for (int64_t t = thread_in_row; t < steps; t += W) {
        // Every load is issued before the mask is known (independent loads overlap their latency); masked
        // tokens, which may hold inf/nan, are then left out by a select, never multiplied in.
        const int64_t i = base + t;
        const bool ok = mask == nullptr || mask[i];
        const TokenLoss token =
            math.eval(static_cast<float>(a[i]), static_cast<float>(b[i]), static_cast<float>(c[i]), nullptr);
        if (ok) {
          sum += token.loss;
          valid += 1.f;
          acc[kClipped] += token.clipped ? 1.f : 0.f;
          acc[kNegLogRatio] += token.neg_log_ratio;
          acc[kRatio] += token.ratio;
        }
      }
    }
    acc[kLossSum] += sum;
    acc[kValidTokens] += valid;
    const float row_total = row_sum<W>(sum, scratch), row_valid = row_sum<W>(valid, scratch);
    if (thread_in_row == 0 && row_valid > 0.f) {
      acc[kRowMeanSum] += row_total / row_valid;
      acc[kValidRows] += 1.f;
    }
  }

#pragma unroll
  for (int k = 0; k < kTotals; ++k) {
    const float v = warp_sum(acc[k]);
    if (lane == 0) block_totals[warp][k] = v;
  }
  __syncthreads();
  if (threadIdx.x < kTotals) {
    float v = 0.f;
    for (int w = 0; w < kWarps; ++w) v += block_totals[w][threadIdx.x];
    partial[static_cast<int64_t>(blockIdx.x) * kTotals + threadIdx.x] = v;
  }
  __threadfence();  // the partial is visible to every block before the counter says so
  __syncthreads();
  if (threadIdx.x == 0) is_last = atomicAdd(blocks_done, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!is_last) return;

  __threadfence();
  double totals[kTotals] = {};
  for (unsigned blk = threadIdx.x; blk < gridDim.x; blk += kThreads)
#pragma unroll
    for (int k = 0; k < kTotals; ++k) totals[k] += __ldcg(partial + static_cast<int64_t>(blk) * kTotals + k);
#pragma unroll
  for (int k = 0; k < kTotals; ++k) {
    const double v = warp_sum(totals[k]);
    if (lane == 0) final_totals[warp][k] = v;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    double sums[kTotals] = {};
    for (int w = 0; w < kWarps; ++w)
      for (int k = 0; k < kTotals; ++k) sums[k] += final_totals[w][k];
    finalize(sums, agg, steps, loss, stats);
  }
}

template <typename scalar_t, typename Math, int W>
__global__ void __launch_bounds__(kThreads)
    loss_backward_kernel(const float* __restrict__ grad_loss, const scalar_t* __restrict__ a,
                         const scalar_t* __restrict__ b, const scalar_t* __restrict__ c, const bool* __restrict__ mask,
                         int64_t rows, int64_t steps, const float* __restrict__ stats, Math math, Agg agg,
                         scalar_t* __restrict__ grad) {
  constexpr int kRowsPerBlock = kThreads / W;
  __shared__ float scratch[kWarps];
  const int row_in_block = threadIdx.x / W, thread_in_row = threadIdx.x % W;
  const float scale = *grad_loss * token_weight(agg, steps, stats);
  const bool count_rows = agg == Agg::SeqMeanTokenMean && mask != nullptr;
  for (int64_t first = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock; first < rows;
       first += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
    const int64_t row = first + row_in_block;
    const int64_t base = row * steps;
    float row_valid = static_cast<float>(steps);
    if (count_rows) {
      float count = 0.f;
      if (row < rows)
        for (int64_t t = thread_in_row; t < steps; t += W) count += mask[base + t] ? 1.f : 0.f;
      row_valid = row_sum<W>(count, scratch);
    }
    if (row >= rows) continue;
    const float w = scale * row_weight(agg, row_valid);
#pragma unroll 4
    for (int64_t t = thread_in_row; t < steps; t += W) {
      const int64_t i = base + t;
      const bool ok = mask == nullptr || mask[i];
      float d = 0.f;
      math.eval(static_cast<float>(a[i]), static_cast<float>(b[i]), static_cast<float>(c[i]), &d);
      grad[i] = static_cast<scalar_t>(ok ? w * d : 0.f);
    }
  }
}

struct LossShape {
  int64_t rows, steps;
};

LossShape check_loss_inputs(const char* op, const at::Tensor& a, const char* a_name, const at::Tensor& b,
                            const char* b_name, const at::Tensor& c, const char* c_name,
                            const c10::optional<at::Tensor>& mask) {
  TORCH_CHECK(a.dim() == 2, op, ": ", a_name, " must be 2-D (rows, steps)");
  check_pair(op, a, a_name, b, b_name);
  check_pair(op, a, a_name, c, c_name);
  if (mask.has_value())
    TORCH_CHECK(mask->sizes() == a.sizes() && mask->scalar_type() == at::kBool && mask->is_contiguous() &&
                    mask->device() == a.device(),
                op, ": mask must be a contiguous bool tensor shaped like ", a_name);
  return {a.size(0), a.size(1)};
}

// Blocks for `rows` rows handled kThreads / W at a time, at most a few resident waves (the rest grid-strides).
unsigned row_blocks(int64_t rows, int W) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t rows_per_block = kThreads / W;
  const int64_t wanted = (rows + rows_per_block - 1) / rows_per_block;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(wanted, sms * 8)));
}

template <typename Math>
std::tuple<at::Tensor, at::Tensor> loss_forward_cuda(const char* op, const at::Tensor& a, const char* a_name,
                                                     const at::Tensor& b, const char* b_name, const at::Tensor& c,
                                                     const char* c_name, const c10::optional<at::Tensor>& mask,
                                                     const Math& math, c10::string_view agg) {
  const LossShape shape = check_loss_inputs(op, a, a_name, b, b_name, c, c_name, mask);
  const Agg mode = parse_agg(std::string(agg));
  const c10::cuda::CUDAGuard guard(a.device());
  auto loss = at::empty({}, a.options().dtype(at::kFloat));
  auto stats = at::empty({kStats}, a.options().dtype(at::kFloat));
  const int W = shape.steps >= kLongRow ? kThreads : 32;
  const unsigned blocks = row_blocks(shape.rows, W);
  // Workspace: the blocks' partial slots, then the completion counter (zeroed by a 4-byte memset, no kernel).
  auto workspace = at::empty({static_cast<int64_t>(blocks) * kTotals + 1}, a.options().dtype(at::kFloat));
  float* partial = workspace.data_ptr<float>();
  unsigned* blocks_done = reinterpret_cast<unsigned*>(partial + static_cast<int64_t>(blocks) * kTotals);
  const bool* m = mask.has_value() ? mask->data_ptr<bool>() : nullptr;
  auto stream = at::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(cudaMemsetAsync(blocks_done, 0, sizeof(unsigned), stream));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "ppo_loss_forward_cuda", [&] {
    auto launch = [&](auto kernel) {
      kernel<<<blocks, kThreads, 0, stream>>>(a.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(), m,
                                              shape.rows, shape.steps, math, mode, partial, blocks_done,
                                              loss.data_ptr<float>(), stats.data_ptr<float>());
    };
    if (W == kThreads)
      launch(loss_forward_kernel<scalar_t, Math, kThreads>);
    else
      launch(loss_forward_kernel<scalar_t, Math, 32>);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, stats};
}

template <typename Math>
at::Tensor loss_backward_cuda(const char* op, const at::Tensor& grad_loss, const at::Tensor& a, const char* a_name,
                              const at::Tensor& b, const char* b_name, const at::Tensor& c, const char* c_name,
                              const c10::optional<at::Tensor>& mask, const at::Tensor& stats, const Math& math,
                              c10::string_view agg) {
  const LossShape shape = check_loss_inputs(op, a, a_name, b, b_name, c, c_name, mask);
  TORCH_CHECK(grad_loss.numel() == 1 && grad_loss.scalar_type() == at::kFloat && grad_loss.device() == a.device(), op,
              ": grad_loss must be a float32 scalar on the inputs' device");
  TORCH_CHECK(stats.numel() == kStats && stats.scalar_type() == at::kFloat && stats.is_contiguous() &&
                  stats.device() == a.device(),
              op, ": stats must be the float32 (", kStats, ",) statistics of the forward");
  const Agg mode = parse_agg(std::string(agg));
  const c10::cuda::CUDAGuard guard(a.device());
  auto grad = at::empty_like(a);
  if (a.numel() == 0) return grad;
  const auto grad_scalar = grad_loss.contiguous();
  const int W = shape.steps >= kLongRow ? kThreads : 32;
  const unsigned blocks = row_blocks(shape.rows, W);
  const bool* m = mask.has_value() ? mask->data_ptr<bool>() : nullptr;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "ppo_loss_backward_cuda", [&] {
    auto launch = [&](auto kernel) {
      kernel<<<blocks, kThreads, 0, stream>>>(
          grad_scalar.data_ptr<float>(), a.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(), m,
          shape.rows, shape.steps, stats.data_ptr<float>(), math, mode, grad.data_ptr<scalar_t>());
    };
    if (W == kThreads)
      launch(loss_backward_kernel<scalar_t, Math, kThreads>);
    else
      launch(loss_backward_kernel<scalar_t, Math, 32>);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grad;
}

std::tuple<at::Tensor, at::Tensor> ppo_policy_loss_cuda(const at::Tensor& logp, const at::Tensor& old_logp,
                                                        const at::Tensor& advantages,
                                                        const c10::optional<at::Tensor>& mask, double clip_low,
                                                        double clip_high, c10::optional<double> dual_clip,
                                                        c10::string_view agg) {
  return loss_forward_cuda("ppo_policy_loss", logp, "logp", old_logp, "old_logp", advantages, "advantages", mask,
                           policy_math(clip_low, clip_high, dual_clip), agg);
}

at::Tensor ppo_policy_loss_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& logp,
                                         const at::Tensor& old_logp, const at::Tensor& advantages,
                                         const c10::optional<at::Tensor>& mask, const at::Tensor& stats,
                                         double clip_low, double clip_high, c10::optional<double> dual_clip,
                                         c10::string_view agg) {
  return loss_backward_cuda("ppo_policy_loss_backward", grad_loss, logp, "logp", old_logp, "old_logp", advantages,
                            "advantages", mask, stats, policy_math(clip_low, clip_high, dual_clip), agg);
}

std::tuple<at::Tensor, at::Tensor> ppo_value_loss_cuda(const at::Tensor& values, const at::Tensor& old_values,
                                                       const at::Tensor& returns, const c10::optional<at::Tensor>& mask,
                                                       double clip, c10::string_view agg) {
  return loss_forward_cuda("ppo_value_loss", values, "values", old_values, "old_values", returns, "returns", mask,
                           ValueMath{static_cast<float>(clip)}, agg);
}

at::Tensor ppo_value_loss_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& values,
                                        const at::Tensor& old_values, const at::Tensor& returns,
                                        const c10::optional<at::Tensor>& mask, const at::Tensor& stats, double clip,
                                        c10::string_view agg) {
  return loss_backward_cuda("ppo_value_loss_backward", grad_loss, values, "values", old_values, "old_values", returns,
                            "returns", mask, stats, ValueMath{static_cast<float>(clip)}, agg);
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_fast, CUDA, m) {
  m.impl("kl_penalty", &kl_penalty_cuda);
  m.impl("kl_penalty_backward", &kl_penalty_backward_cuda);
  m.impl("ppo_policy_loss", &ppo_policy_loss_cuda);
  m.impl("ppo_policy_loss_backward", &ppo_policy_loss_backward_cuda);
  m.impl("ppo_value_loss", &ppo_value_loss_cuda);
  m.impl("ppo_value_loss_backward", &ppo_value_loss_backward_cuda);
}

}  // namespace rlhf_fast
