"""linear_f_divergence: the f-divergence of two lm heads' logits, chunk by chunk, against float64 f_divergence
of the full logits, forward and backward (both hidden states, weights and biases)."""

import importlib

import pytest
import torch
from conftest import live_backends

import rlhf_fast as rf
from rlhf_fast import reference

KINDS = [
    ("kl", None),
    ("reverse_kl", None),
    ("js", None),
    ("tv", None),
    ("hellinger", None),
    ("chi2", None),
    ("alpha", -0.5),
    ("alpha", 2.0),
]
BACKENDS = live_backends("cpu") + ["torch"]
# The Triton interpreter evaluates tiles with numpy, which warns about the inf - inf and log(0) of padding lanes and
# masked rows, whose results are then discarded.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")


def _inputs(rows, vocab, hidden, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape, scale=1.0: torch.randn(*shape, generator=g, dtype=torch.float64) * scale  # noqa: E731
    tensors = dict(
        hidden_p=make(rows, hidden),
        weight_p=make(vocab, hidden, scale=0.4),
        bias_p=make(vocab, scale=0.3),
        hidden_q=make(rows, hidden + 3),
        weight_q=make(vocab, hidden + 3, scale=0.4),
        bias_q=make(vocab, scale=0.3),
    )
    return {k: v.to(dtype).requires_grad_() for k, v in tensors.items()}


def _reference(t, kind, alpha, temperature, mask, logit_scale=(1.0, 1.0), softcap=(None, None)):
    """float64 f_divergence of both heads' full transformed logits, and the float64 leaves."""
    d = {k: v.detach().double().requires_grad_() for k, v in t.items()}
    logits = [
        reference.head_logits(d[f"hidden_{s}"], d[f"weight_{s}"], d[f"bias_{s}"], logit_scale=scale, softcap=cap)
        for s, scale, cap in zip("pq", logit_scale, softcap)
    ]
    out = reference.f_divergence(*logits, kind, alpha=alpha, temperature=temperature, mask=mask)
    return out, d


def _assert_grads_close(t, d, rel, floor):
    for name in t:  # relative to the gradient's scale (chi2 / alpha=2 amplify P^2 / Q)
        assert t[name].grad.shape == d[name].grad.shape, name
        if d[name].grad.numel() == 0:
            continue
        err = (t[name].grad.double() - d[name].grad).abs().max()
        assert err <= rel * d[name].grad.abs().max() + floor, (name, float(err))


@pytest.fixture
def small_chunks(monkeypatch):
    """Vocab chunks of 128 entries (the minimum), so a vocab of 300 has three, the last one short."""
    monkeypatch.setattr(importlib.import_module("rlhf_fast.divergence"), "LINEAR_BUFFER_BYTES", 1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind, alpha", KINDS)
def test_matches_float64(kind, alpha, backend, small_chunks):
    t = _inputs(9, 300, 16, torch.float32, seed=KINDS.index((kind, alpha)))
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 0, 1, 1], dtype=torch.bool)
    out = rf.linear_f_divergence(
        t["hidden_p"],
        t["weight_p"],
        t["hidden_q"],
        t["weight_q"],
        kind,
        bias_p=t["bias_p"],
        bias_q=t["bias_q"],
        alpha=alpha,
        temperature=0.7,
        mask=mask,
        backend=backend,
    )
    expected, d = _reference(t, kind, alpha, 0.7, mask)
    assert out.dtype == torch.float32 and out.shape == (9,)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5)
    upstream = torch.randn(9, dtype=torch.float64)
    (out.double() * upstream).sum().backward()
    (expected * upstream).sum().backward()
    _assert_grads_close(t, d, 2e-3, 1e-5)


TRANSFORMS = [  # (logit_scale, softcap) as passed; the same per side, then per-side pairs
    (1.7, None),
    (0.8, 3.0),
    ((0.5, 2.0), None),
    ((1.3, 0.6), (None, 2.5)),
    (2.0, (4.0, None)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("logit_scale, softcap", TRANSFORMS)
@pytest.mark.parametrize("kind, alpha", [("kl", None), ("js", None), ("tv", None), ("alpha", 2.0)])
def test_logit_scale_and_softcap(kind, alpha, logit_scale, softcap, backend, small_chunks):
    t = _inputs(7, 300, 12, torch.float32, seed=20 + TRANSFORMS.index((logit_scale, softcap)))
    mask = torch.tensor([1, 0, 1, 1, 1, 1, 1], dtype=torch.bool)
    out = rf.linear_f_divergence(
        t["hidden_p"],
        t["weight_p"],
        t["hidden_q"],
        t["weight_q"],
        kind,
        bias_p=t["bias_p"],
        bias_q=t["bias_q"],
        alpha=alpha,
        temperature=0.9,
        logit_scale=logit_scale,
        softcap=softcap,
        mask=mask,
        backend=backend,
    )
    pair = lambda v: tuple(v) if isinstance(v, tuple) else (v, v)  # noqa: E731
    expected, d = _reference(t, kind, alpha, 0.9, mask, pair(logit_scale), pair(softcap))
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5)
    upstream = torch.randn(7, dtype=torch.float64)
    (out.double() * upstream).sum().backward()
    (expected * upstream).sum().backward()
    _assert_grads_close(t, d, 2e-3, 1e-5)


def test_bf16_softcap_frozen_reference(small_chunks):
    """bf16 heads with a soft cap (float32 kernels' logits) and a different scale per side."""
    t = _inputs(6, 260, 16, torch.bfloat16, seed=31)
    for name in ("hidden_q", "weight_q", "bias_q"):
        t[name] = t[name].detach()
    out = rf.linear_f_divergence(
        t["hidden_p"],
        t["weight_p"],
        t["hidden_q"],
        t["weight_q"],
        "kl",
        bias_p=t["bias_p"],
        bias_q=t["bias_q"],
        logit_scale=(1.5, 0.7),
        softcap=2.0,
    )
    expected, d = _reference(t, "kl", None, 1.0, None, (1.5, 0.7), (2.0, 2.0))
    torch.testing.assert_close(out.double(), expected, rtol=3e-2, atol=3e-3)
    out.sum().backward()
    expected.sum().backward()
    for name in ("hidden_p", "weight_p", "bias_p"):
        err = (t[name].grad.double() - d[name].grad).abs().max()
        assert err <= 3e-2 * d[name].grad.abs().max() + 1e-3, name


@pytest.mark.parametrize("kind", ["kl", "js"])
def test_bf16_frozen_reference_and_leading_shape(kind, small_chunks):
    t = _inputs(12, 257, 32, torch.bfloat16, seed=3)
    for name in ("hidden_q", "weight_q", "bias_q"):
        t[name] = t[name].detach()  # the frozen reference side
    shaped = {k: (v.view(3, 4, -1) if k.startswith("hidden") else v) for k, v in t.items()}
    out = rf.linear_f_divergence(
        shaped["hidden_p"],
        t["weight_p"],
        shaped["hidden_q"],
        t["weight_q"],
        kind,
        bias_p=t["bias_p"],
        bias_q=t["bias_q"],
    )
    assert out.shape == (3, 4)
    expected, d = _reference(t, kind, None, 1.0, None)
    torch.testing.assert_close(out.reshape(-1).double(), expected, rtol=3e-2, atol=3e-3)
    out.sum().backward()
    expected.sum().backward()
    for name in ("hidden_p", "weight_p", "bias_p"):
        err = (t[name].grad.double() - d[name].grad).abs().max()
        assert err <= 3e-2 * d[name].grad.abs().max() + 1e-3, name
    assert t["weight_q"].grad is None


def test_padded_vocab_and_no_bias(small_chunks):
    """A -inf bias on a padded vocab tail (both sides) changes nothing; the padded entries get no gradient."""
    t = _inputs(5, 300, 8, torch.float32, seed=8)
    bias = torch.zeros(300)
    bias[260:] = float("-inf")
    out = rf.linear_f_divergence(
        t["hidden_p"], t["weight_p"], t["hidden_q"], t["weight_q"], "kl", bias_p=bias, bias_q=bias
    )
    logits_p = (t["hidden_p"] @ t["weight_p"].T)[:, :260].double()
    logits_q = (t["hidden_q"] @ t["weight_q"].T)[:, :260].double()
    torch.testing.assert_close(out.double(), reference.f_divergence(logits_p, logits_q, "kl"), rtol=1e-4, atol=1e-5)
    out.sum().backward()
    assert torch.equal(t["weight_p"].grad[260:], torch.zeros(40, 8))
    out2 = rf.linear_f_divergence(t["hidden_p"], t["weight_p"], t["hidden_q"], t["weight_q"], "tv")
    assert torch.isfinite(out2).all()


def test_strided_views_and_mixed_dtypes(small_chunks):
    """Non-contiguous hidden states and weights (views of wider tensors), a bf16 p head against a float32 q head."""
    t = _inputs(6, 300, 12, torch.float32, seed=12)
    # each column twice: the even columns are the original values, as a strided view
    wide = {
        k: torch.stack([v.detach(), v.detach()], -1).flatten(-2).requires_grad_()
        for k, v in t.items()
        if not k.startswith("bias")
    }
    views = {k: v[..., ::2] for k, v in wide.items()}
    out = rf.linear_f_divergence(
        views["hidden_p"],
        views["weight_p"],
        views["hidden_q"],
        views["weight_q"],
        "tv",
        bias_p=t["bias_p"],
        bias_q=t["bias_q"],
        logit_scale=1.2,
    )
    expected, d = _reference(t, "tv", None, 1.0, None, (1.2, 1.2))
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5)
    out.sum().backward()
    expected.sum().backward()
    for k in wide:
        grad = wide[k].grad[..., ::2]
        assert torch.equal(wide[k].grad[..., 1::2], torch.zeros_like(grad))
        torch.testing.assert_close(grad.double(), d[k].grad, rtol=2e-3, atol=2e-3 * float(d[k].grad.abs().max()))

    m = _inputs(6, 300, 12, torch.float32, seed=13)
    p16 = {k: m[k].detach().to(torch.bfloat16).requires_grad_() for k in ("hidden_p", "weight_p", "bias_p")}
    out = rf.linear_f_divergence(
        p16["hidden_p"],
        p16["weight_p"],
        m["hidden_q"],
        m["weight_q"],
        "kl",
        bias_p=p16["bias_p"],
        bias_q=m["bias_q"],
        softcap=(3.0, None),
    )
    m.update({k: v for k, v in p16.items()})
    expected, d = _reference(m, "kl", None, 1.0, None, softcap=(3.0, None))
    torch.testing.assert_close(out.double(), expected, rtol=3e-2, atol=3e-3)
    out.sum().backward()
    expected.sum().backward()
    for name in ("hidden_p", "weight_p", "bias_p", "hidden_q", "weight_q", "bias_q"):
        assert m[name].grad.dtype == m[name].dtype
        err = (m[name].grad.double() - d[name].grad).abs().max()
        assert err <= 3e-2 * d[name].grad.abs().max() + 1e-3, name


@pytest.mark.parametrize("rows", [0, 1])
def test_empty_and_single_token(rows, small_chunks):
    t = _inputs(rows, 300, 8, torch.float32, seed=9)
    out = rf.linear_f_divergence(
        t["hidden_p"],
        t["weight_p"],
        t["hidden_q"],
        t["weight_q"],
        "js",
        bias_p=t["bias_p"],
        bias_q=t["bias_q"],
        softcap=5.0,
    )
    expected, d = _reference(t, "js", None, 1.0, None, softcap=(5.0, 5.0))
    assert out.shape == (rows,)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5)
    out.sum().backward()
    expected.sum().backward()
    _assert_grads_close(t, d, 2e-3, 1e-5)


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(kind="bogus"), "kind"),
        (dict(alpha=0.5), "alpha"),
        (dict(temperature=0.0), "temperature"),
        (dict(mask=torch.ones(3, dtype=torch.bool)), "mask"),
        (dict(logit_scale=0.0), "logit_scale"),
        (dict(logit_scale=(1.0, 2.0, 3.0)), "logit_scale"),
        (dict(softcap=(None, -1.0)), "softcap"),
    ],
)
def test_bad_arguments(bad, match):
    t = _inputs(4, 20, 8, torch.float32, seed=1)
    kwargs = dict(kind="kl")
    kwargs.update(bad)
    kind = kwargs.pop("kind")
    with pytest.raises(ValueError, match=match):
        rf.linear_f_divergence(t["hidden_p"], t["weight_p"], t["hidden_q"], t["weight_q"], kind, **kwargs)


def test_mismatched_shapes_and_dtypes():
    t = _inputs(4, 20, 8, torch.float32, seed=1)
    with pytest.raises(ValueError, match="vocab"):
        rf.linear_f_divergence(t["hidden_p"], t["weight_p"], t["hidden_q"], t["weight_q"][:10], "kl")
    with pytest.raises(ValueError, match="leading shape"):
        rf.linear_f_divergence(t["hidden_p"], t["weight_p"], t["hidden_q"][:3], t["weight_q"], "kl")
    with pytest.raises(TypeError, match="share one dtype"):
        rf.linear_f_divergence(t["hidden_p"], t["weight_p"].double(), t["hidden_q"], t["weight_q"], "kl")
