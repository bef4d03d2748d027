"""rlhf_fast.integrations.ray_workers: our patches in every Ray worker process of a job.

Unit tests of the runtime_env merge and of setup_worker / runtime_env_hook in this process; then one real local
Ray cluster (not local mode) started with rf_verl's and rf_openrlhf's runtime envs over a user's own (its hook
imports OpenRLHF with the GPU-only stand-ins, and must run before ours), in which an actor's worker process has
verl and OpenRLHF patched and runs our kernels with their results; and two launcher drivers in subprocesses (a
plain ray.init, RAY_RUNTIME_ENV_HOOK exported), one with RLHF_FAST_PATCH=verl (driver and actor patched) and one without
(neither). The drivers start with the cluster and run beside the first tests.
"""

import importlib
import importlib.util
import json
import os
import pickle
import subprocess
import sys
import tempfile

import pytest

ray = pytest.importorskip("ray")
# (found, not imported: importing verl here would cost ~10 s; the workers import it)
for _peer in ("verl", "openrlhf"):
    if importlib.util.find_spec(_peer) is None:
        pytest.skip(f"{_peer} is not installed", allow_module_level=True)

import _standins  # noqa: E402
import ray_probes  # noqa: E402

from rlhf_fast.integrations import openrlhf as rf_openrlhf  # noqa: E402
from rlhf_fast.integrations import ray_workers  # noqa: E402
from rlhf_fast.integrations import verl as rf_verl  # noqa: E402

HOOK_ENV = "RAY_RUNTIME_ENV_HOOK"
DRIVER_TIMEOUT = 240


# ------------------------------------------------------------------ the cluster


def _start_driver(address, peers):
    """A launcher's driver in a subprocess (ray_probes.driver) on the cluster at `address`, with our runtime_env
    hook exported and RLHF_FAST_PATCH=peers (unset if None). Its stderr goes to a file (a full pipe would stall
    it)."""
    env = {k: v for k, v in os.environ.items() if k not in (ray_workers.ENV_VAR, "RAY_ADDRESS")}
    env.update(
        {
            "RAY_ADDRESS": address,
            HOOK_ENV: "rlhf_fast.integrations.ray_workers.runtime_env_hook",
            "PYTHONPATH": os.pathsep.join([ray_probes.TESTS, env.get("PYTHONPATH", "")]),
        }
    )
    if peers is not None:
        env[ray_workers.ENV_VAR] = peers
    stderr = tempfile.TemporaryFile("w+")
    process = subprocess.Popen(
        [sys.executable, "-c", "import ray_probes; ray_probes.driver()"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
    )
    return process, stderr


@pytest.fixture(scope="module")
def cluster():
    """A 2-CPU local cluster whose job runtime_env is the user's own (PYTHONPATH, an env var, a setup hook that
    imports OpenRLHF with the stand-ins) through rf_verl.ray_runtime_env and rf_openrlhf.ray_runtime_env; the
    probe actor and the two launcher drivers start at once (so that their imports overlap)."""
    user_env = {
        "env_vars": {"PYTHONPATH": ray_probes.TESTS, "USER_VAR": "kept"},
        "worker_process_setup_hook": _standins.import_openrlhf,
    }
    runtime_env = rf_openrlhf.ray_runtime_env(rf_verl.ray_runtime_env(user_env))
    inherited = os.environ.pop(ray_workers.ENV_VAR, None)  # the cluster's processes must not inherit it
    drivers = {}
    try:
        ray.init(num_cpus=2, include_dashboard=False, runtime_env=runtime_env, log_to_driver=False)
        address = ray.get_runtime_context().gcs_address
        probe = ray_probes.Probe.remote()
        drivers = {"patched": _start_driver(address, "verl"), "unpatched": _start_driver(address, None)}
        yield {"probe": probe, "drivers": drivers}
    finally:
        for process, stderr in drivers.values():
            if process.poll() is None:
                process.kill()
            process.communicate()
            stderr.close()
        ray.shutdown()
        if inherited is not None:
            os.environ[ray_workers.ENV_VAR] = inherited


def _report(driver):
    """The driver's REPORT line, parsed (a failure shows the end of its stderr)."""
    process, stderr = driver
    try:
        out, _ = process.communicate(timeout=DRIVER_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        out, _ = process.communicate()
    stderr.seek(0)
    lines = [line for line in out.splitlines() if line.startswith("REPORT ")]
    assert process.returncode == 0 and lines, f"driver failed (exit {process.returncode}):\n{stderr.read()[-3000:]}"
    return json.loads(lines[-1][len("REPORT ") :])


def test_a_worker_process_has_both_peers_patched(cluster):
    state = ray.get(cluster["probe"].state.remote(["verl", "openrlhf"]))
    assert state["pid"] != os.getpid()
    assert state["environ"] == {"USER_VAR": "kept", ray_workers.ENV_VAR: "verl,openrlhf"}  # the user's env_vars kept
    for peer in ("verl", "openrlhf"):
        assert state[peer]["patched"], (peer, state[peer])
        assert not state[peer]["skipped"] and not state[peer]["wrong"], (peer, state[peer])
    assert set(state["verl"]["replaced"]) == {t.qualname for t in rf_verl.TARGETS}
    assert len(state["openrlhf"]["replaced"]) == len(rf_openrlhf.TARGETS) + len(rf_openrlhf.METHODS)


@pytest.mark.parametrize(
    "peer, functions",
    [
        ("verl", {"logprobs_from_logits", "agg_loss", "compute_policy_loss_vanilla"}),
        ("openrlhf", {"compute_approx_kl", "PolicyLoss.forward"}),
    ],
)
def test_peer_functions_in_a_worker_run_our_kernels_with_the_peers_results(cluster, peer, functions):
    report = ray.get(cluster["probe"].run.remote(peer, seed=7))
    assert set(report) == functions
    for name, result in report.items():
        assert result["calls"] == 1, (name, result)  # our kernel ran (not the peer's fallback)
        assert result["diff"] <= 2e-5 * max(1.0, result["scale"]), (name, result)


def test_the_launcher_route_patches_driver_and_actors(cluster):
    report = _report(cluster["drivers"]["patched"])
    assert report["driver"]["patched"] and not report["driver"]["wrong"], report["driver"]
    env_vars = report["job_env_vars"]
    assert env_vars[ray_workers.ENV_VAR] == "verl"
    assert env_vars["TOKENIZERS_PARALLELISM"] == "true"  # the launcher's own runtime_env is kept
    actor = report["actor"]
    assert actor["pid"] != report["driver_pid"]
    assert actor["verl"]["patched"] and not actor["verl"]["wrong"], actor["verl"]
    assert set(actor["verl"]["replaced"]) == {t.qualname for t in rf_verl.TARGETS}


def test_the_launcher_route_without_RLHF_FAST_PATCH_changes_nothing(cluster):
    report = _report(cluster["drivers"]["unpatched"])
    untouched = {"patched": False, "adapter_loaded": False, "peer_loaded": False, "env": None}
    assert report["driver"] == untouched
    assert ray_workers.ENV_VAR not in report["job_env_vars"]
    assert "worker_process_setup_hook" not in report["job_env"]
    assert report["job_env_vars"]["TOKENIZERS_PARALLELISM"] == "true"
    assert report["actor"]["verl"] == untouched


# ------------------------------------------------------------------ runtime_env


def test_runtime_env_without_a_user_hook():
    base = {"env_vars": {"A": "1"}, "pip": ["x"]}
    env = ray_workers.runtime_env(["verl"], base)
    assert env == {
        "env_vars": {"A": "1", ray_workers.ENV_VAR: "verl"},
        "pip": ["x"],
        "worker_process_setup_hook": "rlhf_fast.integrations.ray_workers.setup_worker",
    }
    assert base == {"env_vars": {"A": "1"}, "pip": ["x"]}  # not modified
    assert (
        ray_workers.runtime_env("verl")
        == rf_verl.ray_runtime_env()
        == {"env_vars": {ray_workers.ENV_VAR: "verl"}, "worker_process_setup_hook": ray_workers.HOOK}
    )
    assert rf_openrlhf.ray_runtime_env(env)["env_vars"][ray_workers.ENV_VAR] == "verl,openrlhf"
    assert ray_workers.runtime_env(["verl", " trl"], {"env_vars": {ray_workers.ENV_VAR: "trl,verl"}})["env_vars"] == {
        ray_workers.ENV_VAR: "trl,verl"
    }  # a union, each peer once


ORDER = []  # what user_hook and the peers' patch() did, in order


@pytest.fixture
def patched(monkeypatch):
    """The peers' patch() calls recorded in ORDER instead of made (the cluster tests patch for real)."""
    ORDER.clear()
    for peer in ray_workers.PEERS:
        adapter = importlib.import_module(f"rlhf_fast.integrations.{peer}")
        monkeypatch.setattr(adapter, "patch", lambda peer=peer: ORDER.append(peer))
    return ORDER


def user_hook():
    """A user's setup hook."""
    ORDER.append("user")


@pytest.mark.parametrize("hook", [user_hook, f"{__name__}.user_hook"], ids=["callable", "path"])
def test_runtime_env_chains_a_user_hook_before_ours(hook, patched, monkeypatch):
    base = {"env_vars": {"A": "1"}, "worker_process_setup_hook": hook}
    env = ray_workers.runtime_env(["verl"], base)
    assert base == {"env_vars": {"A": "1"}, "worker_process_setup_hook": hook}
    chained = env["worker_process_setup_hook"]
    assert isinstance(chained, ray_workers.ChainedHook) and chained.first is hook and isinstance(chained.__name__, str)
    assert rf_openrlhf.ray_runtime_env(env)["worker_process_setup_hook"] is chained  # chained once
    chained = pickle.loads(pickle.dumps(chained))  # Ray ships a callable hook pickled
    monkeypatch.setenv(ray_workers.ENV_VAR, "verl")
    chained()
    assert patched == ["user", "verl"]


@pytest.mark.parametrize(
    "peers, base, match",
    [
        (
            ["verl", "vllm"],
            None,
            r"runtime_env\(peers=\.\.\.\): unknown peer 'vllm'; use peer names from verl, openrlhf, trl",
        ),
        ([], None, r"runtime_env\(peers=\.\.\.\): name at least one peer"),
        (
            ["verl"],
            {"env_vars": {ray_workers.ENV_VAR: "verl,deepspeed"}},
            r"base env_vars\['RLHF_FAST_PATCH'\]: unknown peer",
        ),
        (["verl"], {"worker_process_setup_hook": 3}, r"worker_process_setup_hook: a callable or a 'module.function'"),
    ],
)
def test_runtime_env_rejects_bad_arguments(peers, base, match):
    with pytest.raises(ValueError, match=match):
        ray_workers.runtime_env(peers, base)


# ------------------------------------------------------------------ setup_worker / runtime_env_hook


@pytest.mark.parametrize("value", [None, "", " , "])
def test_without_RLHF_FAST_PATCH_nothing_is_patched(value, patched, monkeypatch):
    if value is None:
        monkeypatch.delenv(ray_workers.ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(ray_workers.ENV_VAR, value)
    ray_workers.setup_worker()
    job_env = {"env_vars": {"A": "1"}}
    assert ray_workers.runtime_env_hook(job_env) is job_env and job_env == {"env_vars": {"A": "1"}}
    assert ray_workers.runtime_env_hook(None) is None
    assert patched == []


def test_setup_worker_and_runtime_env_hook_patch_the_named_peers(patched, monkeypatch):
    monkeypatch.setenv(ray_workers.ENV_VAR, "openrlhf, verl,verl")
    ray_workers.setup_worker()
    assert patched == ["openrlhf", "verl"]
    job_env = {"env_vars": {"A": "1"}, "working_dir": None}
    assert ray_workers.runtime_env_hook(job_env) == {
        "env_vars": {"A": "1", ray_workers.ENV_VAR: "openrlhf,verl"},
        "working_dir": None,
        "worker_process_setup_hook": ray_workers.HOOK,
    }
    assert job_env == {"env_vars": {"A": "1"}, "working_dir": None}
    assert patched == ["openrlhf", "verl"] * 2  # the driver too
    monkeypatch.setenv(ray_workers.ENV_VAR, "trl")
    assert ray_workers.runtime_env_hook(None) == ray_workers.runtime_env(["trl"])


def test_setup_worker_rejects_an_unknown_peer(patched, monkeypatch):
    monkeypatch.setenv(ray_workers.ENV_VAR, "verl,open_rlhf")
    with pytest.raises(
        ValueError,
        match="environment variable RLHF_FAST_PATCH: unknown peer 'open_rlhf'; use peer names from verl, openrlhf, trl",
    ):
        ray_workers.setup_worker()
    assert patched == []  # checked before anything is patched
