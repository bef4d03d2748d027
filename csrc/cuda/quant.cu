// CUDA kernels of the quant family: out (M, N) = x (M, K) @ W^T (+ bias), in x's dtype.
//
// Decode-sized M (<= kGemvMaxRows): int8 and int4 weight-only GEMV. One warp per output channel; each lane
// loads 16 bytes of the weight row at a time (16 int8 or 32 int4 values), dequantizes them in registers,
// multiplies them with the matching slice of every activation row (vector loads, L1/L2-resident: x is tiny next
// to W) and keeps one float accumulator per row; a warp shuffle reduction ends it. The weight is read once, so
// the kernel is bound by the weight bytes: N*K (int8) or N*K/2 + groups (int4).
// Larger M: dequantize the weight and run cuBLAS (at::linear) in float32, a documented fallback; the Triton backend has
// the tiled GEMM with the dequant in registers for that regime.
// W8A8: a per-token activation quantisation kernel (bit for bit the float32 operations of the CPU and torch paths,
// NaN rows included, whether or not nvcc runs with --use_fast_math),
// then the int8 x int8 -> int32 GEMM of cuBLASLt (at::_int_mm) and one fused epilogue pass (scales, bias, cast).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <type_traits>

namespace rlhf_fast {
namespace {

constexpr int kGemvMaxRows = 16;
constexpr int kWarpsPerBlock = 8;
constexpr int kQuantThreads = 256;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// COUNT consecutive activations from a 16-byte aligned address, as float.
template <typename scalar_t, int COUNT>
__device__ __forceinline__ void load_activations(const scalar_t* __restrict__ p, float* out) {
  constexpr int kPerVector = 16 / sizeof(scalar_t);
  static_assert(COUNT % kPerVector == 0, "whole 16-byte vectors only");
#pragma unroll
  for (int v = 0; v < COUNT / kPerVector; ++v) {
    const int4 raw = __ldg(reinterpret_cast<const int4*>(p) + v);
    const scalar_t* values = reinterpret_cast<const scalar_t*>(&raw);
#pragma unroll
    for (int i = 0; i < kPerVector; ++i) out[v * kPerVector + i] = static_cast<float>(values[i]);
  }
}

template <typename scalar_t, int ROWS>
__device__ __forceinline__ void store_rows(float (&acc)[ROWS], int rows, int64_t n, int64_t out_features, float scale,
                                           const float* __restrict__ bias, scalar_t* __restrict__ out) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int m = 0; m < ROWS; ++m) {
    const float total = warp_sum(acc[m]);
    if (lane == 0 && m < rows) {
      out[m * out_features + n] = static_cast<scalar_t>(total * scale + (bias ? bias[n] : 0.f));
    }
  }
}

// int8: W[n, k] = q[n, k] * scales[n]. VEC: K % 16 == 0 and 16-byte aligned rows (else a scalar walk).
template <typename scalar_t, int ROWS, bool VEC>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    int8_gemv_kernel(const scalar_t* __restrict__ x, const int8_t* __restrict__ qweight,
                     const float* __restrict__ scales, const float* __restrict__ bias, scalar_t* __restrict__ out,
                     int rows, int64_t out_features, int64_t in_features) {
  const int lane = threadIdx.x & 31;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (n >= out_features) return;  // a whole warp leaves together
  const int8_t* w = qweight + n * in_features;
  float acc[ROWS];
#pragma unroll
  for (int m = 0; m < ROWS; ++m) acc[m] = 0.f;
  if (VEC) {
    for (int64_t c = lane; c < in_features / 16; c += 32) {
      const int4 raw = __ldg(reinterpret_cast<const int4*>(w) + c);
      const int8_t* q = reinterpret_cast<const int8_t*>(&raw);
      float wf[16];
#pragma unroll
      for (int j = 0; j < 16; ++j) wf[j] = static_cast<float>(q[j]);
#pragma unroll
      for (int m = 0; m < ROWS; ++m) {
        if (m >= rows) break;
        float xf[16];
        load_activations<scalar_t, 16>(x + m * in_features + c * 16, xf);
#pragma unroll
        for (int j = 0; j < 16; ++j) acc[m] = fmaf(wf[j], xf[j], acc[m]);
      }
    }
  } else {
    for (int64_t k = lane; k < in_features; k += 32) {
      const float wf = static_cast<float>(w[k]);
#pragma unroll
      for (int m = 0; m < ROWS; ++m) {
        if (m >= rows) break;
        acc[m] = fmaf(wf, static_cast<float>(x[m * in_features + k]), acc[m]);
      }
    }
  }
  store_rows<scalar_t, ROWS>(acc, rows, n, out_features, scales[n], bias, out);
}

// int4: W[n, k] = (q[n, k] - zeros[n, g]) * scales[n, g], g = k / group_size; q packed two per byte, even k low.
// VEC: group_size % 32 == 0 (a 16-byte chunk of 32 values lies in one group) and 16-byte aligned rows.
template <typename scalar_t, int ROWS, bool VEC>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    int4_gemv_kernel(const scalar_t* __restrict__ x, const uint8_t* __restrict__ qweight,
                     const float* __restrict__ scales, const uint8_t* __restrict__ zeros,
                     const float* __restrict__ bias, scalar_t* __restrict__ out, int rows, int64_t out_features,
                     int64_t in_features, int64_t group_size) {
  const int lane = threadIdx.x & 31;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (n >= out_features) return;
  const int64_t groups = in_features / group_size;
  const uint8_t* w = qweight + n * (in_features / 2);
  const float* s = scales + n * groups;
  const uint8_t* z = zeros + n * groups;
  float acc[ROWS];
#pragma unroll
  for (int m = 0; m < ROWS; ++m) acc[m] = 0.f;
  if (VEC) {
    for (int64_t c = lane; c < in_features / 32; c += 32) {
      const int4 raw = __ldg(reinterpret_cast<const int4*>(w) + c);
      const uint8_t* bytes = reinterpret_cast<const uint8_t*>(&raw);
      const int64_t g = c * 32 / group_size;
      const float scale = __ldg(s + g), zero = static_cast<float>(__ldg(z + g));
      float wf[32];
#pragma unroll
      for (int j = 0; j < 16; ++j) {  // (q - z) * s: exactly 0 where q == z (an FMA q * s - z * s is not)
        wf[2 * j] = (static_cast<float>(bytes[j] & 0xF) - zero) * scale;
        wf[2 * j + 1] = (static_cast<float>(bytes[j] >> 4) - zero) * scale;
      }
#pragma unroll
      for (int m = 0; m < ROWS; ++m) {
        if (m >= rows) break;
        float xf[32];
        load_activations<scalar_t, 32>(x + m * in_features + c * 32, xf);
#pragma unroll
        for (int j = 0; j < 32; ++j) acc[m] = fmaf(wf[j], xf[j], acc[m]);
      }
    }
  } else {
    for (int64_t k = lane; k < in_features; k += 32) {
      const uint8_t byte = w[k >> 1];
      const int64_t g = k / group_size;
      const float q = static_cast<float>((k & 1) ? (byte >> 4) : (byte & 0xF));
      const float wf = (q - static_cast<float>(z[g])) * s[g];
#pragma unroll
      for (int m = 0; m < ROWS; ++m) {
        if (m >= rows) break;
        acc[m] = fmaf(wf, static_cast<float>(x[m * in_features + k]), acc[m]);
      }
    }
  }
  store_rows<scalar_t, ROWS>(acc, rows, n, out_features, 1.f, bias, out);
}

// float32 arithmetic rounded to nearest with subnormals kept, never contracted into an FMA: inline PTX, because
// under --use_fast_math (-ftz=true) even __fmul_rn / __fdiv_rn / __float2int_rn compile to .ftz instructions.
__device__ __forceinline__ float add_rn_ieee(float a, float b) {
  float r;
  asm("add.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

__device__ __forceinline__ float mul_rn_ieee(float a, float b) {
  float r;
  asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

__device__ __forceinline__ float div_rn_ieee(float a, float b) {
  float r;
  asm("div.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

// Round half to even, saturating; NaN converts to 0.
__device__ __forceinline__ int rint_to_int_ieee(float a) {
  int r;
  asm("cvt.rni.s32.f32 %0, %1;" : "=r"(r) : "f"(a));
  return r;
}

// |v| as bits: for non-negative floats the integer order is the float order and a NaN lands above inf, so an
// integer maximum is an amax that propagates NaN (fmaxf drops it) and that no flush-to-zero can touch.
__device__ __forceinline__ unsigned abs_bits(float v) { return __float_as_uint(v) & 0x7fffffffu; }

__device__ __forceinline__ unsigned warp_max_bits(unsigned v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// One block per row, exactly the float32 operations of reference.quantize_activations_int8 whatever nvcc's math
// flags: amax, inv = 127 / amax (0 for a zero, NaN or inf amax), q = round_half_even(x * inv) clamped to
// [-127, 127] (cvt.rni; a NaN product converts to 0), scale = amax / 127.
template <typename scalar_t>
__global__ void __launch_bounds__(kQuantThreads)
    quantize_rows_kernel(const scalar_t* __restrict__ x, int64_t in_features, int8_t* __restrict__ q,
                         float* __restrict__ scale) {
  __shared__ unsigned warp_amax[kQuantThreads / 32];
  const scalar_t* xr = x + static_cast<int64_t>(blockIdx.x) * in_features;
  int8_t* qr = q + static_cast<int64_t>(blockIdx.x) * in_features;
  unsigned bits = 0;
  for (int64_t k = threadIdx.x; k < in_features; k += kQuantThreads)
    bits = max(bits, abs_bits(static_cast<float>(xr[k])));
  bits = warp_max_bits(bits);
  if ((threadIdx.x & 31) == 0) warp_amax[threadIdx.x >> 5] = bits;
  __syncthreads();
  bits = 0;
#pragma unroll
  for (int w = 0; w < kQuantThreads / 32; ++w) bits = max(bits, warp_amax[w]);
  const float amax = __uint_as_float(bits);
  const bool positive_finite = bits != 0 && bits < 0x7f800000u;  // bit tests: no flushed comparison
  const float inv = positive_finite ? div_rn_ieee(127.f, amax) : 0.f;
  for (int64_t k = threadIdx.x; k < in_features; k += kQuantThreads) {
    const int v = rint_to_int_ieee(mul_rn_ieee(static_cast<float>(xr[k]), inv));
    qr[k] = static_cast<int8_t>(min(127, max(-127, v)));
  }
  if (threadIdx.x == 0) scale[blockIdx.x] = div_rn_ieee(amax, 127.f);
}

// out[m, n] = acc[m, n] * x_scale[m] * w_scale[n] (+ bias[n]) in x's dtype: one pass over the int32 product. The
// products keep subnormal activation scales (tiny rows), as the CPU and torch paths do.
template <typename scalar_t>
__global__ void w8a8_epilogue_kernel(const int32_t* __restrict__ acc, int64_t acc_stride,
                                     const float* __restrict__ x_scale, const float* __restrict__ w_scale,
                                     const float* __restrict__ bias, scalar_t* __restrict__ out, int64_t rows,
                                     int64_t out_features) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows * out_features) return;
  const int64_t m = i / out_features, n = i % out_features;
  const float value = mul_rn_ieee(mul_rn_ieee(static_cast<float>(acc[m * acc_stride + n]), x_scale[m]), w_scale[n]);
  out[i] = static_cast<scalar_t>(bias ? add_rn_ieee(value, bias[n]) : value);
}

void check_inputs(const char* op, const at::Tensor& x, const at::Tensor& qweight, int64_t in_features,
                  const at::Tensor& scales, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), op, ": x must be a contiguous (M, K) tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf, op,
              ": x must be float32, bfloat16 or float16");
  TORCH_CHECK(qweight.dim() == 2 && qweight.is_contiguous() && qweight.device() == x.device(), op,
              ": qweight must be a contiguous 2-D tensor on x's device");
  TORCH_CHECK(x.size(1) == in_features, op, ": x has K=", x.size(1), " but the weight has K=", in_features);
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.device() == x.device(), op,
              ": scales must be contiguous float32 on x's device");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == qweight.size(0) && bias->scalar_type() == at::kFloat &&
                    bias->is_contiguous() && bias->device() == x.device(),
                op, ": bias must be contiguous float32 (N,) on x's device");
  }
}

// Calls f(scalar_t{}) for x's dtype (float32, bfloat16 or float16, as check_inputs enforces).
template <typename F>
void dispatch_activation(at::ScalarType dtype, const F& f) {
  switch (dtype) {
    case at::kFloat:
      f(float{});
      break;
    case at::kBFloat16:
      f(at::BFloat16{});
      break;
    default:
      f(at::Half{});
      break;
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

unsigned gemv_blocks(int64_t out_features) {
  const int64_t blocks = (out_features + kWarpsPerBlock - 1) / kWarpsPerBlock;
  TORCH_CHECK(blocks <= INT32_MAX, "qmatmul: too many output channels");
  return static_cast<unsigned>(blocks);
}

// Calls launch.template operator()<ROWS>() with the smallest instantiated ROWS >= rows.
template <typename Launch>
void with_rows(int rows, const Launch& launch) {
  if (rows <= 1) {
    launch(std::integral_constant<int, 1>{});
  } else if (rows <= 4) {
    launch(std::integral_constant<int, 4>{});
  } else {
    launch(std::integral_constant<int, kGemvMaxRows>{});
  }
}

// M, N or K of zero: the (M, N) result is the bias (or zeros); cuBLASLt's int8 GEMM and the kernels want more.
bool empty_problem(int64_t rows, int64_t out_features, int64_t in_features) {
  return rows == 0 || out_features == 0 || in_features == 0;
}

at::Tensor bias_only(const at::Tensor& x, int64_t out_features, const c10::optional<at::Tensor>& bias) {
  auto out = at::zeros({x.size(0), out_features}, x.options().dtype(at::kFloat));
  if (bias.has_value()) out.add_(*bias);
  return out.to(x.scalar_type());
}

// Above kGemvMaxRows: cuBLAS on the float32 dequantized weight and bias, in float32 like the GEMV and the CPU
// paths, then one cast of the output (rounding W and bias to x's dtype first made bf16 results jump at M = 17).
at::Tensor dequantized_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  return at::linear(x.to(at::kFloat), weight, bias).to(x.scalar_type());
}

at::Tensor qmatmul_int8_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                             const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(qweight.scalar_type() == at::kChar, "qmatmul_int8: qweight must be int8");
  check_inputs("qmatmul_int8", x, qweight, qweight.size(1), scales, bias);
  TORCH_CHECK(scales.dim() == 1 && scales.size(0) == qweight.size(0), "qmatmul_int8: scales must be (N,)");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.size(0), out_features = qweight.size(0), in_features = qweight.size(1);
  if (empty_problem(rows, out_features, in_features)) return bias_only(x, out_features, bias);
  if (rows > kGemvMaxRows) {
    return dequantized_linear(x, qweight.to(at::kFloat).mul_(scales.unsqueeze(1)), bias);
  }
  auto out = at::empty({rows, out_features}, x.options());
  const bool vec = in_features % 16 == 0 && aligned16(x.data_ptr()) && aligned16(qweight.data_ptr());
  const float* b = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_activation(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    with_rows(static_cast<int>(rows), [&](auto rows_tag) {
      constexpr int kRows = decltype(rows_tag)::value;
      auto kernel = vec ? int8_gemv_kernel<scalar_t, kRows, true> : int8_gemv_kernel<scalar_t, kRows, false>;
      kernel<<<gemv_blocks(out_features), kWarpsPerBlock * 32, 0, stream>>>(
          x.data_ptr<scalar_t>(), qweight.data_ptr<int8_t>(), scales.data_ptr<float>(), b, out.data_ptr<scalar_t>(),
          static_cast<int>(rows), out_features, in_features);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor dequantize_int4(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& zeros,
                           int64_t group_size) {
  const int64_t out_features = qweight.size(0), in_features = 2 * qweight.size(1);
  const auto values = at::stack({qweight.bitwise_and(0xF), qweight.bitwise_right_shift(4)}, -1)
                          .view({out_features, in_features / group_size, group_size})
                          .to(at::kFloat);
  return values.sub_(zeros.to(at::kFloat).unsqueeze(-1)).mul_(scales.unsqueeze(-1)).view({out_features, in_features});
}

at::Tensor qmatmul_int4_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                             const at::Tensor& zeros, int64_t group_size, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(qweight.scalar_type() == at::kByte, "qmatmul_int4: qweight must be uint8 (two values per byte)");
  const int64_t rows = x.size(0), out_features = qweight.size(0), in_features = 2 * qweight.size(1);
  check_inputs("qmatmul_int4", x, qweight, in_features, scales, bias);
  TORCH_CHECK(group_size >= 2 && group_size % 2 == 0 && in_features % group_size == 0,
              "qmatmul_int4: group_size must be even and divide K");
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == out_features && scales.size(1) == in_features / group_size,
              "qmatmul_int4: scales must be (N, K / group_size)");
  TORCH_CHECK(zeros.scalar_type() == at::kByte && zeros.is_contiguous() && zeros.sizes() == scales.sizes() &&
                  zeros.device() == x.device(),
              "qmatmul_int4: zeros must be contiguous uint8 shaped like scales");
  const c10::cuda::CUDAGuard guard(x.device());
  if (empty_problem(rows, out_features, in_features)) return bias_only(x, out_features, bias);
  if (rows > kGemvMaxRows) return dequantized_linear(x, dequantize_int4(qweight, scales, zeros, group_size), bias);
  auto out = at::empty({rows, out_features}, x.options());
  const bool vec = group_size % 32 == 0 && aligned16(x.data_ptr()) && aligned16(qweight.data_ptr());
  const float* b = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_activation(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    with_rows(static_cast<int>(rows), [&](auto rows_tag) {
      constexpr int kRows = decltype(rows_tag)::value;
      auto kernel = vec ? int4_gemv_kernel<scalar_t, kRows, true> : int4_gemv_kernel<scalar_t, kRows, false>;
      kernel<<<gemv_blocks(out_features), kWarpsPerBlock * 32, 0, stream>>>(
          x.data_ptr<scalar_t>(), qweight.data_ptr<uint8_t>(), scales.data_ptr<float>(), zeros.data_ptr<uint8_t>(), b,
          out.data_ptr<scalar_t>(), static_cast<int>(rows), out_features, in_features, group_size);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor qmatmul_w8a8_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                             const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(qweight.scalar_type() == at::kChar, "qmatmul_w8a8: qweight must be int8");
  check_inputs("qmatmul_w8a8", x, qweight, qweight.size(1), scales, bias);
  TORCH_CHECK(scales.dim() == 1 && scales.size(0) == qweight.size(0), "qmatmul_w8a8: scales must be (N,)");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.size(0), out_features = qweight.size(0), in_features = qweight.size(1);
  if (empty_problem(rows, out_features, in_features)) return bias_only(x, out_features, bias);
  TORCH_CHECK(rows <= INT32_MAX, "qmatmul_w8a8: too many rows");
  auto xq = at::empty({rows, in_features}, x.options().dtype(at::kChar));
  auto x_scale = at::empty({rows}, x.options().dtype(at::kFloat));
  dispatch_activation(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    quantize_rows_kernel<scalar_t><<<static_cast<unsigned>(rows), kQuantThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        x.data_ptr<scalar_t>(), in_features, xq.data_ptr<int8_t>(), x_scale.data_ptr<float>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (in_features % 8 != 0 || out_features % 8 != 0 || in_features <= 16) {
    // Shapes cuBLASLt's int8 path refuses: the same integer products in float32 (exact while |sum| < 2^24).
    auto acc = at::mm(xq.to(at::kFloat), qweight.to(at::kFloat).t());
    acc.mul_(x_scale.unsqueeze(1)).mul_(scales.unsqueeze(0));
    if (bias.has_value()) acc.add_(*bias);
    return acc.to(x.scalar_type());
  }
  // cuBLASLt's int8 GEMM wants more than 16 rows: decode-sized batches are padded with zero rows.
  const auto lhs = rows > 16 ? xq : at::cat({xq, xq.new_zeros({17 - rows, in_features})});
  const auto acc = at::_int_mm(lhs, qweight.t());
  auto out = at::empty({rows, out_features}, x.options());
  const int64_t total = rows * out_features;
  const int threads = 256;
  const int64_t blocks = (total + threads - 1) / threads;
  TORCH_CHECK(blocks <= INT32_MAX, "qmatmul_w8a8: output too large");
  dispatch_activation(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    w8a8_epilogue_kernel<scalar_t><<<static_cast<unsigned>(blocks), threads, 0, at::cuda::getCurrentCUDAStream()>>>(
        acc.data_ptr<int32_t>(), acc.stride(0), x_scale.data_ptr<float>(), scales.data_ptr<float>(),
        bias.has_value() ? bias->data_ptr<float>() : nullptr, out.data_ptr<scalar_t>(), rows, out_features);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_fast, CUDA, m) {
  m.impl("qmatmul_int8", &qmatmul_int8_cuda);
  m.impl("qmatmul_int4", &qmatmul_int4_cuda);
  m.impl("qmatmul_w8a8", &qmatmul_w8a8_cuda);
}

}  // namespace rlhf_fast
