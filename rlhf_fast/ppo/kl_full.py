"""--kl-full-vocab KIND: the KL regulariser as the exact per-token f-divergence D(policy || reference) between the
two models' next-token distributions over the whole vocabulary (rlhf_fast.f_divergence kinds), a loss term
kl_coef * agg(D) on the response tokens with gradient to the policy only, instead of a sampled estimator of
log pi - log ref. It is the token-level form of the f-divergence family f-DPG's sequence objective is built on.

Where the reference's side comes from:
- fused head (kernels on, --fused-head): the reference's final hidden states at the response positions (B, R, H),
  kept from the scoring pass (H numbers a token where logits would take V), and its lm-head weight; the term is
  `linear_f_divergence`, so neither model's (tokens, V) logits exist.
- otherwise: the reference's logits of the minibatch, recomputed without gradient in the update and dropped
  after it, and `f_divergence` (with --kernels off: the eager reference).
"""

from __future__ import annotations

import torch


class FullVocabKL:
    """The --kl-full-vocab term for the loop's reference model (a models.LogProbModel); inert when cfg.kl_full_vocab
    is None: `reference_scores` then gives only the log-probs and `tap` None."""

    def __init__(self, cfg, ops, ref_lp):
        self.kind, self.ops, self.ref_lp = cfg.kl_full_vocab, ops, ref_lp
        self.options = {"alpha": cfg.kl_full_vocab_alpha, "temperature": ref_lp.temperature}  # the sampling one

    @torch.no_grad()
    def reference_scores(self, input_ids, attention, labels, n_prompt: int):
        """(ref_logp (B, R) fp32, the reference's hidden states (B, R, H) at the response positions when the
        update needs them (the term with the fused head), else None)."""
        if self.kind is None or not self.ref_lp.fused:
            return self.ref_lp(input_ids, attention, labels, n_prompt), None
        # a copy: the tapped slice is a view that would keep the prompt positions' states alive too
        return self.ref_lp(input_ids, attention, labels, n_prompt, tap=lambda head: head.hidden.clone())

    def tap(self, ref_hidden, input_ids, attention, labels, n_prompt: int, mask):
        """A `tap` for the policy's LogProbModel on these rows (None when the term is off): the per-token
        divergence D(policy || reference) (B, R) fp32, 0 where mask (B, R) is False. ref_hidden: these rows of
        `reference_scores`'s hidden states (None: the reference's logits are recomputed here)."""
        if self.kind is None:
            return None
        if ref_hidden is None:
            with torch.no_grad():
                _, ref_logits = self.ref_lp(input_ids, attention, labels, n_prompt, tap=lambda head: head.logits)
        ref_head = self.ref_lp.model.get_output_embeddings()

        def divergence(head):
            if head.logits is not None:
                return self.ops.f_divergence(head.logits, ref_logits, self.kind, mask=mask, **self.options)
            return self.ops.linear_f_divergence(
                head.hidden,
                head.weight,
                ref_hidden,
                ref_head.weight,
                self.kind,
                bias_p=head.bias,
                bias_q=ref_head.bias,
                mask=mask,
                **head.transform,
                **self.options,
            )

        return divergence
