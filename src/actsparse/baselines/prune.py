"""``prune_weights_(model, config, calib_windows)``: sequential, layer-by-layer weight pruning.

How the calibration inputs are produced (Wanda and SparseGPT; magnitude needs none):

1. One normal forward of the first calibration window records, with forward pre-hooks
   (``with_kwargs=True``), the exact extra arguments every decoder layer receives
   (position embeddings, attention masks, cache positions ... whatever the architecture
   passes, including Gemma-3's per-layer sliding/global masks). A second window's forward
   checks that these arguments do not depend on the tokens (all windows have the same
   length and no padding); the other windows stop at decoder layer 0 (an exception raised
   from the hook), so only layer 0's inputs are computed by the model itself.
2. For each decoder layer in order, its linear layers are pruned in sub-blocks, in the
   order of the forward pass: attention input projections (q, k, v / fused qkv), then o,
   then the MLP input projections (gate, up / fused gate_up), then down. Before each
   sub-block the decoder layer is re-run on the stored inputs with hooks on that sub-block
   only (the run stops as soon as the sub-block's inputs are seen), so the calibration
   inputs of o, say, already come from the pruned q/k/v ("true sequential"). Layers that
   share an input tensor (q/k/v, gate/up) share one set of statistics.
3. The pruned decoder layer then runs on the stored inputs to give the next layer's inputs,
   so every layer is calibrated on the outputs of the already pruned layers before it.

Memory: the inputs of one decoder layer for all windows (kept on ``cache_device``, CPU by
default) plus the statistics of one sub-block (one ``K x K`` Hessian for SparseGPT).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from actsparse.artifacts import versions
from actsparse.baselines.config import WeightPruneConfig
from actsparse.baselines.methods import LayerInputs, get_pruner
from actsparse.errors import ActsparseError
from actsparse.models.discovery import LinearSite, find_decoder_layers, find_linear_sites
from actsparse.models.placement import input_device, keep_onloaded_, layer_device, onloaded
from actsparse.modules import is_conv1d
from actsparse.pipeline import (  # noqa: F401
    REPLAY_BATCH,
    _as_windows,
    _batches,
    _LayerCall,
    _same,
    _split_call,
    _Stop,
    as_windows,
    capture_layer_inputs,
)
from actsparse.selection import choose_sites
from actsparse.sparsify import sparse_layers

RECORD_ATTR = "_actsparse_weight_pruning"  # set on a model by prune_weights_ / load_pruned_
CONFIG_KEY = "actsparse_weight_pruning"  # the same record in a transformers model's config: save_pretrained writes it


def note_pruning_(model: nn.Module, record: dict) -> None:
    """Record what was pruned on the model, and on its transformers config (so that a plain
    ``save_pretrained`` checkpoint says which layers hold which weight pattern)."""
    setattr(model, RECORD_ATTR, record)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        setattr(config, CONFIG_KEY, {"config": dict(record["config"]), "layers": dict(record["layers"]), "versions": versions()})


# Order of the sub-blocks inside a decoder layer.
STAGE = {"q": 0, "k": 0, "v": 0, "qkv": 0, "o": 1, "gate": 2, "up": 2, "gate_up": 2, "down": 3}


@dataclass(frozen=True)
class WeightPruneReport:
    """What ``prune_weights_`` changed."""

    config: WeightPruneConfig
    pruned: tuple[LinearSite, ...]  # layers whose weights were pruned
    dense: tuple[LinearSite, ...]  # decoder linear layers left dense
    density: dict[str, float] = field(default_factory=dict)  # achieved density per pruned layer
    calib_windows: int = 0
    seconds: float = 0.0

    @property
    def pruned_flop_fraction(self) -> float:
        """Share of the decoder's linear-layer FLOPs that run in pruned layers (lm_head excluded)."""
        total = sum(s.flops_per_token for s in self.pruned + self.dense)
        return sum(s.flops_per_token for s in self.pruned) / total if total else 0.0

    @property
    def removed_flop_fraction(self) -> float:
        """Share of the decoder's linear-layer FLOPs that multiply a zeroed weight."""
        total = sum(s.flops_per_token for s in self.pruned + self.dense)
        removed = sum(s.flops_per_token * (1.0 - self.density[s.name]) for s in self.pruned)
        return removed / total if total else 0.0

    def to_dict(self) -> dict:
        """Same keys as ``SparsifyReport.to_dict`` (so records compare), plus the pruning details."""
        return {
            "sparse_layers": len(self.pruned),
            "dense_layers": len(self.dense),
            "sparse_flop_fraction": self.pruned_flop_fraction,
            "sparse_roles": sorted({s.role for s in self.pruned}),
            "unrecognised_layers": [s.name for s in self.dense if s.role is None],
            "density": 1.0 - self.removed_flop_fraction,  # FLOP-weighted share of weights kept, as SparsifyReport's
            "layer_patterns": {str(self.config.pattern): len(self.pruned)} if self.pruned else {},
            "removed_flop_fraction": self.removed_flop_fraction,
            "layer_density": dict(self.density),
            "prune_seconds": self.seconds,
            "calib_windows_used": self.calib_windows,
        }


# ---- weights as [out, in] -------------------------------------------------------------------


def get_weight(module: nn.Module) -> torch.Tensor:
    """The weight as ``[out, in]`` (a view) whatever the storage layout (Linear or GPT-2 Conv1D)."""
    return module.weight.t() if is_conv1d(module) else module.weight


@torch.no_grad()
def set_weight_(module: nn.Module, weight: torch.Tensor) -> None:
    """Write an ``[out, in]`` weight into the module's own parameter, in its dtype and layout."""
    get_weight(module).copy_(weight.to(module.weight.dtype))


@torch.no_grad()
def _collect(
    layer: nn.Module, call: _LayerCall, inputs: list[torch.Tensor], modules: dict[str, nn.Module], need: str, device
) -> dict[str, LayerInputs]:
    """Statistics of the inputs of ``modules`` (one sub-block of ``layer``) over all stored inputs."""
    stats: dict[str, LayerInputs] = {}
    leader: dict[str, bool] = {}
    seen: list[tuple[str, torch.Tensor]] = []

    def hook(name):
        def fn(module, args, kwargs):
            x = args[0] if args else kwargs["input"]
            if name not in stats:  # first forward: share statistics between layers fed the same tensor
                twin = next((other for other, tensor in seen if tensor is x), None)
                stats[name] = stats[twin] if twin else LayerInputs(x.shape[-1], need, device)
                leader[name] = twin is None
            if leader[name]:
                stats[name].add(x)
            seen.append((name, x))
            if len(seen) >= len(modules):
                raise _Stop

        return fn

    handles = [module.register_forward_pre_hook(hook(name), with_kwargs=True) for name, module in modules.items()]
    try:
        for hidden in _batches(inputs, device):
            seen.clear()
            try:
                call.run(layer, hidden)
            except _Stop:
                pass
    finally:
        seen.clear()
        for handle in handles:
            handle.remove()
    missing = [name for name in modules if name not in stats or stats[name].tokens == 0]
    if missing:
        raise ActsparseError(f"linear layer {missing[0]} received no input when its decoder layer ran; cannot calibrate it")
    return stats


# ---- the entry point ------------------------------------------------------------------------


def selected_sites(model: nn.Module, config: WeightPruneConfig) -> tuple[list[LinearSite], list[LinearSite]]:
    """``(chosen, all)`` decoder linear sites for ``config``."""
    sites = find_linear_sites(model)
    return choose_sites(config, sites, what="prune"), sites


@torch.no_grad()
def prune_weights_(
    model: nn.Module,
    config: WeightPruneConfig | None = None,
    calib_windows: torch.Tensor | None = None,
    *,
    bos_id: int | None = None,
    progress: bool = True,
    cache_device: str | torch.device = "cpu",
) -> WeightPruneReport:
    """Prune the weights of the selected linear layers of ``model`` in place.

    ``calib_windows``: token ids ``[n, seqlen]`` from calibration text (never the evaluation
    text), needed by ``wanda`` and ``sparsegpt``; with ``bos_id`` each window is fed as
    BOS + window. ``cache_device`` holds one decoder layer's inputs for all windows.
    The original weights are not kept: copy them first to undo (``snapshot_weights``).
    """
    config = config or WeightPruneConfig()
    start = time.perf_counter()
    if sparse_layers(model):
        raise ActsparseError("model has activation-sparse layers; call actsparse.unsparsify_(model) before pruning weights")
    pattern = config.pattern_obj
    pruner = get_pruner(config.method)
    chosen, sites = selected_sites(model, config)
    for site in chosen:  # check every width before changing anything
        pattern.check_width(site.in_features)
    if pattern.is_dense or not chosen:
        return WeightPruneReport(config, (), tuple(sites), {}, 0, time.perf_counter() - start)

    density: dict[str, float] = {}

    def prune_site(site: LinearSite, inputs: LayerInputs | None) -> None:
        module = model.get_submodule(site.name)
        with onloaded(module):  # an offloaded layer: its weights on hand, the pruned ones kept (in CPU memory)
            pruned = pruner.prune(get_weight(module).float().clone(), inputs, pattern)
            set_weight_(module, pruned)
            density[site.name] = get_weight(module).count_nonzero().item() / get_weight(module).numel()
            keep_onloaded_(module)

    used = 0
    _, layers = find_decoder_layers(model)
    by_layer: dict[int, list[LinearSite]] = {}
    for site in chosen:
        by_layer.setdefault(site.layer, []).append(site)
    bar = tqdm(total=len(layers), desc=f"prune weights {config.method} {pattern}", unit="layer", disable=not progress)
    if not pruner.needs_calibration:
        for index in range(len(layers)):
            for site in by_layer.get(index, []):
                prune_site(site, None)
            bar.update(1)
    else:
        if calib_windows is None:
            raise ActsparseError(
                f"weight pruning method '{config.method}' needs calibration windows: pass calib_windows=[n, seqlen] token ids "
                "from calibration text (never the evaluation text)"
            )
        windows = _as_windows(calib_windows)
        used = len(windows)

        device = input_device(model)
        inputs, calls = capture_layer_inputs(model, windows, bos_id=bos_id, cache_device=cache_device)
        last = max(by_layer)
        model_device = device
        for index, layer in enumerate(layers):
            if index > last:
                break
            device = layer_device(layer, model_device)  # each decoder layer on its own device (device_map)
            for stage in sorted({STAGE.get(s.role, 99) for s in by_layer.get(index, [])}):
                group = [s for s in by_layer[index] if STAGE.get(s.role, 99) == stage]
                modules = {s.name: model.get_submodule(s.name) for s in group}
                stats = _collect(layer, calls[index], inputs, modules, pruner.needs, device)
                for site in group:
                    prune_site(site, stats[site.name])
                del stats
            if index < last:
                inputs = calls[index].run_all(layer, inputs, device, cache_device)
            bar.update(1)
    bar.close()

    record = getattr(model, RECORD_ATTR, None) or {"layers": {}}
    record["layers"].update({site.name: str(pattern) for site in chosen})
    record["config"] = config.to_dict()
    note_pruning_(model, record)
    chosen_names = {s.name for s in chosen}
    return WeightPruneReport(
        config, tuple(chosen), tuple(s for s in sites if s.name not in chosen_names), density, used, time.perf_counter() - start
    )


# ---- undo -----------------------------------------------------------------------------------


@torch.no_grad()
def snapshot_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the weight of every decoder linear layer, keyed by module name."""
    return {s.name: model.get_submodule(s.name).weight.detach().to("cpu", copy=True) for s in find_linear_sites(model)}


@torch.no_grad()
def restore_weights_(model: nn.Module, snapshot: dict[str, torch.Tensor], *, check: bool = True) -> int:
    """Copy the weights of ``snapshot`` back into the model; returns how many layers were restored."""
    for name, weight in snapshot.items():
        module = model.get_submodule(name)
        if module.weight.shape != weight.shape:
            raise ActsparseError(
                f"snapshot does not fit this model: {name} has shape {tuple(module.weight.shape)}, snapshot {tuple(weight.shape)}"
            )
        module.weight.copy_(weight)
        if check and not torch.equal(module.weight.detach().cpu(), weight):
            raise ActsparseError(f"restoring {name} failed: its weight differs from the snapshot")
    if hasattr(model, RECORD_ATTR):
        delattr(model, RECORD_ATTR)
    if hasattr(getattr(model, "config", None), CONFIG_KEY):
        delattr(model.config, CONFIG_KEY)
    return len(snapshot)
