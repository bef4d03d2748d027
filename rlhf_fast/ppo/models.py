"""The four models of the loop and how they are built, loaded, run and scored.

policy: an AutoModelForCausalLM (the embedded tiny Llama, or --model PATH); reference: a frozen copy of the
policy after the warm-up; critic: a causal-LM trunk with a scalar value head (initialised from the reward
model, as in PPO-max, or from the policy's trunk); reward: a sequence-classification model (--reward-model
PATH) or a Python function (--reward module:function, or the task's own verifier).
"""

from __future__ import annotations

import copy
import importlib
import inspect
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

import rlhf_fast as rf
from rlhf_fast.integrations.transformers import head_transform

from . import precision, sharding


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding: 0 at each row's first real token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def tiny_llama(vocab_size: int, cfg):
    """The embedded policy: a small Llama built from a config (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=2 * cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=cfg.tie_embeddings,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )
    return LlamaForCausalLM(config)


def float32_kwargs() -> dict:
    """from_pretrained's dtype argument: `dtype` since transformers 4.56, `torch_dtype` before."""
    import transformers

    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": torch.float32}


def load_policy(cfg, vocab_size: int):
    if cfg.model is None:
        return tiny_llama(max(vocab_size, cfg.vocab_size), cfg)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(cfg.model, **float32_kwargs())


def frozen_copy(model, dtype: torch.dtype = torch.float32):
    """An eval-mode copy of `model` in `dtype` that needs no gradient (the reference)."""
    ref = copy.deepcopy(model).to(dtype).eval()
    ref.requires_grad_(False)
    return ref


def _cache_kwarg(model) -> str:
    """transformers >= 5 names the KV cache argument `cache`, older releases `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _last_logits_kwarg(model) -> dict:
    """Asks the model for the last position's logits only (`logits_to_keep`, `num_logits_to_keep` before
    transformers 4.50): at a 151936-row vocabulary the prompt's full (B, P, V) float32 logits cost more than the
    decoder itself. Models without the argument compute them all."""
    params = inspect.signature(model.forward).parameters
    for name in ("logits_to_keep", "num_logits_to_keep"):
        if name in params:
            return {name: 1}
    return {}


@torch.no_grad()
def generate(
    model,
    prompt_ids,
    prompt_mask,
    *,
    max_new_tokens,
    eos_token_id,
    pad_token_id,
    temperature=1.0,
    generator=None,
    autocast: torch.dtype | None = None,
    ops=None,
    return_logprobs: bool = False,
):
    """Samples responses with a KV cache: prompt_ids, prompt_mask (B, P) left-padded. generator=None decodes
    greedily; otherwise tokens are drawn with torch.multinomial from softmax(logits / temperature) with that
    generator (deterministic for a given generator state). Returns response (B, R) right-padded with
    pad_token_id and its mask (B, R) bool, which includes the end-of-sequence token. autocast: run the model
    under autocast to this dtype (None: as it is). ops (rlhf_fast.ppo.ops): draw with ops.sample (rf.sample with
    kernels on) instead of torch.multinomial; with return_logprobs also the drawn tokens' log-probs and the
    entropies of softmax(logits / temperature) at each step, (B, R) fp32 each, 0 at padding (the rollout policy's
    own log-probs: no second forward pass needed for them). model: a causal LM, or a LogProbModel (decoded
    through its `decode`, which a sharded model gathers for)."""
    step = model.decode if isinstance(model, LogProbModel) else model
    model = model.model if isinstance(model, LogProbModel) else model
    cache_arg, last_only = _cache_kwarg(model), _last_logits_kwarg(model)
    batch = prompt_ids.shape[0]
    attention = prompt_mask.long()
    positions = position_ids(attention)
    tokens, cache = prompt_ids, None
    finished = torch.zeros(batch, dtype=torch.bool, device=prompt_ids.device)
    out_tokens, out_mask, out_logp, out_entropy = [], [], [], []
    for _ in range(max_new_tokens):
        with precision.autocast(autocast, prompt_ids.device):
            out = step(
                input_ids=tokens,
                attention_mask=attention,
                position_ids=positions,
                use_cache=True,
                **{cache_arg: cache},
                **last_only,
            )
        cache = out.cache if cache_arg == "cache" else out.past_key_values
        logits = out.logits[:, -1].float()
        if generator is None:
            nxt = logits.argmax(-1)
        elif ops is not None:
            nxt, logp = ops.sample(logits, temperature=temperature, generator=generator)
            if return_logprobs:
                out_logp.append(torch.where(finished, 0.0, logp))
                out_entropy.append(torch.where(finished, 0.0, ops.entropy(logits, temperature=temperature).float()))
        else:
            nxt = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator).squeeze(-1)
        out_mask.append(~finished)
        out_tokens.append(torch.where(finished, torch.full_like(nxt, pad_token_id), nxt))
        finished = finished | (nxt == eos_token_id)
        if bool(finished.all()):
            break
        tokens = nxt[:, None]
        attention = torch.cat([attention, attention.new_ones(batch, 1)], dim=1)
        positions = positions[:, -1:] + 1
    response = (torch.stack(out_tokens, 1), torch.stack(out_mask, 1))
    if return_logprobs:
        if not out_logp:
            raise ValueError("return_logprobs needs sampling with ops (a generator and ops given)")
        return (*response, torch.stack(out_logp, 1), torch.stack(out_entropy, 1))
    return response


def own_outputs(module: nn.Module, out):
    """`out` with every tensor that is a view copied into its own storage when `module` is sharded: FSDP2 hooks a
    module's outputs for its backward and warns of views (an in-place op on one would drop the hook). These
    outputs are (B, R) per-token values and scalars; unsharded modules return them as they are."""
    if not sharding.is_sharded(module):
        return out
    if isinstance(out, torch.Tensor):
        return out.clone() if out._base is not None else out
    if isinstance(out, (tuple, list)):
        return type(out)(own_outputs(module, item) for item in out)
    if isinstance(out, dict):
        return {key: own_outputs(module, item) for key, item in out.items()}
    return out


class LogProbModel(nn.Module):
    """Per-token log-probs (and entropy) of the response tokens under a causal LM, computed inside forward so
    that DistributedDataParallel sees the whole computation.

    fused=True feeds the trunk's hidden states and the lm-head weight to `linear_logprobs` (the full logits are
    never formed), with the logit scale / soft cap of the model's config (`head_transform` of
    rlhf_fast.integrations.transformers: Cohere, Gemma 2/3), or with `policy_loss` given to `linear_ppo_policy_loss`
    (`fuses_policy_loss`: not with a soft cap, which that op does not apply; a logit scale folds into its
    temperature). fused=False runs the model's own head and `logprobs`. autocast: the forward runs under autocast
    to this dtype (the fused head too, in that dtype); None: in the model's own dtype."""

    def __init__(self, model, ops, *, fused: bool, temperature: float, autocast: torch.dtype | None = None):
        super().__init__()
        self.model, self.ops, self.fused, self.temperature = model, ops, fused, temperature
        self.autocast = autocast
        self.transform = head_transform(model.config) if fused else {}
        self.fuses_policy_loss = fused and self.transform["softcap"] is None

    def forward(
        self,
        input_ids,
        attention_mask,
        labels,
        n_prompt: int,
        return_entropy: bool = False,
        policy_loss: dict | None = None,
        tap=None,
    ):
        """input_ids, attention_mask (B, P + R); labels (B, R) with -100 at padding -> logp (B, R) fp32
        [, entropy (B, R) fp32]. With `policy_loss` (fused only: the keyword arguments of
        linear_ppo_policy_loss after the labels) -> its (loss, stats) instead. With `tap` (a function of the
        response positions' `Head`) -> (that result, tap(head))."""
        with precision.autocast(self.autocast, input_ids.device):
            out = self._forward(input_ids, attention_mask, labels, n_prompt, return_entropy, policy_loss, tap)
        return own_outputs(self, out)

    def decode(self, **kwargs):
        """The causal LM's own forward (its logits), for generation: a method of this module so that a sharded
        model gathers its root group for it as for `forward` (rlhf_fast.ppo.sharding)."""
        return self.model(**kwargs)

    def _forward(self, input_ids, attention_mask, labels, n_prompt, return_entropy, policy_loss, tap):
        positions = position_ids(attention_mask)
        if self.fused:
            head = self.model.get_output_embeddings()
            hidden = self.model.base_model(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=positions
            ).last_hidden_state
            hidden, weight, bias = precision.head_inputs(
                hidden[:, n_prompt - 1 : -1], head.weight, head.bias, self.autocast
            )
            tapped = None if tap is None else tap(Head(hidden, weight, bias, self.transform, None))
            if policy_loss is not None:
                if not self.fuses_policy_loss:
                    raise ValueError("policy_loss needs a head without a soft cap (fuses_policy_loss)")
                out = self.ops.linear_ppo_policy_loss(
                    hidden,
                    weight,
                    labels,
                    bias=bias,
                    temperature=self.temperature / self.transform["logit_scale"],
                    **policy_loss,
                )
            else:
                out = self.ops.linear_logprobs(
                    hidden,
                    weight,
                    labels,
                    bias=bias,
                    temperature=self.temperature,
                    return_entropy=return_entropy,
                    **self.transform,
                )
        else:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions).logits[
                :, n_prompt - 1 : -1
            ]
            tapped = None if tap is None else tap(Head(None, None, None, None, logits))
            out = self.ops.logprobs(logits, labels, temperature=self.temperature, return_entropy=return_entropy)
        return out if tap is None else (out, tapped)


class Head(NamedTuple):
    """The lm head at the response positions, as a LogProbModel's `tap` sees it: with the fused head its inputs
    hidden (B, R, H), weight (V, H), bias (V,) or None (in the forward's dtype) and `transform`
    (head_transform's {logit_scale, softcap}), logits None; otherwise only the model's own logits (B, R, V)."""

    hidden: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    transform: dict | None
    logits: torch.Tensor | None


class ValueModel(nn.Module):
    """Critic: a causal-LM trunk with a scalar value head; the value of the state before each response token."""

    def __init__(self, trunk, hidden_size: int):
        super().__init__()
        self.trunk = trunk
        self.autocast: torch.dtype | None = None  # the forward's autocast dtype (--dtype)
        self.head = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_policy(cls, policy):
        return cls(copy.deepcopy(policy.base_model), policy.config.hidden_size)

    @classmethod
    def from_reward_model(cls, reward_model):
        """PPO-max's critic: a copy of the reward model's trunk, its score row 0 as the value head, so the first
        values are the reward model's per-position scores."""
        head = getattr(reward_model, "score", None)
        if not isinstance(head, nn.Linear):
            raise ValueError(
                f"--critic-init reward-model: {type(reward_model).__name__} has no linear `score` head "
                f"to start the value head from; use --critic-init policy"
            )
        critic = cls(copy.deepcopy(reward_model.base_model), reward_model.config.hidden_size)
        with torch.no_grad():
            critic.head.weight.copy_(head.weight[:1])
            if head.bias is not None:
                critic.head.bias.copy_(head.bias[:1])
        return critic

    def freeze_embedding(self, source=None) -> None:
        """Stops training the trunk's input embedding: no gradient and no optimiser state for its (V, H) table.
        With `source`, a frozen model whose input embedding holds the same values in the same dtype and device
        (the reference or the reward model the critic was copied from), the trunk reads through that table and
        drops its own copy."""
        own = self.trunk.get_input_embeddings()
        theirs = None if source is None else source.get_input_embeddings()
        if (
            theirs is not None
            and not theirs.weight.requires_grad
            and theirs.weight.dtype == own.weight.dtype
            and theirs.weight.device == own.weight.device
            and torch.equal(theirs.weight, own.weight)
        ):
            self.trunk.set_input_embeddings(theirs)
        else:
            own.requires_grad_(False)

    def forward(self, input_ids, attention_mask, n_prompt: int):
        """(B, P + R) -> values (B, R) fp32."""
        with precision.autocast(self.autocast, input_ids.device):
            hidden = self.trunk(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask)
            ).last_hidden_state
            return own_outputs(self, self.head(hidden[:, n_prompt - 1 : -1]).squeeze(-1).float())


class RewardFunction:
    """A Python reward: fn(prompts: list[str], responses: list[str]) -> list[float] (or a tensor)."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, prompts, responses) -> torch.Tensor:
        scores = torch.as_tensor(self.fn(prompts, responses), dtype=torch.float32).reshape(-1)
        if scores.numel() != len(prompts):
            raise ValueError(f"the reward function returned {scores.numel()} scores for {len(prompts)} responses")
        return scores


class RewardModel:
    """A sequence-classification reward model with its own tokenizer; the score is logit 0 of prompt+response."""

    def __init__(self, path: str, device):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(path, **float32_kwargs()).to(device)
        self.model.eval().requires_grad_(False)
        self.device = device

    @torch.no_grad()
    def __call__(self, prompts, responses) -> torch.Tensor:
        batch = self.tokenizer([p + r for p, r in zip(prompts, responses)], return_tensors="pt", padding=True)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        return self.model(**batch).logits[:, 0].float().cpu()


def load_reward_function(spec: str):
    """`module:function` -> the callable; errors say what is wrong with the spec."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--reward {spec!r}: expected module:function, e.g. my_rewards:exact_match")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"--reward {spec!r}: cannot import module {module_name!r} ({exc})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"--reward {spec!r}: module {module_name!r} has no function {attr!r}")
    return fn


def check_model_dir(flag: str, path: str) -> None:
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{flag} {path}: no such directory (expected a local Hugging Face model folder)")
    if not (folder / "config.json").is_file():
        raise ValueError(f"{flag} {path}: no config.json there; save the model with model.save_pretrained(dir)")


def check_quantizable(model, scheme: str, group_size: int, flag: str) -> None:
    """Fails before any work when `scheme` cannot quantize `model` later (e.g. an int4 group that does not
    divide a layer's input size)."""
    if scheme == "none":
        return
    try:
        rf.quant.quantizable_layers(model, scheme, group_size=group_size)
    except ValueError as exc:
        raise ValueError(f"{flag} {scheme}: {exc} (set --quant-group-size)") from None


def quantize(model, scheme: str, group_size: int):
    """rlhf_fast.quantize_model(model, scheme) in place, or the model unchanged for scheme 'none'."""
    return model if scheme == "none" else rf.quantize_model(model, scheme, group_size=group_size)
