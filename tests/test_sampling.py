"""sample / linear_sample: the distribution against the exact filtered probabilities (Hugging Face's warpers),
the returned log-probs against float64, reproducibility, and the edge cases (masked entries, one finite entry,
bf16, strided rows, bad arguments)."""

import importlib
import math

import pytest
import torch
from conftest import live_backends

import rlhf_fast as rf
from rlhf_fast import reference

BACKENDS = ["torch"] + [b for b in live_backends("cpu") if b == "cpu"]
FILTERS = [
    dict(),
    dict(temperature=0.7),
    dict(top_k=5),
    dict(top_p=0.8),
    dict(min_p=0.05),
    dict(temperature=1.3, top_k=40, top_p=0.9, min_p=0.01),
]


def _logits(rows, vocab, seed, scale=2.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, vocab, generator=g, dtype=torch.float64) * scale).to(dtype)


def _chi2_quantile(df, z=5.33):
    """Wilson-Hilferty approximation of the chi-square quantile at the normal quantile z (5.33: 1 - 5e-8)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _assert_matches_distribution(tokens, probs):
    """Pearson chi-square of the token counts against probs (V,) float64, bins with expected count < 5 pooled;
    a correct sampler fails with probability < 1e-7 (and the seeds are fixed)."""
    n = tokens.numel()
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    assert counts[probs == 0].sum() == 0, "a token with probability 0 was drawn"
    expected = probs * n
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    df = int(keep.sum()) - 1
    if df == 0:
        assert obs[keep].sum() == n
        return
    assert stat < _chi2_quantile(df), f"chi-square {stat:.1f} over {df} degrees of freedom"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("vocab", [7, 1003])
@pytest.mark.parametrize("filters", FILTERS, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()) or "plain")
def test_distribution(backend, vocab, filters):
    row = _logits(1, vocab, seed=vocab)[0]
    draws = 40000 if vocab == 7 else 100000
    g = torch.Generator().manual_seed(1234)
    tokens, logp = rf.sample(row.expand(draws, vocab), generator=g, backend=backend, **filters)  # stride-0 rows
    probs = reference.filtered_log_probs(row, **filters).exp()
    _assert_matches_distribution(tokens, probs)
    torch.testing.assert_close(logp, probs.log()[tokens].float(), rtol=1e-5, atol=1e-5)


def test_filters_equal_huggingface_warpers():
    """The filtered distribution is the one Hugging Face's warpers leave (inputs without ties)."""
    from transformers.generation.logits_process import MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = _logits(16, 1003, seed=5, dtype=torch.float64)
    for top_k, top_p, min_p in [(None, 0.9, None), (50, None, None), (None, None, 0.1), (100, 0.7, 0.02)]:
        scores = logits / 0.8
        for warper, value in ((TopKLogitsWarper, top_k), (TopPLogitsWarper, top_p), (MinPLogitsWarper, min_p)):
            if value is not None:
                scores = warper(value)(None, scores)
        expected = torch.log_softmax(scores, dim=-1)
        actual = reference.filtered_log_probs(logits, temperature=0.8, top_k=top_k, top_p=top_p, min_p=min_p)
        torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize("filters", FILTERS[1:], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_cpu_kernel_equals_reference_draw(filters, dtype):
    """The C++ kernel's inverse-CDF walk picks the reference's token for the same uniforms (up to rounding at a
    cumulative boundary, which these seeds do not hit) and returns both log-probs to float32 accuracy."""
    if "cpu" not in BACKENDS:
        pytest.skip("compiled library missing")
    logits = _logits(64, 1003, seed=11, dtype=dtype)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    for logprob in ("filtered", "full"):
        t_cpu, lp_cpu = rf.sample(logits, generator=g1, backend="cpu", logprob=logprob, **filters)
        t_ref, lp_ref = rf.sample(logits, generator=g2, backend="torch", logprob=logprob, **filters)
        assert torch.equal(t_cpu, t_ref)
        exact = (
            reference.filtered_log_probs(logits, **filters)
            if logprob == "filtered"
            else torch.log_softmax(logits.double() / filters.get("temperature", 1.0), -1)
        )
        torch.testing.assert_close(lp_cpu.double(), exact.gather(-1, t_cpu[:, None])[:, 0], rtol=2e-6, atol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_and_degenerate_rows(backend):
    logits = _logits(4, 300, seed=3)
    logits[:, ::2] = -math.inf  # masked entries are never drawn
    logits[3, :] = -math.inf
    logits[3, 17] = 0.5  # one finite entry: always that one, logp 0
    g = torch.Generator().manual_seed(0)
    tokens, logp = rf.sample(logits.repeat(500, 1), generator=g, backend=backend, top_p=0.95)
    assert bool((tokens % 2 == 1).all())
    assert bool((tokens.view(500, 4)[:, 3] == 17).all())
    assert torch.equal(logp.view(500, 4)[:, 3], torch.zeros(500))


@pytest.mark.parametrize("backend", BACKENDS)
def test_unsampleable_rows_raise(backend):
    logits = _logits(3, 50, seed=4)
    logits[1] = -math.inf
    with pytest.raises(ValueError, match="row 1"):
        rf.sample(logits, backend=backend)
    logits = _logits(3, 50, seed=4)
    logits[2, 7] = math.nan
    with pytest.raises(ValueError, match="row 2"):
        rf.sample(logits, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_reproducible_strided(backend):
    logits = _logits(6, 2 * 251, seed=9).view(6, 2, 251)[:, 1]  # non-contiguous rows
    tokens, logp = rf.sample(logits, temperature=0, backend=backend)
    assert torch.equal(tokens, logits.argmax(-1)) and torch.equal(logp, torch.zeros(6))
    a = rf.sample(logits, generator=torch.Generator().manual_seed(3), backend=backend, top_k=20)
    b = rf.sample(logits.contiguous(), generator=torch.Generator().manual_seed(3), backend=backend, top_k=20)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    batch = _logits(2 * 3 * 5, 40, seed=2).view(2, 3, 5, 40)  # any leading shape
    tokens, logp = rf.sample(batch, backend=backend)
    assert tokens.shape == (2, 3, 5) and logp.shape == (2, 3, 5) and tokens.dtype == torch.long


def test_ties_top_k_keeps_all_equal():
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0, 2.0, 0.0]])
    probs = reference.filtered_log_probs(logits, top_k=2).exp()[0]
    assert bool((probs[[0, 2, 3, 4]] > 0).all()) and probs[1] == 0 and probs[5] == 0
    if "cpu" in BACKENDS:
        tokens, _ = rf.sample(
            logits.expand(30000, 6), top_k=2, generator=torch.Generator().manual_seed(1), backend="cpu"
        )
        _assert_matches_distribution(tokens, probs)


def test_tiny_top_p_keeps_the_first_token():
    logits = _logits(8, 1003, seed=12)
    tokens, logp = rf.sample(logits, top_p=1e-9, backend="cpu" if "cpu" in BACKENDS else "torch")
    assert torch.equal(tokens, logits.argmax(-1)) and torch.equal(logp, torch.zeros(8))


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(temperature=-1.0), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(min_p=2.0), "min_p"),
        (dict(logprob="raw"), "logprob"),
    ],
)
def test_bad_arguments(bad, match):
    with pytest.raises(ValueError, match=match):
        rf.sample(_logits(2, 10, seed=0), **bad)


def test_bad_generator_and_dtype():
    with pytest.raises(TypeError, match="generator"):
        rf.sample(_logits(2, 10, seed=0), generator=42)
    with pytest.raises(TypeError, match="logits"):
        rf.sample(torch.ones(2, 10, dtype=torch.long))


# ---------------------------------------------------------------- linear_sample


@pytest.mark.parametrize(
    "filters",
    [dict(), dict(top_k=10, temperature=0.9), dict(top_p=0.9), dict(min_p=0.2), dict(top_k=20, top_p=0.8, min_p=0.01)],
    ids=str,
)
def test_linear_sample_distribution(filters, monkeypatch):
    """From hidden states, with the vocab in several chunks (V not a multiple of the chunk): the same law."""
    lp = importlib.import_module("rlhf_fast.logprobs")  # the module (rf.logprobs is the function)
    monkeypatch.setattr(lp, "LINEAR_CHUNK_BYTES", 4 * 300 * 4)  # 128-entry chunks (the minimum): 8 of them
    g = torch.Generator().manual_seed(21)
    hidden = torch.randn(1, 16, generator=g, dtype=torch.float64)
    weight = torch.randn(1001, 16, generator=g, dtype=torch.float64) * 0.5
    bias = torch.randn(1001, generator=g, dtype=torch.float64) * 0.1
    logits = hidden @ weight.T + bias
    probs = reference.filtered_log_probs(logits[0], **filters).exp()
    draws = 40000
    tokens, logp = rf.linear_sample(
        hidden.float().expand(draws, 16).contiguous(),
        weight.float(),
        bias=bias.float(),
        generator=torch.Generator().manual_seed(5),
        **filters,
    )
    _assert_matches_distribution(tokens, probs)
    torch.testing.assert_close(logp.double(), probs.log()[tokens], rtol=1e-4, atol=1e-4)


def test_linear_sample_full_logp_and_greedy():
    g = torch.Generator().manual_seed(8)
    hidden, weight = torch.randn(2, 3, 32, generator=g), torch.randn(777, 32, generator=g)
    logits = hidden.double() @ weight.double().T
    tokens, logp = rf.linear_sample(
        hidden, weight, temperature=0.7, top_k=30, logprob="full", generator=torch.Generator().manual_seed(1)
    )
    expected = torch.log_softmax(logits / 0.7, -1).gather(-1, tokens[..., None])[..., 0]
    torch.testing.assert_close(logp.double(), expected, rtol=1e-4, atol=1e-4)
    tokens, logp = rf.linear_sample(hidden, weight, temperature=0)
    assert torch.equal(tokens, logits.argmax(-1))


def test_linear_sample_flat_rows_fall_back_exactly(monkeypatch):
    """A flat distribution's nucleus reaches past the per-chunk candidates: those rows are redrawn exactly."""
    sampling = importlib.import_module("rlhf_fast.sampling")
    monkeypatch.setattr(sampling, "_CANDIDATES_PER_CHUNK", 4)
    hidden = torch.zeros(20000, 4)
    hidden[:, 0] = 1.0
    weight = torch.zeros(50, 4)
    weight[:, 0] = torch.linspace(0, 0.2, 50)
    logits = (hidden[:1].double() @ weight.double().T)[0]
    probs = reference.filtered_log_probs(logits, top_p=0.5).exp()
    tokens, _ = rf.linear_sample(hidden, weight, top_p=0.5, generator=torch.Generator().manual_seed(2))
    _assert_matches_distribution(tokens, probs)


@pytest.mark.skipif(rf.backend.compiled() is None, reason="compiled library not built")
def test_opcheck_compiled_op():
    uniforms = torch.rand(2, 3, dtype=torch.float64)
    logits = _logits(6, 50, seed=5).reshape(2, 3, 50)
    strided = _logits(8, 50, seed=6).reshape(2, 4, 50)[:, 1:]
    masked = logits.clone()
    masked[0, 0, :45] = -math.inf
    for args in [
        (logits, uniforms, 1.0, 0, 1.0, 0.0),
        (logits.bfloat16(), uniforms, 0.7, 5, 0.9, 0.05),
        (strided, uniforms, 1.3, 0, 0.8, 0.0),
        (masked, uniforms, 1.0, 3, 1.0, 0.1),
    ]:
        torch.library.opcheck(torch.ops.rlhf_fast.sample.default, args)


@pytest.mark.parametrize("filters", FILTERS + [dict(top_k=3, top_p=0.5, min_p=0.3)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_kernel_equals_reference_draw(filters, dtype):
    """The Triton kernel (interpreter on the CPU, small shapes): the reference's token for the same uniforms and
    both log-probs to float32 accuracy, with a vocab that spans several blocks and is not a power of two."""
    if "triton" not in live_backends("cpu"):
        pytest.skip("triton is not live here")
    tr = importlib.import_module("rlhf_fast.triton.sampling")
    logits = _logits(12, 300, seed=13, dtype=dtype)
    logits[0, :7] = -math.inf
    logits[1, 5] = logits[1, 9] = logits[1].max()  # a tie at the top
    rows = logits[None]
    uniforms = torch.rand(1, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    options = (
        filters.get("temperature", 1.0),
        filters.get("top_k", 0),
        filters.get("top_p", 1.0),
        filters.get("min_p", 0.0),
    )
    original = tr.launch_config
    tr.launch_config = lambda vocab: {"BLOCK": 128, "num_warps": 4}  # three blocks per row
    try:
        tokens, kept, full = tr.sample(rows, uniforms, *options)
    finally:
        tr.launch_config = original
    ref_tokens, ref_kept, ref_full = reference.sample(logits, uniforms[0], **filters)
    assert torch.equal(tokens[0], ref_tokens)
    torch.testing.assert_close(kept[0], ref_kept, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(full[0], ref_full, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("filters", FILTERS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_sample_matches_reference_draw(filters, dtype):
    """On CUDA tensors (auto: the Triton kernel) at the real vocab: the reference's token for the same generator
    state, log-probs to float32 accuracy; then the law at V=1003 from many draws."""
    logits = _logits(64, 151936, seed=17, dtype=dtype).cuda()
    tokens, logp = rf.sample(logits, generator=torch.Generator("cuda").manual_seed(5), **filters)
    ref_tokens, ref_logp = rf.sample(
        logits, generator=torch.Generator("cuda").manual_seed(5), backend="torch", **filters
    )
    assert (tokens == ref_tokens).float().mean() > 0.99  # a cumulative boundary may round either way
    same = tokens == ref_tokens
    torch.testing.assert_close(logp[same], ref_logp[same], rtol=1e-4, atol=1e-4)
    row = _logits(1, 1003, seed=18)[0]
    draws, _ = rf.sample(row.cuda().expand(200000, 1003), generator=torch.Generator("cuda").manual_seed(6), **filters)
    _assert_matches_distribution(draws.cpu(), reference.filtered_log_probs(row, **filters).exp())
