import importlib

import pytest
import torch
from conftest import device_backend_pairs

import rlhf_fast as rf
from rlhf_fast import reference as ref

lp_module = importlib.import_module("rlhf_fast.logprobs")  # the package attribute `logprobs` is the function
PAIRS = device_backend_pairs()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# The Triton interpreter runs every program in Python: keep its vocabularies and row counts small.
SMALL_VOCAB = {"triton": 257}
# Outputs are fp32 math on the same rounded inputs the float64 reference sees, whatever the input dtype.
OUT_TOL = dict(rtol=1e-4, atol=1e-4)


def _vocab(name, default=1003):
    return SMALL_VOCAB.get(name, default)


def _case(shape, vocab, dtype, device, ignore_frac=0.25):
    logits = (torch.randn(*shape, vocab, device=device) * 3).to(dtype)
    labels = torch.randint(0, vocab, shape, device=device)
    labels[torch.rand(shape, device=device) < ignore_frac] = -100
    return logits, labels


def _reference(logits, labels, temperature=1.0):
    return ref.logprobs(logits.double(), labels, temperature=temperature, return_entropy=True)


@pytest.mark.parametrize("device,name", PAIRS)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_forward_matches_float64_reference(device, name, dtype, temperature):
    logits, labels = _case((2, 3), _vocab(name), dtype, device)
    logp, ent = rf.logprobs(logits, labels, temperature=temperature, return_entropy=True, backend=name)
    exp_logp, exp_ent = _reference(logits, labels, temperature)
    assert logp.dtype == torch.float32 and ent.dtype == torch.float32 and logp.shape == (2, 3)
    torch.testing.assert_close(logp.double(), exp_logp, **OUT_TOL)
    torch.testing.assert_close(ent.double(), exp_ent, **OUT_TOL)
    assert (logp[labels == -100] == 0).all()
    alone = rf.logprobs(logits, labels, temperature=temperature, backend=name)
    torch.testing.assert_close(alone, logp)
    torch.testing.assert_close(rf.entropy(logits, temperature=temperature, backend=name), ent)


def _backward(logits, labels, name, temperature=1.0, inplace=False, with_entropy=True):
    x = logits.clone().requires_grad_()
    g_lp = torch.randn(labels.shape, device=logits.device)
    g_h = torch.randn(labels.shape, device=logits.device)
    logp, ent = rf.logprobs(
        x * 1 if inplace else x,
        labels,
        temperature=temperature,
        return_entropy=True,
        inplace_backward=inplace,
        backend=name,
    )
    outputs, grads = ((logp, ent), (g_lp, g_h)) if with_entropy else ((logp,), (g_lp,))
    torch.autograd.backward(outputs, grads)
    return x.grad, g_lp, g_h


def _reference_grad(logits, labels, g_lp, g_h, temperature=1.0, dtype=torch.float64, with_entropy=True):
    x = logits.detach().to(dtype).requires_grad_()
    logp, ent = ref.logprobs(x, labels, temperature=temperature, return_entropy=True)
    loss = (logp * g_lp.to(dtype)).sum() + ((ent * g_h.to(dtype)).sum() if with_entropy else 0)
    loss.backward()
    return x.grad


@pytest.mark.parametrize("device,name", PAIRS)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_backward_matches_autograd_of_reference(device, name, dtype):
    logits, labels = _case((2, 5), _vocab(name), dtype, device)
    grad, g_lp, g_h = _backward(logits, labels, name, temperature=0.7)
    expected = _reference_grad(logits, labels, g_lp, g_h, temperature=0.7)
    assert grad.dtype == dtype
    if dtype in (torch.float32, torch.float64):
        torch.testing.assert_close(grad.double(), expected, rtol=1e-4, atol=1e-6)
        return
    # Low precision: no worse than eager autograd run in that dtype (log_softmax + gather + entropy in bf16/fp16).
    x = logits.detach().clone().requires_grad_()
    log_probs = torch.log_softmax(x / 0.7, dim=-1)
    safe = labels.clamp(min=0)
    eager_logp = torch.where(labels == -100, 0, log_probs.gather(-1, safe[..., None])[..., 0])
    eager_ent = -(log_probs.exp() * log_probs).sum(-1)
    ((eager_logp.float() * g_lp).sum() + (eager_ent.float() * g_h).sum()).backward()
    ours = (grad.double() - expected).norm()
    eager = (x.grad.double() - expected).norm()
    assert ours <= 1.0 * eager, (ours, eager)


@pytest.mark.parametrize("device,name", PAIRS)
def test_backward_logp_only_and_ignored_rows_get_no_logp_gradient(device, name):
    logits, labels = _case((3, 4), _vocab(name), torch.float32, device, ignore_frac=0.5)
    grad, g_lp, g_h = _backward(logits, labels, name, with_entropy=False)
    expected = _reference_grad(logits, labels, g_lp, g_h, with_entropy=False)
    torch.testing.assert_close(grad.double(), expected, rtol=1e-4, atol=1e-6)
    assert (grad[labels == -100] == 0).all()


@pytest.mark.parametrize("device,name", PAIRS)
def test_fully_ignored_batch(device, name):
    logits, _ = _case((2, 3), _vocab(name), torch.float32, device)
    labels = torch.full((2, 3), -1, dtype=torch.long, device=device)
    x = logits.clone().requires_grad_()
    logp, ent = rf.logprobs(x, labels, ignore_index=-1, return_entropy=True, backend=name)
    assert (logp == 0).all()
    torch.testing.assert_close(ent.double(), ref.entropy(logits.double()), **OUT_TOL)
    logp.sum().backward()
    assert (x.grad == 0).all()


@pytest.mark.parametrize("device,name", PAIRS)
def test_inplace_backward_overwrites_logits_with_their_gradient(device, name):
    logits, labels = _case((2, 4), _vocab(name), torch.bfloat16, device)
    expected, g_lp, g_h = _backward(logits, labels, name)
    hidden = logits.clone().requires_grad_()
    buffer = hidden * 1  # the logits buffer the backward writes into
    logp, ent = rf.logprobs(buffer, labels, return_entropy=True, inplace_backward=True, backend=name)
    torch.autograd.backward((logp, ent), (g_lp, g_h))
    torch.testing.assert_close(hidden.grad, expected, rtol=0, atol=0)
    if name != "torch":  # the eager reference keeps its own gradient buffer
        torch.testing.assert_close(buffer.detach(), expected, rtol=0, atol=0)


@pytest.mark.parametrize("device,name", PAIRS)
def test_noncontiguous_rows_are_read_in_place(device, name):
    vocab = _vocab(name)
    big = (torch.randn(3, 6, vocab, device=device) * 2).requires_grad_()
    logits = big[:, :-1]
    labels = torch.randint(0, vocab, (3, 5), device=device)
    rows = lp_module._as_rows(logits)
    assert rows.data_ptr() == big.data_ptr() and rows.shape == (3, 5, vocab)
    logp, ent = rf.logprobs(logits, labels, return_entropy=True, backend=name)
    exp_logp, exp_ent = _reference(logits.detach(), labels)
    torch.testing.assert_close(logp.double(), exp_logp, **OUT_TOL)
    torch.testing.assert_close(ent.double(), exp_ent, **OUT_TOL)
    (logp.sum() + ent.sum()).backward()
    expected = _reference_grad(logits, labels, torch.ones(3, 5), torch.ones(3, 5))
    torch.testing.assert_close(big.grad[:, :-1].double(), expected, rtol=1e-4, atol=1e-6)
    assert (big.grad[:, -1] == 0).all()
    # a transposed batch, a strided vocab (copied) and four leading dims
    for view in (big.detach().transpose(0, 1), big.detach()[..., ::2], big.detach().reshape(3, 2, 3, 1, vocab)):
        view_labels = torch.randint(0, view.shape[-1], view.shape[:-1], device=device)
        got = rf.logprobs(view, view_labels, backend=name)
        torch.testing.assert_close(got.double(), _reference(view, view_labels)[0], **OUT_TOL)


def test_row_folding():
    x = torch.randn(4, 5, 6, 7)
    assert lp_module._as_rows(x).shape == (1, 120, 7)
    assert lp_module._as_rows(x[:, 1:]).shape == (4, 24, 7)
    assert lp_module._as_rows(x[:, 1:]).data_ptr() == x[:, 1:].data_ptr()
    assert lp_module._as_rows(x[:, :, 1:]).shape == (20, 5, 7)
    assert lp_module._as_rows(x[1:, 1:, 1:]).shape == (1, 60, 7)  # three strided groups: copied
    assert lp_module._as_rows(torch.randn(7)).shape == (1, 1, 7)


@pytest.mark.parametrize("device,name", PAIRS)
def test_empty_inputs(device, name):
    vocab = _vocab(name)
    for shape in ((0,), (2, 0)):
        x = torch.randn(*shape, vocab, device=device, requires_grad=True)
        labels = torch.zeros(shape, dtype=torch.long, device=device)
        logp, ent = rf.logprobs(x, labels, return_entropy=True, backend=name)
        assert logp.shape == shape and ent.shape == shape
        (logp.sum() + ent.sum()).backward()
        assert x.grad.shape == x.shape


@pytest.mark.parametrize("device,name", PAIRS)
def test_masked_vocab_entries(device, name):
    logits, labels = _case((4,), _vocab(name), torch.float32, device, ignore_frac=0)
    logits[:, 5:40] = float("-inf")
    labels = labels.clamp(min=40)
    logp, ent = rf.logprobs(logits, labels, return_entropy=True, backend=name)
    exp_logp, exp_ent = _reference(logits, labels)
    torch.testing.assert_close(logp.double(), exp_logp, **OUT_TOL)
    torch.testing.assert_close(ent.double(), exp_ent, **OUT_TOL)
    x = logits.clone().requires_grad_()
    out_logp, out_ent = rf.logprobs(x, labels, return_entropy=True, backend=name)
    (out_logp.sum() + out_ent.sum()).backward()
    assert torch.isfinite(x.grad).all() and (x.grad[:, 5:40] == 0).all()


def test_large_vocab_cpu():
    logits, labels = _case((6,), 50257, torch.bfloat16, "cpu")
    logp, ent = rf.logprobs(logits, labels, return_entropy=True, backend="cpu")
    exp_logp, exp_ent = _reference(logits, labels)
    torch.testing.assert_close(logp.double(), exp_logp, **OUT_TOL)
    torch.testing.assert_close(ent.double(), exp_ent, **OUT_TOL)
    grad, g_lp, g_h = _backward(logits.float(), labels, "cpu")
    expected = _reference_grad(logits.float(), labels, g_lp, g_h)
    torch.testing.assert_close(grad.double(), expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [1, 16, 45, 600])
def test_short_rows_cpu(dtype, vocab):
    """Rows of one block are copied a group at a time before their math: many groups, a group cut short by the
    thread's range, rows that are a view (the loop's logits[:, P - 1:-1]), vocab a whole number of vectors or not."""
    logits, labels = _case((37, 15), vocab, dtype, "cpu")
    view, view_labels = logits[:, 6:14], labels[:, 6:14]
    logp, ent = rf.logprobs(view, view_labels, return_entropy=True, backend="cpu")
    exp_logp, exp_ent = _reference(view, view_labels)
    torch.testing.assert_close(logp.double(), exp_logp, **OUT_TOL)
    torch.testing.assert_close(ent.double(), exp_ent, **OUT_TOL)


def test_bad_input_names_the_argument():
    x, y = torch.randn(2, 3, 11), torch.randint(0, 11, (2, 3))
    with pytest.raises(ValueError, match="labels"):
        rf.logprobs(x, torch.randint(0, 11, (2, 4)))
    with pytest.raises(TypeError, match="labels"):
        rf.logprobs(x, y.float())
    with pytest.raises(TypeError, match="logits"):
        rf.logprobs(x.long(), y)
    with pytest.raises(ValueError, match="labels"):
        rf.logprobs(x, torch.full((2, 3), 11))
    with pytest.raises(ValueError, match="labels"):
        rf.logprobs(x, torch.full((2, 3), -3), backend="torch")
    with pytest.raises(ValueError, match="temperature"):
        rf.logprobs(x, y, temperature=0.0)
    with pytest.raises(ValueError, match="logits"):
        rf.logprobs(torch.randn(2, 0), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="logits"):
        rf.entropy(torch.tensor(1.0))
    with pytest.raises(ValueError, match="backend"):
        rf.logprobs(x, y, backend="tpu")
    with pytest.raises(ValueError, match="weight"):
        rf.linear_logprobs(torch.randn(2, 4), torch.randn(11, 5), torch.zeros(2, dtype=torch.long))
    with pytest.raises(TypeError, match="weight"):
        rf.linear_logprobs(torch.randn(2, 4), torch.randn(11, 4, dtype=torch.float64), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="bias"):
        rf.linear_logprobs(
            torch.randn(2, 4), torch.randn(11, 4), torch.zeros(2, dtype=torch.long), bias=torch.randn(10)
        )
    with pytest.raises(ValueError, match="labels"):
        rf.linear_logprobs(torch.randn(2, 4), torch.randn(11, 4), torch.full((2,), 11))


def test_int32_labels_and_auto_backend():
    x, y = torch.randn(5, 77), torch.randint(0, 77, (5,), dtype=torch.int32)
    torch.testing.assert_close(rf.logprobs(x, y).double(), ref.logprobs(x.double(), y), **OUT_TOL)


@pytest.mark.parametrize("device,name", PAIRS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_logprobs_matches_reference(device, name, dtype, with_bias, monkeypatch):
    # 2 x 3 tokens x 1003 vocab in chunks of 128 columns: 8 chunks, the last one ragged
    monkeypatch.setattr(lp_module, "LINEAR_CHUNK_BYTES", 128 * 6 * torch.tensor([], dtype=dtype).element_size())
    hidden = torch.randn(2, 3, 40, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(1003, 40, device=device) * 0.3).to(dtype).requires_grad_()
    bias = torch.randn(1003, device=device).to(dtype).requires_grad_() if with_bias else None
    labels = torch.randint(0, 1003, (2, 3), device=device)
    labels[0, 1] = -100
    logp, ent = rf.linear_logprobs(
        hidden, weight, labels, bias=bias, temperature=0.9, return_entropy=True, backend=name
    )
    g_lp, g_h = torch.randn(2, 3, device=device), torch.randn(2, 3, device=device)
    torch.autograd.backward((logp, ent), (g_lp, g_h))

    leaves = [t.detach().double().requires_grad_() for t in (hidden, weight) + ((bias,) if with_bias else ())]
    exp_logp, exp_ent = ref.linear_logprobs(
        leaves[0], leaves[1], labels, bias=leaves[2] if with_bias else None, temperature=0.9, return_entropy=True
    )
    torch.autograd.backward((exp_logp, exp_ent), (g_lp.double(), g_h.double()))
    # low precision: the logits of each chunk are rounded to the inputs' dtype, as an lm_head's output is
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    assert logp.dtype == torch.float32 and logp.shape == (2, 3) and logp[0, 1] == 0
    torch.testing.assert_close(logp.double(), exp_logp, **tol)
    torch.testing.assert_close(ent.double(), exp_ent, **tol)
    for got, exp in zip((hidden, weight) + ((bias,) if with_bias else ()), leaves):
        assert got.grad.dtype == dtype
        torch.testing.assert_close(got.grad.double(), exp.grad, **tol)


# (logit_scale, softcap, weight scale): Cohere's scale on large raw logits; Gemma's cap where most logits saturate
# (|s y / c| up to ~10, tanh = +-1 in float32); both at once
TRANSFORMS = {"scale": (0.0625, None, 4.0), "softcap": (1.0, 10.0, 6.0), "scale+softcap": (2.5, 10.0, 2.5)}


def _relative_error(got, expected):
    return float((got.detach().double() - expected.detach()).norm() / expected.detach().norm())


@pytest.mark.parametrize("device,name", PAIRS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("transform", list(TRANSFORMS))
def test_linear_logprobs_logit_transforms_match_float64(device, name, dtype, transform, monkeypatch):
    # chunks of 128 vocab columns (the least _vocab_chunks takes): 1003 (Triton: 257) is not a multiple
    monkeypatch.setattr(lp_module, "LINEAR_CHUNK_BYTES", 1)
    logit_scale, softcap, spread = TRANSFORMS[transform]
    vocab = _vocab(name)
    hidden = torch.randn(3, 5, 48, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, 48, device=device) * spread).to(dtype).requires_grad_()
    bias = torch.randn(vocab, device=device).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (3, 5), device=device)
    labels[1, 2] = -100
    options = dict(temperature=0.7, logit_scale=logit_scale, softcap=softcap)
    logp, ent = rf.linear_logprobs(hidden, weight, labels, bias=bias, return_entropy=True, backend=name, **options)
    g_lp, g_h = torch.randn(3, 5, device=device), torch.randn(3, 5, device=device)
    torch.autograd.backward((logp, ent), (g_lp, g_h))

    leaves = [t.detach().double().requires_grad_() for t in (hidden, weight, bias)]
    raw = torch.nn.functional.linear(*leaves) * logit_scale
    capped = raw if softcap is None else softcap * torch.tanh(raw / softcap)
    if softcap is not None:
        assert (raw.abs() > 3 * softcap).float().mean() > 0.2  # tanh saturates on many logits
    exp_logp, exp_ent = ref.logprobs(capped, labels, temperature=0.7, return_entropy=True)
    torch.autograd.backward((exp_logp, exp_ent), (g_lp.double(), g_h.double()))
    assert logp.dtype == torch.float32 and logp.shape == (3, 5) and logp[1, 2] == 0
    for got in (hidden, weight, bias):
        assert got.grad.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(logp.double(), exp_logp, **OUT_TOL)
        torch.testing.assert_close(ent.double(), exp_ent, **OUT_TOL)
        for got, exp in zip((hidden, weight, bias), leaves):
            torch.testing.assert_close(got.grad.double(), exp.grad, rtol=1e-4, atol=1e-4)
        return
    # bfloat16: the lm_head output is rounded to bfloat16 as the model's is (the transform is float32): <1% here
    for got, exp in [(logp, exp_logp), (ent, exp_ent)] + [
        (t.grad, e.grad) for t, e in zip((hidden, weight, bias), leaves)
    ]:
        assert _relative_error(got, exp) < 1.5e-2


def test_linear_logprobs_transform_is_not_a_no_op():
    # the transform changes the result (so the tests above can fail), and the plain options match no options
    hidden, weight = torch.randn(4, 16), torch.randn(300, 16) * 3
    labels = torch.randint(0, 300, (4,))
    plain = rf.linear_logprobs(hidden, weight, labels, backend="torch")
    torch.testing.assert_close(
        rf.linear_logprobs(hidden, weight, labels, logit_scale=1.0, softcap=None), plain, **OUT_TOL
    )
    for options in (dict(logit_scale=0.5), dict(softcap=5.0)):
        assert (rf.linear_logprobs(hidden, weight, labels, **options) - plain).abs().max() > 0.1


@pytest.mark.parametrize("argument", ["logit_scale", "softcap"])
@pytest.mark.parametrize("value", [0.0, -2.0, float("inf"), float("nan"), True, "1"])
def test_linear_logprobs_bad_transform_names_the_argument(argument, value):
    with pytest.raises(ValueError, match=argument):
        rf.linear_logprobs(torch.randn(2, 4), torch.randn(11, 4), torch.zeros(2, dtype=torch.long), **{argument: value})


@pytest.mark.parametrize("device,name", PAIRS)
def test_linear_logprobs_strided_labels_and_bias(device, name):
    # labels = ids[:, 1] and bias[::2] are strided views: read with their strides, never as if contiguous
    hidden = torch.randn(37, 24, device=device)
    weight = torch.randn(131, 24, device=device) * 0.3
    bias = torch.randn(262, device=device)[::2]
    ids = torch.randint(0, 131, (37, 3), device=device)
    labels = ids[:, 1]
    logp, ent = rf.linear_logprobs(hidden, weight, labels, bias=bias, return_entropy=True, backend=name)
    exp_logp, exp_ent = ref.linear_logprobs(
        hidden.double(), weight.double(), labels, bias=bias.double(), return_entropy=True
    )
    torch.testing.assert_close(logp.double(), exp_logp, **OUT_TOL)
    torch.testing.assert_close(ent.double(), exp_ent, **OUT_TOL)


@pytest.mark.parametrize("device,name", PAIRS)
@pytest.mark.parametrize("chunk_columns", [None, 128])
def test_linear_logprobs_vocab_padding_masked_by_minus_inf_bias(device, name, chunk_columns, monkeypatch):
    # a vocab padded from 100 to 256 columns, the padding masked by a -inf bias: whole vocab tiles (and chunks)
    # of -inf logits contribute nothing, they do not turn the row into NaN
    if chunk_columns is not None:
        monkeypatch.setattr(lp_module, "LINEAR_CHUNK_BYTES", chunk_columns * 19 * 4)
    hidden = torch.randn(19, 24, device=device, requires_grad=True)
    weight = (torch.randn(256, 24, device=device) * 0.3).requires_grad_()
    bias = torch.randn(256, device=device)
    bias[100:] = float("-inf")
    labels = torch.randint(0, 100, (19,), device=device)
    logp, ent = rf.linear_logprobs(hidden, weight, labels, bias=bias, return_entropy=True, backend=name)
    (logp.sum() + ent.sum()).backward()
    leaves = [t.detach().double().requires_grad_() for t in (hidden, weight[:100])]
    exp_logp, exp_ent = ref.linear_logprobs(*leaves, labels, bias=bias[:100].double(), return_entropy=True)
    (exp_logp.sum() + exp_ent.sum()).backward()
    torch.testing.assert_close(logp.double(), exp_logp, **OUT_TOL)
    torch.testing.assert_close(ent.double(), exp_ent, **OUT_TOL)
    torch.testing.assert_close(hidden.grad.double(), leaves[0].grad, **OUT_TOL)
    torch.testing.assert_close(weight.grad[:100].double(), leaves[1].grad, **OUT_TOL)
    assert (weight.grad[100:] == 0).all()


@pytest.mark.skipif("triton" not in [n for _, n in PAIRS], reason="Triton backend not live")
@pytest.mark.parametrize("group", [1, 3])
def test_triton_linear_logprobs_same_for_any_tile_order(group, monkeypatch):
    # 9 token tiles x 4 vocab tiles: the grouped program order (groups of 2 token tiles under the interpreter,
    # the last one short) gives the same bits as others (1: each token tile walks the vocab; 3: other groups)
    ops = importlib.import_module("rlhf_fast.triton.logprobs")
    config = ops.linear_config(torch.float32)
    tokens = 8 * config["BLOCK_N"] + 5
    hidden, weight = torch.randn(tokens, 24), torch.randn(3 * config["BLOCK_V"] + 7, 24) * 0.3
    labels = torch.randint(0, weight.shape[0], (tokens,))
    expected = ops.linear_logprobs_forward(hidden, weight, None, labels, 1.0, -100)
    monkeypatch.setattr(ops, "linear_config", lambda dtype: {**config, "GROUP_N": group})
    for got, exp in zip(ops.linear_logprobs_forward(hidden, weight, None, labels, 1.0, -100), expected):
        assert torch.equal(got, exp)
    torch.testing.assert_close(
        expected[0].double(), ref.linear_logprobs(hidden.double(), weight.double(), labels), **OUT_TOL
    )


@pytest.mark.skipif("triton" not in [n for _, n in PAIRS], reason="Triton backend not live")
def test_triton_fused_forward_rounds_bf16_logits_as_torch_does():
    # the fused forward's logits are the lm_head's bf16 output (rounded to nearest, also under the interpreter),
    # so its log-sum-exp is that of the logits the backward recomputes with torch
    ops = importlib.import_module("rlhf_fast.triton.logprobs")
    hidden, weight = torch.randn(40, 64).bfloat16(), (torch.randn(300, 64) * 0.4).bfloat16()
    labels = torch.randint(0, 300, (40,))
    logp, _, lse = ops.linear_logprobs_forward(hidden, weight, None, labels, 1.0, -100)
    exp_logp, _ = _reference(hidden @ weight.t(), labels)
    torch.testing.assert_close(lse, torch.logsumexp((hidden @ weight.t()).float(), -1), rtol=0, atol=1e-5)
    torch.testing.assert_close(logp.double(), exp_logp, rtol=0, atol=1e-5)


@pytest.mark.skipif("triton" not in [n for _, n in PAIRS], reason="Triton backend not live")
def test_triton_ops_out_of_range_labels_give_nan():
    # the Triton kernels themselves (no host check in front): a label outside [0, V) other than ignore_index
    # reads nothing past its row and gives a NaN log-prob; the other rows, entropies and gradients are unharmed
    ops = importlib.import_module("rlhf_fast.triton.logprobs")
    vocab = 70
    labels = torch.tensor([3, vocab, -5, -100, 2**40, vocab - 1])
    bad = torch.tensor([False, True, True, False, True, False])
    hidden, weight = torch.randn(6, 24), torch.randn(vocab, 24) * 0.3
    logits = hidden @ weight.t()
    safe = torch.where(bad, 0, labels)
    exp_logp, exp_ent = ref.logprobs(logits.double(), safe, return_entropy=True)
    exp_logp = torch.where(bad, float("nan"), exp_logp)
    results = {
        "row": ops.logprobs_forward(logits[None], labels[None], 1.0, -100),
        "linear": ops.linear_logprobs_forward(hidden, weight, None, labels, 1.0, -100),
        "chunked": lp_module._chunked_linear_forward(
            hidden.double(), weight.double(), None, labels, 1.0, -100, [(0, 32), (32, vocab)], ops
        ),
    }
    for where, (logp, ent, _) in results.items():
        torch.testing.assert_close(logp.reshape(-1).double(), exp_logp, equal_nan=True, **OUT_TOL, msg=where)
        torch.testing.assert_close(ent.reshape(-1).double(), exp_ent, **OUT_TOL, msg=where)
    _, entropy, lse = results["row"]
    grad = ops.logprobs_backward(
        torch.ones(1, 6), torch.ones(1, 6), logits[None], labels[None], lse, entropy, 1.0, -100
    )
    assert torch.isfinite(grad).all()


@pytest.mark.skipif("triton" not in [n for _, n in PAIRS], reason="Triton backend not live")
def test_triton_row_ops_take_strided_per_row_tensors():
    # labels, lse, entropy and upstream gradients given to the Triton ops directly as strided (A, B) views
    ops = importlib.import_module("rlhf_fast.triton.logprobs")
    logits, labels = _case((2, 5), 70, torch.float32, "cpu")
    strided = lambda t: t.repeat_interleave(2, dim=1)[:, ::2]  # noqa: E731
    logp, ent, lse = ops.logprobs_forward(logits, strided(labels), 1.0, -100)
    exp_logp, exp_ent = _reference(logits, labels)
    torch.testing.assert_close(logp.double(), exp_logp, **OUT_TOL)
    g_lp, g_h = torch.randn(2, 5), torch.randn(2, 5)
    grad = ops.logprobs_backward(
        strided(g_lp), strided(g_h), logits, strided(labels), strided(lse), strided(ent), 1.0, -100
    )
    torch.testing.assert_close(grad.double(), _reference_grad(logits, labels, g_lp, g_h), **OUT_TOL)


@pytest.mark.parametrize("device,name", PAIRS)
def test_linear_logprobs_empty_and_chunking(device, name):
    hidden = torch.zeros(0, 8, device=device, requires_grad=True)
    weight = torch.randn(20, 8, device=device, requires_grad=True)
    logp = rf.linear_logprobs(hidden, weight, torch.zeros(0, dtype=torch.long, device=device), backend=name)
    logp.sum().backward()
    assert logp.shape == (0,) and weight.grad.shape == weight.shape and (weight.grad == 0).all()
    assert lp_module._vocab_chunks(16384, 151936, 2)[0] == (0, 4096)
    assert lp_module._vocab_chunks(4, 1003, 2) == [(0, 1003)]
    # with a soft cap a bf16 chunk also holds float32 tanh and capped logits (10 bytes a logit): narrower chunks
    per_logit = lp_module._chunk_bytes_per_logit(torch.bfloat16, 30.0)
    assert per_logit == 10 and lp_module._vocab_chunks(16384, 151936, per_logit)[0] == (0, 768)
    assert lp_module._chunk_bytes_per_logit(torch.float32, 30.0) == 8
    assert lp_module._chunk_bytes_per_logit(torch.float32, None) == 4


@pytest.mark.skipif(rf.backend.compiled() is None, reason="compiled library not built")
def test_opcheck_compiled_ops():
    logits = torch.randn(2, 3, 37)
    labels = torch.randint(0, 37, (2, 3))
    labels[0, 0] = -100
    strided = torch.randn(2, 4, 37)[:, 1:]
    for args in [
        (logits, labels, 1.0, -100),
        (logits.bfloat16(), labels, 0.7, -100),
        (logits, None, 1.0, -100),
        (strided, labels, 1.3, -100),
    ]:
        torch.library.opcheck(torch.ops.rlhf_fast.logprobs_forward.default, args)
    torch.library.opcheck(
        torch.ops.rlhf_fast.logprobs_forward.default, (logits.clone().requires_grad_(), labels, 0.8, -100)
    )
    _, entropy, lse = torch.ops.rlhf_fast.logprobs_forward(logits, labels, 1.0, -100)
    grads = (torch.randn(2, 3), torch.randn(2, 3))
    torch.library.opcheck(
        torch.ops.rlhf_fast.logprobs_backward.default, (*grads, logits, labels, lse, entropy, 1.0, -100)
    )
    torch.library.opcheck(
        torch.ops.rlhf_fast.logprobs_backward.default, (None, grads[1], logits, None, lse, entropy, 1.0, -100)
    )
    torch.library.opcheck(
        torch.ops.rlhf_fast.logprobs_backward_.default, (*grads, logits.clone(), labels, lse, entropy, 1.0, -100)
    )


@pytest.mark.skipif(rf.backend.compiled() is None, reason="compiled library not built")
def test_torch_compile_fullgraph_cpu():
    def step(logits, labels, hidden, weight):
        logp, ent = rf.logprobs(logits[:, :-1], labels, temperature=0.8, return_entropy=True, backend="cpu")
        lin = rf.linear_logprobs(hidden, weight, labels, backend="cpu")
        return logp, ent, rf.entropy(logits, backend="cpu"), lin

    logits = torch.randn(2, 6, 50)
    labels = torch.randint(0, 50, (2, 5))
    hidden, weight = torch.randn(2, 5, 16), torch.randn(50, 16)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for got, exp in zip(compiled(logits, labels, hidden, weight), step(logits, labels, hidden, weight)):
        torch.testing.assert_close(got, exp)
    x = logits.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    logp, ent, full, lin = compiled(x, labels, hidden, w)
    (logp.sum() + ent.sum() + full.sum() + lin.sum()).backward()
    x_ref = logits.clone().requires_grad_()
    w_ref = weight.clone().requires_grad_()
    logp, ent, full, lin = step(x_ref, labels, hidden, w_ref)
    (logp.sum() + ent.sum() + full.sum() + lin.sum()).backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(w.grad, w_ref.grad)


@pytest.mark.skipif(rf.backend.compiled() is None, reason="compiled library not built")
def test_torch_compile_fullgraph_cpu_logit_transforms():
    def step(hidden, weight, labels):
        return rf.linear_logprobs(
            hidden, weight, labels, temperature=0.8, logit_scale=0.5, softcap=4.0, return_entropy=True, backend="cpu"
        )

    hidden, labels = torch.randn(2, 5, 16), torch.randint(0, 50, (2, 5))
    grads = []
    for fn in (torch.compile(step, fullgraph=True, backend="aot_eager"), step):
        weight = (torch.randn(50, 16, generator=torch.Generator().manual_seed(0)) * 3).requires_grad_()
        logp, ent = fn(hidden, weight, labels)
        (logp.sum() + ent.sum()).backward()
        grads.append((logp, ent, weight.grad))
    for got, exp in zip(*grads):
        torch.testing.assert_close(got, exp)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_large_vocab(name, dtype):
    big = (torch.randn(4, 17, 151936, device="cuda") * 3).to(dtype)
    logits = big[:, :-1]  # strided rows, and odd row offsets for the 16-byte packs
    labels = torch.randint(0, 151936, (4, 16), device="cuda")
    labels[1, 3:] = -100
    logp, ent = rf.logprobs(logits, labels, temperature=0.9, return_entropy=True, backend=name)
    exp_logp, exp_ent = _reference(logits, labels, 0.9)
    torch.testing.assert_close(logp.double(), exp_logp, **OUT_TOL)
    torch.testing.assert_close(ent.double(), exp_ent, **OUT_TOL)
    grad, g_lp, g_h = _backward(logits, labels, name, temperature=0.9)
    expected = _reference_grad(logits, labels, g_lp, g_h, temperature=0.9)
    tol = dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-5)
    torch.testing.assert_close(grad.double(), expected, **tol)
    odd = torch.randn(5, 50257, device="cuda").to(dtype)[:, 1:]  # every row misaligned differently
    odd_labels = torch.randint(0, 50256, (5,), device="cuda")
    torch.testing.assert_close(
        rf.logprobs(odd, odd_labels, backend=name).double(), _reference(odd, odd_labels)[0], **OUT_TOL
    )
    grad, g_lp, g_h = _backward(odd, odd_labels, name, inplace=True)
    torch.testing.assert_close(grad.double(), _reference_grad(odd, odd_labels, g_lp, g_h), **tol)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["cuda", "triton"])
def test_gpu_compile_and_linear(name):
    logits = torch.randn(8, 32000, device="cuda", dtype=torch.bfloat16)
    labels = torch.randint(0, 32000, (8,), device="cuda")
    compiled = torch.compile(lambda x, y: rf.logprobs(x, y, return_entropy=True, backend=name), fullgraph=True)
    for got, exp in zip(compiled(logits, labels), _reference(logits, labels)):
        torch.testing.assert_close(got.double(), exp, **OUT_TOL)
    hidden = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(151936, 256, device="cuda", dtype=torch.bfloat16) * 0.05
    labels = torch.randint(0, 151936, (64,), device="cuda")
    got = rf.linear_logprobs(hidden, weight, labels, backend=name)
    exp = ref.linear_logprobs(hidden.double(), weight.double(), labels)
    torch.testing.assert_close(got.double(), exp, rtol=3e-2, atol=3e-2)
    # ragged everywhere: tokens, hidden size and vocab off the tile sizes, with a bias and gradients
    hidden = torch.randn(77, 200, device="cuda", dtype=torch.bfloat16).requires_grad_()
    weight = (torch.randn(50257, 200, device="cuda") * 0.1).to(torch.bfloat16).requires_grad_()
    bias = torch.randn(50257, device="cuda", dtype=torch.bfloat16).requires_grad_()
    labels = torch.randint(0, 50257, (77,), device="cuda")
    logp, ent = rf.linear_logprobs(hidden, weight, labels, bias=bias, return_entropy=True, backend=name)
    (logp.sum() + ent.sum()).backward()
    leaves = [t.detach().double().requires_grad_() for t in (hidden, weight, bias)]
    exp_logp, exp_ent = ref.linear_logprobs(leaves[0], leaves[1], labels, bias=leaves[2], return_entropy=True)
    (exp_logp.sum() + exp_ent.sum()).backward()
    torch.testing.assert_close(logp.double(), exp_logp, rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(ent.double(), exp_ent, rtol=3e-2, atol=3e-2)
    for got_leaf, exp_leaf in zip((hidden, weight, bias), leaves):
        torch.testing.assert_close(got_leaf.grad.double(), exp_leaf.grad, rtol=3e-2, atol=3e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["cuda", "triton"])
def test_gpu_linear_logprobs_logit_transforms(name):
    # Gemma's cap (30) on logits that reach past it, with a logit scale; vocab and tokens off the tile sizes
    hidden = torch.randn(77, 200, device="cuda", dtype=torch.bfloat16).requires_grad_()
    weight = (torch.randn(50257, 200, device="cuda") * 2).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, 50257, (77,), device="cuda")
    options = dict(temperature=0.9, logit_scale=1.5, softcap=30.0)
    logp, ent = rf.linear_logprobs(hidden, weight, labels, return_entropy=True, backend=name, **options)
    (logp.sum() + ent.sum()).backward()
    leaves = [t.detach().double().requires_grad_() for t in (hidden, weight)]
    exp_logp, exp_ent = ref.linear_logprobs(*leaves, labels, return_entropy=True, **options)
    (exp_logp.sum() + exp_ent.sum()).backward()
    for got, exp in ((logp, exp_logp), (ent, exp_ent), (hidden.grad, leaves[0].grad), (weight.grad, leaves[1].grad)):
        assert _relative_error(got, exp) < 3e-2


def test_per_row_loop_reference_agrees():
    logits, labels = _case((3, 4), 101, torch.bfloat16, "cpu", ignore_frac=0)
    torch.testing.assert_close(ref.logprobs_per_row_loop(logits, labels), ref.logprobs(logits, labels))


# NaN and label-range behaviour of the compiled kernels and the eager reference (the Triton kernels: their own tests).
KERNEL_PAIRS = [(device, name) for device, name in PAIRS if name in ("cpu", "cuda", "torch")]


def _nan_rows(vocab, device, dtype=torch.float32):
    """Rows (6, vocab) with NaN logits where a kernel's running max is still -inf, or is not: NaN first; a
    block of NaN and -inf starting the row (longer than the CPU kernel's 1024-float block); NaN after finite
    values; a NaN last; plus an all -inf row and a finite row."""
    rows = torch.randn(6, vocab, device=device) * 3
    rows[0, 0] = float("nan")
    rows[1, :1500] = float("-inf")
    rows[1, 700] = float("nan")
    rows[2, vocab // 2] = float("nan")
    rows[3, -1] = float("nan")
    rows[4] = float("-inf")
    return rows.to(dtype)


@pytest.mark.parametrize("device,name", KERNEL_PAIRS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_logits_propagate_like_torch(device, name, dtype):
    logits = _nan_rows(3001, device, dtype)
    labels = torch.randint(0, 3001, (6,), device=device)
    logp, ent = rf.logprobs(logits, labels, return_entropy=True, backend=name)
    exp_logp, exp_ent = _reference(logits, labels)
    assert exp_logp[:5].isnan().all() and exp_ent[:5].isnan().all()  # the reference: NaN rows and all -inf
    torch.testing.assert_close(logp.double(), exp_logp, equal_nan=True, **OUT_TOL)
    torch.testing.assert_close(ent.double(), exp_ent, equal_nan=True, **OUT_TOL)


def _out_of_range_case(device):
    logits = torch.randn(2, 3, 50, device=device)
    labels = torch.randint(0, 50, (2, 3), device=device)
    labels[0, 1], labels[1, 0], labels[1, 2] = 50, -7, -100
    return logits, labels


@pytest.mark.skipif(rf.backend.compiled() is None, reason="compiled library not built")
def test_cpu_kernel_gives_nan_for_labels_out_of_range():
    logits, labels = _out_of_range_case("cpu")
    rows = logits.reshape(1, 6, 50)
    logp, _, lse = torch.ops.rlhf_fast.logprobs_forward(rows, labels.reshape(1, 6), 1.0, -100)
    expected = _reference(logits, labels)[0].reshape(1, 6)
    assert logp[0, [1, 3]].isnan().all() and logp[0, 5] == 0
    torch.testing.assert_close(logp.double(), expected, equal_nan=True, **OUT_TOL)
    # the backward: no one-hot term, never a read or write outside the row
    g = torch.ones(1, 6)
    grad = torch.ops.rlhf_fast.logprobs_backward(g, None, rows, labels.reshape(1, 6), lse, lse, 1.0, -100)
    torch.testing.assert_close(grad[0, 1], -torch.softmax(rows[0, 1], -1))


@pytest.mark.parametrize("device,name", KERNEL_PAIRS)
def test_label_check_modes(device, name, monkeypatch):
    logits, labels = _out_of_range_case(device)
    expected = _reference(logits, labels)[0]
    nan_at = torch.zeros(2, 3, dtype=torch.bool, device=device)
    nan_at[0, 1] = nan_at[1, 0] = True
    for check_labels in (True, None) if device == "cpu" else (True,):  # CPU tensors: checked by default
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 50\)"):
            rf.logprobs(logits, labels, check_labels=check_labels, backend=name)
    if device != "cpu":
        monkeypatch.setenv("RLHF_FAST_CHECK_LABELS", "1")
        with pytest.raises(ValueError, match="labels"):
            rf.logprobs(logits, labels, backend=name)
        monkeypatch.delenv("RLHF_FAST_CHECK_LABELS")
    for check_labels in (False, None) if device != "cpu" else (False,):
        logp = rf.logprobs(logits, labels, check_labels=check_labels, backend=name)
        assert torch.equal(logp.isnan(), nan_at)
        torch.testing.assert_close(logp.double(), expected, equal_nan=True, **OUT_TOL)
    with pytest.raises(TypeError, match="check_labels"):
        rf.logprobs(logits, labels, check_labels=1, backend=name)


@pytest.mark.parametrize("device,name", KERNEL_PAIRS)
def test_linear_logprobs_label_check_modes(device, name, monkeypatch):
    monkeypatch.setattr(lp_module, "LINEAR_CHUNK_BYTES", 128 * 6 * 4)  # 6 fp32 tokens: chunks of 128 columns
    hidden, weight = torch.randn(2, 3, 16, device=device), torch.randn(300, 16, device=device)
    labels = torch.randint(0, 300, (2, 3), device=device)
    labels[0, 1], labels[1, 0], labels[1, 2] = 300, -7, -100
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 300\)"):
        rf.linear_logprobs(hidden, weight, labels, check_labels=True, backend=name)
    w = weight.clone().requires_grad_()
    logp = rf.linear_logprobs(hidden, w, labels, check_labels=False, backend=name)
    expected = ref.linear_logprobs(hidden.double(), weight.double(), labels.clamp(0, 299))
    assert logp[0, 1].isnan() and logp[1, 0].isnan() and logp[1, 2] == 0
    valid = ~logp.isnan() & (labels != -100)
    torch.testing.assert_close(logp[valid].double(), expected[valid], **OUT_TOL)
    logp.nan_to_num(0.0).sum().backward()
    assert torch.isfinite(w.grad).all()


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["cuda", "triton"])
def test_gpu_no_host_sync_by_default(name):
    """The default (labels unchecked on CUDA) never syncs with the device, forward and backward."""
    logits = torch.randn(2, 9, 1003, device="cuda", dtype=torch.bfloat16)[:, 1:].requires_grad_()
    labels = torch.randint(0, 1003, (2, 8), device="cuda")
    hidden = torch.randn(16, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(1003, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    flat_labels = labels.reshape(-1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        logp, ent = rf.logprobs(logits, labels, return_entropy=True, backend=name)
        (logp.sum() + ent.sum()).backward()
        lin, lin_ent = rf.linear_logprobs(hidden, weight, flat_labels, return_entropy=True, backend=name)
        (lin.sum() + lin_ent.sum()).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(logp).all() and torch.isfinite(lin).all()


@pytest.mark.gpu
def test_gpu_labels_out_of_range():
    x = torch.randn(2, 11, device="cuda")
    bad = torch.tensor([3, 11], device="cuda")
    with pytest.raises(ValueError, match="labels"):
        rf.logprobs(x, bad, check_labels=True, backend="cuda")
    logp = rf.logprobs(x, bad, backend="cuda")  # default on CUDA: unchecked, NaN
    assert torch.isfinite(logp[0]) and logp[1].isnan()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_nan_and_misaligned_rows_in_place(dtype):
    """V = 151936 rows starting 0-7 elements past a 16-byte boundary, read where they lie (no copy before the
    op): a NaN in a row makes its outputs NaN, the other rows match float64, and the backward (out of place:
    misaligned input, aligned output; in place: both misaligned alike) matches autograd."""
    vocab = 151936
    big = (torch.randn(8, 9, vocab + 8, device="cuda") * 3).to(dtype)  # rows of vocab + 8: each one aligned
    for offset in range(8):
        logits = big[..., offset : offset + vocab]
        assert lp_module._as_rows(logits).data_ptr() == logits.data_ptr()
        labels = torch.randint(0, vocab, logits.shape[:2], device="cuda")
        labels[3, :4] = -100
        poisoned = big.clone()[..., offset : offset + vocab]
        poisoned[0, 0, 0] = float("nan")  # the first element of the row, in the head when misaligned
        poisoned[1, 0, :4000] = float("-inf")
        poisoned[1, 0, 3000] = float("nan")  # its thread's first value that is not -inf
        poisoned[2, 0, vocab - 1] = float("nan")  # the tail
        poisoned[2, 1] = float("-inf")
        logp, ent = rf.logprobs(poisoned, labels, return_entropy=True, backend="cuda")
        exp_logp, exp_ent = _reference(poisoned, labels)
        assert logp[:3, 0].isnan().all() and ent[:3, 0].isnan().all() and ent[2, 1].isnan()
        torch.testing.assert_close(logp.double(), exp_logp, equal_nan=True, **OUT_TOL)
        torch.testing.assert_close(ent.double(), exp_ent, equal_nan=True, **OUT_TOL)
        tol = dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-5)
        for inplace in (False, True):
            grad, g_lp, g_h = _backward_of_view(big, logits, labels, inplace)
            torch.testing.assert_close(grad.double(), _reference_grad(logits, labels, g_lp, g_h), **tol)


def _backward_of_view(base, view, labels, inplace):
    """d(view) of logp and entropy with the op reading the strided, misaligned `view` of `base` itself (and
    with inplace=True writing its gradient there)."""
    leaf = base.detach().clone().requires_grad_()
    source = leaf * 1 if inplace else leaf  # the in-place backward needs a buffer that is not a leaf
    x = source.as_strided(view.shape, view.stride(), view.storage_offset())
    g_lp = torch.randn(labels.shape, device=view.device)
    g_h = torch.randn(labels.shape, device=view.device)
    logp, ent = rf.logprobs(x, labels, return_entropy=True, inplace_backward=inplace, backend="cuda")
    torch.autograd.backward((logp, ent), (g_lp, g_h))
    return leaf.grad.as_strided(view.shape, view.stride(), view.storage_offset()), g_lp, g_h


def _tiny_causal_lm(kind):
    """A 2-layer model of `kind` with vocab 300 whose head transform matters: logits spread well past the cap."""
    import transformers

    shape = dict(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if kind == "gemma2":
        config = transformers.Gemma2Config(final_logit_softcapping=3.0, query_pre_attn_scalar=16, **shape)
        model = transformers.Gemma2ForCausalLM(config)
    else:
        config = transformers.CohereConfig(logit_scale=0.25, **shape)
        model = transformers.CohereForCausalLM(config)
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0, 1.0)
    return model.eval()


@pytest.mark.parametrize("kind", ["gemma2", "cohere"])
def test_fused_head_applies_the_models_logit_transform(kind):
    from rlhf_fast.ppo.models import LogProbModel, position_ids
    from rlhf_fast.ppo.ops import get_ops

    model = _tiny_causal_lm(kind)
    input_ids = torch.randint(3, 300, (2, 9))
    attention_mask = torch.ones(2, 9, dtype=torch.long)
    attention_mask[1, :2] = 0  # left padding of the prompt
    labels = input_ids[:, 4:].clone()
    labels[0, -2:] = -100
    results = []
    for fused in (True, False):
        model.zero_grad()
        logp, ent = LogProbModel(model, get_ops(True), fused=fused, temperature=0.8)(
            input_ids, attention_mask, labels, 4, return_entropy=True
        )
        (logp.sum() + ent.sum()).backward()
        results.append((logp, ent, model.get_output_embeddings().weight.grad.clone()))
    (logp, ent, grad), (exp_logp, exp_ent, exp_grad) = results
    torch.testing.assert_close(logp, exp_logp, **OUT_TOL)
    torch.testing.assert_close(ent, exp_ent, **OUT_TOL)
    torch.testing.assert_close(grad, exp_grad, rtol=1e-4, atol=1e-5)
    # the transform matters here: the plain lm_head(hidden) gives other log-probs
    hidden = model.base_model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask)
    ).last_hidden_state
    plain = rf.linear_logprobs(
        hidden[:, 3:-1].detach(), model.get_output_embeddings().weight.detach(), labels, temperature=0.8
    )
    assert (plain - exp_logp).abs().max() > 0.5
