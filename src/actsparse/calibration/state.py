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
target and renamed into place.

``read_state_meta(dir)`` checks the format and both checksums without a model, so a damaged
or edited state is refused before any model loads. ``check_state(model, dir)`` adds the
model identity, also without changing anything. ``load_state_(model, dir)`` runs both, then
``sparsify_`` with the saved config and copies the tensors in (refusing any missing name or
shape mismatch, leaving the model dense on failure).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from actsparse.artifacts import sha256_file, versions
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


def meta_digest(meta: dict) -> str:
    """sha256 of a state description without its ``meta_sha256`` field, as compact sorted JSON."""
    body = {key: value for key, value in meta.items() if key != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


_sha256 = sha256_file


def _owned(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{"<module>.<name>": tensor}`` of every mitigation-owned tensor of every SparseLinear."""
    owned = {}
    for name, layer in sparse_layers(model).items():
        for attr in getattr(layer, "state_names", ()):
            owned[f"{name}.{attr}"] = getattr(layer, attr)
    return owned


def model_identity(model: nn.Module) -> dict:
    """Architecture, model type, parameter count (mitigation parameters excluded) and an embedding fingerprint."""
    embed = model.get_input_embeddings().weight.detach().double()
    extra = sum(t.numel() for t in _owned(model).values() if isinstance(t, nn.Parameter))
    return {
        "architecture": type(model).__name__,
        "model_type": getattr(getattr(model, "config", None), "model_type", None),
        "num_params": sum(p.numel() for p in model.parameters()) - extra,
        "embedding_shape": list(embed.shape),
        "embedding_mean": embed.mean().item(),
        "embedding_abs_mean": embed.abs().mean().item(),
        "embedding_sq_mean": embed.square().mean().item(),
    }


def _close(a, b) -> bool:
    return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-3, abs_tol=1e-6)


@torch.no_grad()
def save_state(model: nn.Module, directory: str | Path, *, calibration: dict | None = None) -> Path:
    """Write the calibrated mitigation state of a sparsified ``model`` into ``directory`` (atomically).

    ``calibration``: extra description (e.g. the calibration text); the report of
    ``calibrate_`` is added when the model was calibrated by it.
    """
    layers = sparse_layers(model)
    if not layers:
        raise ActsparseError("model is not sparsified; calibrate it with actsparse.calibrate_ (or sparsify_) first")
    uncalibrated = [
        name for name, layer in layers.items() if getattr(layer, "state_names", ()) and not getattr(layer, "calibrated", True)
    ]
    if uncalibrated:
        raise ActsparseError(
            f"{len(uncalibrated)} sparse layers are not calibrated (e.g. {uncalibrated[0]}); run actsparse.calibrate_ first"
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
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.", suffix=".tmp"))
    try:
        path = tmp / TENSORS_FILE
        save_file(tensors, str(path), metadata={"format": FORMAT})
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "config": config.to_dict(),
            "calibration": {**(report.to_dict() if report is not None else {}), **(calibration or {})},
            "model": model_identity(model),
            "tensors": {
                key: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")} for key, t in tensors.items()
            },
            "layers": sorted(layers),
            "sha256": _sha256(path),
            "bytes": path.stat().st_size,
            "versions": versions(),
        }
        meta = json.loads(json.dumps(meta))  # as it will read back (tuples as lists), before it is hashed
        meta["meta_sha256"] = meta_digest(meta)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        for name in (TENSORS_FILE, META_FILE):
            os.chmod(tmp / name, 0o666 & ~umask)
        old = None
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old.{os.getpid()}")
            os.replace(directory, old)
        os.replace(tmp, directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def read_state_meta(directory: str | Path, verify: bool = True) -> dict:
    """The JSON description of a state directory: format and its own checksum checked, and with
    ``verify`` the tensor file's size and sha256 and the config too (no model needed)."""
    directory = Path(directory)
    meta_path, tensors_path = directory / META_FILE, directory / TENSORS_FILE
    if not meta_path.is_file() or not tensors_path.is_file():
        raise ActsparseError(
            f"{directory} is not a calibrated-state directory written by actsparse calibrate (needs {META_FILE} and {TENSORS_FILE})"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ActsparseError(f"{meta_path} is not valid JSON ({error}); write the state again") from error
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ActsparseError(f"{meta_path} is not an actsparse calibrated-state description (format is not '{FORMAT}')")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ActsparseError(
            f"{meta_path} has format version {meta.get('format_version')}; this actsparse reads version {FORMAT_VERSION} "
            "(whose description is checksummed too); calibrate the state again"
        )
    if meta.get("meta_sha256") != meta_digest(meta):
        raise ActsparseError(
            f"{meta_path} does not match its own checksum (meta_sha256): the description was altered; calibrate again"
        )
    if not verify:
        return meta
    if tensors_path.stat().st_size != meta.get("bytes") or _sha256(tensors_path) != meta.get("sha256"):
        raise ActsparseError(
            f"{tensors_path} does not match the checksum recorded in {META_FILE} (truncated or altered); calibrate again"
        )
    try:
        state_config(meta)
    except (TypeError, KeyError, AttributeError) as error:
        raise ActsparseError(f"{meta_path} holds no valid config ({error}); calibrate again") from error
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
    for key in ("architecture", "model_type"):
        if saved.get(key) != here[key]:
            raise ActsparseError(
                f"state in {directory} is for a different model: {key} is {saved.get(key)!r} there, {here[key]!r} here"
            )
    same = (
        saved.get("num_params") == here["num_params"] and saved.get("embedding_shape") == here["embedding_shape"]
        and all(_close(saved.get(k), here[k]) for k in ("embedding_mean", "embedding_abs_mean", "embedding_sq_mean"))
    )  # fmt: skip
    if check_model and not same:
        raise ActsparseError(
            f"state in {directory} comes from a different checkpoint of {here['architecture']} (its parameter count or input "
            "embeddings differ); load it into the model it was calibrated on, or pass check_model=False"
        )
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
    tensors_path = directory / TENSORS_FILE
    try:
        tensors = load_file(tensors_path)
    except (SafetensorError, OSError) as error:
        raise ActsparseError(f"cannot read {tensors_path} ({error}); calibrate again") from error
    if set(tensors) != set(meta["tensors"]):
        raise ActsparseError(f"{tensors_path} and {META_FILE} do not list the same tensors; the directory is damaged")
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
            if getattr(layer, "state_names", ()):
                layer.calibrated = True
                if "feature_vector" in layer.state_names:
                    layer.feature_vector = layer.feature_vector
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
