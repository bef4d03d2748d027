"""Quant family: quantized matmuls against the unquantized matmul, and a quantized tiny Llama against the float one.

Providers per matmul case: `eager` = F.linear with the unquantized weight (float32 on the CPU, bfloat16 on the
GPU), `compile` = torch.compile of the dequantize-then-matmul reference (what torchao's weight-only path relies
on), `torch` = that reference in eager mode (dequantizes the whole weight per call), each live rlhf_fast backend,
PyTorch's own quantized CPU kernels on the same quantized weight (`torch-int8pack`: `torch._weight_int8pack_mm`;
`torch-int4pack`: `torch._weight_int4pack_mm_for_cpu` on the weight repacked by
`torch._convert_weight_to_int4pack_for_cpu`; `torch-int_mm`: per-token int8 activations, then `torch._int_mm`),
`linear-bf16` (bf16 `F.linear` with the dequantized weight, for float32 cases), and torchao / bitsandbytes when
installed. Every quantized provider is checked against the float32 matmul with the
dequantized weight (the unquantized eager differs from it by the quantization error, by design).

The tiny-Llama case (random init: nothing can be downloaded here) samples text from the float model, then times a
forward of each quantized copy and records the mean per-token KL(float || quantized) on that text and the model
memory as metric rows.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import os

import torch
import torch.nn.functional as F

import rlhf_fast as rf
from rlhf_fast import reference

from .harness import Case, compiled, kernel_providers

SCHEMES = ("int8", "int4", "w8a8")
GROUP_SIZE = 128


def _peer_providers(x, w, scheme):
    """Peer libraries' quantized linears, when installed; else the reason they were skipped."""
    providers, skipped = {}, {}
    for peer in ("torchao", "bitsandbytes"):
        if importlib.util.find_spec(peer) is None:
            skipped[peer] = f"{peer} is not installed"
    if "torchao" not in skipped and x.device.type == "cuda":
        try:
            from torchao.quantization import (
                Int4WeightOnlyConfig,
                Int8DynamicActivationInt8WeightConfig,
                Int8WeightOnlyConfig,
                quantize_,
            )

            config = {
                "int8": Int8WeightOnlyConfig(),
                "int4": Int4WeightOnlyConfig(group_size=GROUP_SIZE),
                "w8a8": Int8DynamicActivationInt8WeightConfig(),
            }[scheme]
            layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device=x.device, dtype=x.dtype)
            layer.weight.data.copy_(w)
            quantize_(layer, config)
            providers["torchao"] = lambda: layer(x)
        except Exception as exc:  # an API change in the peer must not stop the suite
            skipped["torchao"] = f"torchao setup failed: {type(exc).__name__}: {exc}"[:120]
    elif "torchao" not in skipped:
        skipped["torchao"] = "benchmarked on CUDA only"
    if "bitsandbytes" not in skipped:
        if x.device.type == "cuda" and scheme in ("int8", "int4"):
            try:
                import bitsandbytes as bnb

                if scheme == "int8":
                    layer = bnb.nn.Linear8bitLt(w.shape[1], w.shape[0], bias=False, has_fp16_weights=False)
                    layer.weight = bnb.nn.Int8Params(
                        w.detach().cpu().to(x.dtype), requires_grad=False, has_fp16_weights=False
                    )
                else:
                    layer = bnb.nn.Linear4bit(
                        w.shape[1], w.shape[0], bias=False, compute_dtype=x.dtype, quant_type="nf4"
                    )
                    layer.weight = bnb.nn.Params4bit(
                        w.detach().cpu().to(x.dtype), requires_grad=False, quant_type="nf4"
                    )
                layer = layer.to(x.device)
                providers["bitsandbytes"] = lambda: layer(x)
            except Exception as exc:
                skipped["bitsandbytes"] = f"bitsandbytes setup failed: {type(exc).__name__}: {exc}"[:120]
        else:
            skipped["bitsandbytes"] = "int8 / nf4 weight-only on CUDA only"
    return providers, skipped


def _torch_cpu_providers(x, qw):
    """PyTorch's own CPU kernels for `qw`'s scheme, on its quantized values (so they compute the same product)."""
    if x.device.type != "cpu":
        return {}
    if qw.scheme == "int8":
        scales = qw.scales.to(x.dtype)
        return {"torch-int8pack": lambda: torch._weight_int8pack_mm(x, qw.qweight, scales)}
    if qw.scheme == "int4":
        packed = _int4pack(qw)
        scales, zeros = qw.scales, qw.zeros.float()
        # torch's int4 weight is (q - 8) * scale + zero, ours (q - z) * scale: zero = (8 - z) * scale
        scales_and_zeros = torch.stack([scales.T, ((8 - zeros) * scales).T], -1).contiguous().to(x.dtype)
        return {"torch-int4pack": lambda: torch._weight_int4pack_mm_for_cpu(x, packed, qw.group_size, scales_and_zeros)}
    weight_t = qw.qweight.T

    def int_mm():
        q, scale = reference.quantize_activations_int8(x)
        return (torch._int_mm(q, weight_t) * scale[:, None] * qw.scales).to(x.dtype)

    return {"torch-int_mm": int_mm}


@functools.cache
def _weights(features: int, scheme: str, device: torch.device):
    """(w float32 (features, features), its QuantizedWeight): one per size and scheme, shared by every case of
    that size, so that the CPU grid of cases holds each weight once."""
    generator = torch.Generator().manual_seed(features)
    w = (torch.randn(features, features, generator=generator) * 0.02).to(device)
    return w, rf.quantize_weight(w, scheme, group_size=GROUP_SIZE)


@functools.cache
def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype)


@functools.cache
def _dequantized(qw, dtype: torch.dtype) -> torch.Tensor:
    return qw.dequantize(dtype)


@functools.cache
def _int4pack(qw) -> torch.Tensor:
    """qw's 4-bit codes repacked by torch._convert_weight_to_int4pack_for_cpu."""
    codes = torch.stack([qw.qweight & 0xF, qw.qweight >> 4], -1).reshape(qw.out_features, qw.in_features)
    return torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)


def _on_threads(threads, fn):
    """fn run with `threads` torch CPU threads (the caller's count restored after it)."""

    def run():
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return fn()
        finally:
            torch.set_num_threads(before)

    return run


def _matmul_case(rows, features, scheme, dtype, device, with_peers, threads=None):
    w, qw = _weights(features, scheme, device)
    x = torch.randn(rows, features, device=device).to(dtype)
    w_eager = _cast(w, dtype)

    def dequantized(x):
        return reference.qmatmul(x, qw)

    providers = {
        "eager": lambda: F.linear(x, w_eager),
        "compile": lambda fn=compiled(dequantized): fn(x),
        "torch": lambda: rf.qmatmul(x, qw, backend="torch"),
    }
    providers.update(kernel_providers(device, lambda name: rf.qmatmul(x, qw, backend=name)))
    providers.update(_torch_cpu_providers(x, qw))
    if device.type == "cpu" and dtype == torch.float32:
        # the dequantized weight: the same product as the quantized providers, at bf16 F.linear's speed
        x_bf16, w_bf16 = x.to(torch.bfloat16), _dequantized(qw, torch.bfloat16)
        providers["linear-bf16"] = lambda: F.linear(x_bf16, w_bf16).float()
    skipped = {}
    if with_peers:
        peers, skipped = _peer_providers(x, w, scheme)
        providers.update(peers)
    moved = qw.nbytes + 2 * rows * features * x.element_size()  # the quantized weight, x and the output
    shape = f"M={rows},K={features},N={features}"
    if threads is not None:
        providers = {name: _on_threads(threads, fn) for name, fn in providers.items()}
        shape += f",threads={threads}"
    return Case(
        f"qmatmul_{scheme}",
        shape,
        dtype,
        "fwd",
        providers,
        bytes_moved=moved,
        flops=2 * rows * features * features,
        skipped=skipped,
        atol=2e-2,
        reference=lambda: reference.qmatmul(x.float(), qw),
    )


def _model_bytes(model):
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def _tiny_llama_case(device, quick):
    try:
        import transformers
    except ImportError as exc:
        return Case(
            "tiny_llama_forward",
            "-",
            torch.float32,
            "fwd",
            {"eager": lambda: None},
            skipped={"rf-int8": f"transformers missing: {exc}"},
        )
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    hidden, layers, vocab, batch, steps = (256, 2, 512, 2, 32) if quick else (1024, 4, 8192, 4, 128)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 3,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=max(1, hidden // 256),
        max_position_embeddings=2 * steps,
    )
    model = transformers.LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    prompt = torch.randint(0, vocab, (batch, 8), device=device)
    with torch.no_grad():
        text = model.generate(
            prompt, do_sample=True, top_k=0, max_new_tokens=steps - 8, min_new_tokens=steps - 8, pad_token_id=0
        )
        float_logp = torch.log_softmax(model(text).logits.float(), -1)

    def forward(m):
        with torch.no_grad():
            m(text)

    providers = {"eager": lambda: forward(model)}
    metrics = {"eager": [("model_memory", "MB", _model_bytes(model) / 2**20)]}
    for scheme in SCHEMES:
        quantized = rf.quantize_model(copy.deepcopy(model), scheme, group_size=GROUP_SIZE)
        with torch.no_grad():
            logp = torch.log_softmax(quantized(text).logits.float(), -1)
        kl = (float_logp.exp() * (float_logp - logp)).sum(-1).mean().item()
        providers[f"rf-{scheme}"] = lambda m=quantized: forward(m)
        metrics[f"rf-{scheme}"] = [
            ("kl_vs_float", "nats/token", kl),
            ("model_memory", "MB", _model_bytes(quantized) / 2**20),
        ]
    shape = f"B={batch},T={steps},layers={layers},hidden={hidden},vocab={vocab}"
    return Case("tiny_llama_forward", shape, dtype, "fwd", providers, metrics=metrics)


def cases(device: torch.device, quick: bool) -> list[Case]:
    if quick:
        out = [
            _matmul_case(rows, 512, scheme, torch.float32, device, with_peers=False)
            for rows in (1, 64)
            for scheme in SCHEMES
        ]
    elif device.type == "cuda":
        # 17 and 64: past the GEMV limit, where the tiled GEMM splits K (rlhf_fast.triton.quant.SPLIT_MAX_ROWS)
        out = [
            _matmul_case(rows, features, scheme, torch.bfloat16, device, with_peers=True)
            for features in (4096, 8192)
            for rows in (1, 16, 17, 64, 256, 8192)
            for scheme in SCHEMES
        ]
    else:  # float32 and bf16 activations, on one thread and on every core this process may use
        thread_counts = sorted({1, len(os.sched_getaffinity(0))})
        out = [
            _matmul_case(rows, features, scheme, dtype, device, with_peers=True, threads=threads)
            for features in (4096, 8192)
            for rows in (1, 4, 16, 64, 256, 2048)
            for dtype in (torch.float32, torch.bfloat16)
            for threads in thread_counts
            for scheme in SCHEMES
        ]
    return out + [_tiny_llama_case(device, quick)]
