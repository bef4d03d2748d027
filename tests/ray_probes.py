"""What tests/test_integrations_ray.py runs inside Ray: an actor that reports, from its own worker process,
whether the peers are patched there and runs their functions against their originals, and the driver of the
RAY_RUNTIME_ENV_HOOK route (a launcher's plain `ray.init`). Workers import this module by name: the tests put
tests/ on their PYTHONPATH."""

from __future__ import annotations

import ast
import contextlib
import importlib
import json
import os
import sys

import ray
import torch
from peer_checks import mask_with_holes

import rlhf_fast as rf

TESTS = os.path.dirname(os.path.abspath(__file__))
ADAPTERS = {"verl": "rlhf_fast.integrations.verl", "openrlhf": "rlhf_fast.integrations.openrlhf"}
# The peer modules a trainer's worker imports (the functions run below come from these).
PEER_MODULES = {
    "verl": ("verl.utils.torch_functional", "verl.trainer.ppo.core_algos", "verl.workers.utils.losses"),
    "openrlhf": ("openrlhf.models.utils", "openrlhf.models.loss", "openrlhf.models.actor"),
}


def _handle(peer):
    """The peer's active Patch in this process, or None (without importing the adapter)."""
    adapter = sys.modules.get(ADAPTERS[peer])
    return None if adapter is None else adapter._ADAPTER.handle


def _resolve(place):
    """The object at a binding as Patch.bindings names it: `module.attr`, `module.DICT['key']`, `module.Class.attr`."""
    path, _, key = place.partition("[")
    parts = path.split(".")
    cut = max(i for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in sys.modules)
    obj = sys.modules[".".join(parts[:cut])]
    for attr in parts[cut:]:
        obj = getattr(obj, attr)
    return obj[ast.literal_eval(key[:-1])] if key else obj


def patch_state(peer):
    """Whether `peer` is patched in this process. Patched: imports the peer's modules (as its worker code would)
    and lists in `wrong` each binding the adapter wrote that does not hold its replacement. Not patched: whether
    anything imported our adapter or the peer (a setup hook that patched would have)."""
    handle = _handle(peer)
    if handle is None:
        return {
            "patched": False,
            "adapter_loaded": ADAPTERS[peer] in sys.modules,
            "peer_loaded": peer in sys.modules,
            "env": os.environ.get("RLHF_FAST_PATCH"),
        }
    for module in PEER_MODULES[peer]:
        importlib.import_module(module)
    wrong = [
        place
        for qualname, (_, replacement) in handle.replaced.items()
        for place in handle.bindings[qualname]
        if _resolve(place) is not replacement
    ]
    return {"patched": True, "replaced": sorted(handle.replaced), "skipped": dict(handle.skipped), "wrong": wrong}


@contextlib.contextmanager
def counting(*ops):
    """Counts the calls of rlhf_fast's ops `ops` (the adapters call them as `rf.<op>`) while active."""
    calls = dict.fromkeys(ops, 0)
    saved = {op: getattr(rf, op) for op in ops}

    def counted(op):
        def call(*args, **kwargs):
            calls[op] += 1
            return saved[op](*args, **kwargs)

        return call

    for op in ops:
        setattr(rf, op, counted(op))
    try:
        yield calls
    finally:
        for op in ops:
            setattr(rf, op, saved[op])


def _tensors(result):
    """The tensors and float metrics of a result (a tensor, or a tuple of tensors, metric dicts, None)."""
    items = result if isinstance(result, tuple) else (result,)
    out = []
    for item in items:
        if isinstance(item, dict):
            out += [torch.tensor(float(item[key])) for key in sorted(item)]
        elif item is not None:
            out.append(item)
    return out


def _verl_calls(original):
    """(verl function as verl's code reaches it, verl's original, args, rlhf_fast op it must run), by name."""
    from omegaconf import OmegaConf

    tf, core, losses = (sys.modules[m] for m in PEER_MODULES["verl"])
    logits, labels = torch.randn(3, 7, 101) * 2, torch.randint(0, 101, (3, 7))
    old, adv, loss_mat = torch.randn(4, 9), torch.randn(4, 9), torch.randn(4, 9)
    new, mask = old + 0.5 * torch.randn(4, 9), mask_with_holes(4, 9)
    config = OmegaConf.create(
        {
            "clip_ratio": 0.2,
            "clip_ratio_low": 0.2,
            "clip_ratio_high": 0.28,
            "clip_ratio_c": 3.0,
            "global_batch_info": {},
        }
    )
    return {
        "logprobs_from_logits": (
            tf.logprobs_from_logits,
            original(f"{tf.__name__}.logprobs_from_logits"),
            (logits, labels),
            "logprobs",
        ),
        "agg_loss": (
            losses.agg_loss,
            original(f"{core.__name__}.agg_loss"),
            (loss_mat, mask, "seq-mean-token-mean"),
            "agg_loss",
        ),
        "compute_policy_loss_vanilla": (
            core.get_policy_loss_fn("vanilla"),
            original(f"{core.__name__}.compute_policy_loss_vanilla"),
            (old, new, adv, mask, "token-mean", config),
            "ppo_policy_loss",
        ),
    }


def _openrlhf_calls(original):
    utils, loss, _ = (sys.modules[m] for m in PEER_MODULES["openrlhf"])
    logp, base = torch.randn(4, 9), torch.randn(4, 9)
    old, adv, new, mask = torch.randn(4, 9), torch.randn(4, 9), torch.randn(4, 9), mask_with_holes(4, 9)
    policy = loss.PolicyLoss(clip_eps_low=0.2, clip_eps_high=0.28)
    forward = original(f"{loss.__name__}.PolicyLoss.forward")
    return {
        "compute_approx_kl": (
            utils.compute_approx_kl,
            original(f"{utils.__name__}.compute_approx_kl"),
            (logp, base, None, "k3"),
            "kl_penalty",
        ),
        "PolicyLoss.forward": (policy, lambda *args: forward(policy, *args), (new, old, adv, mask), "ppo_policy_loss"),
    }


@ray.remote(num_cpus=0)
class Probe:
    """Reports from its own worker process."""

    def state(self, peers):
        return {
            "pid": os.getpid(),
            "environ": {k: os.environ.get(k) for k in ("USER_VAR", "RLHF_FAST_PATCH")},
            **{peer: patch_state(peer) for peer in peers},
        }

    def run(self, peer, seed):
        """Calls the peer's functions as its code reaches them (patched) and their originals (from the Patch
        handle) on fresh random inputs: name -> {"calls" (of the rlhf_fast op), "diff", "scale"}."""
        handle = _handle(peer)
        assert handle is not None, f"{peer} is not patched in worker {os.getpid()}"
        patch_state(peer)
        torch.manual_seed(seed)
        calls = (_verl_calls if peer == "verl" else _openrlhf_calls)(lambda qualname: handle.replaced[qualname][0])
        report = {}
        with counting(*{op for *_, op in calls.values()}) as counts:
            for name, (patched, original, args, op) in calls.items():
                before = counts[op]
                ours = _tensors(patched(*args))
                ran = counts[op] - before
                theirs = _tensors(original(*args))
                assert len(ours) == len(theirs), (name, len(ours), len(theirs))
                report[name] = {
                    "calls": ran,
                    "diff": max((a.double() - b.double()).abs().max().item() for a, b in zip(ours, theirs)),
                    "scale": max(b.double().abs().max().item() for b in theirs),
                }
        return report


def driver():
    """A launcher's driver (verl's main_ppo, OpenRLHF's train_ppo_ray): a plain ray.init with its own
    runtime_env (RAY_ADDRESS says which cluster), then a worker-group actor with its own env_vars, as verl
    creates them. Prints one line: REPORT <json of the driver's and the actor's state>."""
    ray.init(runtime_env={"env_vars": {"PYTHONPATH": TESTS, "TOKENIZERS_PARALLELISM": "true"}}, log_to_driver=False)
    try:
        driver_state = patch_state("verl")
        job_env = ray.get_runtime_context().runtime_env
        probe = Probe.options(runtime_env={"env_vars": {"WG_PREFIX": "actor_rollout"}}).remote()
        report = {
            "driver": driver_state,
            "driver_pid": os.getpid(),
            "job_env": {key: job_env[key] for key in job_env if key != "env_vars"},
            "job_env_vars": dict(job_env.get("env_vars") or {}),
            "actor": ray.get(probe.state.remote(["verl"])),
        }
    finally:
        ray.shutdown()
    print("REPORT " + json.dumps(report, default=str))
