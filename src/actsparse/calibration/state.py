"""Save a calibrated sparse model's mitigation state, and apply it to a fresh copy of the model.

A state directory holds ``calibrated_state.safetensors`` (every tensor a mitigation owns,
keyed ``<module name>.<tensor name>``, float32 or the model's dtype) and
``actsparse_state.json``: the format marker, the ``SparsityConfig``, the calibration
(text, windows, options, per-layer MSE, a sample of the calibration text's fingerprints),
the model's identity (architecture, model type, parameter count, embedding fingerprint),
every tensor's shape and dtype, the package versions, the sha256 and size of the
safetensors file, and ``meta_sha256``: the sha256 of the JSON's own content (everything
but that field, as compact sorted JSON), so a hand-edited description is refused like an
altered tensor file. The directory is written whole into a temporary directory beside the
target and renamed into place. The format is ``artifacts.SavedDirectory`` (``DIRECTORY``), the
identity ``artifacts.model_fingerprint``: both shared with pruned weights (``baselines/io.py``).

``read_state_meta(dir)`` checks the format and both checksums without a model, so a damaged
or edited state is refused before any model loads. ``check_state(model, dir)`` adds the
model identity, also without changing anything. ``load_state_(model, dir)`` runs both, then
``sparsify_`` with the saved config and copies the tensors in (refusing any missing name or
shape mismatch, leaving the model dense on failure).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from actsparse.artifacts import SavedDirectory, manifest_digest, model_fingerprint
from actsparse.calibration.layerwise import CALIBRATION_ATTR, CalibrationOptions, CalibrationReport
from actsparse.calibration.mitigations import CovarianceStats, ensure_mitigation, own_feature_vector
from actsparse.config import SparsityConfig
from actsparse.data.sources import TextSource, check_disjoint
from actsparse.errors import ActsparseError
from actsparse.models.discovery import find_linear_sites
from actsparse.sparsify import sparse_layers, sparsify_, unsparsify_

TENSORS_FILE = "calibrated_state.safetensors"
META_FILE = "actsparse_state.json"
FORMAT = "actsparse-calibrated-state"
FORMAT_VERSION = 2  # 2: meta_sha256 covers the JSON itself
DIRECTORY = SavedDirectory(
    marker=FORMAT,
    manifest=META_FILE,
    tensors=TENSORS_FILE,
    version=FORMAT_VERSION,
    kind="calibrated-state",
    written_by="actsparse calibrate",
    subject="state",
    listing="tensors",
    again="calibrate again",
    bad_json="write the state again",
    home="load it into the model it was calibrated on",
    version_note=" (whose description is checksummed too); calibrate the state again",
)

meta_digest = manifest_digest  # the old name


def _owned(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{"<module>.<name>": tensor}`` of every mitigation-owned tensor of every SparseLinear: the
    tensors of its ``mitigation_state``, keyed by the layer's name (``….down_proj.eta``)."""
    return {
        f"{name}.{key}": tensor
        for name, layer in sparse_layers(model).items()
        for key, tensor in layer.mitigation_state.tensors().items()
    }


def uncalibrated(model: nn.Module) -> list[str]:
    """The names of the sparse layers whose mitigation state still waits to be fitted."""
    return [name for name, layer in sparse_layers(model).items() if not layer.calibrated]


def model_identity(model: nn.Module) -> dict:
    """``artifacts.model_fingerprint`` of the model, its mitigation parameters not counted."""
    return model_fingerprint(model, exclude=_owned(model).values())


@torch.no_grad()
def save_state(model: nn.Module, directory: str | Path, *, calibration: dict | None = None) -> Path:
    """Write the calibrated mitigation state of a sparsified ``model`` into ``directory`` (atomically).

    ``calibration``: extra description (e.g. the calibration text); the report of
    ``calibrate_`` is added when the model was calibrated by it.
    """
    layers = sparse_layers(model)
    if not layers:
        raise ActsparseError("model is not sparsified; calibrate it with actsparse.calibrate_ (or sparsify_) first")
    waiting = uncalibrated(model)
    if waiting:
        raise ActsparseError(
            f"{len(waiting)} sparse layers are not calibrated (e.g. {waiting[0]}); run actsparse.calibrate_ first"
        )
    report = getattr(model, CALIBRATION_ATTR, None)
    first = next(iter(layers.values()))
    if report is not None:
        config = report.config
    else:
        raise ActsparseError("model was not calibrated by actsparse.calibrate_ (or loaded by load_state_); its config is unknown")
    if first.mitigation.name != config.mitigation:
        raise ActsparseError("the model's sparse layers do not match the config it was calibrated with; calibrate it again")
    tensors = {key: t.detach().cpu().contiguous() for key, t in _owned(model).items()}
    meta = {
        "config": config.to_dict(),
        "calibration": {**(report.to_dict() if report is not None else {}), **(calibration or {})},
        "model": model_identity(model),
        "tensors": {key: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")} for key, t in tensors.items()},
        "layers": sorted(layers),
    }
    return DIRECTORY.write(directory, tensors, meta)


def read_state_meta(directory: str | Path, verify: bool = True) -> dict:
    """The JSON description of a state directory: format and its own checksum checked, and with
    ``verify`` the tensor file's size and sha256 and the config too (no model needed)."""
    meta = DIRECTORY.read_manifest(directory, verify=verify)
    if not verify:
        return meta
    try:
        state_config(meta)
    except (TypeError, KeyError, AttributeError) as error:
        raise ActsparseError(f"{Path(directory) / META_FILE} holds no valid config ({error}); calibrate again") from error
    return meta


def check_state_text(meta: dict, evaluation) -> None:
    """Refuse evaluation text (a ``TextSource``) that overlaps the state's calibration text: by the
    recorded parts, and by content where the state keeps its calibration text's fingerprints."""
    calib = meta.get("calibration", {})
    sample = frozenset(int(f, 16) for f in calib["fingerprints"]) if calib.get("fingerprints") else None
    check_disjoint(
        evaluation, TextSource(calib.get("data", "?"), "", frozenset(calib.get("data_parts") or ())), calib_sample=sample
    )


def state_config(meta: dict) -> SparsityConfig:
    raw = dict(meta["config"])
    ensure_mitigation(raw.get("mitigation", "none"))
    for key in ("roles", "layers", "skip"):
        if raw.get(key) is not None:
            raw[key] = tuple(raw[key])
    return SparsityConfig(**raw)


def check_state(model: nn.Module, directory: str | Path, *, check_model: bool = True) -> dict:
    """The state's description, after every check that needs no change to ``model``: format, both
    checksums, the config, and that ``model`` is the architecture (and with ``check_model`` the
    checkpoint) it was calibrated on."""
    directory = Path(directory)
    meta = read_state_meta(directory)
    saved, here = meta["model"], model_identity(model)
    DIRECTORY.check_architecture(saved, here, directory)
    if check_model:
        DIRECTORY.check_checkpoint(saved, here, directory)
    return meta


@torch.no_grad()
def load_state_(
    model: nn.Module,
    directory: str | Path,
    *,
    expect: SparsityConfig | None = None,
    check_model: bool = True,
    backend: str | None = None,
) -> SparsityConfig:
    """Sparsify ``model`` with a saved state's config and load its calibrated tensors, in place.

    Refuses, before changing anything, a directory that is not a state, a file whose sha256
    differs from the recorded one (truncated or altered), a model of another architecture or
    checkpoint (``check_model=False`` skips the checkpoint check), and with ``expect`` a
    state whose pattern, criterion or mitigation differs; then any missing tensor or shape
    mismatch (the model is left dense). ``backend``: run the sparse layers with this backend
    instead of the saved one (the numbers do not depend on it). Returns the config applied.
    """
    directory = Path(directory)
    meta = check_state(model, directory, check_model=check_model)
    config = state_config(meta)
    if backend is not None:
        config = replace(config, backend=backend)
    if expect is not None:
        for key in ("pattern", "criterion", "mitigation"):
            if getattr(expect, key) != getattr(config, key):
                raise ActsparseError(
                    f"state in {directory} was calibrated for {key} {getattr(config, key)!r}, not {getattr(expect, key)!r}; "
                    "calibrate a state for this config (actsparse calibrate)"
                )
    if sparse_layers(model):
        raise ActsparseError("model is already sparsified; call actsparse.unsparsify_(model) first")
    tensors = DIRECTORY.read_tensors(directory, meta)
    apply_state_(model, config, tensors, meta.get("calibration", {}), where=f"state in {directory}")
    return config


@torch.no_grad()
def apply_state_(
    model: nn.Module, config: SparsityConfig, tensors: dict[str, torch.Tensor], calibration: dict, *, where: str
) -> None:
    """Sparsify a dense ``model`` with ``config`` and copy in the mitigation-owned ``tensors``
    (``{"<module>.<name>": tensor}``), refusing a missing name or a shape mismatch (the model
    is left dense then); ``calibration`` is the recorded calibration report. ``where`` names
    the source in errors."""
    # empty statistics: the mitigations build placeholders of the right shapes, filled below
    placeholders = {s.name: CovarianceStats(s.in_features) for s in find_linear_sites(model) if config.selects(s.role, s.layer)}
    sparsify_(model, config, stats=placeholders)
    for layer in sparse_layers(model).values():
        own_feature_vector(layer)  # as calibrate_ does: a clact state holds its channel norms
    try:
        owned = _owned(model)
        if set(owned) != set(tensors):
            missing = sorted(set(owned) ^ set(tensors))
            raise ActsparseError(f"{where} does not fit this model's sparse layers (e.g. {missing[0]}); shapes or layers differ")
        for key, target in owned.items():
            if tuple(target.shape) != tuple(tensors[key].shape):
                raise ActsparseError(
                    f"tensor {key} has shape {tuple(tensors[key].shape)} in {where} but {tuple(target.shape)} in this model; "
                    "the state is for another model shape"
                )
        for key, target in owned.items():
            target.copy_(tensors[key].to(dtype=target.dtype, device=target.device))
        for layer in sparse_layers(model).values():
            layer.calibrated = True
    except BaseException:
        unsparsify_(model)
        raise
    calib = calibration or {}
    options = (
        CalibrationOptions(**{k: tuple(v) if k == "betas" else v for k, v in calib.get("options", {}).items()})
        if calib.get("options")
        else CalibrationOptions()
    )
    report = CalibrationReport(config, options, calib.get("windows", 0), calib.get("seqlen", 0), calib.get("seconds", 0.0))
    report.layers = {int(k): v for k, v in calib.get("layers", {}).items()}
    setattr(model, CALIBRATION_ATTR, report)
