"""A registry: name -> method (criteria, mitigations, weight pruners), for one-line registration."""

from __future__ import annotations

from actsparse.errors import ActsparseError


class Registry(dict):
    """Methods by name. ``add(item)`` registers an object with a ``name``; ``find(name)`` looks
    one up and, for an unknown name, raises an error that lists the choices."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind  # "criterion", "mitigation", ... for the error message

    def add(self, item):
        self[item.name] = item
        return item

    def find(self, name: str):
        if name not in self:
            raise ActsparseError(f"unknown {self.kind} '{name}'; choose one of: {', '.join(self)}")
        return self[name]
