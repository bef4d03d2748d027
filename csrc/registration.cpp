// The one place where every rlhf_fast op schema is declared. Kernels register per backend in
// csrc/cpu/<family>.cpp and csrc/cuda/<family>.cu; fake kernels and autograd live in rlhf_fast/_ops.py.
#include <torch/extension.h>

namespace rlhf_fast {

bool built_with_cuda() {
#ifdef RLHF_FAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace rlhf_fast

TORCH_LIBRARY(rlhf_fast, m) {
  // ---- advantages (GAE and group/whitening statistics) ----
  // Packed layout: rewards/values/mask are 1-D over all tokens, segment s spans [cu_seqlens[s], cu_seqlens[s+1]).
  m.def("gae(Tensor rewards, Tensor values, Tensor? mask, Tensor? last_value, Tensor cu_seqlens, "
        "float gamma, float lam) -> (Tensor advantages, Tensor returns)");
  // scores (G*group_size,) -> advantages fp32; leave_one_out selects RLOO, else GRPO (optionally / std).
  m.def("group_advantages(Tensor scores, int group_size, bool norm_std, bool leave_one_out, float eps) -> Tensor");
  // (count, sum, sum of squares) of the masked entries, float64, shape (3,).
  m.def("masked_moments(Tensor x, Tensor? mask) -> Tensor");

  // ---- quant (quantized matmuls: out (M, N) = x (M, K) @ W^T + bias, in x's dtype) ----
  // x contiguous (M, K) float32/bfloat16/float16; bias float32 (N,). See rlhf_fast/quant.py for the schemes.
  // int8 weight-only: qweight int8 (N, K), scales float32 (N,).
  m.def("qmatmul_int8(Tensor x, Tensor qweight, Tensor scales, Tensor? bias) -> Tensor");
  // int4 weight-only: qweight uint8 (N, K/2) (even k in the low nibble), scales float32 and zeros uint8
  // (N, K/group_size).
  m.def("qmatmul_int4(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, int group_size, Tensor? bias) -> Tensor");
  // W8A8: int8 weight as qmatmul_int8, activations quantized per token inside the op, int32 accumulation.
  m.def("qmatmul_w8a8(Tensor x, Tensor qweight, Tensor scales, Tensor? bias) -> Tensor");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "rlhf_fast compiled kernels (ops are registered under torch.ops.rlhf_fast)";
  module.def("built_with_cuda", &rlhf_fast::built_with_cuda,
             "True when the CUDA sources were compiled into this library");
}
