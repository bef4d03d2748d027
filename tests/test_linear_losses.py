import pytest
import torch
from conftest import device_backend_pairs

import rlhf_fast as rf
from rlhf_fast import linear_losses
from rlhf_fast import reference as ref

PAIRS = device_backend_pairs()
AGG_MODES = list(ref.AGG_MODES)
# The float64 reference: the eager composition (full logits, log_softmax + gather, ppo_policy_loss, agg_loss).
_reference = ref.linear_ppo_policy_loss


def _inputs(device, dtype, batch=3, steps=7, hidden_size=24, vocab=331, bias=True):
    hidden = torch.randn(batch, steps, hidden_size, device=device).to(dtype)
    weight = (torch.randn(vocab, hidden_size, device=device) * 0.3).to(dtype)
    b = (torch.randn(vocab, device=device) * 0.5).to(dtype) if bias else None
    labels = torch.randint(0, vocab, (batch, steps), device=device)
    with torch.no_grad():  # old / ref log-probs near the current ones, so that some ratios clip and some do not
        logp = ref.logprobs(
            torch.nn.functional.linear(hidden.double(), weight.double(), None if b is None else b.double()), labels
        )
    old_logp = (logp + torch.randn_like(logp) * 0.3).float()
    ref_logp = (logp + torch.randn_like(logp) * 0.5).float()
    advantages = torch.randn(batch, steps, device=device)
    mask = torch.rand(batch, steps, device=device) > 0.25
    mask[1] = False  # an all-masked row
    mask[0, 0] = True
    return hidden, weight, b, labels, old_logp, advantages, mask, ref_logp


def _run(hidden, weight, bias, labels, old_logp, advantages, mask, ref_logp, name, **opts):
    """(loss, stats, grads) of the op and of the float64 reference; grads (hidden, weight, bias)."""
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    loss, stats = rf.linear_ppo_policy_loss(
        leaves[0],
        leaves[1],
        labels,
        old_logp,
        advantages,
        mask,
        bias=leaves[2],
        ref_logp=ref_logp,
        backend=name,
        **opts,
    )
    loss.backward(torch.tensor(1.7, dtype=loss.dtype, device=loss.device))
    leaves64 = [t.double().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    expected, expected_stats = _reference(
        leaves64[0], leaves64[1], labels, old_logp, advantages, mask, bias=leaves64[2], ref_logp=ref_logp, **opts
    )
    (expected * 1.7).backward()
    return (
        loss,
        stats,
        [t.grad if t is not None else None for t in leaves],
        expected,
        expected_stats,
        [t.grad if t is not None else None for t in leaves64],
    )


def _eager_error(hidden, weight, bias, labels, old_logp, advantages, mask, ref_logp, dtype, **opts):
    """Eager's own error in `dtype` against float64: the scale for low-precision tolerances."""
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    loss, _ = _reference(*leaves[:2], labels, old_logp, advantages, mask, bias=leaves[2], ref_logp=ref_logp, **opts)
    (loss * 1.7).backward()
    return loss, [t.grad if t is not None else None for t in leaves]


def _close(actual, expected, tol):
    torch.testing.assert_close(actual.double(), expected, **tol)


@pytest.mark.parametrize("device,name", PAIRS)
@pytest.mark.parametrize("agg", AGG_MODES)
def test_matches_float64_composition_fp32(device, name, agg, monkeypatch):
    monkeypatch.setattr(linear_losses, "CHUNK_BYTES", 331 * 4 * 4)  # 4-token chunks: 21 tokens, ragged last chunk
    inputs = _inputs(device, torch.float32)
    opts = dict(
        agg=agg,
        temperature=0.7,
        clip_low=0.2,
        clip_high=0.28,
        dual_clip=3.0,
        entropy_coef=0.01,
        kl_coef=0.1,
        kl_kind="k3",
    )
    loss, stats, grads, expected, expected_stats, expected_grads = _run(*inputs, name, **opts)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    _close(loss, expected, dict(rtol=1e-5, atol=1e-6))
    assert set(stats) == set(expected_stats)
    for key in stats:
        _close(stats[key], expected_stats[key], dict(rtol=1e-5, atol=1e-6))
    for got, want in zip(grads, expected_grads):
        assert got.dtype == torch.float32
        _close(got, want, dict(rtol=1e-4, atol=1e-6))


@pytest.mark.parametrize("device,name", PAIRS)
@pytest.mark.parametrize("kl_kind", ["k1", "abs", "k2", "k3", "k1+", "k3+"])
def test_kl_estimators_and_no_bias(device, name, kl_kind, monkeypatch):
    monkeypatch.setattr(linear_losses, "CHUNK_BYTES", 331 * 4 * 5)
    inputs = _inputs(device, torch.float32, bias=False)
    opts = dict(agg="seq-mean-token-mean", kl_coef=0.5, kl_kind=kl_kind)
    loss, stats, grads, expected, expected_stats, expected_grads = _run(*inputs, name, **opts)
    _close(loss, expected, dict(rtol=1e-5, atol=1e-6))
    _close(stats["kl"], expected_stats["kl"], dict(rtol=1e-5, atol=1e-6))
    assert grads[2] is None
    for got, want in zip(grads[:2], expected_grads[:2]):
        _close(got, want, dict(rtol=1e-4, atol=1e-6))


@pytest.mark.parametrize("device,name", [p for p in PAIRS if p[1] != "torch"])
def test_k3_near_zero_without_cancellation(device, name):
    """k3 of a policy ~1e-3 from the reference: the kernels' kl_penalty (d²/2 series), not exp(d) - d - 1 in fp32."""
    hidden, weight, bias, labels, old_logp, advantages, mask, _ = _inputs(device, torch.float32)
    logp = ref.linear_logprobs(hidden.double(), weight.double(), labels, bias=bias.double())
    ref_logp = (logp + 1e-3 * torch.randn_like(logp)).float()
    _, stats = rf.linear_ppo_policy_loss(
        hidden,
        weight,
        labels,
        old_logp,
        advantages,
        mask,
        bias=bias,
        ref_logp=ref_logp,
        kl_coef=0.1,
        kl_kind="k3",
        backend=name,
    )
    _, expected = _reference(
        hidden.double(),
        weight.double(),
        labels,
        old_logp,
        advantages,
        mask,
        bias=bias.double(),
        ref_logp=ref_logp,
        kl_coef=0.1,
        kl_kind="k3",
    )
    _close(stats["kl"], expected["kl"], dict(rtol=2e-3, atol=0))


def _assert_within_eager_error(inputs, name, dtype, opts):
    """Errors of the loss and the gradients against float64: at most a few times eager's own in `dtype`."""
    loss, _, grads, expected, _, expected_grads = _run(*inputs, name, **opts)
    eager_loss, eager_grads = _eager_error(*inputs, dtype, **opts)
    assert loss.dtype == torch.float32
    assert all(got.dtype == dtype for got in grads)
    for got, eager, want in zip([loss, *grads], [eager_loss, *eager_grads], [expected, *expected_grads]):
        eager_err = (eager.double() - want).abs().max().item()
        err = (got.double() - want).abs().max().item()
        assert err <= 4 * eager_err + 1e-3 * want.abs().max().item(), (err, eager_err)


@pytest.mark.parametrize("device,name", PAIRS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_eager_error(device, name, dtype, monkeypatch):
    monkeypatch.setattr(linear_losses, "CHUNK_BYTES", 331 * 2 * 6)
    _assert_within_eager_error(
        _inputs(device, dtype),
        name,
        dtype,
        dict(agg="token-mean", entropy_coef=0.05, kl_coef=0.2, kl_kind="low_var_kl", dual_clip=2.5),
    )


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["cuda", "triton"])
def test_gpu_qwen_vocab_bf16(name):
    """V = 151936 in bf16 with the default chunking."""
    inputs = _inputs("cuda", torch.bfloat16, batch=4, steps=96, hidden_size=128, vocab=151936)
    _assert_within_eager_error(
        inputs,
        name,
        torch.bfloat16,
        dict(agg="seq-mean-token-mean", entropy_coef=0.01, kl_coef=0.1, kl_kind="k3", dual_clip=3.0),
    )


@pytest.mark.parametrize("device,name", PAIRS)
def test_frozen_weight_and_hidden_only(device, name):
    hidden, weight, bias, labels, old_logp, advantages, mask, _ = _inputs(device, torch.float32)
    h = hidden.clone().requires_grad_()
    loss, _ = rf.linear_ppo_policy_loss(h, weight, labels, old_logp, advantages, mask, bias=bias, backend=name)
    loss.backward()
    h64 = hidden.double().requires_grad_()
    expected, _ = _reference(h64, weight.double(), labels, old_logp, advantages, mask, bias=bias.double())
    expected.backward()
    _close(h.grad, h64.grad, dict(rtol=1e-4, atol=1e-6))
    # no gradient needed at all: the forward alone
    with torch.no_grad():
        value, stats = rf.linear_ppo_policy_loss(h, weight, labels, old_logp, advantages, mask, bias=bias, backend=name)
    _close(value, expected, dict(rtol=1e-5, atol=1e-6))
    assert "kl" not in stats


@pytest.mark.parametrize("frozen", [False, True])
def test_three_lm_head_matmuls_as_eager(frozen, monkeypatch):
    """Forward + backward costs the FLOPs of eager's three lm-head matmuls (logits, grad_hidden, grad_weight);
    a frozen weight drops the grad_weight one."""
    from torch.utils.flop_counter import FlopCounterMode

    monkeypatch.setattr(linear_losses, "CHUNK_BYTES", 331 * 4 * 4)
    hidden, weight, bias, labels, old_logp, advantages, mask, _ = _inputs("cpu", torch.float32)
    counts = []
    for fn in (rf.linear_ppo_policy_loss, _reference):
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_(not frozen)
        with FlopCounterMode(display=False) as counter:
            loss, _ = fn(h, w, labels, old_logp, advantages, mask)
            loss.backward()
        counts.append(counter.get_total_flops())
    matmul = 2 * hidden.shape[0] * hidden.shape[1] * weight.shape[0] * weight.shape[1]
    assert counts == [(2 if frozen else 3) * matmul] * 2


@pytest.mark.parametrize("device,name", PAIRS)
def test_everything_masked_gives_zero(device, name):
    hidden, weight, bias, labels, old_logp, advantages, _, ref_logp = _inputs(device, torch.float32)
    mask = torch.zeros_like(labels, dtype=torch.bool)
    old_logp = old_logp.masked_fill(~mask, float("nan"))  # masked inputs are ignored even when nan
    for agg in AGG_MODES:
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss, stats = rf.linear_ppo_policy_loss(
            h, w, labels, old_logp, advantages, mask, bias=bias, agg=agg, ref_logp=ref_logp, kl_coef=0.1, backend=name
        )
        loss.backward()
        assert loss.item() == 0 and all(v.item() == 0 for v in stats.values())
        assert h.grad.abs().max().item() == 0 and w.grad.abs().max().item() == 0


@pytest.mark.parametrize("device,name", PAIRS)
@pytest.mark.parametrize("agg", AGG_MODES)
def test_matches_unfused_ops(device, name, agg):
    """The fused-head twin of linear_logprobs + ppo_policy_loss + agg_loss of the entropy and kl_penalty."""
    hidden, weight, bias, labels, old_logp, advantages, mask, ref_logp = _inputs(device, torch.float32)
    h1, h2 = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    loss, stats = rf.linear_ppo_policy_loss(
        h1,
        weight,
        labels,
        old_logp,
        advantages,
        mask,
        bias=bias,
        dual_clip=3.0,
        agg=agg,
        entropy_coef=0.05,
        ref_logp=ref_logp,
        kl_coef=0.2,
        kl_kind="k1+",
        backend=name,
    )
    logp, entropy = rf.linear_logprobs(h2, weight, labels, bias=bias, return_entropy=True, backend=name)
    pg, expected_stats = rf.ppo_policy_loss(logp, old_logp, advantages, mask, dual_clip=3.0, agg=agg, backend=name)
    kl = rf.agg_loss(rf.kl_penalty(logp, ref_logp, "k1+", backend=name), mask, agg)
    expected = pg - 0.05 * rf.agg_loss(entropy, mask, agg) + 0.2 * kl
    loss.backward()
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    expected_stats.update(pg_loss=pg, entropy=rf.agg_loss(entropy, mask, agg), kl=kl)
    assert stats.keys() == expected_stats.keys()
    for key in expected_stats:
        torch.testing.assert_close(stats[key], expected_stats[key].detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("scale", [{}, dict(normalizer=13.0, horizon=5.0)])
def test_agg_weights_are_agg_loss(scale):
    loss = torch.randn(5, 9, dtype=torch.float64)
    mask = torch.rand(5, 9) > 0.4
    mask[2] = False
    mask[0, 0] = True
    for mode in AGG_MODES:
        weights = linear_losses.agg_weights(mask, (5, 9), mode, torch.float64, "cpu", **scale)
        torch.testing.assert_close((weights * loss).sum(), ref.agg_loss(loss, mask, mode, **scale))


@pytest.mark.parametrize("device,name", PAIRS)
def test_normalizer_and_horizon(device, name):
    inputs = _inputs(device, torch.float32)
    for agg in ("token-mean", "seq-mean-token-sum-norm"):
        opts = dict(agg=agg, normalizer=40.0, horizon=9.0, entropy_coef=0.1, kl_coef=0.2)
        loss, stats, grads, expected, expected_stats, expected_grads = _run(*inputs, name, **opts)
        _close(loss, expected, dict(rtol=1e-5, atol=1e-6))
        for got, want in zip(grads, expected_grads):
            _close(got, want, dict(rtol=1e-4, atol=1e-6))


@pytest.mark.parametrize("device,name", PAIRS)
def test_leading_dims_and_non_contiguous_hidden(device, name):
    hidden, weight, bias, labels, old_logp, advantages, mask, _ = _inputs(device, torch.float32, steps=8)
    wide = torch.randn(3, 9, 24, device=device)
    wide[:, :-1] = hidden
    sliced = wide[:, :-1]  # a view, as the loop's hidden[:, n_prompt - 1:-1]
    loss, _ = rf.linear_ppo_policy_loss(
        sliced, weight, labels, old_logp, advantages, mask, bias=bias, agg="seq-mean-token-sum", backend=name
    )
    expected, _ = _reference(
        hidden.double(),
        weight.double(),
        labels,
        old_logp,
        advantages,
        mask,
        bias=bias.double(),
        agg="seq-mean-token-sum",
    )
    _close(loss, expected, dict(rtol=1e-5, atol=1e-6))
    # one row (T, H) and an extra leading dim (A, B, T, H)
    loss, _ = rf.linear_ppo_policy_loss(
        hidden[0], weight, labels[0], old_logp[0], advantages[0], None, bias=bias, backend=name
    )
    expected, _ = _reference(
        hidden[0].double(),
        weight.double(),
        labels[0],
        old_logp[0],
        advantages[0],
        torch.ones_like(mask[0]),
        bias=bias.double(),
    )
    _close(loss, expected, dict(rtol=1e-5, atol=1e-6))
    loss, _ = rf.linear_ppo_policy_loss(
        hidden[None],
        weight,
        labels[None],
        old_logp[None],
        advantages[None],
        mask[None],
        bias=bias,
        agg="seq-mean-token-mean",
        backend=name,
    )
    expected, _ = _reference(
        hidden.double(),
        weight.double(),
        labels,
        old_logp,
        advantages,
        mask,
        bias=bias.double(),
        agg="seq-mean-token-mean",
    )
    _close(loss, expected, dict(rtol=1e-5, atol=1e-6))


def test_float64_torch_backend_is_exact(monkeypatch):
    monkeypatch.setattr(linear_losses, "CHUNK_BYTES", 331 * 8 * 3)
    inputs = _inputs("cpu", torch.float64)
    opts = dict(agg="seq-mean-token-sum-norm", temperature=1.3, entropy_coef=0.02, kl_coef=0.3, kl_kind="k2")
    loss, _, grads, expected, _, expected_grads = _run(*inputs, "torch", **opts)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device,name", PAIRS)
def test_empty(device, name):
    hidden = torch.randn(2, 0, 8, device=device, requires_grad=True)
    weight = torch.randn(11, 8, device=device, requires_grad=True)
    empty = torch.zeros(2, 0, device=device)
    loss, stats = rf.linear_ppo_policy_loss(hidden, weight, empty.long(), empty, empty, backend=name)
    loss.backward()
    assert loss.item() == 0 and hidden.grad.shape == hidden.shape and weight.grad.abs().max().item() == 0


def test_bad_inputs_name_the_argument():
    hidden, weight, bias, labels, old_logp, advantages, mask, ref_logp = _inputs("cpu", torch.float32)
    call = rf.linear_ppo_policy_loss
    with pytest.raises(ValueError, match="agg"):
        call(hidden, weight, labels, old_logp, advantages, mask, agg="sum")
    with pytest.raises(ValueError, match="ref_logp"):
        call(hidden, weight, labels, old_logp, advantages, mask, kl_coef=0.1)
    with pytest.raises(ValueError, match="kind"):
        call(hidden, weight, labels, old_logp, advantages, mask, ref_logp=ref_logp, kl_coef=0.1, kl_kind="k9")
    with pytest.raises(ValueError, match="dual_clip"):
        call(hidden, weight, labels, old_logp, advantages, mask, dual_clip=0.5)
    with pytest.raises(ValueError, match="old_logp"):
        call(hidden, weight, labels, old_logp[:, :-1], advantages[:, :-1], mask[:, :-1])
    with pytest.raises(ValueError, match="labels"):
        call(hidden, weight, labels + 1000, old_logp, advantages, mask)
    with pytest.raises(ValueError, match="weight"):
        call(hidden, weight[:, :-1], labels, old_logp, advantages, mask)
    with pytest.raises(TypeError, match="bias"):
        call(hidden, weight, labels, old_logp, advantages, mask, bias=bias.double())
    with pytest.raises(ValueError, match="hidden"):
        call(hidden[0, 0], weight, labels[0, 0], old_logp[0, 0], advantages[0, 0])
    with pytest.raises(ValueError, match="entropy_coef"):
        call(hidden, weight, labels, old_logp, advantages, mask, entropy_coef=float("nan"))


@pytest.mark.skipif(rf.backend.compiled() is None, reason="compiled library not built")
def test_torch_compile_fullgraph_cpu(monkeypatch):
    monkeypatch.setattr(linear_losses, "CHUNK_BYTES", 331 * 4 * 8)
    hidden, weight, bias, labels, old_logp, advantages, mask, ref_logp = _inputs("cpu", torch.float32)

    def step(h, w):
        return rf.linear_ppo_policy_loss(
            h,
            w,
            labels,
            old_logp,
            advantages,
            mask,
            bias=bias,
            ref_logp=ref_logp,
            kl_coef=0.1,
            entropy_coef=0.01,
            agg="seq-mean-token-sum",
            backend="cpu",
        )

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    (got, got_stats), (expected, expected_stats) = compiled(h1, w1), step(h2, w2)
    got.backward()
    expected.backward()
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got_stats, expected_stats)
    torch.testing.assert_close(h1.grad, h2.grad)
    torch.testing.assert_close(w1.grad, w2.grad)
