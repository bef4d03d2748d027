"""rlhf_fast.integrations.trl: TRL's functions patched with our kernels give TRL's own results.

Every comparison runs TRL's original unpatched (the trainer-utils functions call each other through their
module, so the originals are only themselves while nothing is patched), then the same call patched. fp32:
equal within float32 rounding. bf16 (TRL returns bf16): both against TRL's code in float64 on the same
inputs, ours no further off than TRL's own bf16 result.
"""

import contextlib
import importlib
import importlib.metadata
import math
import sys

import pytest
import torch

trl_utils = pytest.importorskip("trl.trainer.utils")
chunked_logprob = pytest.importorskip("trl.kernels.chunked_logprob")

from rlhf_fast.integrations import trl as rf_trl  # noqa: E402

UTILS_NAMES = ("selective_log_softmax", "entropy_from_logits", "selective_log_softmax_and_entropy")
# Trainer modules of TRL 1.16 that bind the utils functions by name (imported before patching in the tests).
BINDING_MODULES = (
    "trl.experimental.cpo.cpo_trainer",
    "trl.experimental.orpo.orpo_trainer",
    "trl.experimental.tpo.tpo_trainer",
    "trl.experimental.sdft.loss_utils",
)
# Imported only while patched, by test_module_imported_while_patched_is_restored.
LATE_MODULE = "trl.experimental.sdpo.loss_utils"
VOCAB = 1003  # not a power of two

pytestmark = pytest.mark.filterwarnings("ignore:You are importing from 'trl.experimental'")


@pytest.fixture(autouse=True)
def _unpatched():
    rf_trl.unpatch()
    yield
    rf_trl.unpatch()


def originals():
    return {name: getattr(trl_utils, name) for name in UTILS_NAMES} | {
        "ChunkedLogProbFunction": chunked_logprob.ChunkedLogProbFunction
    }


def outputs_and_grads(out, leaves, seed=7):
    """The outputs (tensors; None kept as None), whether each requires grad, and the gradients of a random
    weighted sum of those that do with respect to `leaves`."""
    outs = list(out) if isinstance(out, tuple) else [out]
    gen = torch.Generator().manual_seed(seed)
    weighted = [
        (o.double() * torch.randn(o.shape, generator=gen, dtype=torch.float64)).sum()
        for o in outs
        if o is not None and o.requires_grad
    ]
    grads = list(torch.autograd.grad(sum(weighted), leaves)) if weighted else []
    flags = [None if o is None else o.requires_grad for o in outs]
    return [None if o is None else o.detach() for o in outs], flags, grads


def compare(ours, trl, ref, dtype, what):
    """ours and trl: lists of tensors in TRL's dtype; ref: the same in float64."""
    assert len(ours) == len(trl) == len(ref), what
    for i, (o, t, r) in enumerate(zip(ours, trl, ref)):
        if t is None:
            assert o is None, (what, i)
            continue
        assert o.shape == t.shape and o.dtype == t.dtype, (what, i, o.shape, t.shape, o.dtype, t.dtype)
        if dtype == torch.float32:
            scale = r.abs().max().item() + 1e-12
            torch.testing.assert_close(o.double(), t.double(), rtol=2e-5, atol=2e-6 * scale, msg=f"{what}[{i}]")
        else:
            err_ours = (o.double() - r).abs().max().item()
            err_trl = (t.double() - r).abs().max().item()
            assert err_ours <= 1.5 * err_trl + 1e-6, (what, i, err_ours, err_trl)


def check_against_trl(call, leaves, dtype, reference=None):
    """call(*leaves) unpatched (TRL), patched (ours), and `reference` (default: call on float64 copies of the
    leaves, unpatched): outputs, requires_grad flags and gradients agree. Returns ours (outputs, grads)."""
    trl_out, trl_flags, trl_grads = outputs_and_grads(call(*leaves), leaves)
    with rf_trl.patch():
        our_out, our_flags, our_grads = outputs_and_grads(call(*leaves), leaves)
    leaves64 = [leaf.detach().double().requires_grad_(leaf.requires_grad) for leaf in leaves]
    ref_out, _, ref_grads = outputs_and_grads((reference or call)(*leaves64), leaves64)
    assert our_flags == trl_flags
    compare(our_out, trl_out, ref_out, dtype, "outputs")
    compare(our_grads, trl_grads, ref_grads, dtype, "gradients")
    return our_out, our_grads


def logits_leaf(dtype, vocab=VOCAB, batch=3, seq=6):
    """(B, T, V) logits with a spread like an LM's; tests use the non-contiguous view leaf[:, :-1]."""
    return (torch.randn(batch, seq, vocab, dtype=torch.float64) * 3).to(dtype).requires_grad_()


def holey_mask(shape):
    mask = torch.rand(shape) > 0.3
    mask[0] = False  # a fully masked row
    mask[-1, 0] = True
    return mask


DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("masked", [False, True])
def test_selective_log_softmax(dtype, temperature, masked):
    leaf = logits_leaf(dtype)
    index = torch.randint(0, VOCAB, leaf[:, :-1].shape[:-1])
    row_mask = holey_mask(index.shape) if masked else None
    call = lambda x: trl_utils.selective_log_softmax(x[:, :-1], index, temperature, row_mask=row_mask)  # noqa: E731
    (logp,), (grad,) = check_against_trl(call, [leaf], dtype)
    if masked:
        assert (logp[~row_mask] == 0).all() and (grad[:, :-1][~row_mask] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [VOCAB, 1])
def test_entropy_from_logits(dtype, vocab):
    leaf = logits_leaf(dtype, vocab=vocab)
    check_against_trl(lambda x: trl_utils.entropy_from_logits(x[:, :-1], chunk_size=2), [leaf], dtype)


def test_entropy_from_logits_one_row():
    leaf = logits_leaf(torch.float32)
    check_against_trl(lambda x: trl_utils.entropy_from_logits(x[1, 2]), [leaf], torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("entropy_requires_grad", [True, False])
def test_selective_log_softmax_and_entropy(dtype, temperature, masked, entropy_requires_grad):
    leaf = logits_leaf(dtype)
    index = torch.randint(0, VOCAB, leaf[:, :-1].shape[:-1])
    row_mask = holey_mask(index.shape) if masked else None

    def call(x):
        return trl_utils.selective_log_softmax_and_entropy(
            x[:, :-1], index, entropy_requires_grad, temperature=temperature, row_mask=row_mask
        )

    (logp, entropy), _ = check_against_trl(call, [leaf], dtype)
    if masked:
        assert (logp[~row_mask] == 0).all() and (entropy[~row_mask] == 0).all()


def head_reference(temperature, logit_scale):
    """TRL's head in float64: log-probs and entropy of softmax((hidden @ weight.T + bias) * scale / T)."""

    def reference(hidden, weight, bias, targets):
        z = (hidden @ weight.T + bias) * logit_scale / temperature
        logp = torch.log_softmax(z, -1)
        return logp.gather(-1, targets[:, None])[:, 0], -(logp.exp() * logp).sum(-1), None, None, None

    return reference


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature,logit_scale", [(1.0, 1.0), (0.7, 1.3)])
@pytest.mark.parametrize("outputs", [("log_probs",), ("log_probs", "entropy")])
def test_fused_lm_head(dtype, temperature, logit_scale, outputs):
    tokens, hidden_size = 37, 24
    hidden = torch.randn(tokens, hidden_size, dtype=dtype, requires_grad=True)
    weight = (torch.randn(VOCAB, hidden_size) / hidden_size**0.5 * 4).to(dtype).requires_grad_()
    bias = torch.randn(VOCAB, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, VOCAB, (tokens,))

    def call(h, w, b):
        return chunked_logprob.ChunkedLogProbFunction.apply(
            h, w, b, targets, temperature, 256, None, logit_scale, outputs
        )

    reference = head_reference(temperature, logit_scale)

    def ref(h, w, b):
        entropy = reference(h, w, b, targets)[1] if "entropy" in outputs else None
        return reference(h, w, b, targets)[:1] + (entropy, None, None, None)

    check_against_trl(call, [hidden, weight, bias], dtype, reference=ref)


def test_fused_lm_head_under_autocast():
    """bf16 autocast (GRPOTrainer's default on CPU): TRL runs the head in bf16 from fp32 parameters."""
    tokens, hidden_size = 29, 16
    hidden = torch.randn(tokens, hidden_size, requires_grad=True)
    weight = (torch.randn(VOCAB, hidden_size) / 2).requires_grad_()
    targets = torch.randint(0, VOCAB, (tokens,))

    def call(h, w):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return chunked_logprob.ChunkedLogProbFunction.apply(
                h, w, None, targets, 0.9, 256, None, 1.0, ("log_probs", "entropy")
            )[:2]

    def reference(h, w):
        logp = torch.log_softmax((h.to(torch.bfloat16) @ w.to(torch.bfloat16).T).double() / 0.9, -1)
        return logp.gather(-1, targets[:, None])[:, 0], -(logp.exp() * logp).sum(-1)

    trl_out, _, trl_grads = outputs_and_grads(call(hidden, weight), [hidden, weight])
    with rf_trl.patch():
        our_out, _, our_grads = outputs_and_grads(call(hidden, weight), [hidden, weight])
    assert [g.dtype for g in our_grads] == [torch.float32, torch.float32]
    ref_out = reference(hidden.detach(), weight.detach())
    for o, t, r in zip(our_out, trl_out, ref_out):
        assert o.dtype == t.dtype == torch.float32
        assert (o.double() - r).abs().max() <= 1.5 * (t.double() - r).abs().max() + 1e-5
    for o, t in zip(our_grads, trl_grads):
        torch.testing.assert_close(o, t, rtol=2e-2, atol=2e-2 * t.abs().max().item())


def _spy(monkeypatch, name):
    calls = []
    real = getattr(rf_trl.rf, name)
    monkeypatch.setattr(rf_trl.rf, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("case", ["topk_index", "float64", "int32_index", "bad_row_mask_shape", "autocast"])
def test_inputs_outside_our_kernels_run_trl(monkeypatch, case):
    logits = torch.randn(2, 5, VOCAB)
    index = torch.randint(0, VOCAB, (2, 5))
    row_mask = None
    if case == "topk_index":
        index = torch.randint(0, VOCAB, (2, 5, 3))
    elif case == "float64":
        logits = logits.double()
    elif case == "int32_index":
        index = index.int()
    elif case == "bad_row_mask_shape":
        row_mask = torch.ones(2, 1, dtype=torch.bool)

    def call():
        if case == "autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return trl_utils.selective_log_softmax(logits, index, 0.8, row_mask)
        return trl_utils.selective_log_softmax(logits, index, 0.8, row_mask)

    def attempt():
        try:
            return call()
        except Exception as exc:  # TRL's own error, e.g. gather with an int32 index
            return type(exc)

    expected = attempt()
    calls = _spy(monkeypatch, "logprobs")
    with rf_trl.patch():
        got = attempt()
    assert calls == []
    if isinstance(expected, type):
        assert got is expected
    else:
        assert torch.equal(got, expected)


def test_out_of_range_index_raises_trl_error():
    logits = torch.randn(2, 4, VOCAB)
    for index in (torch.full((2, 4), VOCAB), torch.full((2, 4), -100)):
        with pytest.raises(RuntimeError):
            trl_utils.selective_log_softmax(logits, index)
        with rf_trl.patch(), pytest.raises(RuntimeError):
            trl_utils.selective_log_softmax(logits, index)


@pytest.mark.parametrize("case", ["softcap", "extra_outputs", "nonpositive_scale"])
def test_fused_head_outside_our_kernels_runs_trl(monkeypatch, case):
    hidden, weight = torch.randn(11, 8), torch.randn(VOCAB, 8)
    targets = torch.randint(0, VOCAB, (11,))
    softcap, scale, outputs = None, 1.0, ("log_probs", "entropy")
    if case == "softcap":
        softcap = 5.0
    elif case == "extra_outputs":
        outputs = ("log_probs", "entropy", "is_top1")
    else:
        scale = -0.5

    def call():
        return chunked_logprob.ChunkedLogProbFunction.apply(
            hidden, weight, None, targets, 1.0, 256, softcap, scale, outputs
        )

    expected = call()
    calls = _spy(monkeypatch, "linear_logprobs")
    with rf_trl.patch():
        got = call()
    assert calls == []
    for g, e in zip(got, expected):
        assert (g is None and e is None) or torch.equal(g, e)


def _bindings_of(objs):
    """Every (module, attribute) under trl bound to one of `objs`."""
    ids = {id(o) for o in objs}
    return {
        (name, attr)
        for name, module in list(sys.modules.items())
        if (name == "trl" or name.startswith("trl.")) and module is not None
        for attr, value in list(vars(module).items())
        if id(value) in ids
    }


def test_patch_rebinds_every_binding_and_unpatch_restores_identity():
    for name in BINDING_MODULES:
        importlib.import_module(name)
    before = originals()
    places = _bindings_of(before.values())
    bound_in = {module for module, _ in places}
    assert set(BINDING_MODULES) <= bound_in and "trl.kernels" in bound_in  # the test sees the by-name bindings
    handle = rf_trl.patch()
    assert handle.skipped == {} and set(handle.replaced) == {t.qualname for t in rf_trl.TARGETS}
    assert _bindings_of(before.values()) == set()
    for module, attr in places:
        assert getattr(sys.modules[module], attr) is not None
    rf_trl.unpatch()
    assert _bindings_of(before.values()) == places
    for module, attr in places:
        value = getattr(sys.modules[module], attr)
        assert any(value is original for original in before.values()), (module, attr)


def test_module_imported_while_patched_is_restored():
    original = trl_utils.selective_log_softmax
    sys.modules.pop(LATE_MODULE, None)
    with rf_trl.patch():
        late = importlib.import_module(LATE_MODULE)
        assert late.selective_log_softmax is trl_utils.selective_log_softmax is not original
    assert late.selective_log_softmax is original


def test_with_block_and_idempotence():
    before = originals()
    with rf_trl.patch() as handle:
        assert rf_trl.patch() is handle  # idempotent: same handle, nothing wrapped twice
        assert trl_utils.selective_log_softmax.__wrapped__ is before["selective_log_softmax"]
        assert chunked_logprob.ChunkedLogProbFunction.__bases__ == (before["ChunkedLogProbFunction"],)
    assert originals() == before and all(originals()[k] is v for k, v in before.items())


def test_other_trl_version_warns_once(monkeypatch):
    real_version = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda dist: "1.17.0" if dist == "trl" else real_version(dist))
    with pytest.warns(RuntimeWarning) as record:
        handle = rf_trl.patch()
    assert len(record) == 1 and "1.16" in str(record[0].message) and "1.17.0" in str(record[0].message)
    assert handle.skipped == {}  # the signatures still match: everything patched
    rf_trl.unpatch()

    def changed(logits, index, temperature=1.0):  # row_mask gone
        return logits

    monkeypatch.setattr(trl_utils, "selective_log_softmax", changed)
    with pytest.warns(RuntimeWarning, match="selective_log_softmax .*row_mask"):
        handle = rf_trl.patch()
    assert "trl.trainer.utils.selective_log_softmax" in handle.skipped
    assert trl_utils.selective_log_softmax is changed
    assert "trl.trainer.utils.entropy_from_logits" in handle.replaced


# ---------------------------------------------------------------- end to end: GRPOTrainer on CPU


def grpo_run(patched, steps=2, generate=False):
    """Two GRPOTrainer steps of a one-layer Llama (hidden 32, vocab 32000, built with its tokenizer in code),
    fp32, with a KL term; the logged metrics of each step."""
    from rlhf_fast.cli import _benchmarks_package

    bench = importlib.import_module(f"{_benchmarks_package().__name__}.bench_integrations")
    trainer = bench.tiny_grpo_trainer(
        32000, 32, 1, samples=4, completion_tokens=8, steps=steps, bf16=False, learning_rate=1e-2
    )
    with rf_trl.patch(generate=generate) if patched else contextlib.nullcontext():
        trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h]


def test_grpo_trainer_patched_matches_unpatched(monkeypatch):
    calls = _spy(monkeypatch, "linear_logprobs")
    unpatched = grpo_run(patched=False)
    assert calls == []
    patched = grpo_run(patched=True)
    assert calls, "the patched run must go through rf.linear_logprobs"
    assert len(patched) == len(unpatched) == 2
    for ours, theirs in zip(patched, unpatched):
        for key in ("reward", "completions/mean_length"):
            assert ours[key] == theirs[key], key
        for key in ("loss", "entropy", "kl", "grad_norm"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-6), key


def test_grpo_trainer_generates_with_the_fused_sampler(monkeypatch):
    """patch() (generate=True) also puts transformers' sampling on rf.sample; the trainer runs and learns from
    those completions; unpatch leaves generate as it was."""
    from transformers.generation import utils as generation

    calls = _spy(monkeypatch, "sample")
    logs = grpo_run(patched=True, generate=True)
    assert calls, "generation must go through rf.sample"
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) and math.isfinite(h["reward"]) for h in logs)
    assert generation.torch is torch
