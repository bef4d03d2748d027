"""rlhf_fast.integrations.verl: every patched function against verl's own (captured before patching), forward
and backward, fp32 and bf16, masks with holes and fully masked rows; bindings and registries restored."""

import ast
import contextlib

import numpy as np
import pytest
import torch

verl_f = pytest.importorskip("verl.utils.torch_functional")
core = pytest.importorskip("verl.trainer.ppo.core_algos")
omegaconf = pytest.importorskip("omegaconf")

from peer_checks import RUNS, assert_matches, leaf, mask_with_holes, rounded  # noqa: E402

from rlhf_fast.integrations import verl as rf_verl  # noqa: E402

MODULES = {rf_verl.TF: verl_f, rf_verl.CORE: core}
ORIGINAL = {t.qualname: getattr(MODULES[t.module], t.name) for t in rf_verl.TARGETS}
REGISTRIES = {name: dict(getattr(core, name)) for name in rf_verl.REGISTERED}
DTYPES = [torch.float32, torch.bfloat16]


def original(name):
    return next(fn for qualname, fn in ORIGINAL.items() if qualname.endswith("." + name))


def function(label, module, name):
    """verl's original, or the patched binding in `module` (call it inside `patched(label)`)."""
    return getattr(module, name) if label == "ours" else original(name)


def patched(label):
    return rf_verl.patch() if label == "ours" else contextlib.nullcontext()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ------------------------------------------------------------------ torch_functional


@pytest.mark.parametrize("dtype", DTYPES)
def test_logprobs_and_entropy_match_verl(dtype):
    vocab, temperature = 1003, 0.7
    (full,) = rounded(dtype, torch.randn(3, 9, vocab) * 3)
    labels = torch.randint(0, vocab, (3, 8))
    grads = torch.randn(2, 3, 8)
    out = {}
    for label, dt in RUNS:
        x = leaf(full, dt or dtype)
        logits = x[:, :-1] / temperature  # verl divides by the temperature first; a non-contiguous view
        with patched(label):
            logp = function(label, verl_f, "logprobs_from_logits")(logits, labels)
            ent = function(label, verl_f, "entropy_from_logits")(logits)
        (logp.float() * grads[0] + ent.float() * grads[1]).sum().backward()
        out[label] = (logp, ent, x.grad)
    assert out["ours"][0].dtype == torch.float32
    for o, p, r in zip(out["ours"], out["peer"], out["ref"]):
        assert_matches(o, p, r)


def test_logprobs_inplace_backward_leaves_a_leaf_alone():
    x = torch.randn(4, 257, requires_grad=True)
    saved = x.detach().clone()
    labels = torch.randint(0, 257, (4,))
    with rf_verl.patch():
        verl_f.logprobs_from_logits(x, labels, inplace_backward=True).sum().backward()
    assert torch.equal(x.detach(), saved)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_dtype", [torch.long, torch.bool, torch.float32])
def test_masked_mean_and_whiten_match_verl(dtype, mask_dtype):
    (values,) = rounded(dtype, torch.randn(6, 37) * 2 + 0.5)
    mask = mask_with_holes(6, 37, mask_dtype)
    out = {}
    for label, dt in RUNS:
        with patched(label):
            x = leaf(values, dt or dtype)
            mean = function(label, verl_f, "masked_mean")(x, mask)
            mean.float().backward()
            whitened = [
                function(label, verl_f, "masked_whiten")(values.to(dt or dtype), mask, shift) for shift in (True, False)
            ]
        out[label] = (mean, x.grad, *whitened)
    for o, p, r in zip(out["ours"], out["peer"], out["ref"]):
        assert_matches(o, p, r)


def test_masked_functions_fall_back_or_raise_like_verl():
    values = torch.randn(4, 5)
    weights = torch.rand(4, 5)  # a weighting mask: verl's semantics, not ours
    one_valid = torch.zeros(4, 5, dtype=torch.long)
    one_valid[1, 2] = 1
    with rf_verl.patch():
        assert torch.equal(verl_f.masked_mean(values, weights), original("masked_mean")(values, weights))
        counts = torch.randint(0, 3, (4, 5))  # an integer mask that is not 0/1 weights tokens too
        assert torch.equal(verl_f.masked_mean(values, counts), original("masked_mean")(values, counts))
        assert torch.equal(
            verl_f.masked_mean(values, weights, axis=-1), original("masked_mean")(values, weights, axis=-1)
        )
        assert verl_f.masked_mean(values, torch.zeros(4, 5)).item() == 0.0
        with pytest.raises(ValueError, match="sum of the mask is one"):
            verl_f.masked_whiten(values, one_valid)


# ------------------------------------------------------------------ advantages


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("steps", [41, 1])
def test_gae_matches_verl(dtype, steps):
    rewards, values = rounded(dtype, torch.randn(5, steps), torch.randn(5, steps))
    mask = mask_with_holes(5, 41) if steps > 1 else torch.tensor([[1], [0], [1], [1], [0]])
    gamma, lam = torch.tensor(0.99), 0.95
    gae = original("compute_gae_advantage_return")
    peer = gae(rewards.to(dtype), values.to(dtype), mask, gamma, lam)
    with rf_verl.patch():  # verl's GAE whitens with verl_F.masked_whiten: the reference runs unpatched
        ours = core.compute_gae_advantage_return(rewards.to(dtype), values.to(dtype), mask, gamma, lam)
    ref = gae(rewards.double(), values.double(), mask, gamma, lam)
    for o, p, r in zip(ours, peer, ref):
        assert_matches(o, p, r, rtol=1e-4, atol=1e-5)


def _shuffled_uids(groups, size):
    uids = np.array([f"uid-{g}" for g in range(groups) for _ in range(size)], dtype=object)
    return uids[np.random.default_rng(0).permutation(len(uids))]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("estimator", ["grpo", "grpo_no_std", "rloo"])
def test_group_advantages_match_verl_for_scattered_uids(dtype, estimator):
    index = _shuffled_uids(5, 4)
    (rewards,) = rounded(dtype, torch.randn(20, 7))
    mask = mask_with_holes(20, 7)
    name = "compute_rloo_outcome_advantage" if estimator == "rloo" else "compute_grpo_outcome_advantage"
    kwargs = {} if estimator == "rloo" else {"norm_adv_by_std_in_grpo": estimator == "grpo"}
    peer = original(name)(rewards.to(dtype), mask, index, **kwargs)
    ref = original(name)(rewards.double(), mask, index, **kwargs)
    with rf_verl.patch():
        ours = getattr(core, name)(rewards.to(dtype), mask, index, **kwargs)
        by_registry = core.get_adv_estimator_fn(estimator[:4] if estimator != "rloo" else "rloo")
        assert by_registry is getattr(core, name)
    for o, p, r in zip(ours, peer, ref):
        assert_matches(o, p, r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sizes", [(3, 3, 1), (2, 4), (1, 1)])
def test_group_advantages_of_uneven_or_single_groups_fall_back(sizes):
    index = np.array([g for g, n in enumerate(sizes) for _ in range(n)])
    rewards, mask = torch.randn(len(index), 3), torch.ones(len(index), 3)
    for name in ("compute_grpo_outcome_advantage", "compute_rloo_outcome_advantage"):
        peer = original(name)(rewards.clone(), mask, index)
        with rf_verl.patch():
            ours = getattr(core, name)(rewards.clone(), mask, index)
        torch.testing.assert_close(ours[0], peer[0])


# ------------------------------------------------------------------ losses

KL_NAMES = [
    "kl",
    "k1",
    "abs",
    "mse",
    "k2",
    "low_var_kl",
    "k3",
    "kl+",
    "k1+",
    "abs+",
    "mse+",
    "k2+",
    "low_var_kl+",
    "k3+",
]


@pytest.mark.parametrize("dtype", DTYPES)
def test_kl_penalty_matches_verl_for_every_name(dtype):
    logp, ref_logp = torch.randn(4, 33) * 3, torch.randn(4, 33) * 3
    logp[0, :3] = torch.tensor([-30.0, 30.0, 8.0])  # through the clamps
    logp, ref_logp = rounded(dtype, logp, ref_logp)
    grad = torch.randn(4, 33)
    out = {}
    for label, dt in RUNS:
        with patched(label):  # one patch for every name (patching scans every module)
            for name in KL_NAMES:
                a, b = leaf(logp, dt or dtype), leaf(ref_logp, dt or dtype)
                value = function(label, core, "kl_penalty")(a, b, name)
                (value.float() * grad).sum().backward()
                out[label, name] = (value, a.grad, b.grad)
    for name in KL_NAMES:
        for o, p, r in zip(out["ours", name], out["peer", name], out["ref", name]):
            assert_matches(o, p, r, rtol=1e-5, atol=1e-6)


def test_kl_penalty_full_raises_like_verl():
    with rf_verl.patch(), pytest.raises(NotImplementedError):
        core.kl_penalty(torch.randn(3), torch.randn(3), "full")


AGG_MODES = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
GLOBAL = [{}, {"dp_size": 2, "batch_num_tokens": 300, "global_batch_size": 11, "loss_scale_factor": 64}]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("global_info", GLOBAL, ids=["local", "dp2"])
def test_agg_loss_matches_verl(dtype, global_info):
    (loss,), mask = rounded(dtype, torch.randn(6, 29)), mask_with_holes(6, 29)
    out = {}
    for label, dt in RUNS:
        with patched(label):
            for mode in AGG_MODES:
                x = leaf(loss, dt or dtype)
                value = function(label, core, "agg_loss")(x, mask, mode, **global_info)
                value.float().backward()
                out[label, mode] = (value, x.grad)
    for mode in AGG_MODES:
        for o, p, r in zip(out["ours", mode], out["peer", mode], out["ref", mode]):
            assert_matches(o, p, r)


def test_agg_loss_all_masked_and_errors_like_verl():
    loss, empty = torch.randn(3, 4), torch.zeros(3, 4)
    with rf_verl.patch():
        for mode in AGG_MODES:
            ours, peer = core.agg_loss(loss, empty, mode), original("agg_loss")(loss, empty, mode)
            torch.testing.assert_close(ours.float(), peer.float(), equal_nan=True)
        with pytest.raises(ValueError, match="batch_num_tokens is required"):
            core.agg_loss(loss, empty, "token-mean", dp_size=2)
        with pytest.raises(ValueError, match="Invalid loss_agg_mode"):
            core.agg_loss(loss, empty, "token-median")


def _actor_config(**global_info):
    return omegaconf.OmegaConf.create(
        {
            "clip_ratio": 0.2,
            "clip_ratio_low": 0.15,
            "clip_ratio_high": 0.28,
            "clip_ratio_c": 2.5,
            "global_batch_info": global_info,
        }
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("global_info", GLOBAL, ids=["local", "dp2"])
def test_vanilla_policy_loss_matches_verl(dtype, global_info):
    old, adv = torch.randn(6, 29), torch.randn(6, 29)
    # ratios beyond both clips and the dual clip
    old, adv, new = rounded(dtype, old, adv, old + torch.randn(6, 29) * 0.8)
    mask = mask_with_holes(6, 29)
    config = _actor_config(**global_info)
    out = {}
    for label, dt in RUNS:
        dt = dt or dtype
        with patched(label):
            for mode in AGG_MODES:
                logp = leaf(new, dt)
                fn = core.get_policy_loss_fn("vanilla") if label == "ours" else original("compute_policy_loss_vanilla")
                loss, metrics = fn(old.to(dt), logp, adv.to(dt), mask, mode, config)
                loss.float().backward()
                out[label, mode] = (loss, logp.grad, metrics)
    for mode in AGG_MODES:
        ours, peer, ref = out["ours", mode], out["peer", mode], out["ref", mode]
        for i in range(2):
            assert_matches(ours[i], peer[i], ref[i])
        assert ours[2].keys() == peer[2].keys()
        for key, value in ours[2].items():
            assert isinstance(value, float)
            tol = 1e-5 if dtype == torch.float32 else 0.05
            assert value == pytest.approx(ref[2][key], abs=tol), key
        assert ref[2]["actor/pg_clipfrac_lower"] > 0  # the dual clip was exercised


def test_policy_loss_by_the_rlhf_fast_name_and_fallbacks():
    old, adv, new = torch.randn(4, 9), torch.randn(4, 9), torch.randn(4, 9)
    mask, config = mask_with_holes(4, 9), _actor_config()
    weights = torch.rand(4, 9)
    with rf_verl.patch():
        ours = core.get_policy_loss_fn("rlhf_fast")(old, new, adv, mask, "token-mean", config)
        weighted = core.compute_policy_loss_vanilla(old, new, adv, mask, "token-mean", config, weights)
    peer = original("compute_policy_loss_vanilla")(old, new, adv, mask, "token-mean", config)
    peer_weighted = original("compute_policy_loss_vanilla")(old, new, adv, mask, "token-mean", config, weights)
    torch.testing.assert_close(ours[0], peer[0])
    torch.testing.assert_close(weighted[0], peer_weighted[0])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("global_info", GLOBAL, ids=["local", "dp2"])
def test_value_loss_matches_verl(dtype, global_info):
    old, ret = torch.randn(6, 29), torch.randn(6, 29)
    old, ret, new = rounded(dtype, old, ret, old + torch.randn(6, 29) * 0.3)
    mask = mask_with_holes(6, 29)
    out = {}
    for label, dt in RUNS:
        dt = dt or dtype
        with patched(label):
            for mode in AGG_MODES:
                vpreds = leaf(new, dt)
                fn = function(label, core, "compute_value_loss")
                loss, clipfrac = fn(vpreds, ret.to(dt), old.to(dt), mask, 0.2, mode, **global_info)
                loss.float().backward()
                out[label, mode] = (loss, vpreds.grad, clipfrac)
    for mode in AGG_MODES:
        for o, p, r in zip(out["ours", mode], out["peer", mode], out["ref", mode]):
            assert_matches(o, p, r)


# ------------------------------------------------------------------ patching


def test_patch_is_idempotent_and_unpatch_restores_every_binding_and_registry():
    handle = rf_verl.patch()
    try:
        assert rf_verl.patch() is handle
        assert not handle.skipped
        assert set(handle.replaced) == set(ORIGINAL)
        for qualname, places in handle.bindings.items():
            assert places, qualname
        import verl.workers.utils.losses as worker_losses

        assert worker_losses.agg_loss is core.agg_loss is not original("agg_loss")
        assert core.POLICY_LOSS_REGISTRY["vanilla"] is core.compute_policy_loss_vanilla
        assert core.get_adv_estimator_fn("gae") is core.compute_gae_advantage_return
        assert core.get_adv_estimator_fn("rlhf_fast") is core.compute_gae_advantage_return
        assert core.get_adv_estimator_fn("rlhf_fast_grpo") is core.compute_grpo_outcome_advantage
        assert core.get_adv_estimator_fn("rlhf_fast_rloo") is core.compute_rloo_outcome_advantage
    finally:
        rf_verl.unpatch()
    assert not handle.active
    for qualname, places in handle.bindings.items():
        for place in places:
            module_name, _, attr = place.partition("[")[0].rpartition(".")
            holder = getattr(__import__(module_name, fromlist=["_"]), attr)
            value = holder[ast.literal_eval(place.partition("[")[2][:-1])] if "[" in place else holder
            assert value is ORIGINAL[qualname], place
    for name, snapshot in REGISTRIES.items():
        registry = getattr(core, name)
        assert registry.keys() == snapshot.keys()
        assert all(registry[key] is snapshot[key] for key in snapshot)
    with rf_verl.patch() as again:
        assert again is not handle and again.active
    assert verl_f.masked_mean is original("masked_mean")
