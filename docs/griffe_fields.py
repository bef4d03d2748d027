"""A griffe extension for the docs build: PPOConfig's fields are declared as `_opt(default, help, choices)`, so
the signature shown on the API page would hold the whole call; this shows the default alone."""

from __future__ import annotations

import griffe


class FieldDefaults(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:
        for module in _modules(pkg):
            for member in module.members.values():
                if isinstance(member, griffe.Class) and not member.is_alias:
                    _field_defaults(member)


def _modules(module: griffe.Module):
    yield module
    for member in module.members.values():
        if isinstance(member, griffe.Module) and not member.is_alias:
            yield from _modules(member)


def _field_defaults(cls: griffe.Class) -> None:
    for attribute in cls.members.values():
        value = getattr(attribute, "value", None)
        if (
            isinstance(attribute, griffe.Attribute)
            and isinstance(value, griffe.ExprCall)
            and str(value.function) == "_opt"
            and value.arguments
        ):
            attribute.value = value.arguments[0]
