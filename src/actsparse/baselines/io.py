"""Save the pruned linear weights of a model, and apply them to a fresh copy of it.

A saved directory (``artifacts.SavedDirectory``, the format calibrated states use too) holds
``pruned_weights.safetensors`` (the pruned layers' weights, keyed by module name, in the
model's storage layout and dtype) and ``actsparse_pruned.json`` (the format marker, the
config, the model's fingerprint, each layer's shape and pattern, the package versions, the
sha256 and size of the weights file and ``meta_sha256`` over the JSON itself). The two
files are written into the directory (other files there are left alone), the JSON last, so
a directory without it is incomplete. Version 1 directories (no checksums, a shorter
fingerprint) still load, unchecked as before.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from actsparse.artifacts import SavedDirectory, model_fingerprint
from actsparse.baselines.config import WeightPruneConfig
from actsparse.baselines.prune import RECORD_ATTR, WeightPruneReport, note_pruning_
from actsparse.baselines.verify import verify_pattern
from actsparse.errors import ActsparseError

WEIGHTS_FILE = "pruned_weights.safetensors"
META_FILE = "actsparse_pruned.json"
FORMAT = "actsparse-pruned-weights"
FORMAT_VERSION = 2  # 2: the JSON and the weights file checksummed, the full model fingerprint
DIRECTORY = SavedDirectory(
    marker=FORMAT,
    manifest=META_FILE,
    tensors=WEIGHTS_FILE,
    version=FORMAT_VERSION,
    unchecked=(1,),
    kind="pruned-weights",
    written_by="actsparse.save_pruned",
    subject="pruned weights",
    plural=True,
    listing="layers",
    again="save the pruned weights again",
    bad_json="it was not written by actsparse.save_pruned",
    home="load them into the model they were pruned from",
    replace=False,
)


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
    tensors = {name: model.get_submodule(name).weight.detach().cpu().contiguous() for name in layers}
    meta = {
        "config": config,
        "model": model_fingerprint(model),
        "layers": {
            name: {
                "shape": list(t.shape),
                "dtype": str(t.dtype).removeprefix("torch."),
                "pattern": layers[name],
                "density": t.count_nonzero().item() / t.numel(),
            }
            for name, t in tensors.items()
        },  # fmt: skip
    }
    return DIRECTORY.write(directory, tensors, meta)


@torch.no_grad()
def load_pruned_(model: nn.Module, directory: str | Path, *, check_model: bool = True) -> WeightPruneConfig:
    """Apply pruned weights saved by ``save_pruned`` to ``model`` (the same dense model), in place.

    Refuses, before changing anything, a directory that is not such a save, a model of another
    architecture, any missing layer or shape mismatch, and a different checkpoint (another
    parameter count or other input embeddings; skip this check with ``check_model=False``). Weights are cast to
    the model's dtype. Returns the config they were pruned with.
    """
    directory = Path(directory)
    meta = DIRECTORY.read_manifest(directory)
    saved, here = meta["model"], model_fingerprint(model)
    DIRECTORY.check_architecture(saved, here, directory)
    tensors = DIRECTORY.read_tensors(directory, meta)
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
    if check_model:
        DIRECTORY.check_checkpoint(saved, here, directory)
    for weight, tensor in targets.values():
        weight.copy_(tensor.to(weight.dtype))
    config = WeightPruneConfig.from_dict(meta["config"])
    record = getattr(model, RECORD_ATTR, None) or {"layers": {}}
    record["layers"].update({name: info["pattern"] for name, info in meta["layers"].items()})
    record["config"] = config.to_dict()
    note_pruning_(model, record)
    verify_pattern(model, names=list(tensors))
    return config
