"""Model surgery: ``sparsify_(model, config)`` swaps the targeted linear layers in place."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from actsparse.config import SparsityConfig
from actsparse.core.patterns import parse_pattern
from actsparse.core.shared_input import link_shared_input, unlink_shared_input
from actsparse.core.sparse_linear import SparseLinear
from actsparse.core.stats import InputStats
from actsparse.errors import ActsparseError
from actsparse.models.discovery import SHARED_INPUT_ROLES, LinearSite, find_linear_sites
from actsparse.models.placement import bridge_offload_, onloaded
from actsparse.modules import set_module
from actsparse.selection import choose_sites

SPARSITY_ATTR = "_actsparse_config"  # the SparsityConfig a model was sparsified with, set by sparsify_
CALIBRATION_ATTR = "_actsparse_calibration"  # set on a model by calibrate_ / load_state_

# (attach, detach) pairs called with the model after it is marked sparsified and after
# unsparsify_; actsparse.hf registers the one that gives transformers models the actsparse
# quantizer, so that this layer needs nothing above it.
MODEL_HOOKS: list[tuple[Callable[[nn.Module], None], Callable[[nn.Module], None]]] = []


def add_model_hook(attach: Callable[[nn.Module], None], detach: Callable[[nn.Module], None]) -> None:
    """Call ``attach(model)`` whenever a model is marked sparsified, ``detach(model)`` on ``unsparsify_`` (once per pair)."""
    if (attach, detach) not in MODEL_HOOKS:
        MODEL_HOOKS.append((attach, detach))


@dataclass(frozen=True)
class SparsifyReport:
    """What ``sparsify_`` changed."""

    sparse: tuple[LinearSite, ...]  # layers that now run sparse
    dense: tuple[LinearSite, ...]  # decoder linear layers left dense
    patterns: dict[str, str] = field(default_factory=dict)  # module name -> pattern, of the sparse layers

    @property
    def sparse_flop_fraction(self) -> float:
        """Fraction of the decoder's linear-layer FLOPs per token that run sparse (lm_head excluded)."""
        total = sum(s.flops_per_token for s in self.sparse + self.dense)
        return sum(s.flops_per_token for s in self.sparse) / total if total else 0.0

    @property
    def density(self) -> float:
        """FLOP-weighted share of the decoder's linear-layer inputs kept (dense layers count 1; lm_head excluded)."""
        total = sum(s.flops_per_token for s in self.sparse + self.dense)
        kept = sum(s.flops_per_token for s in self.dense)
        kept += sum(s.flops_per_token * parse_pattern(self.patterns.get(s.name, "dense")).density for s in self.sparse)
        return kept / total if total else 1.0

    @classmethod
    def of(cls, model: nn.Module, sites: list[LinearSite]) -> SparsifyReport:
        """The report of a model as it is now swapped: ``sites`` found before the swap."""
        layers = sparse_layers(model)
        return cls(
            tuple(s for s in sites if s.name in layers),
            tuple(s for s in sites if s.name not in layers),
            {name: str(layer.pattern) for name, layer in layers.items()},
        )

    def to_dict(self) -> dict:
        return {
            "sparse_layers": len(self.sparse),
            "dense_layers": len(self.dense),
            "sparse_flop_fraction": self.sparse_flop_fraction,
            "density": self.density,
            "layer_patterns": {p: sum(1 for v in self.patterns.values() if v == p) for p in sorted(set(self.patterns.values()))},
            "sparse_roles": sorted({s.role for s in self.sparse}),
            "unrecognised_layers": [s.name for s in self.dense if s.role is None],
        }


def sparse_layers(model: nn.Module) -> dict[str, SparseLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, SparseLinear)}


_set_module = set_module  # the old private name


def sparsify_(
    model: nn.Module,
    config: SparsityConfig | None = None,
    *,
    stats: dict[str, InputStats] | None = None,
) -> SparsifyReport:
    """Replace the selected linear layers of ``model`` by :class:`SparseLinear`, in place.

    ``stats`` maps module names to calibration statistics, needed by criteria and
    mitigations that say ``needs_calibration`` (see ``actsparse.collect_input_stats``).
    """
    config = config or SparsityConfig()
    if sparse_layers(model):
        raise ActsparseError("model is already sparsified; call actsparse.unsparsify_(model) first")
    pattern, criterion, mitigation = config.pattern_obj, config.criterion_obj, config.mitigation_obj
    sites = find_linear_sites(model)
    chosen = choose_sites(config, sites, resolved=True)  # refuses a selection of nothing, missing layers/roles, widths
    needs_stats = criterion.needs_calibration or mitigation.needs_calibration
    if needs_stats and not pattern.is_dense:
        missing = [s.name for s in chosen if not stats or s.name not in stats]
        if missing:
            raise ActsparseError(
                f"criterion '{criterion.name}' / mitigation '{mitigation.name}' need calibration statistics, "
                f"missing for {len(missing)} layers (e.g. {missing[0]}); collect them with "
                "actsparse.collect_input_stats(model, windows) and pass stats=..."
            )
    for index, site in enumerate(chosen):
        original = model.get_submodule(site.name)
        with onloaded(original):  # an offloaded layer's weights on hand while its buffers are computed
            layer = SparseLinear(
                original,
                config.pattern_of(site.role, site.layer),
                criterion,
                mitigation,
                name=site.name,
                stats=(stats or {}).get(site.name),
                seed=config.seed + index,
                backend=config.backend,
                prefill_only=config.prefill_only,
            )
        bridge_offload_(layer, original)
        set_module(model, site.name, layer)
    link_shared_inputs_(model, chosen)
    if chosen:
        mark_sparsified_(model, config)
    if pattern.is_dense:
        return SparsifyReport(sparse=(), dense=tuple(sites))
    return SparsifyReport.of(model, sites)


def link_shared_inputs_(model: nn.Module, sites: list[LinearSite]) -> None:
    """Link the sparse layers of each block that read one input (q/k/v, gate/up) and keep the same
    features, so that the fast path selects once for them (``core.shared_input``)."""
    layers = sparse_layers(model)
    blocks: dict[tuple, list[SparseLinear]] = {}
    for site in sites:
        roles = next((roles for roles in SHARED_INPUT_ROLES if site.role in roles), None)
        if roles is not None and site.name in layers:
            blocks.setdefault((site.name.rpartition(".")[0], roles), []).append(layers[site.name])
    for members in blocks.values():
        link_shared_input(members)


def mark_sparsified_(model: nn.Module, config: SparsityConfig) -> None:
    """Record ``config`` on a sparsified model; a transformers model gets the actsparse quantizer,
    so that ``model.save_pretrained`` writes an actsparse checkpoint."""
    setattr(model, SPARSITY_ATTR, config)
    for attach, _ in MODEL_HOOKS:
        attach(model)


def unsparsify_(model: nn.Module) -> int:
    """Put the original dense layers back; returns how many were restored."""
    layers = sparse_layers(model)
    unlink_shared_input(layers.values())
    for name, layer in layers.items():
        set_module(model, name, layer.original)
    for attr in (SPARSITY_ATTR, CALIBRATION_ATTR):
        if attr in vars(model):
            delattr(model, attr)
    for _, detach in MODEL_HOOKS:
        detach(model)
    return len(layers)
