"""Replacing a peer trainer's functions with ours, and putting them back.

An adapter is a declarative list of `Target`s (the module that defines a function, its name, a factory that
builds our replacement from the peer's original, and the parameters the replacement translates) plus the
version of the peer it was written against. `Adapter.patch()` replaces each original in every binding the
peer holds: the defining module, every module of the peer that bound it by name (`from .utils import f`,
aliases included), and the values of module-level dicts (registries such as `{"vanilla": fn}`).
`Adapter.unpatch()` finds every binding of each replacement, including those made by peer modules imported
while patched, and puts the original object back.

With a peer version other than the pinned one, `patch()` warns once and skips every target whose original no
longer has the parameters the replacement translates (the handle's `skipped` says which and why).
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import inspect
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    """`module.name` in the peer, replaced by `make(original)`.

    params: parameters of the original that the replacement reads or translates; a target whose original
    lacks any of them is skipped rather than patched.
    """

    module: str
    name: str
    make: Callable[[Callable], Callable]
    params: tuple[str, ...] = ()

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"


# A hook runs after the targets are patched and returns the function that undoes it (e.g. registering a new
# name in a peer registry).
Hook = Callable[[], Callable[[], None]]


class Patch:
    """The handle `patch()` returns; a context manager whose with-block ends with `unpatch()`.

    replaced: qualified name of each patched target -> (original, replacement).
    bindings: qualified name -> every place the replacement was written (``module.attr`` or ``module.DICT[key]``).
    skipped: qualified name -> why the target was left as the peer has it.
    """

    def __init__(self, adapter: Adapter):
        self.adapter = adapter
        self.replaced: dict[str, tuple[Callable, Callable]] = {}
        self.bindings: dict[str, list[str]] = {}
        self.skipped: dict[str, str] = {}
        self._undo_hooks: list[Callable[[], None]] = []

    @property
    def active(self) -> bool:
        return self.adapter.handle is self

    def unpatch(self) -> None:
        if self.active:
            self.adapter.unpatch()

    def __enter__(self) -> Patch:
        return self

    def __exit__(self, *exc) -> None:
        self.unpatch()

    def __repr__(self) -> str:
        state = "active" if self.active else "undone"
        return f"<{self.adapter.peer} patch ({state}): {len(self.replaced)} patched, {len(self.skipped)} skipped>"


def _under(module_name: str, packages: Sequence[str]) -> bool:
    return any(module_name == p or module_name.startswith(p + ".") for p in packages)


def _bindings(packages: Sequence[str], obj) -> list[tuple[dict, str, str]]:
    """(namespace, key, description) of every module attribute under `packages`, and every value of a
    module-level dict there, that is `obj`."""
    found = []
    for module_name, module in list(sys.modules.items()):
        namespace = getattr(module, "__dict__", None)
        if namespace is None or not _under(module_name, packages):
            continue
        for attr, value in list(namespace.items()):
            if value is obj:
                found.append((namespace, attr, f"{module_name}.{attr}"))
            elif type(value) is dict and attr != "__builtins__":
                found += [
                    (value, key, f"{module_name}.{attr}[{key!r}]") for key, item in list(value.items()) if item is obj
                ]
    return found


def _rebind(packages: Sequence[str], old, new) -> list[str]:
    places = _bindings(packages, old)
    for namespace, key, _ in places:
        namespace[key] = new
    return [description for _, _, description in places]


def _missing_params(fn: Callable, params: Sequence[str]) -> list[str]:
    """The `params` that `fn` (for a class such as an autograd.Function: its `forward`) does not take."""
    if isinstance(fn, type):
        fn = getattr(fn, "forward", fn)
    try:
        have = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return list(params)
    return [p for p in params if p not in have]


def _is_default(parameter: inspect.Parameter, value) -> bool:
    if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
        return not value
    return value is parameter.default


def known_arguments(signature: inspect.Signature, known: Sequence[str], args: tuple, kwargs: dict) -> dict | None:
    """The call's arguments by name, defaults filled in; None when it sets a parameter outside `known` (one a
    newer peer added) to anything but its default. Raises TypeError as the call itself would."""
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    arguments = bound.arguments
    for parameter in signature.parameters.values():
        if parameter.name not in known and not _is_default(parameter, arguments[parameter.name]):
            return None
    return arguments


def dispatching(original: Callable, ours: Callable[[dict], object], known: Sequence[str]) -> Callable:
    """A replacement for `original` with its signature and metadata that runs `ours` where it applies.

    ours(arguments) gets the call's arguments by name (see `known_arguments`) and returns NotImplemented to
    let the original run; so does a call that sets a parameter outside `known`.
    """
    signature = inspect.signature(original)

    @functools.wraps(original)
    def replacement(*args, **kwargs):
        arguments = known_arguments(signature, known, args, kwargs)
        if arguments is not None:
            result = ours(arguments)
            if result is not NotImplemented:
                return result
        return original(*args, **kwargs)

    return replacement


class Adapter:
    """patch()/unpatch() of one peer.

    peer: the peer's distribution and top-level package name (e.g. "trl").
    pinned: the version the targets were written against; "1.16" matches 1.16 and every 1.16.x.
    targets: what to replace. scan: peer modules to import first, so that their by-name bindings are found
    (one that fails to import is left out: it binds the replacement if it is imported later).
    hooks: extra steps run after patching, each returning its undo.
    """

    def __init__(
        self, peer: str, pinned: str, targets: Sequence[Target], *, scan: Sequence[str] = (), hooks: Sequence[Hook] = ()
    ):
        self.peer = peer
        self.pinned = pinned
        self.targets = tuple(targets)
        self.scan = tuple(scan)
        self.hooks = tuple(hooks)
        self.handle: Patch | None = None

    def version(self) -> str:
        try:
            return importlib.metadata.version(self.peer)
        except importlib.metadata.PackageNotFoundError:
            return str(getattr(importlib.import_module(self.peer), "__version__", "unknown"))

    def version_matches(self, version: str) -> bool:
        return version == self.pinned or version.startswith(self.pinned + ".")

    def patch(self) -> Patch:
        """Replaces every target in every binding; calling it again while patched returns the same handle."""
        if self.handle is not None:
            return self.handle
        version = self.version()
        other_version = not self.version_matches(version)
        for module_name in self.scan:
            try:
                importlib.import_module(module_name)
            except ImportError:
                pass
        handle = Patch(self)
        for target in self.targets:
            reason = self._why_skip(target)
            if reason is not None:
                handle.skipped[target.qualname] = reason
                continue
            original = getattr(sys.modules[target.module], target.name)
            replacement = target.make(original)
            handle.replaced[target.qualname] = (original, replacement)
            handle.bindings[target.qualname] = _rebind((self.peer,), original, replacement)
        self.handle = handle
        try:
            handle._undo_hooks = [hook() for hook in self.hooks]
        except Exception:
            self.unpatch()
            raise
        if other_version or handle.skipped:
            self._warn(version, other_version, handle.skipped)
        return handle

    def unpatch(self) -> None:
        """Puts every original back wherever a replacement is bound; a no-op when not patched."""
        handle, self.handle = self.handle, None
        if handle is None:
            return
        for undo in reversed(handle._undo_hooks):
            undo()
        for original, replacement in handle.replaced.values():
            _rebind((self.peer,), replacement, original)

    def _why_skip(self, target: Target) -> str | None:
        try:
            module = importlib.import_module(target.module)
        except ImportError as exc:
            return f"{target.module} does not import ({exc})"
        original = getattr(module, target.name, None)
        if original is None:
            return f"{target.module} has no {target.name}"
        missing = _missing_params(original, target.params)
        if missing:
            return f"its signature lacks {', '.join(missing)}"
        return None

    def _warn(self, version: str, other_version: bool, skipped: dict[str, str]) -> None:
        lines = []
        if other_version:
            lines.append(
                f"rlhf_fast.integrations.{self.peer} was written against {self.peer} {self.pinned}, "
                f"found {version}: only functions whose signature still matches are patched."
            )
        if skipped:
            lines.append("Left as the peer has them: " + "; ".join(f"{name} ({why})" for name, why in skipped.items()))
        warnings.warn(" ".join(lines), RuntimeWarning, stacklevel=3)
