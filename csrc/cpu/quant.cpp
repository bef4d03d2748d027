// CPU kernels of the quant family: out (M, N) = x (M, K) @ W^T (+ bias), W quantized int8 / int4 / W8A8.
//
// Few rows (decode, M <= kFusedMaxRows): one fused pass over the weight, output channels split over the OpenMP
// threads; each quantized weight row is read once, dequantized in registers and dotted with every activation
// row (they stay in cache). Many rows: the weight is dequantized a few hundred output channels at a time into a
// float32 panel that ATen's sgemm multiplies, so the GEMM runs at BLAS speed and the full dequantized weight never
// exists. W8A8 quantizes the activations per token first; its fused path accumulates int8 x int8 products in
// int32, its panel path multiplies the integer values in float32 sgemm (exact while |sum| < 2^24, otherwise
// rounded like the int32 -> float32 conversion of the epilogue).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "simd_clones.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace rlhf_fast {
namespace {

constexpr int64_t kFusedMaxRows = 4;
constexpr int64_t kFusedBlock = 64;          // output channels per work item of the fused path
constexpr int64_t kChunkFloats = 4096;       // fused path: the K-chunks of all activation rows together, 16 KB of L1
constexpr int64_t kPanelElements = 1 << 20;  // 4 MB float32 panels for the many-rows path

// The hot loops get AVX-512 and AVX2 clones (simd_clones.h): int8 -> float conversions vectorise poorly on
// the baseline x86-64 the extension is compiled for.

RLHF_FAST_SIMD_CLONES float dot_int8(const float* x, const int8_t* w, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t k = 0; k < n; ++k) acc += x[k] * static_cast<float>(w[k]);
  return acc;
}

RLHF_FAST_SIMD_CLONES float dot_f32(const float* a, const float* b, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t k = 0; k < n; ++k) acc += a[k] * b[k];
  return acc;
}

RLHF_FAST_SIMD_CLONES int32_t dot_int8_int8(const int8_t* a, const int8_t* w, int64_t n) {
  int32_t acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t k = 0; k < n; ++k) acc += static_cast<int32_t>(a[k]) * static_cast<int32_t>(w[k]);
  return acc;
}

RLHF_FAST_SIMD_CLONES void dequantize_int8_row(const int8_t* w, float scale, float* dst, int64_t n) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) dst[k] = static_cast<float>(w[k]) * scale;
}

// One int4 group: dst[2j] = (low(b[j]) - z) s, dst[2j+1] = (high(b[j]) - z) s. The subtraction comes first (exact
// on small integers), so q == z gives exactly 0; q * s - z * s, contracted into an FMA, left a rounding residue.
RLHF_FAST_SIMD_CLONES void dequantize_int4_group(const uint8_t* b, float scale, float zero, float* dst, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    dst[2 * j] = (static_cast<float>(b[j] & 0xF) - zero) * scale;
    dst[2 * j + 1] = (static_cast<float>(b[j] >> 4) - zero) * scale;
  }
}

void check_inputs(const char* op, const at::Tensor& x, const at::Tensor& qweight, int64_t in_features,
                  const at::Tensor& scales, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), op, ": x must be a contiguous (M, K) tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf, op,
              ": x must be float32, bfloat16 or float16");
  TORCH_CHECK(qweight.dim() == 2 && qweight.is_contiguous(), op, ": qweight must be a contiguous 2-D tensor");
  TORCH_CHECK(x.size(1) == in_features, op, ": x has K=", x.size(1), " but the weight has K=", in_features);
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous(), op, ": scales must be contiguous float32");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == qweight.size(0) && bias->scalar_type() == at::kFloat &&
                    bias->is_contiguous(),
                op, ": bias must be contiguous float32 (N,)");
  }
}

at::Tensor finish(at::Tensor out, const c10::optional<at::Tensor>& bias, const at::Tensor& x) {
  if (bias.has_value()) out.add_(*bias);
  return out.to(x.scalar_type());
}

// M, N or K of zero: the (M, N) result is the bias (or zeros); the kernels below divide by N and K.
bool empty_problem(int64_t rows, int64_t out_features, int64_t in_features) {
  return rows == 0 || out_features == 0 || in_features == 0;
}

at::Tensor bias_only(const at::Tensor& x, int64_t out_features, const c10::optional<at::Tensor>& bias) {
  return finish(at::zeros({x.size(0), out_features}, x.options().dtype(at::kFloat)), bias, x);
}

// Panels of ~kPanelElements weights (a few hundred output channels) spread over the threads: each thread
// dequantizes its panel into its own float32 buffer and multiplies it with ATen's sgemm (single-threaded inside
// the parallel region), writing its slice of out (M, N) float32. One parallel region per call; at most one panel
// per thread exists at a time, never the whole dequantized weight.
template <typename DequantRow>
at::Tensor panel_matmul(const at::Tensor& x32, int64_t out_features, const DequantRow& dequant_row) {
  const int64_t rows = x32.size(0), in_features = x32.size(1);
  const int64_t panel_rows = std::min(out_features, std::max<int64_t>(64, kPanelElements / in_features));
  const int64_t panels = (out_features + panel_rows - 1) / panel_rows;
  auto out = at::empty({rows, out_features}, x32.options());
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    auto panel = at::empty({panel_rows, in_features}, x32.options());
    float* p = panel.data_ptr<float>();
    for (int64_t index = begin; index < end; ++index) {
      const int64_t n0 = index * panel_rows, count = std::min(panel_rows, out_features - n0);
      for (int64_t r = 0; r < count; ++r) dequant_row(n0 + r, p + r * in_features);
      out.narrow(1, n0, count).copy_(at::mm(x32, panel.narrow(0, 0, count).t()));
    }
  });
  return out;
}

// Runs fn(begin, end) over blocks of kFusedBlock output channels handed out dynamically: a thread that loses its
// core (shared machines) delays one block, not a static share of the work.
template <typename Fn>
void for_channel_blocks(int64_t out_features, const Fn& fn) {
  const int64_t blocks = (out_features + kFusedBlock - 1) / kFusedBlock;
#pragma omp parallel for schedule(dynamic, 1) num_threads(at::get_num_threads())
  for (int64_t block = 0; block < blocks; ++block) {
    fn(block * kFusedBlock, std::min(out_features, (block + 1) * kFusedBlock));
  }
}

// Few rows: K is walked in chunks so that the chunk of every activation row stays in L1 while the block's weight
// rows stream past, so the weight is read once. span_dot(n, k0, len, x_chunk, buffer, fresh) returns the dot of
// x_chunk with columns [k0, k0 + len) of weight row n; `buffer` (chunk floats) may hold that dequantized span,
// filled when `fresh` (the first activation row) and reused for the others.
template <typename SpanDot>
at::Tensor fused_matmul(const at::Tensor& x32, int64_t out_features, int64_t chunk, const SpanDot& span_dot) {
  const int64_t rows = x32.size(0), in_features = x32.size(1);
  auto out = at::zeros({rows, out_features}, x32.options());
  const float* x = x32.data_ptr<float>();
  float* o = out.data_ptr<float>();
  for_channel_blocks(out_features, [&](int64_t begin, int64_t end) {
    std::vector<float> buffer(chunk);
    for (int64_t k0 = 0; k0 < in_features; k0 += chunk) {
      const int64_t len = std::min(chunk, in_features - k0);
      for (int64_t n = begin; n < end; ++n) {
        for (int64_t m = 0; m < rows; ++m) {
          o[m * out_features + n] += span_dot(n, k0, len, x + m * in_features + k0, buffer.data(), m == 0);
        }
      }
    }
  });
  return out;
}

at::Tensor qmatmul_int8_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                            const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(qweight.scalar_type() == at::kChar, "qmatmul_int8: qweight must be int8");
  check_inputs("qmatmul_int8", x, qweight, qweight.size(1), scales, bias);
  TORCH_CHECK(scales.dim() == 1 && scales.size(0) == qweight.size(0), "qmatmul_int8: scales must be (N,)");
  const int64_t rows = x.size(0), out_features = qweight.size(0), in_features = qweight.size(1);
  if (empty_problem(rows, out_features, in_features)) return bias_only(x, out_features, bias);
  const auto x32 = x.to(at::kFloat);
  const int8_t* q = qweight.data_ptr<int8_t>();
  const float* s = scales.data_ptr<float>();
  if (rows > kFusedMaxRows) {
    auto out = panel_matmul(x32, out_features, [&](int64_t n, float* dst) {
      dequantize_int8_row(q + n * in_features, s[n], dst, in_features);
    });
    return finish(out, bias, x);
  }
  const int64_t chunk = kChunkFloats / std::max<int64_t>(rows, 1);
  auto out =
      fused_matmul(x32, out_features, chunk, [&](int64_t n, int64_t k0, int64_t len, const float* xc, float*, bool) {
        return dot_int8(xc, q + n * in_features + k0, len) * s[n];
      });
  return finish(out, bias, x);
}

at::Tensor qmatmul_int4_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                            const at::Tensor& zeros, int64_t group_size, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(qweight.scalar_type() == at::kByte, "qmatmul_int4: qweight must be uint8 (two values per byte)");
  const int64_t rows = x.size(0), out_features = qweight.size(0), in_features = 2 * qweight.size(1);
  check_inputs("qmatmul_int4", x, qweight, in_features, scales, bias);
  TORCH_CHECK(group_size >= 2 && group_size % 2 == 0 && in_features % group_size == 0,
              "qmatmul_int4: group_size must be even and divide K");
  const int64_t groups = in_features / group_size, half = in_features / 2, half_group = group_size / 2;
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == out_features && scales.size(1) == groups,
              "qmatmul_int4: scales must be (N, K / group_size)");
  TORCH_CHECK(zeros.scalar_type() == at::kByte && zeros.is_contiguous() && zeros.sizes() == scales.sizes(),
              "qmatmul_int4: zeros must be contiguous uint8 shaped like scales");
  if (empty_problem(rows, out_features, in_features)) return bias_only(x, out_features, bias);
  const auto x32 = x.to(at::kFloat);
  const uint8_t* q = qweight.data_ptr<uint8_t>();
  const uint8_t* z = zeros.data_ptr<uint8_t>();
  const float* s = scales.data_ptr<float>();
  if (rows > kFusedMaxRows) {
    auto out = panel_matmul(x32, out_features, [&](int64_t n, float* dst) {
      for (int64_t g = 0; g < groups; ++g) {
        const uint8_t* b = q + n * half + g * half_group;
        dequantize_int4_group(b, s[n * groups + g], static_cast<float>(z[n * groups + g]), dst + g * group_size,
                              half_group);
      }
    });
    return finish(out, bias, x);
  }
  // whole groups; the dequantized buffer shares the L1 budget with the activation chunks
  const int64_t chunk = std::max<int64_t>(1, kChunkFloats / (rows + 1) / group_size) * group_size;
  auto out = fused_matmul(
      x32, out_features, chunk, [&](int64_t n, int64_t k0, int64_t len, const float* xc, float* buffer, bool fresh) {
        if (fresh) {
          for (int64_t g = k0 / group_size; g < (k0 + len) / group_size; ++g) {
            dequantize_int4_group(q + n * half + g * half_group, s[n * groups + g],
                                  static_cast<float>(z[n * groups + g]), buffer + g * group_size - k0, half_group);
          }
        }
        return dot_f32(xc, buffer, len);
      });
  return finish(out, bias, x);
}

// |v| as bits: for non-negative floats the integer order is the float order, and a NaN lands above inf, so the
// integer maximum of these is an amax that propagates NaN (std::max on floats drops it).
RLHF_FAST_SIMD_CLONES uint32_t amax_bits(const float* x, int64_t n) {
  uint32_t top = 0;
#pragma omp simd reduction(max : top)
  for (int64_t k = 0; k < n; ++k) {
    uint32_t bits;
    std::memcpy(&bits, x + k, sizeof bits);
    top = std::max(top, bits & 0x7fffffffu);
  }
  return top;
}

// Per-token symmetric int8, exactly the float32 operations of reference.quantize_activations_int8: a NaN or inf in
// a row gives inv = 0, q = 0 and scale NaN or inf (its output row is NaN); a NaN product gives q = 0.
void quantize_rows(const float* x, int64_t rows, int64_t in_features, int8_t* q, float* scale) {
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const float* xr = x + m * in_features;
      const uint32_t bits = amax_bits(xr, in_features);
      float amax;
      std::memcpy(&amax, &bits, sizeof amax);
      const float inv = amax > 0.f ? 127.f / amax : 0.f;
      for (int64_t k = 0; k < in_features; ++k) {
        const float p = xr[k] * inv;
        q[m * in_features + k] = std::isnan(p) ? 0 : static_cast<int8_t>(std::clamp(std::nearbyint(p), -127.f, 127.f));
      }
      scale[m] = amax / 127.f;
    }
  });
}

at::Tensor qmatmul_w8a8_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                            const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(qweight.scalar_type() == at::kChar, "qmatmul_w8a8: qweight must be int8");
  check_inputs("qmatmul_w8a8", x, qweight, qweight.size(1), scales, bias);
  TORCH_CHECK(scales.dim() == 1 && scales.size(0) == qweight.size(0), "qmatmul_w8a8: scales must be (N,)");
  const int64_t rows = x.size(0), out_features = qweight.size(0), in_features = qweight.size(1);
  if (empty_problem(rows, out_features, in_features)) return bias_only(x, out_features, bias);
  const auto x32 = x.to(at::kFloat);
  auto xq = at::empty({rows, in_features}, x.options().dtype(at::kChar));
  auto x_scale = at::empty({rows}, x32.options());
  quantize_rows(x32.data_ptr<float>(), rows, in_features, xq.data_ptr<int8_t>(), x_scale.data_ptr<float>());
  const int8_t* w = qweight.data_ptr<int8_t>();
  const float* s = scales.data_ptr<float>();
  if (rows > kFusedMaxRows) {
    auto out = panel_matmul(xq.to(at::kFloat), out_features, [&](int64_t n, float* dst) {
      dequantize_int8_row(w + n * in_features, 1.f, dst, in_features);
    });
    out.mul_(x_scale.unsqueeze(1)).mul_(scales.unsqueeze(0));
    return finish(out, bias, x);
  }
  auto out = at::empty({rows, out_features}, x32.options());
  const int8_t* a = xq.data_ptr<int8_t>();
  const float* sa = x_scale.data_ptr<float>();
  float* o = out.data_ptr<float>();
  for_channel_blocks(out_features, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int8_t* row = w + n * in_features;
      for (int64_t m = 0; m < rows; ++m) {
        const int32_t acc = dot_int8_int8(a + m * in_features, row, in_features);
        o[m * out_features + n] = static_cast<float>(acc) * sa[m] * s[n];
      }
    }
  });
  return finish(out, bias, x);
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_fast, CPU, m) {
  m.impl("qmatmul_int8", &qmatmul_int8_cpu);
  m.impl("qmatmul_int4", &qmatmul_int4_cpu);
  m.impl("qmatmul_w8a8", &qmatmul_w8a8_cpu);
}

}  // namespace rlhf_fast
