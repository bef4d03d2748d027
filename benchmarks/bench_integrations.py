"""Integrations family: every function rlhf_fast.integrations patches, against the peer's own function, and a
peer trainer's step patched vs unpatched.

Here `eager` is the peer's own code, called as its trainer calls it, and `patched` is the replacement that
`patch()` installs, built from the same original without patching the peer (so both run in one process side by
side). A trainer step runs one optimizer step of a live run per call (generation, scoring, log-probs, loss,
backward); its providers are timed interleaved, its peak memory is the resident set's high-water mark, and
its phases (generation, log-prob passes, the rest) are recorded as extra metrics.

One block per peer below; `cases()` joins the blocks of the peers installed here.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import rlhf_fast as rf

from .bench_logprobs import _backward_of
from .harness import Case

# ---------------------------------------------------------------- TRL


def _trl_pairs():
    """{target name: (TRL's function, our replacement)}, built without patching TRL."""
    from rlhf_fast.integrations import trl as rf_trl

    pairs = {}
    for target in rf_trl.TARGETS:
        module = importlib.import_module(target.module)
        original = getattr(module, target.name)
        pairs[target.name] = (original, target.make(original))
    return pairs


def _trl_logits_cases(pairs, inputs, batch, steps, vocab, dtype, device):
    """selective_log_softmax, entropy_from_logits and selective_log_softmax_and_entropy on (B, T, V) logits.
    The tensors live in `inputs` (one logits tensor: the forward cases read it detached)."""
    inputs["logits"] = (torch.randn(batch, steps, vocab, device=device) * 3).to(dtype).requires_grad_()
    inputs["index"] = torch.randint(0, vocab, (batch, steps), device=device)
    inputs["upstream"] = (torch.randn(batch, steps, device=device), torch.randn(batch, steps, device=device))
    shape = f"N={batch * steps},V={vocab}"
    atol = 2e-2 if dtype != torch.float32 else 1e-3
    calls = {  # how a trainer calls each function
        "selective_log_softmax": lambda f, t: f(t, inputs["index"]),
        "entropy_from_logits": lambda f, t: f(t),
        "selective_log_softmax_and_entropy": lambda f, t: f(t, inputs["index"]),
    }
    # On CUDA the patch keeps TRL's Triton kernel (`patched` = `eager` there); `rlhf_fast` is the op the patch
    # would call, measured against it.
    direct = {
        "selective_log_softmax": lambda t: rf.logprobs(t, inputs["index"]).to(t.dtype),
        "entropy_from_logits": lambda t: rf.entropy(t).to(t.dtype),
        "selective_log_softmax_and_entropy": lambda t: tuple(
            o.to(t.dtype) for o in rf.logprobs(t, inputs["index"], return_entropy=True)
        ),
    }

    def providers(name, backward):
        original, replacement = pairs[name]
        fns = {"eager": lambda t: calls[name](original, t), "patched": lambda t: calls[name](replacement, t)}
        if device.type == "cuda":
            fns["rlhf_fast"] = direct[name]
        if backward:
            return {
                p: (lambda fn=fn: _backward_of(fn, inputs["logits"], inputs["upstream"])()) for p, fn in fns.items()
            }
        return {p: (lambda fn=fn: fn(inputs["logits"].detach())) for p, fn in fns.items()}

    return [
        Case("trl.selective_log_softmax", shape, dtype, "fwd", providers("selective_log_softmax", False), atol=atol),
        Case("trl.selective_log_softmax", shape, dtype, "fwd+bwd", providers("selective_log_softmax", True), atol=atol),
        Case("trl.entropy_from_logits", shape, dtype, "fwd", providers("entropy_from_logits", False), atol=atol),
        Case(
            "trl.selective_log_softmax_and_entropy",
            shape,
            dtype,
            "fwd+bwd",
            providers("selective_log_softmax_and_entropy", True),
            atol=atol,
        ),
    ]


def _trl_head_cases(pairs, inputs, tokens, hidden_size, vocab, device):
    """TRL's fused LM head (ChunkedLogProbFunction, as GRPOTrainer calls it: log-probs and entropy) fwd+bwd."""
    original, replacement = pairs["ChunkedLogProbFunction"]
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    inputs["h"] = torch.randn(tokens, hidden_size, device=device).requires_grad_()
    inputs["w"] = (torch.randn(vocab, hidden_size, device=device) / hidden_size**0.5 * 3).requires_grad_()
    inputs["targets"] = torch.randint(0, vocab, (tokens,), device=device)
    inputs["upstream"] = (torch.randn(tokens, device=device), torch.randn(tokens, device=device))

    def trl_head(function):
        return lambda h, w, targets: function.apply(
            h, w, None, targets, 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, ("log_probs", "entropy")
        )[:2]

    def run(head):
        def call():
            h, w = inputs["h"], inputs["w"]
            out = head(h, w, inputs["targets"])
            torch.autograd.backward(out, inputs["upstream"])
            grads = (h.grad, w.grad)
            h.grad = w.grad = None
            return tuple(o.detach() for o in out), grads

        return call

    providers = {"eager": run(trl_head(original)), "patched": run(trl_head(replacement))}
    if device.type == "cuda":  # see _trl_logits_cases
        providers["rlhf_fast"] = run(lambda h, w, targets: rf.linear_logprobs(h, w, targets, return_entropy=True))
    flops = 3 * 2 * tokens * hidden_size * vocab
    return [
        Case(
            "trl.ChunkedLogProbFunction",
            f"N={tokens},H={hidden_size},V={vocab}",
            torch.float32,
            "fwd+bwd",
            providers,
            flops=flops,
            atol=2e-2,
        )
    ]


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer built in code: <pad>, <eos>, <unk>, then the words w0, w1, ..."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(vocab_size - 3)]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece()  # joins the words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def odd_words_reward(completions, **kwargs):
    return [sum(int(w[1:]) % 2 for w in c.split() if w[1:].isdigit()) / 8 for c in completions]


def tiny_grpo_trainer(
    vocab_size: int,
    hidden_size: int,
    layers: int,
    samples: int,
    completion_tokens: int,
    *,
    steps: int = 1,
    seed: int = 0,
    **config,
):
    """TRL's GRPOTrainer on a random Llama (`samples` completions per step, 4 per prompt) with a KL term, so a
    reference model too; `config` overrides GRPOConfig fields (e.g. bf16=False)."""
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(seed)
    model_dir = tempfile.mkdtemp(prefix="tiny_llama_")  # a path: GRPOTrainer loads the reference model from it
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=layers,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=256,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=1,
        )
    ).save_pretrained(model_dir)
    prompts = Dataset.from_dict(
        {"prompt": [" ".join(f"w{(7 * i + j) % 500}" for j in range(4)) for i in range(4 * samples)]}
    )
    args = GRPOConfig(
        **{
            "output_dir": tempfile.mkdtemp(prefix="tiny_grpo_"),
            "per_device_train_batch_size": samples,
            "num_generations": 4,
            "max_completion_length": completion_tokens,
            "max_steps": steps,
            "logging_steps": 1,
            "report_to": "none",
            "use_cpu": True,
            "seed": seed,
            "learning_rate": 1e-3,
            "beta": 0.04,
            "save_strategy": "no",
            "disable_tqdm": True,
            **config,
        }
    )
    return GRPOTrainer(
        model=model_dir,
        reward_funcs=odd_words_reward,
        args=args,
        train_dataset=prompts,
        processing_class=word_tokenizer(vocab_size),
    )


def _grpo_case(inputs, vocab, hidden_size, layers, samples, completion_tokens, rounds):
    """One GRPOTrainer step (TRL defaults: bf16 autocast on the CPU) per call, unpatched vs patched. Extra
    metrics: the median phases of the timed calls, and the peak resident set of one step in a fresh process."""
    shape = f"V={vocab},h{hidden_size} L{layers},{samples}x{completion_tokens} tokens"
    model = (vocab, hidden_size, layers, samples, completion_tokens)
    case = Case("trl.GRPOTrainer step", shape, torch.bfloat16, "fwd+bwd", {}, interleaved=rounds)

    def stepper(provider, patched):
        state = inputs.setdefault(provider, {})

        def step():
            if "trainer" not in state:  # built on the warm-up call, not while the cases are listed
                state["rss"] = _peak_rss_in_child(model, patched)
                state["trainer"] = _quiet_grpo_trainer(*model)
                state["phases"] = []
                for name in _PHASES:
                    setattr(state["trainer"], name, _timed(getattr(state["trainer"], name), state, name))
            state["current"] = dict.fromkeys(_PHASES, 0.0)
            t0 = time.perf_counter()
            _grpo_step(state["trainer"], patched)
            if not torch.autograd._profiler_enabled():  # the harness's memory count slows the step down
                state["phases"].append({**state["current"], "total": (time.perf_counter() - t0) * 1e3})
            timed = state["phases"][1:] or state["phases"]  # the warm-up call's phases are left out
            median = lambda f: statistics.median(f(p) for p in timed)  # noqa: E731
            case.metrics[provider] = [
                ("phase_generate", "ms", median(lambda p: p["_generate"])),
                ("phase_logprob_passes", "ms", median(lambda p: p["_get_per_token_logps_and_entropies"])),
                ("phase_rest", "ms", median(lambda p: p["total"] - sum(p[name] for name in _PHASES))),
            ] + [(metric, "MB", value) for metric, value in state["rss"].items()]
            # no tensors: the harness has nothing to compare (equality is tests/test_integrations_trl.py's)

        return step

    case.providers.update(eager=stepper("eager", False), patched=stepper("patched", True))
    return case


# GRPOTrainer methods timed as phases: sampling the completions; the log-prob passes (model forward and the
# fused LM head, for the old/reference log-probs and the loss); the rest is backward, optimizer and bookkeeping.
_PHASES = ("_generate", "_get_per_token_logps_and_entropies")


def _quiet_grpo_trainer(*model):
    from transformers import PrinterCallback

    trainer = tiny_grpo_trainer(*model, logging_strategy="no")
    trainer.remove_callback(PrinterCallback)
    return trainer


def _grpo_step(trainer, patched):
    from rlhf_fast.integrations import trl as rf_trl

    with rf_trl.patch() if patched else contextlib.nullcontext():
        trainer.train()


def _resident_mb(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise OSError(f"no {field} in /proc/self/status")


def grpo_step_rss(model, patched):
    """In a fresh process: the resident set (MB) before the first GRPOTrainer step and its peak during it."""
    trainer = _quiet_grpo_trainer(*model)
    Path("/proc/self/clear_refs").write_text("5")  # the high-water mark restarts from the current resident set
    before = _resident_mb("VmRSS")
    _grpo_step(trainer, patched)
    return {"rss_before_step": before, "peak_rss_step": _resident_mb("VmHWM")}


def _peak_rss_in_child(model, patched):
    """grpo_step_rss in a child process (Linux); {} where /proc cannot tell."""
    if not Path("/proc/self/clear_refs").exists():
        return {}
    root = Path(rf.__file__).resolve().parent.parent  # the same rlhf_fast in the child
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    code = (
        "import importlib, json, sys; from rlhf_fast.cli import _benchmarks_package; "
        "module = importlib.import_module(_benchmarks_package().__name__ + '.bench_integrations'); "
        "print('RSS', json.dumps(module.grpo_step_rss(json.loads(sys.argv[1]), sys.argv[2] == 'patched')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(model), "patched" if patched else "eager"],
        capture_output=True,
        text=True,
        env=env,
    )
    if out.returncode != 0:
        raise RuntimeError(f"the peak-memory run failed: {out.stderr.strip().splitlines()[-1:]}")
    line = [line for line in out.stdout.splitlines() if line.startswith("RSS ")][-1]
    return json.loads(line[4:])


def _timed(method, state, name):
    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            state["current"][name] += (time.perf_counter() - t0) * 1e3

    return timed


def _trl_cases(device: torch.device, quick: bool):
    """The TRL block, one group of cases at a time: a group's tensors are made when the bench reaches it and
    dropped when it moves on (the suite's results keep the cases)."""
    pairs = _trl_pairs()
    if quick:
        groups = [
            lambda inputs: _trl_logits_cases(pairs, inputs, 4, 64, 4096, torch.float32, device),
            lambda inputs: _trl_head_cases(pairs, inputs, 256, 64, 4096, device),
        ]
        grpo = (32000, 32, 1, 8, 16, 2)
    else:
        groups = [
            lambda inputs: _trl_logits_cases(pairs, inputs, 8, 512, 32000, torch.float32, device),
            lambda inputs: _trl_logits_cases(pairs, inputs, 8, 512, 151936, torch.bfloat16, device),
            lambda inputs: _trl_head_cases(pairs, inputs, 4096, 128, 151936, device),
        ]
        grpo = (151936, 128, 2, 32, 64, 3)
    if device.type == "cpu":  # the trainer runs on the CPU here (use_cpu=True)
        groups.append(lambda inputs: [_grpo_case(inputs, *grpo)])
    for group in groups:
        inputs = {}
        yield from group(inputs)
        inputs.clear()


# ---------------------------------------------------------------- verl and OpenRLHF


def _pairs(adapter_module):
    """{name: (the peer's function, our replacement)} for an adapter's targets (and, for OpenRLHF, its
    methods, keyed Class.method), built without patching the peer."""
    from rlhf_fast.integrations._patching import dispatching

    pairs = {}
    for target in adapter_module.TARGETS:
        original = getattr(importlib.import_module(target.module), target.name)
        pairs[target.name] = (original, target.make(original))
    for module_name, class_name, method, ours, params in getattr(adapter_module, "METHODS", ()):
        original = vars(getattr(importlib.import_module(module_name), class_name))[method]
        pairs[f"{class_name}.{method}"] = (original, dispatching(original, ours, params))
    return pairs


def _peer_cases(peer, pairs, specs):
    """One Case per (name, mode, shape, dtype, call, x[, reference]): `call(fn)` runs the function once; for
    fwd+bwd `x` is the leaf whose gradient is taken (upstream gradients of ones); `reference(fn)`, for
    low-precision forward cases, runs the peer's function in float64 (the ground truth the outputs are checked
    against, since the peer's own bf16 arithmetic is further off than ours)."""
    cases = []
    for name, mode, shape, dtype, call, x, *reference in specs:
        original, replacement = pairs[name]
        if mode == "fwd":
            providers = {"eager": lambda c=call, f=original: c(f), "patched": lambda c=call, f=replacement: c(f)}
        else:

            def backward_of(fn, c=call, x=x):
                def run():
                    out = c(fn)
                    outs = out if isinstance(out, tuple) else (out,)
                    torch.autograd.backward(
                        [o.float() for o in outs], [torch.ones_like(o, dtype=torch.float32) for o in outs]
                    )
                    grad, x.grad = x.grad, None
                    return tuple(o.detach() for o in outs), grad

                return run

            providers = {"eager": backward_of(original), "patched": backward_of(replacement)}
        atol = 2e-2 if dtype != torch.float32 else 1e-3
        reference = (lambda r=reference[0], f=original: r(f)) if reference else None
        cases.append(Case(f"{peer}.{name}", shape, dtype, mode, providers, atol=atol, reference=reference))
    return cases


def _logits_specs(names, tokens, vocab, dtype, device, modes=("fwd", "fwd+bwd")):
    """(name, mode, shape, dtype, call, x) for log-prob and entropy functions on (8, tokens/8, V) logits."""
    logits = (torch.randn(8, tokens // 8, vocab, device=device) * 3).to(dtype)
    labels = torch.randint(0, vocab, (8, tokens // 8), device=device)
    x = logits.clone().requires_grad_()
    shape = f"N={tokens},V={vocab}"
    specs = []
    for name, takes_labels in names:
        for mode in modes:
            source = logits if mode == "fwd" else x
            call = (lambda f, t=source: f(t, labels)) if takes_labels else (lambda f, t=source: f(t))
            if dtype == torch.float32 or mode != "fwd":
                specs.append((name, mode, shape, dtype, call, x))
                continue

            def reference(f, takes_labels=takes_labels):  # in row chunks: (N, V) in float64 would not fit
                rows, row_labels = logits.view(-1, vocab).split(256), labels.view(-1).split(256)
                outs = [f(r.double(), lab) if takes_labels else f(r.double()) for r, lab in zip(rows, row_labels)]
                return torch.cat(outs).view(labels.shape)

            specs.append((name, mode, shape, dtype, call, x, reference))
    return specs


def _peer_inputs(logits_names, device, quick):
    """What both trainers' cases start from: (the specs of their log-prob / entropy functions at the benchmark
    shapes, g(scale) giving a random (B, T) float32 tensor, a right-padded 0/1 mask (B, T) as a rollout leaves
    it, the shape label)."""
    if quick:
        specs = _logits_specs(logits_names, 256, 4096, torch.float32, device)
    else:
        specs = _logits_specs(logits_names, 4096, 32000, torch.float32, device) + _logits_specs(
            logits_names, 4096, 151936, torch.bfloat16, device, modes=("fwd",)
        )
    batch, steps = (16, 128) if quick else (256, 2048)
    g = lambda scale=1.0: torch.randn(batch, steps, device=device) * scale  # noqa: E731
    lengths = torch.randint(steps // 4, steps + 1, (batch,), device=device)
    mask = (torch.arange(steps, device=device) < lengths[:, None]).long()
    return specs, g, mask, f"B={batch},T={steps}"


def _verl_cases(device: torch.device, quick: bool) -> list[Case]:
    from omegaconf import OmegaConf

    from rlhf_fast.integrations import verl as rf_verl

    pairs = _pairs(rf_verl)
    logits_names = (("logprobs_from_logits", True), ("entropy_from_logits", False))
    specs, g, mask, shape = _peer_inputs(logits_names, device, quick)
    rewards, values, logp, old, ref, adv = g(), g(), g(), g(), g(), g()
    logp = (old + g(0.3)).requires_grad_()
    uids = [f"u{i // 8}" for i in torch.randperm(mask.shape[0]).tolist()]  # groups of 8 in scattered order
    config = OmegaConf.create(
        {
            "clip_ratio": 0.2,
            "clip_ratio_low": 0.2,
            "clip_ratio_high": 0.28,
            "clip_ratio_c": 3.0,
            "global_batch_info": {},
        }
    )
    f32 = torch.float32
    specs += [
        ("compute_gae_advantage_return", "fwd", shape, f32, lambda f: f(rewards, values, mask, 1.0, 0.95), None),
        ("masked_whiten", "fwd", shape, f32, lambda f: f(adv, mask), None),
        ("compute_grpo_outcome_advantage", "fwd", shape, f32, lambda f: f(rewards, mask, uids), None),
        ("compute_rloo_outcome_advantage", "fwd", shape, f32, lambda f: f(rewards, mask, uids), None),
        ("kl_penalty", "fwd+bwd", shape, f32, lambda f: f(logp, ref, "low_var_kl"), logp),
        ("agg_loss", "fwd+bwd", shape, f32, lambda f: f(logp, mask, "seq-mean-token-mean"), logp),
        (
            "compute_policy_loss_vanilla",
            "fwd+bwd",
            shape,
            f32,
            lambda f: f(old, logp, adv, mask, "token-mean", config)[0],
            logp,
        ),
        ("compute_value_loss", "fwd+bwd", shape, f32, lambda f: f(logp, rewards, old, mask, 0.2)[0], logp),
    ]
    return _peer_cases("verl", pairs, specs)


def _openrlhf_cases(device: torch.device, quick: bool) -> list[Case]:
    from rlhf_fast.integrations import openrlhf as rf_openrlhf

    pairs = _pairs(rf_openrlhf)
    logits_names = (("log_probs_from_logits", True), ("compute_entropy", False))
    specs, g, mask, shape = _peer_inputs(logits_names, device, quick)
    rewards, values, old, base, adv = g(), g(), g(), g(), g()
    logp = (old + g(0.3)).requires_grad_()
    from openrlhf.models.loss import PolicyLoss, ValueLoss
    from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker

    policy, value = PolicyLoss(clip_eps_low=0.2, clip_eps_high=0.28), ValueLoss(clip_eps=0.2)
    maker = object.__new__(RemoteExperienceMaker)  # the GAE method reads nothing from the instance
    f32 = torch.float32
    specs += [
        (
            "RemoteExperienceMaker.get_advantages_and_returns",
            "fwd",
            shape,
            f32,
            lambda f: f(maker, values, rewards, mask, 1.0, 0.95),
            None,
        ),
        ("compute_approx_kl", "fwd+bwd", shape, f32, lambda f: f(logp, base, kl_estimator="k3"), logp),
        ("masked_mean", "fwd", shape, f32, lambda f: f(adv, mask), None),
        ("PolicyLoss.forward", "fwd+bwd", shape, f32, lambda f: f(policy, logp, old, adv, mask)[0], logp),
        ("ValueLoss.forward", "fwd+bwd", shape, f32, lambda f: f(value, logp, old, rewards, mask), logp),
    ]
    return _peer_cases("openrlhf", pairs, specs)


def _importable(*modules) -> bool:
    """True if every module imports (OpenRLHF's need flash_attn, deepspeed and vllm at import time)."""
    try:
        for name in modules:
            importlib.import_module(name)
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------- entry point


def cases(device: torch.device, quick: bool):
    """The cases of every installed peer, made lazily (a generator): run each case before asking for the next,
    as the harness does; a group's inputs are dropped when the next group is made."""
    if importlib.util.find_spec("trl") is not None:
        yield from _trl_cases(device, quick)
    if _importable("verl.trainer.ppo.core_algos", "omegaconf"):
        yield from _verl_cases(device, quick)
    if _importable("openrlhf.models.utils", "openrlhf.models.loss", "openrlhf.trainer.ppo_utils.experience_maker"):
        yield from _openrlhf_cases(device, quick)
