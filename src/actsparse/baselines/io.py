"""Save the pruned linear weights of a model, and apply them to a fresh copy of it.

A saved directory holds ``pruned_weights.safetensors`` (the pruned layers' weights, keyed by
module name, in the model's storage layout and dtype) and ``actsparse_pruned.json`` (the
format marker, the config, the model's identity, each layer's shape and pattern, and the
package versions). The JSON is written last, so a directory without it is incomplete.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from actsparse.artifacts import versions, write_json_atomic
from actsparse.baselines.config import WeightPruneConfig
from actsparse.baselines.prune import RECORD_ATTR, WeightPruneReport, note_pruning_
from actsparse.baselines.verify import verify_pattern
from actsparse.errors import ActsparseError

WEIGHTS_FILE = "pruned_weights.safetensors"
META_FILE = "actsparse_pruned.json"
FORMAT = "actsparse-pruned-weights"
FORMAT_VERSION = 1


def _identity(model: nn.Module) -> dict:
    """What a model must match to take these weights: its class, type and a fingerprint of its embeddings."""
    embed = model.get_input_embeddings().weight.detach().double()
    return {
        "architecture": type(model).__name__,
        "model_type": getattr(model.config, "model_type", None),
        "num_params": sum(p.numel() for p in model.parameters()),
        "embedding_mean": embed.mean().item(),
        "embedding_abs_mean": embed.abs().mean().item(),
    }


@torch.no_grad()
def save_pruned(model: nn.Module, directory: str | Path, report: WeightPruneReport | None = None) -> Path:
    """Write the pruned linear weights of ``model`` and a JSON description into ``directory``.

    The layers and config come from ``report``, else from what ``prune_weights_`` recorded on the model.
    """
    record = getattr(model, RECORD_ATTR, None)
    if report is not None:
        layers = {s.name: report.config.pattern for s in report.pruned}
        config = report.config.to_dict()
    elif record:
        layers, config = dict(record["layers"]), record["config"]
    else:
        raise ActsparseError(
            "model has no pruned weights to save; prune it with actsparse.prune_weights_ first (or pass report=)"
        )
    if not layers:
        raise ActsparseError("no layer was pruned, nothing to save")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: model.get_submodule(name).weight.detach().cpu().contiguous() for name in layers}
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{WEIGHTS_FILE}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": FORMAT})
        os.replace(tmp, directory / WEIGHTS_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": config,
        "model": _identity(model),
        "layers": {
            name: {
                "shape": list(t.shape),
                "dtype": str(t.dtype).removeprefix("torch."),
                "pattern": layers[name],
                "density": t.count_nonzero().item() / t.numel(),
            }
            for name, t in tensors.items()
        },  # fmt: skip
        "versions": versions(),
    }
    write_json_atomic(directory / META_FILE, meta)
    return directory


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-3, abs_tol=1e-6)


@torch.no_grad()
def load_pruned_(model: nn.Module, directory: str | Path, *, check_model: bool = True) -> WeightPruneConfig:
    """Apply pruned weights saved by ``save_pruned`` to ``model`` (the same dense model), in place.

    Refuses, before changing anything, a directory that is not such a save, a model of another
    architecture, any missing layer or shape mismatch, and a different checkpoint (another
    parameter count or other input embeddings; skip this check with ``check_model=False``). Weights are cast to
    the model's dtype. Returns the config they were pruned with.
    """
    directory = Path(directory)
    meta_path, weights_path = directory / META_FILE, directory / WEIGHTS_FILE
    if not meta_path.is_file() or not weights_path.is_file():
        raise ActsparseError(
            f"{directory} is not a pruned-weights directory written by actsparse.save_pruned (needs {META_FILE} and {WEIGHTS_FILE})"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ActsparseError(f"{meta_path} is not valid JSON ({error}); it was not written by actsparse.save_pruned") from error
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ActsparseError(f"{meta_path} is not an actsparse pruned-weights description (format is not '{FORMAT}')")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ActsparseError(
            f"{meta_path} has format version {meta.get('format_version')}; this actsparse reads version {FORMAT_VERSION}"
        )
    saved, here = meta["model"], _identity(model)
    for key in ("architecture", "model_type"):
        if saved.get(key) != here[key]:
            raise ActsparseError(
                f"pruned weights in {directory} are for a different model: {key} is {saved.get(key)!r} there, {here[key]!r} here"
            )
    try:
        tensors = load_file(weights_path)
    except (SafetensorError, OSError) as error:
        raise ActsparseError(f"cannot read {weights_path} ({error}); save the pruned weights again") from error
    if set(tensors) != set(meta["layers"]):
        raise ActsparseError(
            f"{weights_path} and {meta_path} do not list the same layers; the directory is damaged, save it again"
        )
    targets = {}
    for name, tensor in tensors.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ActsparseError(f"pruned weights in {directory} have layer {name}, which this model does not have") from None
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.shape != tensor.shape:
            shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else None
            raise ActsparseError(f"layer {name} has weight shape {shape} in this model but {tuple(tensor.shape)} in {directory}")
        targets[name] = (weight, tensor)
    same = (
        saved.get("num_params") == here["num_params"]
        and _close(saved["embedding_mean"], here["embedding_mean"])
        and _close(saved["embedding_abs_mean"], here["embedding_abs_mean"])
    )
    if check_model and not same:
        raise ActsparseError(
            f"pruned weights in {directory} come from a different checkpoint of {here['architecture']} (its parameter count or input "
            "embeddings differ); load them into the model they were pruned from, or pass check_model=False"
        )
    for weight, tensor in targets.values():
        weight.copy_(tensor.to(weight.dtype))
    config = WeightPruneConfig.from_dict(meta["config"])
    record = getattr(model, RECORD_ATTR, None) or {"layers": {}}
    record["layers"].update({name: info["pattern"] for name, info in meta["layers"].items()})
    record["config"] = config.to_dict()
    note_pruning_(model, record)
    verify_pattern(model, names=list(tensors))
    return config
