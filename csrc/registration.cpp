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
  m.def(
      "gae(Tensor rewards, Tensor values, Tensor? mask, Tensor? last_value, Tensor cu_seqlens, "
      "float gamma, float lam) -> (Tensor advantages, Tensor returns)");
  // scores (G*group_size,) -> advantages fp32; leave_one_out selects RLOO, else GRPO (optionally / std).
  m.def("group_advantages(Tensor scores, int group_size, bool norm_std, bool leave_one_out, float eps) -> Tensor");
  // (count, sum, sum of squares) of the masked entries, float64, shape (3,).
  m.def("masked_moments(Tensor x, Tensor? mask) -> Tensor");

  // ---- logprobs (fused log-softmax + gather + entropy) ----
  // logits (A, B, V) with a contiguous last dim and any strides on A and B (so logits[:, :-1] of a (B, T, V)
  // tensor needs no copy); labels (A, B) int64 contiguous, or None for the entropy alone.
  // Returns logp (A, B) fp32 ((0,) without labels; 0 where the label is ignore_index), the entropy (A, B)
  // fp32 and the per-row log-sum-exp of logits / temperature (A, B) fp32, which the backward needs.
  m.def(
      "logprobs_forward(Tensor logits, Tensor? labels, float temperature, int ignore_index) "
      "-> (Tensor logp, Tensor entropy, Tensor lse)");
  // d(logits) (A, B, V) contiguous, in the logits' dtype, for upstream gradients grad_logp / grad_entropy
  // (A, B) fp32 contiguous (either may be None). A label outside [0, V) other than ignore_index adds no one-hot
  // term (only -p g_lp / T): that is how a slice of the vocab is differentiated (linear_logprobs).
  m.def(
      "logprobs_backward(Tensor? grad_logp, Tensor? grad_entropy, Tensor logits, Tensor? labels, Tensor lse, "
      "Tensor entropy, float temperature, int ignore_index) -> Tensor");
  // The same gradient written over the logits (their strides kept): the logits are destroyed.
  m.def(
      "logprobs_backward_(Tensor? grad_logp, Tensor? grad_entropy, Tensor(a!) logits, Tensor? labels, "
      "Tensor lse, Tensor entropy, float temperature, int ignore_index) -> ()");
  // ---- losses (KL penalty, fused PPO policy / value losses) ----
  // Elementwise KL estimator of logp against ref_logp (same shape and dtype) -> fp32; kind: k1, abs, k2/mse,
  // k3/low_var_kl, k1+, k3+. The backward gives d/dlogp in logp's dtype (d/dref_logp is its negative).
  m.def("kl_penalty(Tensor logp, Tensor ref_logp, str kind) -> Tensor");
  m.def("kl_penalty_backward(Tensor grad, Tensor logp, Tensor ref_logp, str kind) -> Tensor");
  // PPO losses over (rows, steps) inputs of one dtype: fp32 0-dim loss and fp32 stats (5,) = (clipfrac,
  // approx_kl, ratio_mean, valid tokens, valid rows). agg: token-mean, token-sum, seq-mean-token-sum,
  // seq-mean-token-mean, seq-mean-token-sum-norm. The backwards take the forward's stats and give the gradient
  // of the first input (logp / values) in its dtype.
  m.def(
      "ppo_policy_loss(Tensor logp, Tensor old_logp, Tensor advantages, Tensor? mask, float clip_low, "
      "float clip_high, float? dual_clip, str agg) -> (Tensor loss, Tensor stats)");
  m.def(
      "ppo_policy_loss_backward(Tensor grad_loss, Tensor logp, Tensor old_logp, Tensor advantages, "
      "Tensor? mask, Tensor stats, float clip_low, float clip_high, float? dual_clip, str agg) -> Tensor");
  m.def(
      "ppo_value_loss(Tensor values, Tensor old_values, Tensor returns, Tensor? mask, float clip, str agg) "
      "-> (Tensor loss, Tensor stats)");
  m.def(
      "ppo_value_loss_backward(Tensor grad_loss, Tensor values, Tensor old_values, Tensor returns, "
      "Tensor? mask, Tensor stats, float clip, str agg) -> Tensor");
  // ---- quant (quantized matmuls: out (M, N) = x (M, K) @ W^T + bias, in x's dtype) ----
  // x contiguous (M, K) float32/bfloat16/float16; bias float32 (N,). See rlhf_fast/quant.py for the schemes.
  // int8 weight-only: qweight int8 (N, K), scales float32 (N,).
  m.def("qmatmul_int8(Tensor x, Tensor qweight, Tensor scales, Tensor? bias) -> Tensor");
  // int4 weight-only: qweight uint8 (N, K/2) (even k in the low nibble), scales float32 and zeros uint8
  // (N, K/group_size).
  m.def("qmatmul_int4(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, int group_size, Tensor? bias) -> Tensor");
  // W8A8: int8 weight as qmatmul_int8, activations quantized per token inside the op, int32 accumulation.
  m.def("qmatmul_w8a8(Tensor x, Tensor qweight, Tensor scales, Tensor? bias) -> Tensor");
  // ---- sampling (one token per row from softmax(logits / T) under top-k, then top-p, then min-p) ----
  // logits (A, B, V) with a contiguous last dim, any strides on A and B; uniforms (A, B) float64 in [0, 1),
  // one per row; top_k 0, top_p 1 and min_p 0 turn a filter off. Returns tokens (A, B) int64 and the fp32
  // log-probs of the tokens under the filtered, renormalised distribution and under the full softmax. A row
  // with a NaN or no finite entry gives token 0 and NaN log-probs.
  m.def(
      "sample(Tensor logits, Tensor uniforms, float temperature, int top_k, float top_p, float min_p) "
      "-> (Tensor tokens, Tensor logp_filtered, Tensor logp_full)");
  // ---- divergence (f-divergences between softmax(logits_p / T) and softmax(logits_q / T)) ----
  // logits (rows, V), unit vocab stride, any row stride; mask (rows,) bool or None. out (rows,) fp32; stats
  // (rows, 3) fp32 = (lse_p, lse_q, aux), saved for the backward. Kinds: kl, reverse_kl, js, tv, hellinger, chi2,
  // alpha (alpha used only by the last).
  m.def(
      "f_divergence(Tensor logits_p, Tensor logits_q, Tensor? mask, str kind, float alpha, float temperature) "
      "-> (Tensor out, Tensor stats)");
  // js / tv over some vocab columns given the rows' log-normalisers (stats (rows, 3): lse_p, lse_q, unused):
  // (rows, 2) fp32 sums, js: (sum P log(P/M), sum Q log(Q/M)); tv: (sum |P - Q|, sum P sign(P - Q)); masked rows 0.
  m.def(
      "f_divergence_second_pass(Tensor logits_p, Tensor logits_q, Tensor? mask, Tensor stats, str kind, "
      "float temperature) -> Tensor");
  // Gradients in the logits' dtype, (rows, V) contiguous, or (0,) when not needed.
  m.def(
      "f_divergence_backward(Tensor grad_out, Tensor logits_p, Tensor logits_q, Tensor? mask, Tensor out, "
      "Tensor stats, str kind, float alpha, float temperature, bool need_grad_p, bool need_grad_q) "
      "-> (Tensor grad_p, Tensor grad_q)");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "rlhf_fast compiled kernels (ops are registered under torch.ops.rlhf_fast)";
  module.def("built_with_cuda", &rlhf_fast::built_with_cuda,
             "True when the CUDA sources were compiled into this library");
}
