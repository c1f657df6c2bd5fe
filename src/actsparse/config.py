"""What to sparsify and how: one plain, serialisable config object."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from functools import cached_property

import actsparse.validate as validate
from actsparse.core.dispatch import BACKENDS, choose_backend
from actsparse.core.mitigation import Mitigation, get_mitigation
from actsparse.core.patterns import Pattern, parse_pattern
from actsparse.core.scoring import Criterion, get_criterion
from actsparse.errors import ActsparseError
from actsparse.models.discovery import ROLES

_SKIP = re.compile(r"^(?P<role>[a-z_]*)(?:@(?P<layers>[0-9,\-]+))?$")


@dataclass(frozen=True)
class SparsityConfig:
    """Activation sparsity for the linear layers of a causal LM.

    - ``pattern``: ``"N:M"``, ``"unstructured:S"`` or ``"dense"``.
    - ``criterion`` / ``mitigation``: names from the registries (``actsparse.CRITERIA``,
      ``actsparse.MITIGATIONS``).
    - ``roles``: sparsify only these roles (default: every recognised role).
    - ``layers``: sparsify only these decoder layer indices (default: all).
    - ``skip``: entries ``"ROLE"`` (everywhere), ``"ROLE@3,5-7"`` (those layers) or
      ``"@0"`` (every role of layer 0).
    - ``seed``: seeds the ``random`` criterion.
    - ``backend``: ``auto`` (Triton kernels on CUDA where supported), ``torch`` or ``triton``.
    - ``prefill_only``: sparsify prompt tokens only; single-token decode steps (KV cache) run
      dense (as in the Amber Pruner paper). Perplexity (teacher forcing) is all prefill, so it is unaffected.
    """

    pattern: str = "2:4"
    criterion: str = "magnitude"
    mitigation: str = "none"
    roles: tuple[str, ...] | None = None
    layers: tuple[int, ...] | None = None
    skip: tuple[str, ...] = field(default_factory=tuple)
    seed: int = 0
    backend: str = "auto"
    prefill_only: bool = False

    def __post_init__(self):
        normalise_selection(self)
        if not isinstance(self.backend, str) or self.backend not in BACKENDS:
            raise ActsparseError(f"unknown backend {self.backend!r}; choose one of: {', '.join(BACKENDS)}")
        parse_pattern(self.pattern)
        get_criterion(validate.text("criterion", self.criterion))
        get_mitigation(validate.text("mitigation", self.mitigation))
        validate.whole("seed", self.seed, minimum=None)
        validate.flag("prefill_only", self.prefill_only)
        if self.backend == "triton":  # a forced kernel that does not exist is refused now, not at the first sparse layer
            choose_backend("triton", parse_pattern(self.pattern), self.criterion, self.mitigation)

    def to_dict(self) -> dict:
        return asdict(self)

    # The names resolved once, on first use: what callers read instead of parsing and looking up again.
    @cached_property
    def pattern_obj(self) -> Pattern:
        return parse_pattern(self.pattern)

    @cached_property
    def criterion_obj(self) -> Criterion:
        return get_criterion(self.criterion)

    @cached_property
    def mitigation_obj(self) -> Mitigation:
        return get_mitigation(self.mitigation)

    def __getstate__(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}  # a pickle holds the names; the objects are resolved again

    def selects(self, role: str | None, layer: int) -> bool:
        """Whether the linear layer with this role in this decoder layer is sparsified."""
        if role is None:
            return False
        if self.roles is not None and role not in self.roles:
            return False
        if self.layers is not None and layer not in self.layers:
            return False
        for entry in self.skip:
            skip_role, skip_layers = parse_skip(entry)
            if (skip_role is None or skip_role == role) and (skip_layers is None or layer in skip_layers):
                return False
        return True


def normalise_selection(config) -> None:
    """Check and normalise a (frozen) config's ``roles``, ``layers`` and ``skip`` in place (lists become tuples)."""
    roles = validate.names("roles", config.roles, optional=True)
    if roles is not None and not roles:
        raise ActsparseError("roles is empty, so nothing would be sparsified; leave it out to select every role")
    for role in roles or ():
        check_role(role)
    skip = validate.names("skip", config.skip if config.skip is not None else ())
    for entry in skip:
        parse_skip(entry)
    object.__setattr__(config, "roles", roles)
    object.__setattr__(config, "layers", validate.indices("layers", config.layers, optional=True))
    object.__setattr__(config, "skip", skip)


def check_role(role: str) -> str:
    if role not in ROLES:
        raise ActsparseError(f"unknown role '{role}'; roles are: {', '.join(ROLES)}")
    return role


def parse_skip(entry: str) -> tuple[str | None, set[int] | None]:
    """``"k"`` -> ("k", None); ``"q@19,21"`` -> ("q", {19, 21}); ``"@0-2"`` -> (None, {0, 1, 2})."""
    match = _SKIP.match(entry.strip())
    if not match or (not match["role"] and not match["layers"]):
        raise ActsparseError(f"cannot parse skip entry '{entry}'; use ROLE, ROLE@LAYERS or @LAYERS, e.g. 'k', 'q@19,21', '@0-2'")
    role = check_role(match["role"]) if match["role"] else None
    layers = None
    if match["layers"]:
        layers = set()
        for part in match["layers"].split(","):
            start, _, stop = part.partition("-")
            if not start.isdigit() or (stop and not stop.isdigit()):
                raise ActsparseError(f"cannot parse layers '{match['layers']}' in skip entry '{entry}'; use e.g. 3,5-7")
            layers.update(range(int(start), int(stop or start) + 1))
    return role, layers
