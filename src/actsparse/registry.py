"""A registry: name -> method (criteria, mitigations, weight pruners), for one-line registration."""

from __future__ import annotations

from collections.abc import Callable

from actsparse.errors import ActsparseError


class Registry(dict):
    """Methods by name. ``add(item)`` registers an object with a ``name`` (a taken name is
    refused); ``find(name)`` looks one up and, for an unknown name, raises an error that lists
    the choices.

    Parametrised names come from a factory: ``add_factory("lowrank", make)`` makes
    ``find("lowrank:24")`` call ``make("24")`` the first time and register what it returns
    (``make`` returns None for an option it does not take, and the name is unknown).
    """

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind  # "criterion", "mitigation", ... for the error message
        self.factories: dict[str, Callable[[str], object]] = {}

    def add(self, item):
        if item.name in self:
            raise ActsparseError(f"{self.kind} '{item.name}' is already registered; give the new one another name")
        self[item.name] = item
        return item

    def add_factory(self, prefix: str, make: Callable[[str], object]) -> Callable[[str], object]:
        """Register ``make(option)``, which builds the item named ``f"{prefix}:{option}"``."""
        if prefix in self.factories:
            raise ActsparseError(f"{self.kind} factory '{prefix}:' is already registered")
        self.factories[prefix] = make
        return make

    def find(self, name: str):
        if name not in self:
            prefix, sep, option = name.partition(":") if isinstance(name, str) else ("", "", "")
            item = self.factories[prefix](option) if sep and prefix in self.factories else None
            if item is None:
                raise ActsparseError(f"unknown {self.kind} '{name}'; choose one of: {', '.join(self)}")
            if item.name != name:
                raise ActsparseError(f"{self.kind} factory '{prefix}:' made '{item.name}' for '{name}'")
            self.add(item)
        return self[name]
