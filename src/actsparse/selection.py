"""Which linear layers a config selects, checked against the model: nothing silently ignored.

``choose_sites(config, sites)`` is what ``sparsify_`` and ``prune_weights_`` use, and what the
CLI runs on a weightless copy of the model (built from its config on the meta device)
before any weights load. It refuses:

- a decoder layer index (in ``layers`` or ``skip``) the model does not have;
- a role (in ``roles`` or ``skip``) no decoder layer of the model has;
- a selection that leaves no linear layer to sparsify (unless the pattern is ``dense``);
- a pattern whose M does not divide the input width of a selected layer, naming that
  layer's role in the fix;
- an allocation map (``SparsityConfig.allocation``) naming a layer that is not selected, and an
  unresolved ``allocation="sensitivity"`` when ``resolved`` is asked for.

Layers the allocation map sets to ``dense`` are selected but left out of the returned sites.
"""

from __future__ import annotations

from actsparse.config import parse_site_key, parse_skip
from actsparse.errors import ActsparseError


def _span(layers: set[int]) -> str:
    return f"{min(layers)}-{max(layers)}" if layers else "none"


def choose_sites(config, sites: list, what: str = "sparsify", resolved: bool = False) -> list:
    """The sites of ``sites`` that ``config`` selects, after the checks of the module docstring.

    ``resolved``: refuse a config whose per-layer N is still to be measured (``sparsify_`` does)."""
    pattern = config.pattern_obj
    present_layers = {s.layer for s in sites}
    present_roles = {s.role for s in sites if s.role}
    count = max(present_layers) + 1 if present_layers else 0
    asked_layers = set(config.layers or ())
    asked_roles = set(config.roles or ())
    for entry in config.skip:
        role, layers = parse_skip(entry)
        asked_layers |= layers or set()
        if role:
            asked_roles.add(role)
    missing = sorted(asked_layers - present_layers)
    if missing:
        raise ActsparseError(
            f"decoder layer {', '.join(map(str, missing[:5]))} does not exist: the model has {count} decoder layers "
            f"({_span(present_layers)}); fix the layer indices of --layers / --skip"
        )
    absent = sorted(asked_roles - present_roles)
    if absent:
        raise ActsparseError(
            f"role {', '.join(absent)} is not in this model (its decoder layers have: {', '.join(sorted(present_roles))}); "
            "fix --roles / --skip (see `actsparse layers --model ...`)"
        )
    chosen = [s for s in sites if config.selects(s.role, s.layer)]
    if not chosen and not pattern.is_dense:
        parts = [f"{key} {getattr(config, key)}" for key in ("roles", "layers", "skip") if getattr(config, key)]
        raise ActsparseError(
            f"the selection ({', '.join(parts) or 'every role'}) leaves no linear layer to {what}, so the run would measure the "
            "dense model; select at least one layer"
        )
    allocation = getattr(config, "allocation", None)
    if resolved and allocation == "sensitivity":
        raise ActsparseError(
            "allocation 'sensitivity' is not resolved yet: measure it on calibration text first "
            "(actsparse.allocate(model, config, calib_windows) gives the config with its per-layer map)"
        )
    if isinstance(allocation, tuple):
        selected = {(s.role, s.layer) for s in chosen}
        for key, _ in allocation:
            if parse_site_key(key) not in selected:
                raise ActsparseError(
                    f"allocation names {key}, which is not a selected linear layer of this model; "
                    "fix the map's keys (ROLE@LAYER of the layers --roles/--layers/--skip select)"
                )
        chosen = [s for s in chosen if not config.pattern_of(s.role, s.layer).is_dense]
    for site in chosen:
        if not pattern.fits(site.in_features):
            same = sorted({s.in_features for s in chosen if s.role == site.role})
            pattern.check_width(site.in_features, layer=site.name, role=site.role, widths=same)
    return chosen
