"""The patching machinery of rlhf_fast.integrations on a made-up peer package held in sys.modules."""

import sys
import types
import warnings

import pytest

from rlhf_fast.integrations._patching import Adapter, Target

PEER = "fakepeer_rf"


def _scale(x, factor=2.0):
    return x * factor


def _shift(x, offset=1.0):
    return x + offset


@pytest.fixture
def peer(monkeypatch):
    """fakepeer_rf with utils (defines scale, shift), trainer (binds them by name and by alias), registry
    (a dict of them), and a module outside the package that also binds scale."""

    def module(name, **attrs):
        mod = types.ModuleType(name)
        mod.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, mod)
        return mod

    # Fresh function objects per test, so identity checks cannot pass by accident across tests.
    scale = types.FunctionType(_scale.__code__, {}, "scale", _scale.__defaults__)
    shift = types.FunctionType(_shift.__code__, {}, "shift", _shift.__defaults__)
    pkg = module(PEER, __version__="1.2.0")
    pkg.utils = module(f"{PEER}.utils", scale=scale, shift=shift)
    pkg.trainer = module(f"{PEER}.trainer", scale=scale, scale_alias=scale, shift=shift)
    pkg.registry = module(f"{PEER}.registry", LOSSES={"scale": scale, "other": len})
    module("outside_rf", scale=scale)
    return types.SimpleNamespace(scale=scale, shift=shift, pkg=pkg)


def _replacement(original):
    def replacement(x, factor=2.0):
        return -original(x, factor)

    replacement.__wrapped__ = original
    return replacement


def _adapter(pinned="1.2", params=("factor",), **kwargs):
    targets = [
        Target(f"{PEER}.utils", "scale", _replacement, params),
        Target(f"{PEER}.utils", "shift", lambda original: lambda x, offset=1.0: x - offset, ("offset",)),
    ]
    return Adapter(PEER, pinned, targets, **kwargs)


def _places(pkg):
    return {
        "utils.scale": lambda: pkg.utils.scale,
        "trainer.scale": lambda: pkg.trainer.scale,
        "trainer.scale_alias": lambda: pkg.trainer.scale_alias,
        "registry.LOSSES['scale']": lambda: pkg.registry.LOSSES["scale"],
    }


def test_patch_replaces_every_binding_and_unpatch_restores_identity(peer):
    adapter = _adapter()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        handle = adapter.patch()
    for where, get in _places(peer.pkg).items():
        assert get() is not peer.scale, where
        assert get()(3.0) == -6.0, where
    assert peer.pkg.trainer.shift(3.0) == 2.0
    assert sys.modules["outside_rf"].scale is peer.scale  # only the peer's own modules are touched
    assert peer.pkg.registry.LOSSES["other"] is len
    assert len(handle.bindings[f"{PEER}.utils.scale"]) == 4
    assert handle.skipped == {}
    adapter.unpatch()
    for where, get in _places(peer.pkg).items():
        assert get() is peer.scale, where
    assert peer.pkg.utils.shift is peer.shift and peer.pkg.trainer.shift is peer.shift
    assert not handle.active


def test_patch_is_idempotent(peer):
    adapter = _adapter()
    first = adapter.patch()
    second = adapter.patch()
    assert first is second
    assert peer.pkg.trainer.scale(1.0) == -2.0  # wrapped once, not twice
    adapter.unpatch()
    adapter.unpatch()  # a second unpatch is a no-op
    assert peer.pkg.trainer.scale is peer.scale


def test_with_block_restores_originals(peer):
    adapter = _adapter()
    with adapter.patch() as handle:
        assert handle.active
        assert peer.pkg.trainer.scale_alias is not peer.scale
    assert not handle.active and adapter.handle is None
    for where, get in _places(peer.pkg).items():
        assert get() is peer.scale, where


def test_with_block_restores_on_error(peer):
    adapter = _adapter()
    with pytest.raises(RuntimeError, match="boom"):
        with adapter.patch():
            raise RuntimeError("boom")
    assert peer.pkg.trainer.scale is peer.scale


def test_module_imported_while_patched_is_restored(peer, monkeypatch):
    adapter = _adapter()
    adapter.patch()
    late = types.ModuleType(f"{PEER}.late")
    late.scale = peer.pkg.utils.scale  # what `from .utils import scale` binds while patched
    monkeypatch.setitem(sys.modules, f"{PEER}.late", late)
    adapter.unpatch()
    assert late.scale is peer.scale


def test_other_version_warns_once_and_skips_changed_signatures(peer):
    def scale_v2(x, multiplier=2.0):  # the parameter the replacement translates was renamed
        return x * multiplier

    for module in (peer.pkg.utils, peer.pkg.trainer):
        module.scale = scale_v2
    peer.pkg.__version__ = "2.0.0"
    adapter = _adapter()
    with pytest.warns(RuntimeWarning) as record:
        handle = adapter.patch()
    assert len(record) == 1
    message = str(record[0].message)
    assert "1.2" in message and "2.0.0" in message and f"{PEER}.utils.scale" in message and "factor" in message
    assert peer.pkg.trainer.scale is scale_v2  # skipped
    assert peer.pkg.trainer.shift(3.0) == 2.0  # still matches: patched
    assert set(handle.skipped) == {f"{PEER}.utils.scale"}
    adapter.unpatch()
    assert peer.pkg.trainer.shift is peer.shift


def test_other_version_with_matching_signatures_patches_everything(peer):
    peer.pkg.__version__ = "1.3.0"
    with pytest.warns(RuntimeWarning, match="found 1.3.0"):
        handle = _adapter().patch()
    assert handle.skipped == {} and peer.pkg.trainer.scale(1.0) == -2.0
    handle.unpatch()


def test_pinned_minor_matches_every_patch_release(peer):
    peer.pkg.__version__ = "1.2.7"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _adapter().patch().unpatch()


def test_missing_module_or_name_is_skipped(peer):
    targets = [
        Target(f"{PEER}.absent", "scale", _replacement),
        Target(f"{PEER}.utils", "gone", _replacement),
        Target(f"{PEER}.utils", "scale", _replacement, ("factor",)),
    ]
    with pytest.warns(RuntimeWarning, match="does not import"):
        handle = Adapter(PEER, "1.2", targets).patch()
    assert set(handle.skipped) == {f"{PEER}.absent.scale", f"{PEER}.utils.gone"}
    assert peer.pkg.trainer.scale(1.0) == -2.0
    handle.unpatch()


def test_scan_imports_listed_modules_and_tolerates_missing_ones(peer, monkeypatch):
    imported = []
    real_import = __import__("importlib").import_module

    def fake_import(name, *args):
        imported.append(name)
        return real_import(name, *args)

    monkeypatch.setattr("importlib.import_module", fake_import)
    handle = _adapter(scan=(f"{PEER}.trainer", f"{PEER}.not_there")).patch()
    assert f"{PEER}.trainer" in imported and f"{PEER}.not_there" in imported
    handle.unpatch()


def test_hooks_run_after_patch_and_are_undone(peer):
    events = []

    def hook():
        events.append(("on", peer.pkg.utils.scale is not peer.scale))
        peer.pkg.registry.LOSSES["rlhf_fast"] = peer.pkg.utils.scale
        return lambda: (events.append("off"), peer.pkg.registry.LOSSES.pop("rlhf_fast"))

    with _adapter(hooks=(hook,)).patch():
        assert peer.pkg.registry.LOSSES["rlhf_fast"](1.0) == -2.0
    assert events == [("on", True), "off"]
    assert "rlhf_fast" not in peer.pkg.registry.LOSSES
    assert peer.pkg.registry.LOSSES["scale"] is peer.scale


def test_dispatching_keeps_signature_and_falls_back():
    from rlhf_fast.integrations._patching import dispatching

    def original(x, factor=2.0, *, added=None):
        """doc"""
        return ("original", x, factor)

    def ours(arguments):
        return NotImplemented if arguments["x"] < 0 else ("ours", arguments["x"], arguments["factor"])

    replacement = dispatching(original, ours, ("x", "factor"))
    assert replacement.__wrapped__ is original and replacement.__doc__ == "doc"
    assert replacement(3) == ("ours", 3, 2.0)
    assert replacement(3, factor=5.0) == ("ours", 3, 5.0)
    assert replacement(-1) == ("original", -1, 2.0)  # ours declined
    assert replacement(3, added=1) == ("original", 3, 2.0)  # a parameter ours does not know is set
    with pytest.raises(TypeError):
        replacement(3, nope=1)


def test_class_target_checks_forward_parameters(peer):
    class Function:
        @staticmethod
        def forward(ctx, hidden, temperature):
            return hidden

    peer.pkg.utils.Function = Function
    targets = [
        Target(f"{PEER}.utils", "Function", lambda original: type("F", (original,), {}), ("temperature",)),
        Target(f"{PEER}.utils", "scale", _replacement, ("logit_scale",)),
    ]
    with pytest.warns(RuntimeWarning, match="lacks logit_scale"):
        handle = Adapter(PEER, "1.2", targets).patch()
    assert set(handle.replaced) == {f"{PEER}.utils.Function"}
    assert issubclass(peer.pkg.utils.Function, Function) and peer.pkg.utils.Function is not Function
    handle.unpatch()
    assert peer.pkg.utils.Function is Function
