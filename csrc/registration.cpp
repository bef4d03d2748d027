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

  // ---- divergence (f-divergences between softmax(logits_p / T) and softmax(logits_q / T)) ----
  // logits (rows, V), unit vocab stride, any row stride; mask (rows,) bool or None. out (rows,) fp32; stats
  // (rows, 3) fp32 = (lse_p, lse_q, aux), saved for the backward. Kinds: kl, reverse_kl, js, tv, hellinger, chi2,
  // alpha (alpha used only by the last).
  m.def("f_divergence(Tensor logits_p, Tensor logits_q, Tensor? mask, str kind, float alpha, float temperature) "
        "-> (Tensor out, Tensor stats)");
  // Gradients in the logits' dtype, (rows, V) contiguous, or (0,) when not needed.
  m.def("f_divergence_backward(Tensor grad_out, Tensor logits_p, Tensor logits_q, Tensor? mask, Tensor out, "
        "Tensor stats, str kind, float alpha, float temperature, bool need_grad_p, bool need_grad_q) "
        "-> (Tensor grad_p, Tensor grad_q)");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "rlhf_fast compiled kernels (ops are registered under torch.ops.rlhf_fast)";
  module.def("built_with_cuda", &rlhf_fast::built_with_cuda,
             "True when the CUDA sources were compiled into this library");
}
