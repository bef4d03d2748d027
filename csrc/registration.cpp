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
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "rlhf_fast compiled kernels (ops are registered under torch.ops.rlhf_fast)";
  module.def("built_with_cuda", &rlhf_fast::built_with_cuda,
             "True when the CUDA sources were compiled into this library");
}
