"""Divergence family: f_divergence against eager (log_softmax of both sides, then the formula), torch.compile of
the same, each rlhf_fast backend, and Liger-Kernel's KL / JSD losses when installed (batch means: their own case)."""

from __future__ import annotations

import torch

import rlhf_fast as rf
from rlhf_fast import reference

from .harness import Case, compiled, kernel_providers


def _alpha(kind):
    return 0.5 if kind == "alpha" else None


def _fwd_bwd(fn, logits_p):
    """fn(logits_p) -> per-position values; runs the backward of their sum and returns (values, grad of logits_p)."""

    def run():
        logits_p.grad = None
        out = fn(logits_p)
        out.sum().backward()
        return out.detach(), logits_p.grad

    return run


def _case(kind, rows, vocab, dtype, mode, device):
    # logits_q plays the frozen reference model: only logits_p needs a gradient (the RLHF case)
    logits_p = (torch.randn(rows, vocab, device=device) * 2).to(dtype).requires_grad_(mode == "fwd+bwd")
    logits_q = (torch.randn(rows, vocab, device=device) * 2).to(dtype)
    alpha = _alpha(kind)

    def eager(p):
        return reference.f_divergence_eager(p, logits_q, kind, alpha=alpha)

    compiled_eager = compiled(eager)
    per_call = {"eager": eager, "compile": lambda p: compiled_eager(p)}
    for name in kernel_providers(device, lambda name: name):
        per_call[name] = lambda p, name=name: rf.f_divergence(p, logits_q, kind, alpha=alpha, backend=name)
    if mode == "fwd":
        providers = {name: (lambda fn=fn: fn(logits_p)) for name, fn in per_call.items()}
    else:
        providers = {name: _fwd_bwd(fn, logits_p) for name, fn in per_call.items()}
    float64 = None
    if dtype != torch.float32:
        p64, q64 = logits_p.detach().double().requires_grad_(mode == "fwd+bwd"), logits_q.double()
        exact = lambda p: reference.f_divergence(p, q64, kind, alpha=alpha)  # noqa: E731
        float64 = (lambda: exact(p64)) if mode == "fwd" else _fwd_bwd(exact, p64)
    # floor: read both logits once (forward); the backward reads both again and writes grad_p
    size = rows * vocab * logits_p.element_size()
    moved = 2 * size if mode == "fwd" else 5 * size
    return Case(
        f"f_divergence[{kind}]",
        f"N={rows},V={vocab}",
        dtype,
        mode,
        providers,
        bytes_moved=moved,
        atol=2e-2 if dtype != torch.float32 else 1e-3,
        reference=float64,
    )


def _liger_cases(rows, vocab, dtype, device):
    """Liger-Kernel's KL and JSD take log-probabilities and return a batch mean, so they get cases of their own:
    the mean over positions of KL(P||Q) and JS(P, Q) from raw logits."""
    try:
        from liger_kernel.transformers import LigerJSD, LigerKLDIVLoss
    except ImportError:
        return []
    logits_p = (torch.randn(rows, vocab, device=device) * 2).to(dtype)
    logits_q = (torch.randn(rows, vocab, device=device) * 2).to(dtype)
    log_p = lambda: torch.log_softmax(logits_p.float(), -1)  # noqa: E731
    log_q = lambda: torch.log_softmax(logits_q.float(), -1)  # noqa: E731
    peers = {
        "kl": lambda: LigerKLDIVLoss(reduction="batchmean", log_target=True)(log_q(), log_p()),
        "js": lambda: LigerJSD(beta=0.5)(log_q(), log_p()),
    }
    cases = []
    for kind, peer in peers.items():
        providers = {
            "eager": lambda kind=kind: reference.f_divergence_eager(logits_p, logits_q, kind).mean(),
            "liger": peer,
        }
        providers.update(
            kernel_providers(
                device, lambda name, kind=kind: rf.f_divergence(logits_p, logits_q, kind, backend=name).mean()
            )
        )
        cases.append(
            Case(
                f"f_divergence_mean[{kind}]",
                f"N={rows},V={vocab}",
                dtype,
                "fwd",
                providers,
                bytes_moved=2 * logits_p.numel() * logits_p.element_size(),
                atol=1e-3,
            )
        )
    return cases


def cases(device: torch.device, quick: bool) -> list[Case]:
    if quick:
        return [
            _case("kl", 64, 4096, torch.float32, "fwd", device),
            _case("js", 64, 4096, torch.float32, "fwd", device),
            _case("kl", 64, 4096, torch.float32, "fwd+bwd", device),
        ] + linear_cases(device, quick)
    if device.type == "cuda":
        rows, vocab, dtype = 8192, 151936, torch.bfloat16
        out = [_case(kind, rows, vocab, dtype, "fwd", device) for kind in ("kl", "reverse_kl", "alpha", "js", "tv")]
        out += [_case(kind, rows, vocab, dtype, "fwd+bwd", device) for kind in ("kl", "js")]
        return out + _liger_cases(rows, vocab, dtype, device) + linear_cases(device, quick)
    rows, vocab = 2048, 32000
    out = [_case(kind, rows, vocab, torch.float32, "fwd", device) for kind in ("kl", "reverse_kl", "alpha", "js", "tv")]
    out += [
        _case("kl", rows, vocab, torch.bfloat16, "fwd", device),
        _case("kl", rows, vocab, torch.float32, "fwd+bwd", device),
        _case("js", rows, vocab, torch.float32, "fwd+bwd", device),
    ]
    return out + _liger_cases(rows, vocab, torch.float32, device) + linear_cases(device, quick)


def _linear_case(kind, rows, hidden, vocab, device):
    """Two cases: linear_f_divergence forward+backward with a trainable p side and a frozen q side (the reference
    model), against eager (both full logits, then the formula), TRL's chunked JSD from hidden states (js only), and the
    matmuls the chunked op cannot avoid, timed alone (each side's projection, the recompute of both in the
    backward, grad_hidden and grad_weight of the p side: the floor on this CPU)."""
    hidden_p = torch.randn(rows, hidden, device=device, requires_grad=True)
    weight_p = (torch.randn(vocab, hidden, device=device) / hidden**0.5).requires_grad_()
    hidden_q = torch.randn(rows, hidden, device=device)
    weight_q = torch.randn(vocab, hidden, device=device) / hidden**0.5

    def fwd_bwd(fn):
        def run():
            hidden_p.grad = weight_p.grad = None
            out = fn()
            out.sum().backward()
            return out.detach(), hidden_p.grad, weight_p.grad

        return run

    providers = {
        "eager": fwd_bwd(lambda: reference.f_divergence_eager(hidden_p @ weight_p.T, hidden_q @ weight_q.T, kind)),
    }
    providers.update(
        {
            name: fwd_bwd(fn)
            for name, fn in kernel_providers(
                device, lambda name: rf.linear_f_divergence(hidden_p, weight_p, hidden_q, weight_q, kind, backend=name)
            ).items()
        }
    )
    skipped = {}
    if kind == "js":
        try:
            from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

            providers["trl"] = fwd_bwd(
                lambda: ChunkedDivergenceFunction.apply(hidden_p, weight_p, None, hidden_q, weight_q, None, 0.5, 1.0)[0]
            )
        except ImportError as exc:
            skipped["trl"] = f"trl not importable ({exc})"

    logits = torch.empty(rows, vocab, device=device)  # reused: the floor times the arithmetic, not page faults
    grad_hidden, grad_weight = torch.empty_like(hidden_p), torch.empty_like(weight_p)

    def matmuls():
        with torch.no_grad():
            for _ in range(2):  # forward, then the backward's recompute
                torch.mm(hidden_p, weight_p.T, out=logits)
                torch.mm(hidden_q, weight_q.T, out=logits)
            torch.mm(logits, weight_p, out=grad_hidden)
            torch.mm(logits.T, hidden_p, out=grad_weight)

    shape = f"N={rows},H={hidden},V={vocab}"
    return [
        Case(f"linear_f_divergence[{kind}]", shape, torch.float32, "fwd+bwd", providers, atol=2e-3, skipped=skipped),
        Case(
            f"linear_f_divergence[{kind}] matmuls only (floor)",
            shape,
            torch.float32,
            "fwd+bwd",
            {"eager": matmuls},
            flops=2 * rows * hidden * vocab * 6,
        ),
    ]


def linear_cases(device: torch.device, quick: bool) -> list[Case]:
    if quick:
        return _linear_case("kl", 256, 64, 8192, device)
    rows, hidden = (8192, 4096) if device.type == "cuda" else (4096, 256)
    return [case for kind in ("kl", "js") for case in _linear_case(kind, rows, hidden, 151936, device)]
