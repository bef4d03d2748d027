"""The policy's loss on one minibatch: the clipped objective, the entropy bonus and the KL term (--kl-in-loss's
estimator, or --kl-full-vocab's exact per-token divergence, rlhf_fast.ppo.kl_full).

With the fused head (kernels on, --fused-head) it is one `linear_ppo_policy_loss` call from the trunk's hidden
states and the lm-head weight: the loss's gradients are made in the forward, one token chunk of logits at a
time, and the backward only scales them (no logits recompute). Otherwise the policy's log-probs (and entropy)
go through `ppo_policy_loss`, `agg_loss` and `kl_penalty`. Both give the same loss and metrics.
"""

from __future__ import annotations


def minibatch_policy_loss(
    train_policy,
    ops,
    cfg,
    kl_coef: float,
    *,
    fused: bool,
    input_ids,
    attention,
    labels,
    n_prompt: int,
    old_logp,
    advantages,
    mask,
    ref_logp,
    full_kl=None,
    ref_hidden=None,
):
    """(loss, metrics): the policy's loss (0-dim, differentiable) and its float metrics policy_loss, clipfrac,
    approx_kl, ratio_mean (and kl_loss with --kl-in-loss or --kl-full-vocab, kl_full_vocab: the token mean of the
    divergence, with the latter). Tensors are the minibatch's rows; full_kl: a kl_full.FullVocabKL, ref_hidden:
    these rows of its reference hidden states (or None)."""
    clip = dict(clip_low=cfg.clip_low, clip_high=cfg.clip_high, dual_clip=cfg.dual_clip, agg=cfg.loss_agg)
    tap = None if full_kl is None else full_kl.tap(ref_hidden, input_ids, attention, labels, n_prompt, mask)
    if fused:
        kl = dict(ref_logp=ref_logp, kl_coef=kl_coef, kl_kind=cfg.kl_estimator) if cfg.kl_in_loss else {}
        out = train_policy(
            input_ids,
            attention,
            labels,
            n_prompt,
            tap=tap,
            policy_loss=dict(
                old_logp=old_logp, advantages=advantages, mask=mask, entropy_coef=cfg.entropy_coef, **clip, **kl
            ),
        )
        (loss, stats), divergence = out if tap is not None else (out, None)
        pg_loss, kl_loss = stats["pg_loss"], stats.get("kl")
    else:
        out = train_policy(input_ids, attention, labels, n_prompt, return_entropy=cfg.entropy_coef > 0, tap=tap)
        out, divergence = out if tap is not None else (out, None)
        logp = out[0] if cfg.entropy_coef > 0 else out
        pg_loss, stats = ops.ppo_policy_loss(logp, old_logp, advantages, mask, **clip)
        loss = pg_loss
        if cfg.entropy_coef > 0:
            loss = loss - cfg.entropy_coef * ops.agg_loss(out[1], mask, cfg.loss_agg)
        kl_loss = None
        if cfg.kl_in_loss:
            kl_loss = ops.agg_loss(ops.kl_penalty(logp, ref_logp, cfg.kl_estimator), mask, cfg.loss_agg)
            loss = loss + kl_coef * kl_loss
    metrics = dict(
        policy_loss=pg_loss.item(),
        clipfrac=stats["clipfrac"].item(),
        approx_kl=stats["approx_kl"].item(),
        ratio_mean=stats["ratio_mean"].item(),
    )
    if divergence is not None:
        kl_loss = ops.agg_loss(divergence, mask, cfg.loss_agg)
        loss = loss + kl_coef * kl_loss
        metrics["kl_full_vocab"] = ops.masked_mean(divergence.detach(), mask).item()
    if kl_loss is not None:
        metrics["kl_loss"] = kl_loss.item()
    return loss, metrics
