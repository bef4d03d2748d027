"""rlhf_fast.integrations.openrlhf: every patched function against OpenRLHF's own (captured before patching),
forward and backward, fp32 and bf16, masks with holes and fully masked rows; bindings restored."""

import contextlib
import importlib

import pytest
import torch
from _standins import gpu_only_modules
from peer_checks import RUNS, assert_matches, leaf, mask_with_holes, rounded

from rlhf_fast.integrations import openrlhf as rf_openrlhf

pytest.importorskip("openrlhf")
with gpu_only_modules():
    try:
        for _name in rf_openrlhf.SCAN:
            importlib.import_module(_name)
    except ImportError as exc:  # a dependency of OpenRLHF's that is not installed
        pytest.skip(f"OpenRLHF does not import here: {exc}", allow_module_level=True)

from openrlhf.models import loss as orl_loss  # noqa: E402
from openrlhf.models import utils as orl_utils  # noqa: E402
from openrlhf.trainer.ppo_utils import experience_maker  # noqa: E402

ORIGINAL = {t.name: getattr(orl_utils, t.name) for t in rf_openrlhf.TARGETS}
METHODS = {
    f"{cls}.{method}": importlib.import_module(module).__dict__[cls].__dict__[method]
    for module, cls, method, _, _ in rf_openrlhf.METHODS
}
DTYPES = [torch.float32, torch.bfloat16]


def patched(label):
    return rf_openrlhf.patch() if label == "ours" else contextlib.nullcontext()


def function(label, name):
    return getattr(orl_utils, name) if label == "ours" else ORIGINAL[name]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_log_probs_and_entropy_match_openrlhf(dtype, temperature):
    vocab = 1003
    (full,) = rounded(dtype, torch.randn(3, 9, vocab) * 3)
    labels = torch.randint(0, vocab, (3, 8))
    grads = torch.randn(2, 3, 8)
    out = {}
    for label, dt in RUNS:
        x = leaf(full, dt or dtype)
        logits = x * 1.0  # OpenRLHF's output logits: an intermediate (it divides them in place)
        with patched(label):
            ent = function(label, "compute_entropy")(logits[:, :-1] / temperature)
            logp = function(label, "log_probs_from_logits")(logits[:, :-1], labels, temperature)
        (logp.float() * grads[0] + ent.float() * grads[1]).sum().backward()
        out[label] = (logp, ent, x.grad, logits.detach())
    assert out["ours"][0].dtype == torch.float32
    for o, p, r in zip(out["ours"], out["peer"], out["ref"]):
        assert_matches(o, p, r)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_compute_approx_kl_matches_openrlhf(dtype, estimator):
    logp, base = torch.randn(4, 33) * 3, torch.randn(4, 33) * 3
    logp[0, :4] = torch.tensor([-30.0, 30.0, 8.0, -12.0])  # through the clamps
    logp, base = rounded(dtype, logp, base)
    grad = torch.randn(4, 33)
    out = {}
    for label, dt in RUNS:
        a, b = leaf(logp, dt or dtype), leaf(base, dt or dtype)
        with patched(label):
            value = function(label, "compute_approx_kl")(a, b, kl_estimator=estimator)
        (value.float() * grad).sum().backward()
        out[label] = (value, a.grad, b.grad)
    for o, p, r in zip(out["ours"], out["peer"], out["ref"]):
        assert_matches(o, p, r)


def test_compute_approx_kl_unbiased_and_unknown_go_to_openrlhf():
    logp, base, old = torch.randn(3, 5), torch.randn(3, 5), torch.randn(3, 5)
    with rf_openrlhf.patch():
        ours = orl_utils.compute_approx_kl(logp, base, old, "k3", unbiased_gradient=True)
        with pytest.raises(ValueError, match="Unknown kl_estimator"):
            orl_utils.compute_approx_kl(logp, base, kl_estimator="k4")
    torch.testing.assert_close(ours, ORIGINAL["compute_approx_kl"](logp, base, old, "k3", unbiased_gradient=True))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_dtype", [torch.long, torch.bool, torch.float32])
def test_masked_mean_matches_openrlhf(dtype, mask_dtype):
    (values,) = rounded(dtype, torch.randn(6, 37) * 2 + 0.5)
    mask = mask_with_holes(6, 37, mask_dtype)
    out = {}
    for label, dt in RUNS:
        x = leaf(values, dt or dtype)
        with patched(label):
            mean = function(label, "masked_mean")(x, mask)
            empty = function(label, "masked_mean")(x, torch.zeros_like(mask))
            per_row = function(label, "masked_mean")(x, mask, dim=-1)  # OpenRLHF's own
        mean.float().backward()
        out[label] = (mean, x.grad, empty, per_row)
    for o, p, r in zip(out["ours"], out["peer"], out["ref"]):
        assert_matches(o, p, r)
    assert out["ours"][2].isnan()


def _policy_inputs(dtype):
    old, adv = torch.randn(6, 29), torch.randn(6, 29)
    return rounded(dtype, old, adv, old + torch.randn(6, 29) * 0.8)  # ratios past both clips and the dual clip


GLOBAL = [{}, {"dp_size": 2, "batch_num_tokens": 300, "global_batch_size": 11}]


POLICY_SETTINGS = [(token_level, dual) for token_level in (True, False) for dual in (None, 2.5)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("global_info", GLOBAL, ids=["local", "dp2"])
def test_policy_loss_matches_openrlhf(dtype, global_info):
    old, adv, new = _policy_inputs(dtype)
    mask = mask_with_holes(6, 29)
    out = {}
    for label, dt in RUNS:
        dt = dt or dtype
        with patched(label):  # one patch for every setting (patching scans every module)
            for token_level_loss, dual_clip in POLICY_SETTINGS:
                module = orl_loss.PolicyLoss(
                    clip_eps_low=0.15, clip_eps_high=0.28, dual_clip=dual_clip, token_level_loss=token_level_loss
                )
                logp = leaf(new, dt)
                forward = module.forward if label == "ours" else METHODS["PolicyLoss.forward"].__get__(module)
                loss, clip_ratio, ppo_kl, vllm_kl, filtered = forward(logp, old.to(dt), adv.to(dt), mask, **global_info)
                loss.float().backward()
                assert vllm_kl is None and filtered is None
                out[label, token_level_loss, dual_clip] = (loss, logp.grad, clip_ratio, ppo_kl)
    for setting in POLICY_SETTINGS:
        for o, p, r in zip(out[("ours",) + setting], out[("peer",) + setting], out[("ref",) + setting]):
            assert_matches(o, p, r)


def test_policy_loss_without_mask_and_with_gspo():
    old, adv, new = _policy_inputs(torch.float32)
    plain, gspo = orl_loss.PolicyLoss(), orl_loss.PolicyLoss(policy_loss_type="gspo")
    mask = mask_with_holes(6, 29)
    peer = METHODS["PolicyLoss.forward"](plain, new, old, adv)
    peer_gspo = METHODS["PolicyLoss.forward"](gspo, new, old, adv, mask)
    with rf_openrlhf.patch():
        ours, ours_gspo = plain(new, old, adv), gspo(new, old, adv, mask)
    for o, p in zip(ours[:3] + ours_gspo[:3], peer[:3] + peer_gspo[:3]):
        torch.testing.assert_close(o.float(), p.float())


VALUE_SETTINGS = [(token_level, clip) for token_level in (True, False) for clip in (None, 0.2)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("global_info", GLOBAL, ids=["local", "dp2"])
def test_value_loss_matches_openrlhf(dtype, global_info):
    old, ret = torch.randn(6, 29), torch.randn(6, 29)
    old, ret, new = rounded(dtype, old, ret, old + torch.randn(6, 29) * 0.3)
    mask = mask_with_holes(6, 29)
    out = {}
    for label, dt in RUNS:
        dt = dt or dtype
        with patched(label):
            for token_level_loss, clip_eps in VALUE_SETTINGS:
                module = orl_loss.ValueLoss(clip_eps=clip_eps, token_level_loss=token_level_loss)
                values = leaf(new, dt)
                forward = module.forward if label == "ours" else METHODS["ValueLoss.forward"].__get__(module)
                loss = forward(values, old.to(dt), ret.to(dt), mask, **global_info)
                loss.float().backward()
                out[label, token_level_loss, clip_eps] = (loss, values.grad)
    for setting in VALUE_SETTINGS:
        for o, p, r in zip(out[("ours",) + setting], out[("peer",) + setting], out[("ref",) + setting]):
            assert_matches(o, p, r)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_mask", [True, False])
@pytest.mark.parametrize("steps", [41, 1])
def test_gae_matches_openrlhf(dtype, with_mask, steps):
    values, rewards = rounded(dtype, torch.randn(5, steps), torch.randn(5, steps))
    mask = mask_with_holes(5, steps) if with_mask else None
    maker = object.__new__(experience_maker.RemoteExperienceMaker)  # the method reads nothing from self
    out = {}
    for label, dt in RUNS:
        dt = dt or dtype
        with patched(label):
            method = (
                maker.get_advantages_and_returns
                if label == "ours"
                else METHODS["RemoteExperienceMaker.get_advantages_and_returns"].__get__(maker)
            )
            out[label] = method(values.to(dt), rewards.to(dt), mask, 0.99, 0.95)
    for o, p, r in zip(out["ours"], out["peer"], out["ref"]):
        assert_matches(o, p, r, rtol=1e-4, atol=1e-5)


def test_patch_is_idempotent_and_unpatch_restores_every_binding():
    import openrlhf.models.actor as actor

    handle = rf_openrlhf.patch()
    try:
        assert rf_openrlhf.patch() is handle
        assert not handle.skipped, handle.skipped
        assert len(handle.replaced) == len(ORIGINAL) + len(METHODS)
        assert actor.log_probs_from_logits is orl_utils.log_probs_from_logits is not ORIGINAL["log_probs_from_logits"]
        assert actor.compute_entropy is orl_utils.compute_entropy is not ORIGINAL["compute_entropy"]
        assert orl_loss.masked_mean is orl_utils.masked_mean
        assert experience_maker.compute_approx_kl is orl_utils.compute_approx_kl
        assert orl_loss.PolicyLoss.__dict__["forward"] is not METHODS["PolicyLoss.forward"]
    finally:
        handle.unpatch()
    assert not handle.active
    for qualname, places in handle.bindings.items():
        original = handle.replaced[qualname][0]
        for place in places:
            module_name, _, attr = place.rpartition(".")
            try:
                holder = importlib.import_module(module_name)
            except ImportError:  # Class.method
                module_name, _, cls = module_name.rpartition(".")
                holder = vars(getattr(importlib.import_module(module_name), cls))
                assert holder[attr] is original, place
                continue
            assert getattr(holder, attr) is original, place
    for name, fn in ORIGINAL.items():
        assert getattr(orl_utils, name) is fn
    for key, fn in METHODS.items():
        cls, method = key.split(".")
        owner = orl_loss if cls != "RemoteExperienceMaker" else experience_maker
        assert getattr(owner, cls).__dict__[method] is fn
