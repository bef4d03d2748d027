// Host-side argument checks and the row layout shared by the CPU and CUDA log-prob kernels.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>

#ifdef __CUDACC__
#define RLHF_FAST_LOGPROBS_HD __host__ __device__
#else
#define RLHF_FAST_LOGPROBS_HD
#endif

namespace rlhf_fast {
namespace logprobs {

// Rows of a logits tensor (A, B, V) whose last dim is contiguous: row r = (r / inner, r % inner).
struct RowLayout {
  int64_t rows, inner, stride_outer, stride_inner, vocab;

  RLHF_FAST_LOGPROBS_HD int64_t offset(int64_t row) const {
    return (row / inner) * stride_outer + (row % inner) * stride_inner;
  }
};

inline RowLayout row_layout(const at::Tensor& logits, const char* op) {
  TORCH_CHECK(logits.dim() == 3, op, ": logits must be (A, B, V), got ", logits.dim(), " dims");
  TORCH_CHECK(logits.is_floating_point(), op, ": logits must be floating point");
  TORCH_CHECK(logits.size(2) > 0, op, ": logits must have a non-empty vocab dim");
  TORCH_CHECK(logits.stride(2) == 1 || logits.size(2) == 1, op, ": logits must have a contiguous last dim");
  return {logits.size(0) * logits.size(1), logits.size(1) > 0 ? logits.size(1) : 1, logits.stride(0),
          logits.stride(1), logits.size(2)};
}

// An (A, B) tensor of the given dtype, contiguous, on the logits' device.
inline void check_per_row(const at::Tensor& t, const at::Tensor& logits, at::ScalarType dtype, const char* name,
                          const char* op) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == logits.size(0) && t.size(1) == logits.size(1), op, ": ", name,
              " must have shape (A, B) = ", logits.sizes().slice(0, 2), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype && t.is_contiguous(), op, ": ", name, " must be contiguous ", dtype);
  TORCH_CHECK(t.device() == logits.device(), op, ": ", name, " must be on the logits' device");
}

inline void check_optional_per_row(const c10::optional<at::Tensor>& t, const at::Tensor& logits,
                                   at::ScalarType dtype, const char* name, const char* op) {
  if (t.has_value()) check_per_row(*t, logits, dtype, name, op);
}

inline void check_temperature(double temperature, const char* op) {
  TORCH_CHECK(temperature > 0, op, ": temperature must be positive, got ", temperature);
}

inline void check_backward_inputs(const c10::optional<at::Tensor>& grad_logp,
                                  const c10::optional<at::Tensor>& grad_entropy, const at::Tensor& logits,
                                  const c10::optional<at::Tensor>& labels, const at::Tensor& lse,
                                  const at::Tensor& entropy, double temperature, const char* op) {
  check_optional_per_row(labels, logits, at::kLong, "labels", op);
  check_per_row(lse, logits, at::kFloat, "lse", op);
  check_optional_per_row(grad_logp, logits, at::kFloat, "grad_logp", op);
  check_optional_per_row(grad_entropy, logits, at::kFloat, "grad_entropy", op);
  if (grad_entropy.has_value()) check_per_row(entropy, logits, at::kFloat, "entropy", op);
  TORCH_CHECK(!grad_logp.has_value() || labels.has_value(), op, ": grad_logp needs labels");
  check_temperature(temperature, op);
}

}  // namespace logprobs
}  // namespace rlhf_fast
