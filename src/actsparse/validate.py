"""Type and range checks of settings, shared by the configs, the sweep files and the CLI.

Each check returns the value in its proper type or raises ``ActsparseError`` with one line
naming the setting, what it must be and what it got. ``bool`` is never taken for a number
and a number is never taken for a flag (YAML's ``yes``/``no`` are booleans already).
"""

from __future__ import annotations

import math

from actsparse.errors import ActsparseError


def whole(name: str, value, minimum: int | None = 1, optional: bool = False) -> int | None:
    """An ``int`` (not a bool) that is at least ``minimum``; ``None`` passes when ``optional``."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        floor = "" if minimum is None else f" >= {minimum}"
        raise ActsparseError(f"{name} must be a whole number{floor}, got {value!r}")
    if minimum is not None and value < minimum:
        raise ActsparseError(f"{name} must be >= {minimum}, got {value}")
    return value


def number(
    name: str, value, low: float | None = None, high: float | None = None, *, open_low: bool = False, optional: bool = False
):
    """A finite ``int`` or ``float`` (not a bool) in ``[low, high]`` (``(low, high]`` with ``open_low``)."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ActsparseError(f"{name} must be a finite number, got {value!r}")
    if (low is not None and (value < low or (open_low and value == low))) or (high is not None and value > high):
        side = "(" if open_low else "["
        raise ActsparseError(
            f"{name} must be in {side}{'-inf' if low is None else low:g}, {'inf' if high is None else high:g}], got {value!r}"
        )
    return value


def flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ActsparseError(f"{name} must be true or false, got {value!r}")
    return value


def text(name: str, value, optional: bool = False) -> str | None:
    """A non-empty string."""
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ActsparseError(f"{name} must be a non-empty string, got {value!r}")
    return value


def names(name: str, value, optional: bool = False) -> tuple[str, ...] | None:
    """A tuple of non-empty strings from a string or a list/tuple of strings."""
    if value is None and optional:
        return None
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise ActsparseError(f"{name} must be a list of names, got {value!r}")
    return tuple(text(f"{name} entry", item) for item in items)


def indices(name: str, value, optional: bool = False) -> tuple[int, ...] | None:
    """A non-empty tuple of whole numbers >= 0 from an int or a list/tuple of ints."""
    if value is None and optional:
        return None
    items = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(items, (list, tuple)):
        raise ActsparseError(f"{name} must be a list of layer indices (whole numbers >= 0), got {value!r}")
    if not items:
        raise ActsparseError(f"{name} is empty, so nothing would be selected; leave it out to select every layer")
    return tuple(whole(f"{name} entry", item, minimum=0) for item in items)
