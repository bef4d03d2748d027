import pytest
import torch
from conftest import device_backend_pairs

import rlhf_fast as rf
from rlhf_fast import reference as ref

PAIRS = device_backend_pairs()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _tol(dtype):
    # outputs are computed in fp32 from inputs rounded to `dtype`; the reference gets the same rounded inputs
    return dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)


def _mask(kind, batch, steps, device):
    if kind == "none":
        return None
    if kind == "right":
        lengths = torch.randint(1, steps + 1, (batch,), device=device)
        return torch.arange(steps, device=device)[None] < lengths[:, None]
    if kind == "left":
        lengths = torch.randint(1, steps + 1, (batch,), device=device)
        return torch.arange(steps, device=device)[None] >= (steps - lengths)[:, None]
    m = torch.rand(batch, steps, device=device) > 0.35  # holes
    m[0] = False  # an all-masked row
    return m


def _check_against_reference(device, name, dtype, batch, steps, mask_kind, gamma, lam, bootstrap):
    rewards = torch.randn(batch, steps, device=device).to(dtype)
    values = torch.randn(batch, steps, device=device).to(dtype)
    mask = _mask(mask_kind, batch, steps, device)
    last_value = torch.randn(batch, device=device) if bootstrap else None
    adv, ret = rf.gae(rewards, values, mask, gamma=gamma, lam=lam, last_value=last_value, backend=name)
    exp_adv, exp_ret = ref.gae(
        rewards.double(),
        values.double(),
        mask,
        gamma=gamma,
        lam=lam,
        last_value=None if last_value is None else last_value.double(),
    )
    assert adv.dtype == torch.float32 and ret.dtype == torch.float32
    torch.testing.assert_close(adv.double(), exp_adv, **_tol(dtype))
    torch.testing.assert_close(ret.double(), exp_ret, **_tol(dtype))
    if mask is not None:
        assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()


@pytest.mark.parametrize("device,name", PAIRS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_kind", ["none", "right", "left", "holes"])
def test_gae_matches_float64_reference(device, name, dtype, mask_kind):
    _check_against_reference(device, name, dtype, 6, 45, mask_kind, 0.99, 0.95, bootstrap=False)


@pytest.mark.parametrize("device,name", PAIRS)
@pytest.mark.parametrize("batch,steps", [(1, 1), (1, 300), (3, 1), (4, 2500)])
def test_gae_awkward_shapes_and_bootstrap(device, name, batch, steps):
    # 2500 spans several Triton/CUDA tiles (1024 tokens each) so the carry between tiles is exercised
    _check_against_reference(device, name, torch.float32, batch, steps, "holes", 0.97, 0.9, bootstrap=True)


def test_gae_right_padding_equals_classic_loop():
    rewards, values = torch.randn(5, 33, dtype=torch.float64), torch.randn(5, 33, dtype=torch.float64)
    adv, ret = rf.gae(rewards, values, gamma=0.9, lam=0.8, backend="cpu")
    loop_adv, loop_ret = ref.gae_right_padded_loop(rewards, values, gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv.double(), loop_adv, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ret.double(), loop_ret, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device,name", PAIRS)
def test_gae_leading_dims_and_noncontiguous(device, name):
    big_r = torch.randn(2, 3, 40, device=device)
    big_v = torch.randn(2, 3, 40, device=device)
    rewards, values = big_r[..., ::2], big_v.transpose(0, 1).contiguous().transpose(0, 1)[..., ::2]
    mask = torch.rand(2, 3, 20, device=device) > 0.3
    last_value = torch.randn(2, 3, device=device)
    adv, ret = rf.gae(rewards, values, mask.int(), gamma=0.95, lam=0.9, last_value=last_value, backend=name)
    exp_adv, exp_ret = ref.gae(
        rewards.reshape(6, 20).double(),
        values.reshape(6, 20).double(),
        mask.reshape(6, 20),
        gamma=0.95,
        lam=0.9,
        last_value=last_value.reshape(6).double(),
    )
    torch.testing.assert_close(adv.reshape(6, 20).double(), exp_adv, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ret.reshape(6, 20).double(), exp_ret, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device,name", PAIRS)
def test_gae_empty(device, name):
    adv, ret = rf.gae(torch.randn(0, 7, device=device), torch.randn(0, 7, device=device), backend=name)
    assert adv.shape == (0, 7) and ret.shape == (0, 7)
    adv, ret = rf.gae(torch.randn(3, 0, device=device), torch.randn(3, 0, device=device), backend=name)
    assert adv.shape == (3, 0)


@pytest.mark.parametrize("device,name", PAIRS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gae_backward_matches_autograd_of_reference(device, name, dtype):
    batch, steps = 4, 70
    rewards = torch.randn(batch, steps, device=device).to(dtype).requires_grad_()
    values = torch.randn(batch, steps, device=device).to(dtype).requires_grad_()
    last_value = torch.randn(batch, device=device, requires_grad=True)
    mask = _mask("holes", batch, steps, device)
    grad_adv, grad_ret = torch.randn(batch, steps, device=device), torch.randn(batch, steps, device=device)
    adv, ret = rf.gae(rewards, values, mask, gamma=0.9, lam=0.85, last_value=last_value, backend=name)
    torch.autograd.backward((adv, ret), (grad_adv, grad_ret))

    r64, v64, lv64 = (t.detach().double().requires_grad_() for t in (rewards, values, last_value))
    exp_adv, exp_ret = ref.gae(r64, v64, mask, gamma=0.9, lam=0.85, last_value=lv64)
    torch.autograd.backward((exp_adv, exp_ret), (grad_adv.double(), grad_ret.double()))
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    assert rewards.grad.dtype == dtype and values.grad.dtype == dtype
    torch.testing.assert_close(rewards.grad.double(), r64.grad, **tol)
    torch.testing.assert_close(values.grad.double(), v64.grad, **tol)
    torch.testing.assert_close(last_value.grad.double(), lv64.grad, rtol=1e-4, atol=1e-4)


def _packed_case(device):
    lengths = torch.tensor([5, 0, 1, 1100, 37])
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(device)
    n = int(lengths.sum())
    return (
        torch.randn(n, device=device),
        torch.randn(n, device=device),
        cu,
        torch.rand(n, device=device) > 0.2,
        torch.randn(len(lengths), device=device),
    )


@pytest.mark.parametrize("device,name", PAIRS)
def test_gae_packed_matches_reference_and_padded(device, name):
    rewards, values, cu, mask, last_value = _packed_case(device)
    adv, ret = rf.gae_packed(rewards, values, cu, mask, gamma=0.99, lam=0.9, last_value=last_value, backend=name)
    exp_adv, exp_ret = ref.gae_packed(
        rewards.double(), values.double(), cu, mask, gamma=0.99, lam=0.9, last_value=last_value.double()
    )
    torch.testing.assert_close(adv.double(), exp_adv, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ret.double(), exp_ret, rtol=1e-4, atol=1e-4)
    # the same tokens right-padded into rows give the same advantages
    index, valid = ref.packed_to_padded(cu)
    pad_adv, _ = rf.gae(
        rewards[index], values[index], valid & mask[index], gamma=0.99, lam=0.9, last_value=last_value, backend=name
    )
    torch.testing.assert_close(pad_adv[valid], adv[index[valid]], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device,name", PAIRS)
def test_gae_packed_backward(device, name):
    rewards, values, cu, mask, last_value = _packed_case(device)
    inputs = [t.clone().requires_grad_() for t in (rewards, values, last_value)]
    adv, ret = rf.gae_packed(inputs[0], inputs[1], cu, mask, gamma=0.9, lam=0.9, last_value=inputs[2], backend=name)
    g1, g2 = torch.randn_like(adv), torch.randn_like(ret)
    torch.autograd.backward((adv, ret), (g1, g2))
    exp_inputs = [t.double().requires_grad_() for t in (rewards, values, last_value)]
    e_adv, e_ret = ref.gae_packed(exp_inputs[0], exp_inputs[1], cu, mask, gamma=0.9, lam=0.9, last_value=exp_inputs[2])
    torch.autograd.backward((e_adv, e_ret), (g1.double(), g2.double()))
    for got, exp in zip(inputs, exp_inputs):
        torch.testing.assert_close(got.grad.double(), exp.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device,name", PAIRS)
@pytest.mark.parametrize("group_size", [1, 2, 7, 16])
@pytest.mark.parametrize("dtype", DTYPES)
def test_group_advantages(device, name, group_size, dtype):
    scores = (torch.randn(5 * group_size, device=device) * 3 + 1).to(dtype)
    grpo = rf.grpo_advantages(scores, group_size, backend=name)
    plain = rf.grpo_advantages(scores, group_size, norm_std=False, backend=name)
    rloo = rf.rloo_advantages(scores, group_size, backend=name)
    s64 = scores.double().reshape(-1, group_size)
    centred = s64 - s64.mean(1, keepdim=True)
    std = s64.std(1, keepdim=True) if group_size > 1 else torch.zeros_like(centred)
    exp_rloo = (centred * group_size / (group_size - 1)) if group_size > 1 else torch.zeros_like(centred)
    for got, exp in ((grpo, centred / (std + 1e-6)), (plain, centred), (rloo, exp_rloo)):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), exp.reshape(-1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device,name", PAIRS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_mean_and_whiten(device, name, dtype):
    x = (torch.randn(7, 301, device=device) * 2 + 0.5).to(dtype)
    x[0, 0] = float("inf")  # masked out: must not leak into the statistics
    mask = torch.rand(7, 301, device=device) > 0.3
    mask[0, 0] = False
    valid = x.double()[mask]
    mean, var = valid.mean(), valid.var()
    torch.testing.assert_close(rf.masked_mean(x, mask, backend=name).double(), mean, rtol=1e-5, atol=1e-5)
    for shift in (True, False):
        got = rf.masked_whiten(x, mask, shift_mean=shift, backend=name)
        exp = (x.double() - mean) * torch.rsqrt(var + 1e-8) + (0 if shift else mean)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got[mask].double(), exp[mask], rtol=1e-4, atol=1e-4)
    unmasked = rf.masked_whiten(x[1:], backend=name)
    torch.testing.assert_close(
        unmasked.double().mean(), torch.tensor(0.0, dtype=torch.float64, device=device), rtol=0, atol=1e-4
    )


@pytest.mark.parametrize("device,name", PAIRS)
def test_masked_mean_all_masked_is_zero_and_whiten_grads(device, name):
    x = torch.randn(4, 9, device=device)
    assert rf.masked_mean(x, torch.zeros(4, 9, dtype=torch.bool, device=device), backend=name).item() == 0.0
    xg = x.clone().requires_grad_()
    rf.masked_whiten(xg, x > 0, backend=name).sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()


def test_bad_input_names_the_argument():
    r = torch.randn(2, 5)
    with pytest.raises(ValueError, match="values"):
        rf.gae(r, torch.randn(2, 6))
    with pytest.raises(TypeError, match="rewards"):
        rf.gae(r.long(), r)
    with pytest.raises(ValueError, match="mask"):
        rf.gae(r, r, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="last_value"):
        rf.gae(r, r, last_value=torch.zeros(3))
    with pytest.raises(ValueError, match="gamma"):
        rf.gae(r, r, gamma=float("nan"))
    with pytest.raises(ValueError, match="group_size"):
        rf.grpo_advantages(torch.randn(10), 3)
    with pytest.raises(ValueError, match="group_size"):
        rf.rloo_advantages(torch.randn(10), 0)
    with pytest.raises(TypeError, match="scores"):
        rf.grpo_advantages(torch.arange(10), 5)
    with pytest.raises(ValueError, match="cu_seqlens"):
        rf.gae_packed(torch.randn(10), torch.randn(10), torch.tensor([0, 4, 9]))
    with pytest.raises(TypeError, match="cu_seqlens"):
        rf.gae_packed(torch.randn(10), torch.randn(10), torch.tensor([0.0, 10.0]))
    with pytest.raises(ValueError, match="backend"):
        rf.gae(r, r, backend="tpu")


@pytest.mark.skipif(rf.backend.compiled() is None, reason="compiled library not built")
def test_opcheck_compiled_ops():
    n = 50
    cu = torch.tensor([0, 20, 20, 50])
    mask = torch.rand(n) > 0.3
    for args in [
        (torch.randn(n), torch.randn(n), mask, torch.randn(3), cu, 0.9, 0.95),
        (torch.randn(n, dtype=torch.bfloat16), torch.randn(n, dtype=torch.bfloat16), None, None, cu, 1.0, 0.9),
    ]:
        torch.library.opcheck(torch.ops.rlhf_fast.gae.default, args)
    grad_args = (
        torch.randn(n, requires_grad=True),
        torch.randn(n, requires_grad=True),
        mask,
        torch.randn(3, requires_grad=True),
        cu,
        0.9,
        0.95,
    )
    torch.library.opcheck(torch.ops.rlhf_fast.gae.default, grad_args)
    torch.library.opcheck(torch.ops.rlhf_fast.group_advantages.default, (torch.randn(12), 4, True, False, 1e-6))
    torch.library.opcheck(torch.ops.rlhf_fast.masked_moments.default, (torch.randn(5, 7), torch.rand(5, 7) > 0.5))


@pytest.mark.skipif(rf.backend.compiled() is None, reason="compiled library not built")
def test_torch_compile_fullgraph_cpu():
    def step(rewards, values, mask, scores):
        adv, ret = rf.gae(rewards, values, mask, gamma=1.0, lam=0.95, backend="cpu")
        return rf.masked_whiten(adv, mask, backend="cpu"), ret, rf.grpo_advantages(scores, 4, backend="cpu")

    rewards, values = torch.randn(3, 16), torch.randn(3, 16)
    mask, scores = torch.rand(3, 16) > 0.2, torch.randn(8)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for got, exp in zip(compiled(rewards, values, mask, scores), step(rewards, values, mask, scores)):
        torch.testing.assert_close(got, exp)
    r = rewards.clone().requires_grad_()
    adv, _ = torch.compile(lambda x: rf.gae(x, values, mask, backend="cpu"), fullgraph=True, backend="aot_eager")(r)
    adv.sum().backward()
    assert r.grad is not None


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["cuda", "triton"])
def test_gpu_compile_and_large_shape(name):
    rewards = torch.randn(64, 8192, device="cuda", dtype=torch.bfloat16)
    values = torch.randn(64, 8192, device="cuda", dtype=torch.bfloat16)
    mask = torch.rand(64, 8192, device="cuda") > 0.1
    compiled = torch.compile(lambda r, v, m: rf.gae(r, v, m, backend=name), fullgraph=True)
    adv, ret = compiled(rewards, values, mask)
    exp_adv, exp_ret = ref.gae(rewards.double(), values.double(), mask, gamma=1.0, lam=0.95)
    torch.testing.assert_close(adv.double(), exp_adv, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(ret.double(), exp_ret, rtol=2e-3, atol=2e-3)
