"""The checks that ``eval``, ``calibrate`` and ``export`` make before a model's weights load."""

from __future__ import annotations

from dataclasses import replace

from actsparse.baselines import WeightPruneConfig, get_pruner
from actsparse.calibration.mitigations import is_calibrated
from actsparse.cli.options import allocation_from, given, settings_from
from actsparse.core.patterns import parse_pattern
from actsparse.data.sources import check_disjoint, load_text
from actsparse.errors import ActsparseError
from actsparse.models.discovery import find_linear_sites
from actsparse.models.loading import model_skeleton
from actsparse.selection import choose_sites

STATE_FIXES = (
    "pattern",
    "criterion",
    "mitigation",
    "roles",
    "layers",
    "skip",
    "seed",
    "prefill_only",
    "allocation",
    "sensitivity",
)  # from the state's config
STATE_REFUSES = ("calib_data", "calib_windows", "prune", "method")  # its calibration is done


def needs_calibration(config) -> bool:
    """Whether ``config`` (a ``SparsityConfig`` or ``WeightPruneConfig``) reads calibration text."""
    if isinstance(config, WeightPruneConfig):
        return get_pruner(config.method).needs_calibration
    return (
        config.criterion_obj.needs_calibration
        or config.mitigation_obj.needs_calibration
        or is_calibrated(config.mitigation)
        or not config.resolved  # allocation="sensitivity" is measured on the calibration text
    )


def preflight(args, config, calibrated: bool | None = None):
    """Every check that needs no weights, before the model loads: the settings, the texts (and that
    they share nothing, when calibration text is used or was given), and ``config`` against the
    model's layers as built from its config (no weights). Returns the model skeleton (or None)."""
    settings = settings_from(args)
    settings.resolved_device()
    evaluation = load_text(settings.data)
    calibrated = needs_calibration(config) if calibrated is None else calibrated
    if calibrated or "calib_data" in given(args):
        check_disjoint(evaluation, load_text(settings.calib_data))
    skeleton = model_skeleton(settings.model)
    if skeleton is not None and config is not None:
        what = "prune" if isinstance(config, WeightPruneConfig) else "sparsify"
        choose_sites(config, find_linear_sites(skeleton), what=what)
    return skeleton


def _same(key: str, typed, saved) -> bool:
    if key == "pattern":
        return str(parse_pattern(typed)) == str(parse_pattern(saved))
    if key == "allocation":
        typed = allocation_from(typed)
        if isinstance(typed, str) or isinstance(saved, str):
            return typed == saved
        return {k: str(parse_pattern(v)) for k, v in dict(typed).items()} == dict(saved)
    if key in ("roles", "layers", "skip"):
        return (None if typed is None else set(typed)) == (None if saved is None else set(saved))
    return typed == saved


def check_state_options(args, config):
    """With ``eval --state``: every sparsity option typed must agree with the state's config (whatever
    its value); calibration options are refused. Returns the config to apply (``--backend`` honoured)."""
    typed = given(args)
    for key in STATE_REFUSES:
        if key in typed:
            option = "--" + key.replace("_", "-")
            raise ActsparseError(
                f"{option} cannot be combined with --state: the state's calibration is done and fixes it; drop {option}"
            )
    for key in STATE_FIXES:
        if key in typed and not _same(key, getattr(args, key), getattr(config, key)):
            option = "--" + key.replace("_", "-")
            raise ActsparseError(
                f"{option} {getattr(args, key)!r} given, but the state in {args.state} was calibrated with {key} {getattr(config, key)!r}; "
                f"drop {option} (eval --state applies the state's own config) or calibrate a state for it"
            )
    if "backend" in typed:
        config = replace(config, backend=args.backend)
    return config
