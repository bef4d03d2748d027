import subprocess
import sys

import pytest
import torch
from conftest import device_backend_pairs

import rlhf_fast as rf
from rlhf_fast import _ops
from rlhf_fast import reference as ref

PAIRS = device_backend_pairs()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
KINDS = [
    ("kl", None),
    ("reverse_kl", None),
    ("js", None),
    ("tv", None),
    ("hellinger", None),
    ("chi2", None),
    ("alpha", -0.5),
    ("alpha", 0.5),
    ("alpha", 2.0),
]
KIND_IDS = [kind if alpha is None else f"alpha={alpha}" for kind, alpha in KINDS]
# The Triton interpreter evaluates tiles with numpy, which warns about the inf - inf, log(0) and overflowing casts
# of padding lanes and masked rows, whose results are then discarded.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")
needs_compiled = pytest.mark.skipif(rf.backend.compiled() is None, reason="compiled library not built")


def _vocab(device, name):
    # the Triton interpreter is slow: a small vocab, not a power of two (its kernels use 128-wide tiles there:
    # two full tiles and a ragged one)
    return 257 if name == "triton" and device == "cpu" else 1003


def _logits(rows, vocab, dtype, device, scale=1.5):
    return (torch.randn(rows, vocab, device=device) * scale).to(dtype)


def _holes(rows, device):
    mask = torch.rand(rows, device=device) > 0.3
    mask[0] = False
    mask[-1] = True
    return mask


def _assert_close_to_float64(got, exact, eager, what):
    """got (a kernel) may be off from the float64 `exact` by at most twice eager's own error in the same dtype
    (eager: the reference run on the same inputs in their dtype) plus one rounding to got's dtype of the largest
    value (a result may round the other way from eager's)."""
    # float32 results: 1e-5 relative; the one-pass log-space sums carry ~|lse| * 1e-7 of relative error, which
    # shows on the huge chi2 / alpha=2 values of confident rows
    ulp = max(torch.finfo(got.dtype).eps, 1e-5)
    got, eager = got.detach().double(), eager.detach().double()
    if not exact.numel():
        return
    err = (got - exact).abs().max().item()
    eager_err = (eager - exact).abs().max().item()
    bound = 2 * eager_err + ulp * (1 + exact.abs().max().item())
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g} (eager's own error {eager_err:.3g})"


def _check(device, name, dtype, kind, alpha, rows, vocab, temperature, mask, scale=1.5):
    logits_p = _logits(rows, vocab, dtype, device, scale).requires_grad_()
    logits_q = _logits(rows, vocab, dtype, device, scale).requires_grad_()
    upstream = torch.randn(rows, device=device)
    out = rf.f_divergence(logits_p, logits_q, kind, alpha=alpha, temperature=temperature, mask=mask, backend=name)
    assert out.shape == (rows,) and out.dtype == torch.float32
    (out * upstream).sum().backward()

    def run_reference(as_dtype):
        p = logits_p.detach().to(as_dtype).requires_grad_()
        q = logits_q.detach().to(as_dtype).requires_grad_()
        value = ref.f_divergence(p, q, kind, alpha=alpha, temperature=temperature, mask=mask)
        (value * upstream.to(value.dtype)).sum().backward()
        return value, p.grad, q.grad

    exact, exact_p, exact_q = run_reference(torch.float64)
    eager, eager_p, eager_q = run_reference(dtype)
    _assert_close_to_float64(out, exact, eager, "forward")
    assert logits_p.grad.dtype == dtype and logits_q.grad.dtype == dtype
    _assert_close_to_float64(logits_p.grad, exact_p, eager_p, "grad logits_p")
    _assert_close_to_float64(logits_q.grad, exact_q, eager_q, "grad logits_q")
    if mask is not None:
        assert (out[~mask] == 0).all()
        assert (logits_p.grad[~mask] == 0).all() and (logits_q.grad[~mask] == 0).all()


@pytest.mark.parametrize("device,name", PAIRS)
@pytest.mark.parametrize("kind,alpha", KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_and_backward_match_float64_reference(device, name, kind, alpha, dtype):
    rows = 6
    _check(device, name, dtype, kind, alpha, rows, _vocab(device, name), 0.7, _holes(rows, device))


@pytest.mark.parametrize("device,name", PAIRS)
@pytest.mark.parametrize("kind,alpha", KINDS, ids=KIND_IDS)
def test_unmasked_default_temperature_and_peaked_logits(device, name, kind, alpha):
    # scale 6: confident rows (P and Q near one-hot) stress the cancellations in the one-pass formulas;
    # 2500 entries span three of the CPU kernel's 1024-entry chunks (the last one ragged)
    vocab = _vocab(device, name) if name == "triton" else 2500
    _check(device, name, torch.float32, kind, alpha, 3, vocab, 1.0, None, scale=6.0)


@pytest.mark.parametrize("device,name", PAIRS)
def test_identical_inputs_give_zero(device, name):
    logits = _logits(4, _vocab(device, name), torch.float32, device)
    for kind, alpha in KINDS:
        out = rf.f_divergence(logits, logits, kind, alpha=alpha, backend=name)
        torch.testing.assert_close(out, torch.zeros_like(out), rtol=0, atol=2e-6, msg=kind)


@pytest.mark.parametrize("device,name", [p for p in PAIRS if p[1] != "torch"])
def test_power_kinds_save_the_s_of_their_value(device, name):
    # The backward's S = sum P^e Q^(1-e) (saved in stats) and the value scale * (S - 1) come from one expm1, so
    # that they agree to rounding whatever the exp of the device (with nvcc's fast math, expf and expm1f differ).
    ops = _ops.kernels(name, "divergence")
    vocab = _vocab(device, name)
    p = _logits(4, vocab, torch.float32, device)
    for q in (_logits(4, vocab, torch.float32, device), p + 0.01 * torch.randn_like(p)):
        for kind, alpha in [("hellinger", 0.0), ("chi2", 0.0), ("alpha", -0.5), ("alpha", 2.0)]:
            out, stats = ops.f_divergence(p, q, None, kind, alpha, 1.0)
            scale = ref.power_divergence_constants(kind, alpha)[1]
            torch.testing.assert_close(stats[:, 2].double(), 1 + out.double() / scale, rtol=2.5e-7, atol=0, msg=kind)


@pytest.mark.parametrize("device,name", PAIRS)
def test_all_masked_and_empty(device, name):
    vocab = _vocab(device, name)
    p = _logits(3, vocab, torch.float32, device).requires_grad_()
    q = _logits(3, vocab, torch.float32, device).requires_grad_()
    out = rf.f_divergence(p, q, "js", mask=torch.zeros(3, dtype=torch.bool, device=device), backend=name)
    out.sum().backward()
    assert (out == 0).all() and (p.grad == 0).all() and (q.grad == 0).all()
    for lead in [(0,), (2, 0)]:
        p = torch.randn(*lead, vocab, device=device, requires_grad=True)
        out = rf.f_divergence(p, torch.randn(*lead, vocab, device=device), "kl", backend=name)
        assert out.shape == lead and out.dtype == torch.float32
        out.sum().backward()
        assert p.grad.shape == p.shape


@pytest.mark.parametrize("device,name", PAIRS)
def test_leading_dims_and_noncontiguous_inputs(device, name):
    vocab = _vocab(device, name)
    wide = torch.randn(2, 3, vocab + 9, device=device)  # a vocab slice: rows strided, no copy needed
    logits_p = wide[..., :vocab]
    logits_q = torch.randn(3, 2, vocab, device=device).transpose(0, 1)  # leading dims permuted
    every_other = torch.randn(2, 3, 2 * vocab, device=device)[..., ::2]  # vocab stride 2: copied
    mask = torch.rand(2, 3, device=device) > 0.3
    for p, q in [(logits_p, logits_q), (every_other, logits_p)]:
        for kind, alpha in [("reverse_kl", None), ("tv", None), ("hellinger", None)]:
            out = rf.f_divergence(p, q, kind, alpha=alpha, temperature=0.8, mask=mask.int(), backend=name)
            exact = ref.f_divergence(p.double(), q.double(), kind, alpha=alpha, temperature=0.8, mask=mask)
            assert out.shape == (2, 3)
            torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device,name", PAIRS)
def test_padded_vocab_entries_are_absent(device, name):
    # vocab entries where both logits are -inf (a padded vocab) change nothing and get no gradient
    vocab, pad = _vocab(device, name), 7
    for kind, alpha in KINDS:
        p = torch.randn(3, vocab + pad, device=device)
        q = torch.randn(3, vocab + pad, device=device)
        p[:, vocab:] = q[:, vocab:] = float("-inf")
        p.requires_grad_()
        q.requires_grad_()
        out = rf.f_divergence(p, q, kind, alpha=alpha, backend=name)
        out.sum().backward()
        p_real = p.detach()[:, :vocab].double().requires_grad_()
        q_real = q.detach()[:, :vocab].double().requires_grad_()
        exact = ref.f_divergence(p_real, q_real, kind, alpha=alpha)
        exact.sum().backward()
        torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-5, msg=kind)
        torch.testing.assert_close(p.grad[:, :vocab].double(), p_real.grad, rtol=1e-4, atol=1e-6, msg=kind)
        torch.testing.assert_close(q.grad[:, :vocab].double(), q_real.grad, rtol=1e-4, atol=1e-6, msg=kind)
        assert (p.grad[:, vocab:] == 0).all() and (q.grad[:, vocab:] == 0).all()


@pytest.mark.parametrize("device,name", PAIRS)
def test_gradient_to_one_side_only_and_mixed_dtypes(device, name):
    vocab = _vocab(device, name)
    policy = _logits(4, vocab, torch.bfloat16, device).requires_grad_()
    reference_model = _logits(4, vocab, torch.float32, device)  # no gradient wanted, another dtype
    out = rf.f_divergence(policy, reference_model, "kl", backend=name)
    out.sum().backward()
    p64 = policy.detach().double().requires_grad_()
    ref.f_divergence(p64, reference_model.double(), "kl").sum().backward()
    assert policy.grad.dtype == torch.bfloat16
    torch.testing.assert_close(policy.grad.double(), p64.grad, rtol=2e-2, atol=1e-4)


@pytest.mark.parametrize("device,name", PAIRS)
def test_float64_inputs(device, name):
    # kernels compute float64 inputs in float32 and return float32; the torch backend stays in float64
    p = torch.randn(3, _vocab(device, name), device=device, dtype=torch.float64, requires_grad=True)
    q = torch.randn(3, _vocab(device, name), device=device, dtype=torch.float64)
    out = rf.f_divergence(p, q, "hellinger", backend=name)
    assert out.dtype == (torch.float64 if name == "torch" else torch.float32)
    out.sum().backward()
    p64 = p.detach().clone().requires_grad_()
    exact = ref.f_divergence(p64, q, "hellinger")
    exact.sum().backward()
    assert p.grad.dtype == torch.float64
    torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(p.grad, p64.grad, rtol=1e-4, atol=1e-6)


def test_backends_agree_with_each_other():
    names = [name for device, name in PAIRS if device == "cpu"]
    p, q = _logits(5, 257, torch.float32, "cpu"), _logits(5, 257, torch.float32, "cpu")
    for kind, alpha in KINDS:
        outs = [rf.f_divergence(p, q, kind, alpha=alpha, temperature=1.3, backend=name) for name in names]
        for name, out in zip(names[1:], outs[1:]):
            torch.testing.assert_close(out, outs[0], rtol=1e-5, atol=1e-6, msg=f"{kind}: {name} vs {names[0]}")


def test_bad_input_names_the_argument():
    p, q = torch.randn(2, 5), torch.randn(2, 5)
    with pytest.raises(ValueError, match="kind"):
        rf.f_divergence(p, q, "wasserstein")
    with pytest.raises(ValueError, match="alpha"):
        rf.f_divergence(p, q, "alpha")
    for bad in (0, 1, 1.0, float("nan"), True):
        with pytest.raises(ValueError, match="alpha"):
            rf.f_divergence(p, q, "alpha", alpha=bad)
    with pytest.raises(ValueError, match="alpha"):
        rf.f_divergence(p, q, "kl", alpha=0.5)  # alpha belongs to kind='alpha' only: never silently ignored
    with pytest.raises(ValueError, match="logits_q"):
        rf.f_divergence(p, torch.randn(2, 6), "kl")
    with pytest.raises(ValueError, match="logits_q"):
        rf.f_divergence(p, torch.randn(2, 5, device="meta"), "kl")
    with pytest.raises(TypeError, match="logits_p"):
        rf.f_divergence(p.long(), q, "kl")
    with pytest.raises(TypeError, match="logits_q"):
        rf.f_divergence(p, [[0.0] * 5] * 2, "kl")
    with pytest.raises(ValueError, match="mask"):
        rf.f_divergence(p, q, "kl", mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="temperature"):
        rf.f_divergence(p, q, "kl", temperature=0.0)
    with pytest.raises(ValueError, match="vocab"):
        rf.f_divergence(torch.randn(2, 0), torch.randn(2, 0), "kl")
    with pytest.raises(ValueError, match="backend"):
        rf.f_divergence(p, q, "kl", backend="tpu")


@needs_compiled
def test_forward_allocates_no_rows_by_vocab_buffers():
    from torch.profiler import ProfilerActivity, profile

    p, q = torch.randn(64, 4096), torch.randn(64, 4096)  # 1 MiB each
    for kind in ("kl", "js", "alpha"):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            rf.f_divergence(p, q, kind, alpha=0.5 if kind == "alpha" else None, backend="cpu")
        allocated = sum(max(e.self_cpu_memory_usage, 0) for e in prof.events())
        assert allocated < 64 * 1024, f"{kind}: forward allocated {allocated} bytes"


@needs_compiled
def test_opcheck_compiled_ops():
    rows, vocab = 5, 37
    mask = torch.tensor([True, False, True, True, True])
    for dtype in (torch.float32, torch.bfloat16):
        for kind, alpha in [("kl", 0.0), ("js", 0.0), ("alpha", -0.5)]:
            p = torch.randn(rows, vocab, dtype=dtype, requires_grad=True)
            q = torch.randn(rows, vocab, dtype=dtype, requires_grad=True)
            torch.library.opcheck(torch.ops.rlhf_fast.f_divergence.default, (p, q, mask, kind, alpha, 0.7))
            torch.library.opcheck(
                torch.ops.rlhf_fast.f_divergence.default, (p.detach(), q.detach(), None, kind, alpha, 1.0)
            )
            out, stats = torch.ops.rlhf_fast.f_divergence(p.detach(), q.detach(), mask, kind, alpha, 0.7)
            torch.library.opcheck(
                torch.ops.rlhf_fast.f_divergence_backward.default,
                (torch.randn(rows), p.detach(), q.detach(), mask, out, stats, kind, alpha, 0.7, True, False),
            )
            if kind == "js":
                torch.library.opcheck(
                    torch.ops.rlhf_fast.f_divergence_second_pass.default,
                    (p.detach(), q.detach(), mask, stats, kind, 0.7),
                )


@pytest.mark.parametrize("device, name", [pair for pair in PAIRS if pair[1] != "torch"])
@pytest.mark.parametrize("kind", ["js", "tv"])
def test_second_pass_sums_over_column_blocks(device, name, kind):
    """f_divergence_second_pass (linear_f_divergence's second pass) over blocks of columns, against the rows'
    log-normalisers, adds up to the forward's value and statistic; masked rows give 0."""
    ops = _ops.kernels(name, "divergence")
    vocab = _vocab(device, name)
    p, q = _logits(6, vocab, torch.float32, device), _logits(6, vocab, torch.float32, device)
    mask = _holes(6, device)
    out, stats = ops.f_divergence(p, q, None, kind, 0.0, 0.8)
    sums = sum(
        ops.f_divergence_second_pass(p[:, s : s + 100], q[:, s : s + 100], mask, stats, kind, 0.8)
        for s in range(0, vocab, 100)
    )
    value, statistic = (0.5 * sums.sum(-1), sums[:, 0]) if kind == "js" else (0.5 * sums[:, 0], sums[:, 1])
    zero = torch.zeros_like(out)
    torch.testing.assert_close(value, torch.where(mask, out, zero), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(statistic, torch.where(mask, stats[:, 2], zero), rtol=1e-4, atol=1e-6)
    with pytest.raises((ValueError, RuntimeError), match="'js' or 'tv'"):
        ops.f_divergence_second_pass(p, q, mask, stats, "kl", 0.8)


@needs_compiled
def test_torch_compile_fullgraph_cpu():
    def loss(p, q, mask):
        return rf.f_divergence(p, q, "js", temperature=0.9, mask=mask, backend="cpu").sum()

    p = torch.randn(2, 3, 50, requires_grad=True)
    q = torch.randn(2, 3, 50, requires_grad=True)
    mask = torch.rand(2, 3) > 0.3
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    value = compiled(p, q, mask)
    torch.testing.assert_close(value, loss(p, q, mask))
    value.backward()
    p64, q64 = p.detach().double().requires_grad_(), q.detach().double().requires_grad_()
    ref.f_divergence(p64, q64, "js", temperature=0.9, mask=mask).sum().backward()
    torch.testing.assert_close(p.grad.double(), p64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(q.grad.double(), q64.grad, rtol=1e-4, atol=1e-6)


@needs_compiled
def test_quick_benchmark_providers_agree():
    # every provider's output is checked against eager's by the harness: a MISMATCH or error fails the command
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "rlhf_fast.cli",
            "bench",
            "--quick",
            "--family",
            "divergence",
            "--device",
            "cpu",
            "--no-save",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "f_divergence[kl]" in out.stdout and "f_divergence[js]" in out.stdout


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["cuda", "triton"])
@pytest.mark.parametrize("vocab,dtype", [(151936, torch.bfloat16), (50257, torch.float16), (32000, torch.float32)])
def test_gpu_large_vocab_matches_reference(name, vocab, dtype):
    rows = 16
    for kind, alpha in KINDS:
        _check("cuda", name, dtype, kind, alpha, rows, vocab, 0.7, _holes(rows, "cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["cuda", "triton"])
def test_gpu_compile_fullgraph(name):
    p = torch.randn(8, 128, 4099, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    q = torch.randn(8, 128, 4099, device="cuda", dtype=torch.bfloat16)
    mask = torch.rand(8, 128, device="cuda") > 0.2
    fn = torch.compile(lambda p, q, m: rf.f_divergence(p, q, "reverse_kl", mask=m, backend=name), fullgraph=True)
    out = fn(p, q, mask)
    out.sum().backward()
    exact = ref.f_divergence(p.detach().double(), q.double(), "reverse_kl", mask=mask)
    torch.testing.assert_close(out.double(), exact, rtol=1e-4, atol=1e-4)
    assert p.grad.dtype == torch.bfloat16 and torch.isfinite(p.grad).all()
