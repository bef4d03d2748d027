"""Our patches in every Ray worker process of a job (verl and OpenRLHF run their actor, critic and reference
work in Ray actors, which a `patch()` in the driver does not reach).

Two routes, both carried by the job's runtime_env (its `env_vars` reach every node; Ray runs its
`worker_process_setup_hook` in each worker process before the worker takes any task or actor):

- a script that calls `ray.init` itself: `ray.init(runtime_env=runtime_env(["verl"]))`;
- a launcher that calls `ray.init` for the user (`python -m verl.trainer.main_ppo`, OpenRLHF's
  `train_ppo_ray`): export `RAY_RUNTIME_ENV_HOOK=rlhf_fast.integrations.ray_workers.runtime_env_hook` and
  `RLHF_FAST_PATCH=verl` (comma-separated peers); ray.init passes the launcher's runtime_env through
  `runtime_env_hook`, which also patches the launching process.

Importing this module imports neither Ray nor any peer.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterable, Mapping

# Comma-separated peers to patch in every worker process (and, through runtime_env_hook, in the driver).
ENV_VAR = "RLHF_FAST_PATCH"
PEERS = ("verl", "openrlhf", "trl")
HOOK = f"{__name__}.setup_worker"

SetupHook = str | Callable[[], object]


def _peers(names: Iterable[str], what: str) -> tuple[str, ...]:
    """The peer names, stripped, empty entries dropped, first occurrence kept; ValueError naming `what` for a
    name outside PEERS."""
    peers = []
    for name in names:
        if not isinstance(name, str) or name.strip() not in PEERS + ("",):
            raise ValueError(f"{what}: unknown peer {name!r}; use peer names from {', '.join(PEERS)}")
        name = name.strip()
        if name and name not in peers:
            peers.append(name)
    return tuple(peers)


def requested() -> tuple[str, ...]:
    """The peers named in RLHF_FAST_PATCH (none when it is unset or empty)."""
    return _peers(os.environ.get(ENV_VAR, "").split(","), f"environment variable {ENV_VAR}")


def setup_worker() -> None:
    """Patches, in this process, every peer named in RLHF_FAST_PATCH (idempotent; a no-op when it is unset).

    Ray's worker_process_setup_hook: `runtime_env(...)` points every worker of the job here."""
    for peer in requested():
        importlib.import_module(f"rlhf_fast.integrations.{peer}").patch()


def _load(hook: str) -> Callable[[], object]:
    """The function named by a "module.function" path, as Ray resolves a string setup hook."""
    module, _, name = hook.rpartition(".")
    if not module:
        raise ValueError(f"worker_process_setup_hook {hook!r} is not a 'module.function' path")
    return getattr(importlib.import_module(module), name)


class ChainedHook:
    """A worker setup hook that runs the user's own hook (a callable or a "module.function" path) first, so
    that what it sets up (sys.path, stand-in modules, ...) is in place, then `setup_worker`.

    Picklable wherever the user's hook is (Ray pickles a callable hook into the cluster); `__name__` is what
    Ray logs and records for it."""

    def __init__(self, first: SetupHook):
        self.first = first
        self.__name__ = f"{first if isinstance(first, str) else getattr(first, '__name__', 'hook')}+rlhf_fast"

    def __call__(self) -> None:
        (_load(self.first) if isinstance(self.first, str) else self.first)()
        setup_worker()

    def __repr__(self) -> str:
        return f"ChainedHook({self.first!r})"


def runtime_env(peers: Iterable[str], base: Mapping | None = None) -> dict:
    """A new runtime_env for ``ray.init`` that patches `peers` in every worker process of the job.

    Parameters
    ----------
    peers : iterable of str
        Names from ``PEERS`` (``verl``, ``openrlhf``, ``trl``), or one comma-separated string.
    base : Mapping or None
        Your runtime_env, left as it is.

    Returns
    -------
    dict
        `base` plus ``RLHF_FAST_PATCH=peers`` in its ``env_vars`` (joined with a value already there) and the
        setup hook that patches them in each worker (chained after base's own ``worker_process_setup_hook``,
        if it has one, which runs first).

    Raises
    ------
    ValueError
        An unknown peer name, no peer at all, or a base hook that is neither callable nor a
        ``"module.function"`` path.

    Examples
    --------

        ray.init(runtime_env=runtime_env(["verl"], {"env_vars": {"TOKENIZERS_PARALLELISM": "true"}}))
    """
    if isinstance(peers, str):
        peers = peers.split(",")
    peers = _peers(peers, "runtime_env(peers=...)")
    if not peers:
        raise ValueError(f"runtime_env(peers=...): name at least one peer of {', '.join(PEERS)}")
    env = dict(base or {})
    env_vars = dict(env.get("env_vars") or {})
    have = _peers(env_vars.get(ENV_VAR, "").split(","), f"runtime_env base env_vars[{ENV_VAR!r}]")
    env_vars[ENV_VAR] = ",".join(have + tuple(p for p in peers if p not in have))
    env["env_vars"] = env_vars
    user_hook = env.get("worker_process_setup_hook")
    if user_hook is None or user_hook == HOOK:
        env["worker_process_setup_hook"] = HOOK
    elif not isinstance(user_hook, ChainedHook):
        if not isinstance(user_hook, str) and not callable(user_hook):
            raise ValueError(
                f"runtime_env base worker_process_setup_hook: a callable or a 'module.function' path, got {user_hook!r}"
            )
        env["worker_process_setup_hook"] = ChainedHook(user_hook)
    return env


def runtime_env_hook(env: dict | None) -> dict | None:
    """Ray's ``RAY_RUNTIME_ENV_HOOK``, for launchers that call ``ray.init`` themselves.

    Parameters
    ----------
    env : dict or None
        The job's runtime_env, as ``ray.init`` passes it.

    Returns
    -------
    dict or None
        With ``RLHF_FAST_PATCH`` set: ``runtime_env(those peers, base=env)``, after patching this process (the
        driver). With it unset: `env` untouched, nothing patched.

    Examples
    --------

        export RAY_RUNTIME_ENV_HOOK=rlhf_fast.integrations.ray_workers.runtime_env_hook RLHF_FAST_PATCH=verl
        python -m verl.trainer.main_ppo ...
    """
    peers = requested()
    if not peers:
        return env
    setup_worker()
    return runtime_env(peers, env)
