"""Quantized matmuls for frozen models (reference and reward models, rollout decoding): int8 / int4 weight-only
and W8A8, plus the module swap that applies them to a transformers model.

Schemes (``QuantizedWeight.scheme``), for a weight W (N, K) = (out_features, in_features):
  ``int8``  per-output-channel symmetric: qweight int8 (N, K) in [-127, 127], scales fp32 (N,); W = q * s[n].
  ``int4``  group-wise asymmetric along K: values uint4 in [0, 15] packed two per byte, qweight uint8 (N, K/2)
            (even k in the low nibble), scales fp32 and zero points uint8 (N, K/group_size);
            W = (q - z) * s. The range of each group includes 0, so 0 is exact.
  ``w8a8``  the int8 weight of ``int8``, and activations quantized per token at run time (symmetric int8,
            see reference.quantize_activations_int8); int8 x int8 products accumulate in int32 and the
            epilogue applies s_x[m] * s_w[n] (+ bias).

``qmatmul(x, qw, bias)`` has F.linear semantics for x (..., K) float32 / bfloat16 / float16 and returns x's dtype.
It is for inference: the quantized weights never receive gradients (a float tensor of ``qw`` that requires grad
is an error), while a gradient to x does flow, through the dequantized weight (for w8a8 the activation rounding
is treated as the identity, a straight-through estimate). ``QuantizedLinear`` refuses to run in training mode
with grad enabled, so training a quantized model fails loudly instead of silently leaving its linears frozen.
"""

from __future__ import annotations

import dataclasses
from typing import cast

import torch
from torch import nn

from . import _ops, reference
from . import _validate as check
from . import backend as _backend

SCHEMES = ("int8", "int4", "w8a8")
ACTIVATION_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DECODE_ROWS = 4  # up to this many rows `auto` picks the CUDA GEMV on the GPU, beyond it AUTO_GPU["qmatmul_many_rows"]


def _check_scheme(scheme):
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")


def _check_group_size(group_size, in_features):
    check.positive_int("group_size", group_size)
    if group_size % 2:
        raise ValueError(f"group_size must be even (two int4 values share a byte), got {group_size}")
    if in_features % group_size:
        raise ValueError(
            f"group_size={group_size} does not divide in_features K={in_features}; int4 groups run "
            f"along K, so pick a group_size that divides K (e.g. 32, 64 or 128)"
        )


@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A quantized ``(N, K)`` weight: the tensors of its scheme and how to read them (made by `quantize_weight`).

    Parameters
    ----------
    scheme : str
        ``"int8"``, ``"int4"`` or ``"w8a8"``.
    qweight : torch.Tensor
        int8 ``(N, K)`` values in [-127, 127] (int8, w8a8), or uint8 ``(N, K/2)`` holding two uint4 values a
        byte, the even k in the low nibble (int4).
    scales : torch.Tensor
        float32: ``(N,)`` one per output channel (int8, w8a8), ``(N, K/group_size)`` one per group (int4).
    zeros : torch.Tensor or None
        int4 only: uint8 zero points ``(N, K/group_size)``; None for the other schemes.
    group_size : int or None
        int4 only: the group length along K (even, divides K); None for the other schemes.

    Raises
    ------
    TypeError
        A tensor of the wrong dtype (scales not float32, qweight not int8 / uint8 as the scheme needs).
    ValueError
        An unknown scheme, tensors of the wrong shape or on different devices, zero points or groups given to a
        symmetric scheme.

    Notes
    -----
    int8: ``W = q * s[n]``. int4: ``W = (q - z) * s`` per group; each group's range includes 0, so 0 is
    exact. w8a8: the int8 weight, with the activations quantized per token at run time.
    """

    scheme: str
    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None = None
    group_size: int | None = None

    def __post_init__(self):
        _check_scheme(self.scheme)
        check.tensor("qweight", self.qweight)
        check.tensor("scales", self.scales)
        if self.qweight.dim() != 2:
            raise ValueError(f"qweight must be 2-D, got shape {tuple(self.qweight.shape)}")
        if self.scales.dtype != torch.float32:
            raise TypeError(f"scales must be float32, got {self.scales.dtype}")
        rows = self.qweight.shape[0]
        if self.scheme == "int4":
            if self.qweight.dtype != torch.uint8:
                raise TypeError(f"int4 qweight must be uint8 (two values per byte), got {self.qweight.dtype}")
            _check_group_size(self.group_size, self.in_features)
            groups = (rows, self.in_features // self.group_size)
            check.tensor("zeros", self.zeros)
            if self.zeros.dtype != torch.uint8 or tuple(self.zeros.shape) != groups:
                raise ValueError(
                    f"int4 zeros must be uint8 of shape {groups}, got {self.zeros.dtype} {tuple(self.zeros.shape)}"
                )
            if tuple(self.scales.shape) != groups:
                raise ValueError(f"int4 scales must have shape {groups}, got {tuple(self.scales.shape)}")
        else:
            if self.qweight.dtype != torch.int8:
                raise TypeError(f"{self.scheme} qweight must be int8, got {self.qweight.dtype}")
            if self.zeros is not None or self.group_size is not None:
                raise ValueError(f"{self.scheme} has no zero points or groups (symmetric, per output channel)")
            if tuple(self.scales.shape) != (rows,):
                raise ValueError(f"{self.scheme} scales must have shape ({rows},), got {tuple(self.scales.shape)}")
        for name in ("scales", "zeros"):
            tensor = getattr(self, name)
            if tensor is not None and tensor.device != self.qweight.device:
                raise ValueError(f"{name} is on {tensor.device} but qweight is on {self.qweight.device}")

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1] * (2 if self.scheme == "int4" else 1)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.out_features, self.in_features))

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def nbytes(self) -> int:
        """Bytes of the quantized tensors (qweight, scales and zero points)."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros) if t is not None)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The ``(N, K)`` weight this stands for.

        Parameters
        ----------
        dtype : torch.dtype
            Dtype of the result (computed in float32, or float64 for float64).

        Returns
        -------
        torch.Tensor
            ``(N, K)`` in `dtype`.
        """
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        if self.scheme == "int4":
            weight = reference.dequantize_int4(self.qweight, self.scales, self.zeros, self.group_size, compute)
        else:
            weight = reference.dequantize_int8(self.qweight, self.scales, compute)
        return weight.to(dtype)

    def to(self, device: torch.device | str) -> QuantizedWeight:
        """A copy on `device`.

        Parameters
        ----------
        device : torch.device or str
            Where the tensors go.

        Returns
        -------
        QuantizedWeight
            The same weight with its tensors on `device`.
        """
        return dataclasses.replace(
            self,
            qweight=self.qweight.to(device),
            scales=self.scales.to(device),
            zeros=None if self.zeros is None else self.zeros.to(device),
        )

    def state_dict(self) -> dict:
        """The scheme and tensors as a dict, for ``torch.save``.

        Returns
        -------
        dict
            ``scheme``, ``qweight``, ``scales`` and, for int4, ``zeros`` and ``group_size``.
        """
        state: dict[str, object] = {"scheme": self.scheme, "qweight": self.qweight, "scales": self.scales}
        if self.scheme == "int4":
            state.update(zeros=self.zeros, group_size=self.group_size)
        return state

    @classmethod
    def from_state_dict(cls, state: dict) -> QuantizedWeight:
        """The weight a `state_dict` holds.

        Parameters
        ----------
        state : dict
            As `state_dict` returns it.

        Returns
        -------
        QuantizedWeight
            Checked as the constructor checks it.
        """
        return cls(state["scheme"], state["qweight"], state["scales"], state.get("zeros"), state.get("group_size"))


def quantize_weight(w: torch.Tensor, scheme: str, *, group_size: int = 128) -> QuantizedWeight:
    """Quantizes a linear layer's weight.

    Parameters
    ----------
    w : torch.Tensor
        ``(N, K)`` = (out_features, in_features), any float dtype (computed in float32), non-empty, finite.
    scheme : str
        ``"int8"``: int8, symmetric per output channel, float32 scales ``(N,)`` (1 byte a weight).
        ``"int4"``: uint4, asymmetric per group of `group_size` along K, packed two a byte ``(N, K/2)``,
        float32 scales and uint8 zero points ``(N, K/group_size)`` (0.5 + 5/group_size bytes a weight).
        ``"w8a8"``: the int8 weight; `qmatmul` then quantizes the activations per token (int8, symmetric) on
        the fly and accumulates in int32 (1 byte a weight).
    group_size : int
        int4 only: must be even and divide K.

    Returns
    -------
    QuantizedWeight
        On `w`'s device.

    Raises
    ------
    TypeError
        Non-float `w`.
    ValueError
        An unknown scheme, a `w` that is not a non-empty 2-D tensor, inf or nan entries (checked on the
        host: one device sync per weight), a `group_size` that is odd or does not divide K.
    """
    check.floating("w", w)
    _check_scheme(scheme)
    if w.dim() != 2 or w.shape[0] == 0 or w.shape[1] == 0:
        raise ValueError(f"w must be a non-empty 2-D (out_features, in_features) weight, got {tuple(w.shape)}")
    w = w.detach().float()
    if not bool(torch.isfinite(w).all()):
        raise ValueError("w has inf or nan entries; they cannot be quantized")
    if scheme != "int4":
        amax = w.abs().amax(dim=1)
        inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
        q = torch.round(w * inv[:, None]).clamp_(-127, 127).to(torch.int8)
        return QuantizedWeight(scheme, q.contiguous(), (amax / 127.0).contiguous())
    rows, cols = w.shape
    _check_group_size(group_size, cols)
    groups = w.reshape(rows, cols // group_size, group_size)
    low = groups.amin(dim=-1).clamp(max=0.0)
    high = groups.amax(dim=-1).clamp(min=0.0)
    scales = (high - low) / 15.0
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))  # an all-zero group: any scale, q = z = 0
    zeros = torch.round(-low / scales).clamp_(0, 15)
    q = (torch.round(groups / scales[..., None]) + zeros[..., None]).clamp_(0, 15).to(torch.uint8)
    q = q.reshape(rows, cols // 2, 2)
    packed = q[..., 0] | (q[..., 1] << 4)
    return QuantizedWeight(
        "int4", packed.contiguous(), scales.contiguous(), zeros.to(torch.uint8).contiguous(), group_size
    )


def _kernels(name: str):
    return _ops.kernels(name, "quant")


def _check_frozen(qw: QuantizedWeight):
    if qw.scales.requires_grad:
        raise ValueError(
            "qw.scales requires grad, but quantized weights are frozen: qmatmul is for inference and "
            "gives no gradient to the quantized weight. Train the float weight, then quantize it"
        )


def qmatmul(
    x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None, *, backend: str | None = None
) -> torch.Tensor:
    """``F.linear(x, qw.dequantize(), bias)`` on the quantized weight.

    Parameters
    ----------
    x : torch.Tensor
        ``(..., K)`` float32 / bfloat16 / float16 activations; non-contiguous and empty are fine.
    qw : QuantizedWeight
        The ``(N, K)`` weight, on x's device.
    bias : torch.Tensor or None
        ``(N,)`` float.
    backend : str or None
        ``"auto" | "triton" | "cuda" | "cpu" | "torch"``; None: ``RLHF_FAST_BACKEND`` or ``"auto"``.

    Returns
    -------
    torch.Tensor
        ``(..., N)`` in x's dtype. M, N or K of zero gives the bias (or zeros).

    Raises
    ------
    TypeError
        An `x` that is not float32 / bfloat16 / float16, a `qw` that is not a `QuantizedWeight`, a non-float
        bias.
    ValueError
        An `x` whose last dim is not K, a bias not ``(N,)``, mismatched devices, a ``qw.scales`` that
        requires grad (quantized weights are frozen).
    rlhf_fast.BackendUnavailable
        A backend asked for by name cannot run these tensors.

    Notes
    -----
    Gradients flow to `x` (through the dequantized weight; for w8a8 the activation rounding is passed
    straight through) and to `bias`, never to the quantized weight. int4 dequantizes as ``(q - z) * s``, so a
    zero weight is exactly 0. W8A8 activations are quantized bit for bit as
    ``reference.quantize_activations_int8`` (float32 ``127 / amax``, round-half-even of ``x * inv``, subnormals
    kept). A row holding a NaN or an inf gives a NaN output row. On CUDA tensors ``"auto"`` runs the cuda GEMV
    for up to ``DECODE_ROWS`` (4) rows and Triton for more (``AUTO_GPU["qmatmul_many_rows"]``).
    """
    check.floating("x", x)
    if x.dtype not in ACTIVATION_DTYPES:
        raise TypeError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    if not isinstance(qw, QuantizedWeight):
        raise TypeError(f"qw must be a QuantizedWeight (from rlhf_fast.quantize_weight), got {type(qw).__name__}")
    if x.dim() < 1 or x.shape[-1] != qw.in_features:
        raise ValueError(
            f"x must have shape (..., {qw.in_features}) to match qw of shape {tuple(qw.shape)}, got {tuple(x.shape)}"
        )
    check.same_device("x", x, "qw.qweight", qw.qweight)
    if bias is not None:
        check.floating("bias", bias)
        check.same_device("bias", bias, "x", x)
        if tuple(bias.shape) != (qw.out_features,):
            raise ValueError(f"bias must have shape ({qw.out_features},), got {tuple(bias.shape)}")
    _check_frozen(qw)
    lead = x.shape[:-1]
    rows = x.reshape(lead.numel(), qw.in_features)  # not -1: K may be 0
    name = _backend.select("qmatmul" if rows.shape[0] <= DECODE_ROWS else "qmatmul_many_rows", backend, x.device)
    if name == "torch":
        out = reference.qmatmul(rows, qw, bias)
    else:
        ops = _kernels(name)
        rows = rows.contiguous()
        bias32 = None if bias is None else bias.float().contiguous()
        if qw.scheme == "int8":
            out = ops.qmatmul_int8(rows, qw.qweight, qw.scales, bias32)
        elif qw.scheme == "int4":
            out = ops.qmatmul_int4(rows, qw.qweight, qw.scales, qw.zeros, qw.group_size, bias32)
        else:
            out = ops.qmatmul_w8a8(rows, qw.qweight, qw.scales, bias32)
    return out.reshape(*lead, qw.out_features)


class QuantizedLinear(nn.Module):
    """Inference replacement for ``nn.Linear`` on a quantized weight (what `quantize_model` puts in).

    Parameters
    ----------
    in_features : int
        K.
    out_features : int
        N.
    scheme : str
        ``"int8"``, ``"int4"`` or ``"w8a8"`` (see `quantize_weight`).
    bias : bool
        Whether the layer has a bias.
    group_size : int
        int4 only: must be even and divide `in_features`.
    device : torch.device, str or None
        Where the buffers are made.
    bias_dtype : torch.dtype
        Dtype of the bias buffer.

    Raises
    ------
    ValueError
        An unknown scheme or a bad int4 `group_size`.

    Notes
    -----
    The quantized tensors and the bias live in buffers (the module has no parameters), so ``.to()``,
    ``state_dict()`` and ``load_state_dict()`` carry them; a state dict of another scheme or group size is
    refused (``ValueError``). A dtype cast of the model (``model.half()``, ``.to(torch.bfloat16)``) leaves the
    float32 scales alone. ``forward`` raises ``RuntimeError`` in training mode with grad enabled: training
    through it fails loudly (under ``torch.no_grad()`` or in eval mode it runs, and gradients still flow to
    the inputs). Its ``backend`` attribute (None: ``RLHF_FAST_BACKEND`` or ``"auto"``) is passed to
    `qmatmul`. Make one from a float layer with `from_linear`.
    """

    qweight: torch.Tensor  # buffers, registered in __init__
    scales: torch.Tensor
    zeros: torch.Tensor | None
    bias: torch.Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        scheme: str,
        *,
        bias: bool = True,
        group_size: int = 128,
        device: torch.device | str | None = None,
        bias_dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        _check_scheme(scheme)
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        self.group_size = group_size if scheme == "int4" else None
        self.backend = None  # backend= of qmatmul for this layer (None: RLHF_FAST_BACKEND or auto)
        if scheme == "int4":
            _check_group_size(group_size, in_features)
            groups = in_features // group_size
            self.register_buffer(
                "qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device)
            )
            self.register_buffer("scales", torch.ones(out_features, groups, device=device))
            self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=torch.uint8, device=device))
        else:
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
            self.register_buffer("scales", torch.ones(out_features, device=device))
            self.register_buffer("zeros", None)
        self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Module, scheme: str, *, group_size: int = 128) -> QuantizedLinear:
        """A quantized copy of a float linear layer.

        Parameters
        ----------
        linear : torch.nn.Module
            An ``nn.Linear``, or a transformers ``Conv1D`` (GPT-2 style, weight stored as (in, out)).
        scheme : str
            As in `quantize_weight`.
        group_size : int
            As in `quantize_weight`.

        Returns
        -------
        QuantizedLinear
            On the weight's device, with a copy of the bias in its dtype.
        """
        stored = cast(torch.Tensor, linear.weight)
        weight = stored.t() if _is_conv1d(linear) else stored
        qw = quantize_weight(weight, scheme, group_size=group_size)
        bias = cast("torch.Tensor | None", linear.bias)
        module = cls(
            qw.in_features,
            qw.out_features,
            scheme,
            bias=bias is not None,
            group_size=group_size,
            device=weight.device,
            bias_dtype=bias.dtype if bias is not None else torch.float32,
        )
        module.qweight, module.scales = qw.qweight, qw.scales
        if qw.zeros is not None:
            module.zeros = qw.zeros
        if bias is not None:
            module.bias = bias.detach().clone()
        return module

    @property
    def quantized_weight(self) -> QuantizedWeight:
        return QuantizedWeight(self.scheme, self.qweight, self.scales, self.zeros, self.group_size)

    def forward(self, x):
        if self.training and torch.is_grad_enabled():
            raise RuntimeError(
                "QuantizedLinear is inference-only: its quantized weights cannot be trained. Call "
                "model.eval() (gradients still flow to the inputs) or run under torch.no_grad(); to "
                "train, use the float model"
            )
        return qmatmul(x, self.quantized_weight, self.bias, backend=self.backend)

    def _apply(self, fn, recurse=True):
        # A dtype cast of the model must not round the float32 scales: keep them, moved to the new device.
        scales = self.scales
        super()._apply(fn, recurse)
        if self.scales.dtype != torch.float32:
            self.scales = scales.to(self.scales.device)
        return self

    def get_extra_state(self):
        return {"scheme": self.scheme, "group_size": self.group_size}

    def set_extra_state(self, state):
        if state["scheme"] != self.scheme or state["group_size"] != self.group_size:
            raise ValueError(
                f"state dict holds a {state['scheme']} (group_size={state['group_size']}) weight, this "
                f"layer is {self.scheme} (group_size={self.group_size})"
            )

    def extra_repr(self):
        group = f", group_size={self.group_size}" if self.group_size else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}{group}, "
            f"bias={self.bias is not None}"
        )


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2 and relatives): a linear layer whose weight is stored as (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def _in_features(module: nn.Module) -> int:
    return cast(torch.Tensor, module.weight).shape[0] if _is_conv1d(module) else cast(int, module.in_features)


def _skipped(name: str, skip) -> bool:
    parts = name.split(".")
    return any(name == s or name.startswith(s + ".") or s in parts for s in skip)


def quantizable_layers(
    model: nn.Module, scheme: str, *, skip: str | tuple[str, ...] = ("lm_head",), group_size: int = 128
) -> list[tuple[str, nn.Module]]:
    """The layers `quantize_model` would replace, without touching the model (to fail early).

    Parameters
    ----------
    model : torch.nn.Module
        The model to inspect.
    scheme : str
        As in `quantize_weight`.
    skip : str or tuple of str
        As in `quantize_model`.
    group_size : int
        As in `quantize_weight`.

    Returns
    -------
    list of tuple of (str, torch.nn.Module)
        ``(dotted name, layer)`` pairs.

    Raises
    ------
    ValueError
        The same errors `quantize_model` would raise: an unknown scheme, a layer that cannot take it (an int4
        `group_size` that does not divide its K; the message names the layer), no layer to quantize.
    """
    _check_scheme(scheme)
    if isinstance(skip, str):
        skip = (skip,)
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if name and (isinstance(module, nn.Linear) or _is_conv1d(module)) and not _skipped(name, skip)
    ]
    if not targets:
        raise ValueError(f"model has no nn.Linear or transformers Conv1D layer outside skip={tuple(skip)} to quantize")
    if scheme == "int4":
        for name, linear in targets:
            try:
                _check_group_size(group_size, _in_features(linear))
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}; or add {name!r} to skip") from None
    return targets


def quantize_model(
    model: nn.Module, scheme: str, *, skip: str | tuple[str, ...] = ("lm_head",), group_size: int = 128
) -> nn.Module:
    """Replaces, in place, every ``nn.Linear`` (and transformers ``Conv1D``, as in GPT-2) with a `QuantizedLinear`.

    Parameters
    ----------
    model : torch.nn.Module
        The frozen model (a reference or reward model).
    scheme : str
        As in `quantize_weight`.
    skip : str or tuple of str
        Layers to leave in float: a module is skipped when its full dotted name, a prefix of it, or one of its
        name components (such as ``"mlp"``) is listed.
    group_size : int
        As in `quantize_weight`.

    Returns
    -------
    torch.nn.Module
        `model` itself, in eval mode (it is for inference).

    Raises
    ------
    ValueError
        As `quantizable_layers`: every layer is checked before any is replaced, and a model with nothing to
        quantize is an error rather than a silent no-op.
    """
    targets = quantizable_layers(model, scheme, skip=skip, group_size=group_size)
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QuantizedLinear.from_linear(linear, scheme, group_size=group_size))
    return model.eval()
