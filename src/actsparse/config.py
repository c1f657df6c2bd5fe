"""What to sparsify and how: one plain, serialisable config object."""

from __future__ import annotations

import re
from collections.abc import Mapping
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
_SITE = re.compile(r"^(?P<role>[a-z_]+)@(?P<layer>[0-9]+)$")
UNIFORM, SENSITIVITY = "uniform", "sensitivity"
# What allocation="sensitivity" minimises (the objectives of actsparse.amber.allocation.OBJECTIVES): "fisher", the
# Fisher estimate of the loss increase (the default); "eq", the layers' relative output errors e_q.
SENSITIVITIES = ("fisher", "eq")
DEFAULT_SENSITIVITY = SENSITIVITIES[0]
ALLOCATION_HELP = (
    "use allocation='uniform', 'sensitivity' (N per layer measured on calibration text, the pattern as the FLOP-weighted "
    "average) or a map {'ROLE@LAYER': 'N:M' or 'dense'} with the pattern's M, e.g. {'down@0': '12:16', 'q@3': '6:16'}"
)


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
    - ``allocation``: how N is chosen per layer, M fixed by ``pattern``. ``"uniform"``: every
      selected layer gets ``pattern``. ``"sensitivity"``: ``pattern`` is the FLOP-weighted
      average density; N per layer is measured on calibration text and must be resolved into a
      map (``actsparse.allocate``, or the CLI / ``Evaluator`` with the calibration text) before
      ``sparsify_``. A map ``{"ROLE@LAYER": "N:M" or "dense"}``: those layers get that pattern,
      the other selected layers ``pattern``. It is held as sorted ``(key, pattern)`` pairs and
      ``to_dict`` gives it back as a JSON object, so a saved config names every layer's N.
    - ``sensitivity``: what ``allocation="sensitivity"`` minimises, one of ``SENSITIVITIES``:
      ``"fisher"`` (default) the Fisher estimate of the loss increase, ``"eq"`` ``Σ e_q²``
      (docs/methods.md, Per-layer allocation). Kept in the resolved config (how its map was
      chosen); with ``allocation="uniform"`` it chooses nothing and is held as the default.
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
    allocation: str | Mapping[str, str] | tuple[tuple[str, str], ...] = UNIFORM
    sensitivity: str = DEFAULT_SENSITIVITY

    def __post_init__(self):
        normalise_selection(self)
        if not isinstance(self.backend, str) or self.backend not in BACKENDS:
            raise ActsparseError(f"unknown backend {self.backend!r}; choose one of: {', '.join(BACKENDS)}")
        pattern = self.pattern_obj  # parsed (and refused) here, once
        validate.text("criterion", self.criterion)
        criterion = self.criterion_obj  # looked up (and refused) here, once
        validate.text("mitigation", self.mitigation)
        mitigation = self.mitigation_obj
        validate.whole("seed", self.seed, minimum=None)
        validate.flag("prefill_only", self.prefill_only)
        object.__setattr__(self, "allocation", parse_allocation(self.allocation, pattern))
        validate.text("sensitivity", self.sensitivity)
        if self.sensitivity not in SENSITIVITIES:
            raise ActsparseError(f"unknown sensitivity {self.sensitivity!r}; choose one of: {', '.join(SENSITIVITIES)}")
        if self.allocation == UNIFORM:  # nothing to choose: one value, so that uniform configs compare and round-trip equal
            object.__setattr__(self, "sensitivity", DEFAULT_SENSITIVITY)
        if self.backend == "triton":  # a forced kernel that does not exist is refused now, not at the first sparse layer
            for each in {pattern, *self.layer_patterns().values()}:
                if not each.is_dense:
                    choose_backend("triton", each, criterion, mitigation)

    def to_dict(self) -> dict:
        out = asdict(self)
        if isinstance(self.allocation, tuple):
            out["allocation"] = dict(self.allocation)
        elif self.allocation == UNIFORM:  # left out, so that records and run keys of uniform configs stay as they were
            del out["allocation"]
            del out["sensitivity"]
        return out

    @property
    def resolved(self) -> bool:
        """Whether every layer's pattern is known (False for an unmeasured ``allocation="sensitivity"``)."""
        return self.allocation != SENSITIVITY

    def layer_patterns(self) -> dict[str, Pattern]:
        """The explicit map as ``{"ROLE@LAYER": Pattern}`` (empty for uniform and sensitivity)."""
        return dict(self._layer_patterns)

    @cached_property
    def _layer_patterns(self) -> dict[str, Pattern]:
        return {key: parse_pattern(value) for key, value in self.allocation} if isinstance(self.allocation, tuple) else {}

    def pattern_of(self, role: str | None, layer: int) -> Pattern:
        """The pattern of the linear layer with this role in this decoder layer (the map's entry, else ``pattern``)."""
        return self._layer_patterns.get(f"{role}@{layer}", self.pattern_obj)

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


def site_key(role: str, layer: int) -> str:
    """The allocation map's key of a linear layer: ``"down@3"``."""
    return f"{role}@{layer}"


def parse_site_key(key) -> tuple[str, int]:
    """``"down@3"`` -> ("down", 3)."""
    match = _SITE.match(key.strip()) if isinstance(key, str) else None
    if not match:
        raise ActsparseError(f"cannot parse allocation key {key!r}; keys are ROLE@LAYER, e.g. 'down@3'")
    return check_role(match["role"]), int(match["layer"])


def parse_allocation(value, pattern: Pattern):
    """``"uniform"`` / ``"sensitivity"`` as they are; a map (or pairs) as sorted ``(key, "N:M")`` pairs, checked."""
    if isinstance(value, str):
        if value not in (UNIFORM, SENSITIVITY):
            raise ActsparseError(f"unknown allocation {value!r}; {ALLOCATION_HELP}")
        if value == SENSITIVITY and pattern.nm is None:
            raise ActsparseError(f"allocation 'sensitivity' needs an N:M pattern (the average N and the M), not {pattern}")
        return value
    if isinstance(value, Mapping):
        items = list(value.items())
    elif isinstance(value, (list, tuple)) and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in value):
        items = [tuple(p) for p in value]
    else:
        raise ActsparseError(f"allocation must be a string or a map, got {value!r}; {ALLOCATION_HELP}")
    if pattern.nm is None:
        raise ActsparseError(f"a per-layer allocation needs an N:M pattern (its M is every layer's M), not {pattern}")
    pairs = {}
    for key, text in items:
        role, layer = parse_site_key(key)
        chosen = parse_pattern(validate.text(f"allocation[{key!r}]", text))
        if not (chosen.is_dense or (chosen.nm is not None and chosen.m == pattern.m)):
            raise ActsparseError(
                f"allocation[{key!r}] is {chosen}, but every layer keeps the pattern's M ({pattern.m}); use N:{pattern.m} or dense"
            )
        if site_key(role, layer) in pairs:
            raise ActsparseError(f"allocation names {site_key(role, layer)} twice; give each layer once")
        pairs[site_key(role, layer)] = str(chosen)
    order = {role: index for index, role in enumerate(ROLES)}
    return tuple(sorted(pairs.items(), key=lambda kv: (parse_site_key(kv[0])[1], order[parse_site_key(kv[0])[0]])))
