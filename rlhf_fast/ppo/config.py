"""Every knob of `rlhf-fast train`, one documented dataclass field each; the command line is built from it.

The PPO-max switches (MOSS-RLHF, "Secrets of RLHF in Large Language Models Part I") default to the paper's
values: reward normalisation and clipping at 10, token-level KL penalty in the reward, advantage whitening,
policy clip 0.2, value clip 0.2, global gradient clip 1.0, gamma 1, lambda 0.95. The KL penalty is the exception:
PPO-max's fixed 0.02 let the default task's KL(policy || ref) reach 11 nats, so it starts at 0.3 under the adaptive
controller (target 2.5 nats per sequence) after a longer warm-up (25 supervised steps).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from dataclasses import dataclass, field

from rlhf_fast.reference import F_DIVERGENCES

from . import presets


def _opt(default, help: str, choices=None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class PPOConfig:
    """Every setting of a `train` run; the command line has one ``--flag`` per field (``rlhf-fast train --help``).

    Boolean fields are ``--flag`` / ``--no-flag`` on the command line, and ``None`` is spelled ``none``.
    `validate` checks the combinations; the trainer checks paths and files before any work.

    Parameters
    ----------
    out : str
        Output folder: ``metrics.jsonl``, ``summary.json``, ``reward_kl.png``, ``checkpoint/``, ``policy/``.
    resume : str or None
        Continue the run saved in this folder (from the command line: with its config, overridden by the
        flags given, e.g. a larger ``--total-steps``).
    seed : int
        Seed of the model init, prompt sampling, generation and minibatch order.
    device : str
        ``"auto"`` (cuda if visible), ``"cpu"`` or ``"cuda"``.
    threads : int
        torch CPU threads per process; 0: the cores available / processes per machine.
    fsdp : bool
        Shard the policy, critic, reference and reward model with FSDP2 (``fully_shard`` per decoder layer and
        per model) instead of replicating them with DDP; sharded checkpoints. Under torchrun, or alone as one
        process.
    kernels : str
        ``"on"``: the rlhf_fast fused ops; ``"off"``: the eager torch references of `rlhf_fast.reference`
        (A/B runs).
    fused_head : bool
        With kernels on, log-probs straight from the hidden states and the lm-head weight (`linear_logprobs`,
        with the config's logit scale / soft cap) and the policy loss through `linear_ppo_policy_loss`.
    dtype : str
        ``"fp32"``, or ``"bf16"``: the policy and critic under bf16 autocast (float32 master weights and
        optimiser state), the frozen reference and reward model held in bf16; log-probs and losses stay
        float32.
    grad_checkpointing : bool
        Recompute each decoder layer's activations in the backward (policy and critic).
    save_every : int
        PPO steps between checkpoints (one is always written at the end).
    progress : bool
        tqdm progress bar.
    plot : bool
        Write ``reward_kl.png`` at the end.
    model : str or None
        Local Hugging Face causal-LM folder (with its tokenizer; needs `prompts`); None: the embedded tiny
        Llama.
    reward_model : str or None
        Local sequence-classification reward model folder (score = logit 0).
    reward : str or None
        ``module:function`` with ``fn(prompts: list[str], responses: list[str]) -> list[float]``; None: the
        task's verifier.
    prompts : str or None
        JSON-lines file of ``{"prompt": ..., "response": ...}`` objects (``response``, a demonstration, is
        optional); None: the embedded digit-sorting task.
    ref_quant : str
        ``"none" | "int8" | "int4" | "w8a8"``: quantize the frozen reference with `rlhf_fast.quantize_model`.
    reward_quant : str
        The same for the reward model.
    quant_group_size : int
        int4 group size along K for `ref_quant` / `reward_quant` (must divide every quantized layer's input
        size).
    preset : str or None
        A named model shape filling the fields left at their defaults; ``"qwen-shape"``: Qwen2.5-0.5B's
        vocabulary (151936) and tied embeddings on a h128 L2 trunk.
    task_length : int
        Default task: digits per prompt.
    hidden_size : int
        Embedded tiny Llama: hidden size (the MLP is twice that).
    num_layers : int
        Embedded tiny Llama: decoder layers.
    num_heads : int
        Embedded tiny Llama: attention heads.
    tie_embeddings : bool
        Embedded Llama: the lm head shares the input embedding (as in Qwen2.5-0.5B).
    vocab_size : int
        Embedded Llama: vocabulary rows; 0: the tokenizer's; more pads the lm head to a real model's size
        (ids past the tokenizer decode to nothing), for timing.
    eval_size : int
        Held-out prompts of the greedy evaluation before and after training.
    warmup_steps : int
        Supervised steps on the task's demonstrations before RL (skipped when there are none).
    warmup_batch : int
        Demonstrations per warm-up step.
    warmup_lr : float
        Warm-up learning rate (AdamW).
    algo : str
        ``"ppo"`` (critic + GAE), ``"grpo"`` or ``"rloo"`` (critic-free group advantages).
    divergence : str or None
        f-DPG: ``"rkl" | "fkl" | "js" | "tv"``, train towards p ∝ ref · exp(r / kl_coef) with the
        per-sequence pseudo-reward -f'(π/p); ``rkl`` equals the KL-penalised PPO reward.
    total_steps : int
        PPO steps (rollout + update each).
    batch_size : int
        Prompts per step, over all processes.
    group_size : int
        Samples per prompt (grpo / rloo need >= 2).
    max_new_tokens : int
        Response length limit.
    temperature : float
        Sampling temperature (the log-probs use the same).
    rollout_logprobs : bool
        Take the old log-probs (and entropies) of the update from the sampler during the rollout instead of a
        second policy forward pass.
    ppo_epochs : int
        Passes over each rollout batch.
    minibatch_size : int
        Sequences per optimiser step, per process.
    lr : float
        Policy learning rate (AdamW).
    critic_lr : float
        Critic learning rate (AdamW).
    critic_init : str
        ``"reward-model"``: the critic's trunk and value head from the reward model (PPO-max; needs
        `reward_model` with the policy's tokenizer); ``"policy"``: the policy's trunk with a zero head;
        ``"auto"``: the reward model when there is one.
    critic_embedding : str
        ``"frozen"``: the critic's input embedding is frozen and read through the reference's (or the reward
        model's) table when that holds the same values (no copy, gradient or optimiser state of its own);
        ``"trainable"``: its own trained copy.
    gamma : float
        Discount.
    lam : float
        GAE lambda.
    reward_norm : bool
        Normalise scores by their running mean and std.
    reward_clip : float
        Clip normalised scores to ± this.
    kl_coef : float
        KL coefficient β, the adaptive controller's starting value (PPO-max's fixed 0.02 let the default
        task's KL(policy ‖ ref) reach 11 nats).
    kl_in_loss : bool
        KL as a loss term (estimator `kl_estimator`) instead of a token-level penalty in the reward.
    kl_estimator : str
        KL estimator of the penalty or loss: ``k1 | abs | k2 | mse | k3 | low_var_kl | k1+ | k3+``.
    kl_full_vocab : str or None
        A `rlhf_fast.f_divergence` kind: the KL becomes the loss term kl_coef × agg(D), D the exact
        per-token f-divergence of the policy from the reference over the whole vocabulary, instead of a
        sampled estimator (no KL penalty in the reward).
    kl_full_vocab_alpha : float or None
        The α of ``kl_full_vocab="alpha"`` (not 0 or 1).
    adaptive_kl : bool
        Adaptive KL controller (Ziegler et al.) towards `kl_target`.
    kl_target : float
        Adaptive KL: target sequence KL(policy ‖ ref), nats.
    kl_horizon : int
        Adaptive KL: horizon in samples (β moves by at most 20% × samples / horizon per step: 1% per step at
        64 samples).
    whiten_advantages : bool
        Whiten advantages over the batch.
    clip_low : float
        Policy ratio clip below 1.
    clip_high : float
        Policy ratio clip above 1.
    dual_clip : float or None
        Dual-clip constant c > 1 for negative advantages (e.g. 3).
    value_clip : float or None
        Value clip around the old values; None: off.
    vf_coef : float
        Value-loss weight.
    entropy_coef : float
        Entropy bonus weight.
    max_grad_norm : float
        Global gradient-norm clip (policy and critic each).
    critic_warmup_steps : int
        Steps that train only the critic before the policy moves.
    ptx_coef : float
        PPO-ptx: weight of the supervised loss on demonstrations mixed into each update.
    target_kl : float or None
        Stop a step's epochs early when approx KL(old ‖ new) > 1.5 × this.
    loss_agg : str
        Loss aggregation, an `rlhf_fast.agg_loss` mode.

    Notes
    -----
    The PPO-max switches (MOSS-RLHF) default to the paper's values: reward normalisation and clipping at 10,
    token-level KL penalty in the reward, advantage whitening, policy clip 0.2, value clip 0.2, global
    gradient clip 1.0, gamma 1, lambda 0.95. The KL penalty is the exception: it starts at 0.3 under the
    adaptive controller (target 2.5 nats per sequence) after a longer warm-up (25 supervised steps).
    """

    # ---- run
    out: str = _opt("runs/ppo", "output folder: metrics.jsonl, summary.json, reward_kl.png, checkpoint/, policy/")
    resume: str | None = _opt(
        None,
        "continue the run saved in this folder (its config, overridden by the flags "
        "given, e.g. a larger --total-steps)",
    )
    seed: int = _opt(0, "seed of the model init, prompt sampling, generation and minibatch order")
    device: str = _opt("auto", "auto (cuda if visible), cpu or cuda", ["auto", "cpu", "cuda"])
    threads: int = _opt(0, "torch CPU threads per process; 0: the cores available / processes per machine")
    fsdp: bool = _opt(
        False,
        "shard the policy, critic, reference and reward model with FSDP2 (fully_shard per "
        "decoder layer and per model; with --dtype bf16 the trainable models gather bf16 "
        "weights) instead of replicating them with DDP; sharded checkpoints "
        "(torch.distributed.checkpoint). Under torchrun, or alone as one process",
    )
    kernels: str = _opt("on", "on: rlhf_fast fused ops; off: the eager torch references (A/B timing)", ["on", "off"])
    fused_head: bool = _opt(
        True,
        "with kernels on, log-probs straight from hidden states and the lm-head weight "
        "(linear_logprobs, no full logits; with the config's logit scale / soft cap)",
    )
    dtype: str = _opt(
        "fp32",
        "bf16: the policy and critic run under bf16 autocast (float32 master weights and "
        "optimiser state), the frozen reference and reward model hold bf16 weights; "
        "log-probs and losses stay float32",
        ["fp32", "bf16"],
    )
    grad_checkpointing: bool = _opt(
        False, "recompute each decoder layer's activations in the backward (policy and critic) instead of keeping them"
    )
    save_every: int = _opt(25, "PPO steps between checkpoints (one is always written at the end)")
    progress: bool = _opt(True, "tqdm progress bar")
    plot: bool = _opt(True, "write reward_kl.png at the end")

    # ---- models and data
    model: str | None = _opt(None, "local Hugging Face causal-LM folder; default: the embedded tiny Llama")
    reward_model: str | None = _opt(None, "local sequence-classification reward model folder (score = logit 0)")
    reward: str | None = _opt(
        None, "Python reward module:function(prompts, responses) -> list[float]; default: the task's verifier"
    )
    prompts: str | None = _opt(
        None,
        'JSON-lines prompts file ({"prompt": ..., optional "response": ...}); default: the embedded digit-sorting task',
    )
    ref_quant: str = _opt(
        "none", "quantize the frozen reference with rlhf_fast.quantize_model", ["none", "int8", "int4", "w8a8"]
    )
    reward_quant: str = _opt(
        "none", "quantize the reward model with rlhf_fast.quantize_model", ["none", "int8", "int4", "w8a8"]
    )
    quant_group_size: int = _opt(
        128, "int4 group size along K for --ref-quant / --reward-quant (must divide every quantized layer's input size)"
    )
    preset: str | None = _opt(
        None,
        "a named model shape (rlhf_fast.ppo.presets) filling the fields left at their "
        "defaults; qwen-shape: Qwen2.5-0.5B's vocabulary (151936) and tied embeddings "
        "on a h128 L2 trunk",
        ["qwen-shape"],
    )
    task_length: int = _opt(6, "default task: digits per prompt")
    hidden_size: int = _opt(64, "embedded tiny Llama: hidden size (MLP is twice that)")
    num_layers: int = _opt(2, "embedded tiny Llama: decoder layers")
    num_heads: int = _opt(4, "embedded tiny Llama: attention heads")
    tie_embeddings: bool = _opt(False, "embedded Llama: the lm head shares the input embedding (as in Qwen2.5-0.5B)")
    vocab_size: int = _opt(
        0,
        "embedded Llama: vocabulary rows; 0: the tokenizer's; more pads the lm head to a "
        "real model's size (ids past the tokenizer decode to nothing), for timing",
    )
    eval_size: int = _opt(256, "held-out prompts for the greedy evaluation before and after training")

    # ---- supervised warm-up on the task's demonstrations (skipped when there are none)
    warmup_steps: int = _opt(
        25,
        "supervised steps before RL: a reference that already knows the format, so RL has "
        "to move it less (short enough to leave room to improve)",
    )
    warmup_batch: int = _opt(64, "demonstrations per warm-up step")
    warmup_lr: float = _opt(3e-3, "warm-up learning rate (AdamW)")

    # ---- RL algorithm
    algo: str = _opt("ppo", "ppo (critic + GAE), grpo or rloo (critic-free group advantages)", ["ppo", "grpo", "rloo"])
    divergence: str | None = _opt(
        None,
        "f-DPG: train towards p ~ ref * exp(r / kl_coef) with the per-sequence "
        "pseudo-reward -f'(pi/p); rkl equals the KL-penalised PPO reward",
        ["rkl", "fkl", "js", "tv"],
    )
    total_steps: int = _opt(250, "PPO steps (rollout + update each)")
    batch_size: int = _opt(64, "prompts per step (over all processes)")
    group_size: int = _opt(1, "samples per prompt (grpo/rloo need >= 2)")
    max_new_tokens: int = _opt(8, "response length limit")
    temperature: float = _opt(1.0, "sampling temperature (log-probs use the same)")
    rollout_logprobs: bool = _opt(
        False,
        "take the old log-probs (and entropies) of the PPO update from the sampler "
        "during the rollout instead of a second policy forward pass",
    )
    ppo_epochs: int = _opt(4, "passes over each rollout batch")
    minibatch_size: int = _opt(32, "sequences per optimiser step (per process)")
    lr: float = _opt(3e-4, "policy learning rate (AdamW)")
    critic_lr: float = _opt(2e-3, "critic learning rate (AdamW)")
    critic_init: str = _opt(
        "auto",
        "critic trunk and value head from the reward model (PPO-max; needs --reward-model "
        "with the policy's tokenizer) or from the policy's trunk with a zero head; auto: "
        "the reward model when there is one",
        ["auto", "reward-model", "policy"],
    )
    critic_embedding: str = _opt(
        "frozen",
        "the critic's input embedding: frozen (read through the reference's or "
        "the reward model's table when it holds the same values: no copy, "
        "gradient or optimiser state of its own) or trainable (its own copy)",
        ["frozen", "trainable"],
    )
    gamma: float = _opt(1.0, "discount")
    lam: float = _opt(0.95, "GAE lambda")

    # ---- PPO-max switches
    reward_norm: bool = _opt(True, "normalise scores by running mean and std")
    reward_clip: float = _opt(10.0, "clip normalised scores to +-this")
    kl_coef: float = _opt(
        0.3,
        "KL coefficient (beta), the adaptive controller's starting value (PPO-max's 0.02 let "
        "the default task's KL(policy || ref) reach 11 nats)",
    )
    kl_in_loss: bool = _opt(
        False, "KL as a loss term (estimator kl_estimator) instead of a token-level penalty in the reward"
    )
    kl_estimator: str = _opt(
        "k1", "KL estimator for the penalty or loss", ["k1", "abs", "k2", "mse", "k3", "low_var_kl", "k1+", "k3+"]
    )
    kl_full_vocab: str | None = _opt(
        None,
        "KL as the loss term kl_coef x agg(D), D the exact per-token f-divergence "
        "of the policy from the reference over the whole vocabulary (f_divergence; "
        "linear_f_divergence with the fused head), instead of a sampled estimator "
        "(no KL penalty in the reward)",
        list(F_DIVERGENCES),
    )
    kl_full_vocab_alpha: float | None = _opt(None, "the alpha of --kl-full-vocab alpha (not 0 or 1)")
    adaptive_kl: bool = _opt(True, "adaptive KL controller (Ziegler et al.) towards kl_target")
    kl_target: float = _opt(2.5, "adaptive KL: target sequence KL(policy || ref), nats")
    kl_horizon: int = _opt(
        1280,
        "adaptive KL: horizon in samples (beta moves by at most 20% x samples / horizon per "
        "step: 1% per step at 64 samples)",
    )
    whiten_advantages: bool = _opt(True, "whiten advantages over the batch")
    clip_low: float = _opt(0.2, "policy ratio clip below 1")
    clip_high: float = _opt(0.2, "policy ratio clip above 1")
    dual_clip: float | None = _opt(None, "dual-clip constant c > 1 for negative advantages (e.g. 3)")
    value_clip: float | None = _opt(0.2, "value clip around the old values")
    vf_coef: float = _opt(0.5, "value-loss weight")
    entropy_coef: float = _opt(0.0, "entropy bonus weight")
    max_grad_norm: float = _opt(1.0, "global gradient-norm clip (policy and critic each)")
    critic_warmup_steps: int = _opt(5, "steps that train only the critic before the policy moves")
    ptx_coef: float = _opt(0.0, "PPO-ptx: weight of the supervised loss on demonstrations mixed into each update")
    target_kl: float | None = _opt(None, "early stop the epochs of a step when approx KL(old||new) > 1.5 x this")
    loss_agg: str = _opt(
        "token-mean",
        "loss aggregation",
        ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"],
    )

    def __post_init__(self):
        presets.apply(self)

    def validate(self) -> None:
        """Checks the combinations of fields that need no files (paths are checked by the trainer, before any work).

        Raises
        ------
        ValueError
            A contradictory or out-of-range setting, naming its ``--flag``.
        """
        if self.algo in ("grpo", "rloo") and self.group_size < 2:
            raise ValueError(f"--algo {self.algo} needs --group-size >= 2 (it compares samples of one prompt)")
        if self.reward is not None and self.reward_model is not None:
            raise ValueError("give --reward or --reward-model, not both")
        if self.dual_clip is not None and self.dual_clip <= 1:
            raise ValueError(f"--dual-clip must be > 1, got {self.dual_clip}")
        if self.divergence is not None and self.kl_coef <= 0:
            raise ValueError("--divergence needs --kl-coef > 0 (it is the temperature beta of the target)")
        if self.fsdp and (self.ref_quant != "none" or self.reward_quant != "none"):
            raise ValueError(
                "--fsdp shards every model's weights; --ref-quant / --reward-quant replace a model's "
                "linear layers with quantized buffers, which FSDP2 does not shard: use one of them"
            )
        if self.kl_full_vocab is not None:
            self._validate_kl_full_vocab()
        elif self.kl_full_vocab_alpha is not None:
            raise ValueError("--kl-full-vocab-alpha is only used by --kl-full-vocab alpha")
        for name in (
            "total_steps",
            "batch_size",
            "group_size",
            "ppo_epochs",
            "minibatch_size",
            "max_new_tokens",
            "save_every",
            "eval_size",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")

    def _validate_kl_full_vocab(self) -> None:
        if self.kl_in_loss:
            raise ValueError(
                "--kl-full-vocab is the KL loss term; it replaces --kl-in-loss's sampled estimator: give one of them"
            )
        if self.divergence is not None:
            raise ValueError(
                "--kl-full-vocab with --divergence: f-DPG already regularises towards the reference "
                "through its target p ~ ref * exp(r / kl_coef); drop one of them"
            )
        if self.kl_coef <= 0:
            raise ValueError(f"--kl-full-vocab needs --kl-coef > 0 (the weight of the term), got {self.kl_coef}")
        if self.kl_full_vocab == "alpha":
            alpha = self.kl_full_vocab_alpha
            if alpha is None or not math.isfinite(alpha) or alpha in (0, 1):
                raise ValueError(
                    f"--kl-full-vocab alpha needs a finite --kl-full-vocab-alpha other than 0 and 1 "
                    f"(those limits are reverse_kl and kl), got {alpha}"
                )
        elif self.kl_full_vocab_alpha is not None:
            raise ValueError(f"--kl-full-vocab-alpha is only used by --kl-full-vocab alpha, not {self.kl_full_vocab}")

    @property
    def kl_in_reward(self) -> bool:
        """Whether the KL regulariser is the token-level penalty in the reward: not with f-DPG (--divergence, whose
        pseudo-reward holds it) nor as a loss term (--kl-in-loss, --kl-full-vocab)."""
        return self.divergence is None and not self.kl_in_loss and self.kl_full_vocab is None


_FIELD_TYPES = typing.get_type_hints(PPOConfig)


def _parser_type(hint):
    """(argparse type, optional) for int / float / str and their `| None` forms."""
    args = typing.get_args(hint)
    base = next(a for a in args if a is not type(None)) if args else hint
    optional = type(None) in args

    def parse(text):
        return None if optional and text.lower() == "none" else base(text)

    parse.__name__ = base.__name__
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One --flag per PPOConfig field (booleans as --flag / --no-flag). Defaults are left out of the namespace
    (argparse.SUPPRESS) so that `from_args` can tell the flags given from the defaults."""
    for f in dataclasses.fields(PPOConfig):
        flag = "--" + f.name.replace("_", "-")
        hint = _FIELD_TYPES[f.name]
        help_text = f"{f.metadata['help']} (default: {f.default})".replace("%", "%%")  # argparse formats help
        if hint is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(
                flag, type=_parser_type(hint), choices=f.metadata["choices"], default=argparse.SUPPRESS, help=help_text
            )


def given(args: argparse.Namespace) -> dict:
    """The config fields set on the command line."""
    names = {f.name for f in dataclasses.fields(PPOConfig)}
    return {k: v for k, v in vars(args).items() if k in names}


def from_args(args: argparse.Namespace) -> PPOConfig:
    cfg = PPOConfig(**given(args))
    cfg.validate()
    return cfg
