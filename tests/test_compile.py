"""torch.library.opcheck of every Triton op (each family's compiled ops: test_<family>.py).

On the CPU the Triton kernels run under the interpreter, which cannot run inside fake-tensor tracing (DESIGN.md):
there opcheck checks the schemas and the autograd registration only, and the backward each Triton op has through
the dispatcher is checked against the compiled op's; on the GPU opcheck runs every check (fake tensors and AOT
dispatch, which runs the backward, too). The ops come through rlhf_fast._ops.kernels, which registers their specs.
"""

import pytest
import torch
from conftest import HAS_CUDA, live_backends

import rlhf_fast as rf
from rlhf_fast import _ops

DEVICE = "cuda" if HAS_CUDA else "cpu"

# opcheck's checks that run the op but not in fake-tensor tracing
INTERPRETER_CHECKS = ("test_schema", "test_autograd_registration")


def _randn(*shape, device, dtype=torch.float32, grad=False):
    return torch.randn(*shape, device=device).to(dtype).requires_grad_(grad)


def _advantages(ops, device):
    n, cu_seqlens = 20, torch.tensor([0, 8, 8, 20], device=device)
    mask = torch.rand(n, device=device) > 0.3
    r, v, last = (_randn(*shape, device=device, grad=True) for shape in ((n,), (n,), (3,)))
    return {
        "gae": [
            (r, v, mask, last, cu_seqlens, 0.9, 0.95),
            (r.detach().bfloat16(), v.detach().bfloat16(), None, None, cu_seqlens, 1.0, 0.9),
        ],
        "group_advantages": [
            (_randn(12, device=device), 4, True, False, 1e-6),
            (_randn(12, device=device), 3, False, True, 1e-6),
        ],
        "masked_moments": [(_randn(5, 7, device=device), torch.rand(5, 7, device=device) > 0.5)],
    }


def _logprobs(ops, device):
    logits = _randn(2, 3, 37, device=device)
    labels = torch.randint(0, 37, (2, 3), device=device)
    labels[0, 0] = -100
    _, entropy, lse = ops.logprobs_forward(logits, labels, 1.0, -100)
    grads = (_randn(2, 3, device=device), _randn(2, 3, device=device))
    hidden, weight = _randn(6, 24, device=device, grad=True), _randn(70, 24, device=device)
    return {
        "logprobs_forward": [(logits.clone().requires_grad_(), labels, 0.8, -100), (logits, None, 1.0, -100)],
        "logprobs_backward": [
            (*grads, logits, labels, lse, entropy, 1.0, -100),
            (None, grads[1], logits, None, lse, entropy, 1.0, -100),
        ],
        "logprobs_backward_": [(*grads, logits.clone(), labels, lse, entropy, 1.0, -100)],
        "linear_logprobs_forward": [
            (hidden.detach(), weight, None, labels.reshape(-1), 1.0, -100),
            (hidden.detach(), weight, _randn(70, device=device), labels.reshape(-1), 0.7, -100, 0.5, 3.0),
        ],
    }


def _divergence(ops, device):
    mask = torch.tensor([True, False, True, True, True], device=device)
    p, q = _randn(5, 37, device=device, grad=True), _randn(5, 37, device=device, grad=True)
    out, stats = ops.f_divergence(p.detach(), q.detach(), mask, "js", 0.0, 0.7)
    return {
        "f_divergence": [(p, q, mask, "kl", 0.0, 0.7), (p, q, None, "alpha", -0.5, 1.0)],
        "f_divergence_backward": [
            (_randn(5, device=device), p.detach(), q.detach(), mask, out, stats, "js", 0.0, 0.7, True, False)
        ],
        "f_divergence_second_pass": [(p.detach(), q.detach(), mask, stats, "js", 0.7)],
    }


def _losses(ops, device):
    a, b = _randn(4, 9, device=device, grad=True), _randn(4, 9, device=device, grad=True)
    logp, old_logp, adv = (_randn(5, 13, device=device) for _ in range(3))
    mask = torch.rand(5, 13, device=device) > 0.3
    _, stats = ops.ppo_policy_loss(logp, old_logp, adv, mask, 0.2, 0.2, None, "token-mean")
    one = torch.tensor(1.0, device=device)
    return {
        "kl_penalty": [(a, b, "k3"), (a.detach().bfloat16(), b.detach().bfloat16(), "k2")],
        "kl_penalty_backward": [(_randn(4, 9, device=device), a.detach(), b.detach(), "k3")],
        "ppo_policy_loss": [(logp.clone().requires_grad_(), old_logp, adv, mask, 0.2, 0.3, 2.0, "token-mean")],
        "ppo_policy_loss_backward": [(one, logp, old_logp, adv, mask, stats, 0.2, 0.2, None, "token-mean")],
        "ppo_value_loss": [(logp.clone().requires_grad_(), old_logp, adv, None, 0.2, "seq-mean-token-mean")],
        "ppo_value_loss_backward": [(one, logp, old_logp, adv, mask, stats, 0.2, "seq-mean-token-mean")],
    }


def _quant(ops, device):
    w = _randn(24, 64, device=device)
    int8, int4 = rf.quantize_weight(w, "int8"), rf.quantize_weight(w, "int4", group_size=32)
    x, bias = _randn(5, 64, device=device, grad=True), _randn(24, device=device)
    return {
        "qmatmul_int8": [(x, int8.qweight, int8.scales, bias), (x.detach(), int8.qweight, int8.scales, None)],
        "qmatmul_int4": [(x, int4.qweight, int4.scales, int4.zeros, 32, bias)],
        "qmatmul_w8a8": [(x, int8.qweight, int8.scales, None)],
    }


def _sampling(ops, device):
    uniforms = torch.rand(1, 4, dtype=torch.float64, device=device)
    logits = _randn(1, 4, 50, device=device)
    return {"sample": [(logits, uniforms, 1.0, 0, 1.0, 0.0), (logits.bfloat16(), uniforms, 0.8, 5, 0.9, 0.05)]}


FAMILIES = {
    "advantages": _advantages,
    "logprobs": _logprobs,
    "divergence": _divergence,
    "losses": _losses,
    "quant": _quant,
    "sampling": _sampling,
}


def _opcheck_family(family, device, **checks):
    ops = _ops.kernels("triton", family)
    for name, calls in FAMILIES[family](ops, device).items():
        for args in calls:
            torch.library.opcheck(getattr(ops, name), args, **checks)


@pytest.mark.skipif("triton" not in live_backends("cpu"), reason="Triton interpreter not live")
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_opcheck_triton_ops_interpreted(family):
    _opcheck_family(family, "cpu", test_utils=INTERPRETER_CHECKS)


@pytest.mark.gpu
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_opcheck_triton_ops(family):
    _opcheck_family(family, "cuda")


@pytest.mark.skipif("triton" not in live_backends(DEVICE), reason="Triton not live")
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_triton_op_has_a_case(family):
    ops = _ops.kernels("triton", family)
    defined = {name for name, value in vars(ops).items() if isinstance(value, torch._library.custom_ops.CustomOpDef)}
    assert defined == set(FAMILIES[family](ops, DEVICE))


def _weighted_sum(outputs):
    """A scalar of every output that carries a gradient, with fixed weights (the same for every backend)."""
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    return sum(
        (o.float() * torch.arange(o.numel(), device=o.device).cos().reshape(o.shape)).sum()
        for o in outputs
        if o.requires_grad
    )


DIFFERENTIABLE = sorted(f for f in FAMILIES if any(spec.backward for spec in _ops.SPECS[f].values()))


@pytest.mark.skipif(
    "triton" not in live_backends(DEVICE) or rf.backend.compiled() is None,
    reason="needs the Triton backend and the compiled ops",
)
@pytest.mark.parametrize("family", DIFFERENTIABLE)
def test_triton_backward_through_the_dispatcher_matches_the_compiled_ops(family):
    # what torch.compile and a direct torch.ops call differentiate (rf's functions take _ops.call's Function)
    ops = _ops.kernels("triton", family)
    for name, calls in FAMILIES[family](ops, DEVICE).items():
        if name not in _ops.SPECS[family] or _ops.SPECS[family][name].backward is None:
            continue  # no backward (linear_logprobs_forward: Triton only, differentiated by rf.linear_logprobs)
        for args in calls:
            inputs = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
            if not inputs:
                continue
            triton, compiled = (
                torch.autograd.grad(_weighted_sum(getattr(backend_ops, name)(*args)), inputs)
                for backend_ops in (ops, torch.ops.rlhf_fast)
            )
            for got, expected in zip(triton, compiled):
                torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4, msg=name)
