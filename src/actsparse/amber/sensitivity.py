"""Per-layer sensitivity to activation sparsity (the Amber Pruner paper's layer analysis).

For each decoder linear layer with a recognised role,
``e_q = ‖Y − Y'‖₂ / (‖Y‖₂ + ε)``: ``Y`` the dense layer's output on the calibration inputs,
``Y'`` the output of the same layer with only its own input sparsified, on exactly the same
inputs. The norms are Frobenius norms over all calibration tokens (the sums of squares are
accumulated window by window in float64). The model runs dense once; a forward hook on every
layer feeds the captured input to a ``SparseLinear`` built on the fly (sharing the weight),
so no layer's inputs are ever stored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from actsparse.calibration.collect import run_windows
from actsparse.core.mitigation import get_mitigation
from actsparse.core.patterns import parse_pattern
from actsparse.core.scoring import get_criterion
from actsparse.core.sparse_linear import SparseLinear
from actsparse.core.stats import InputStats
from actsparse.errors import ActsparseError
from actsparse.models.discovery import ROLES, LinearSite, find_linear_sites
from actsparse.models.placement import bridge_offload_, onloaded
from actsparse.sparsify import sparse_layers

SENSITIVITY_EPS = 1e-8


def relative_error(y: torch.Tensor, y_sparse: torch.Tensor, eps: float = SENSITIVITY_EPS) -> float:
    """``‖Y − Y'‖₂ / (‖Y‖₂ + ε)`` (Frobenius), in float64."""
    y, y_sparse = y.double(), y_sparse.double()
    return ((y - y_sparse).norm() / (y.norm() + eps)).item()


@dataclass
class Sensitivity:
    """Sensitivity ``e_q`` of every recognised decoder linear layer."""

    sites: list[LinearSite]
    scores: dict[str, float]
    settings: dict = field(default_factory=dict)

    def roles(self) -> list[str]:
        present = {s.role for s in self.sites if s.name in self.scores}
        return [r for r in ROLES if r in present]

    def num_layers(self) -> int:
        return 1 + max(s.layer for s in self.sites)

    def grid(self) -> dict[str, list[float | None]]:
        """``{role: [e_q of layer 0, 1, …]}`` (None where a layer has no such role)."""
        grid = {role: [None] * self.num_layers() for role in self.roles()}
        for site in self.sites:
            if site.name in self.scores:
                grid[site.role][site.layer] = self.scores[site.name]
        return grid

    def heatmap_text(self, digits: int = 3) -> str:
        """Roles × layer index as a text table of ``e_q`` values."""
        width = digits + 3
        header = "role  " + " ".join(f"{i:>{width}}" for i in range(self.num_layers()))
        lines = [header]
        for role, values in self.grid().items():
            cells = ["-".rjust(width) if v is None else f"{v:{width}.{digits}f}" for v in values]
            lines.append(f"{role:<5} " + " ".join(cells))
        return "\n".join(lines)

    def save_png(self, path: str | Path) -> str | None:
        """Write the heat map with matplotlib; returns a note (and writes nothing) when it is not installed."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return "matplotlib is not installed; no PNG written (pip install matplotlib)"
        grid = self.grid()
        data = [[math.nan if v is None else v for v in values] for values in grid.values()]
        fig, ax = plt.subplots(figsize=(max(6, 0.35 * self.num_layers() + 2), 0.5 * len(grid) + 1.5))
        image = ax.imshow(data, aspect="auto", cmap="viridis")
        ax.set_yticks(range(len(grid)), list(grid))
        ax.set_xlabel("decoder layer")
        ax.set_title(f"e_q  {self.settings.get('pattern', '')} {self.settings.get('criterion', '')}")
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return None

    def to_dict(self) -> dict:
        return {
            "scores": dict(self.scores),
            "sites": [
                {"name": s.name, "layer": s.layer, "role": s.role, "in_features": s.in_features, "out_features": s.out_features,
                 "flops_per_token": s.flops_per_token}
                for s in self.sites
            ],
            "grid": self.grid(),
            "settings": dict(self.settings),
        }  # fmt: skip


def measure_sensitivity(
    model: nn.Module,
    windows: torch.Tensor,
    pattern: str = "8:16",
    criterion: str = "amber",
    mitigation: str = "none",
    *,
    stats: dict[str, InputStats] | None = None,
    bos_id: int | None = None,
    names: list[str] | None = None,
    progress: bool = True,
    eps: float = SENSITIVITY_EPS,
) -> Sensitivity:
    """``e_q`` of every recognised decoder linear layer (or of ``names``) over ``windows`` ``[n, seqlen]``.

    ``stats`` (``actsparse.collect_input_stats``) is needed by criteria and mitigations that
    need calibration statistics. The model must be dense (not sparsified).
    """
    curves = measure_curves(
        model, windows, [pattern], criterion, mitigation, stats=stats, bos_id=bos_id, names=names, progress=progress, eps=eps
    )
    return next(iter(curves.values()))


@torch.no_grad()
def measure_curves(
    model: nn.Module,
    windows: torch.Tensor,
    patterns: list[str],
    criterion: str = "amber",
    mitigation: str = "none",
    *,
    stats: dict[str, InputStats] | None = None,
    bos_id: int | None = None,
    names: list[str] | None = None,
    progress: bool = True,
    eps: float = SENSITIVITY_EPS,
) -> dict[str, Sensitivity]:
    """``e_q`` of every layer at each of ``patterns``, in one dense pass over ``windows``:
    ``{str(pattern): Sensitivity}`` (the sensitivity curves a per-layer allocation reads)."""
    if sparse_layers(model):
        raise ActsparseError("model is sparsified; measure sensitivity on the dense model (actsparse.unsparsify_ first)")
    pattern_objs = [parse_pattern(p) for p in patterns]
    if not pattern_objs or any(p.is_dense for p in pattern_objs):
        raise ActsparseError("sensitivity needs sparse patterns (N:M or unstructured:S), not dense")
    criterion_obj, mitigation_obj = get_criterion(criterion), get_mitigation(mitigation)
    sites = find_linear_sites(model)
    chosen = [s for s in sites if s.role is not None and (names is None or s.name in names)]
    wrappers: dict[str, SparseLinear] = {}
    sums: dict[str, list[list[float]]] = {}
    for index, site in enumerate(chosen):
        module = model.get_submodule(site.name)
        for pattern_obj in pattern_objs[1:]:
            pattern_obj.check_width(site.in_features)
        with onloaded(module):
            wrappers[site.name] = SparseLinear(
                module,
                pattern_objs[0],
                criterion_obj,
                mitigation_obj,
                name=site.name,
                stats=(stats or {}).get(site.name),
                seed=index,
                backend="torch",
            )
        bridge_offload_(wrappers[site.name], module)
        sums[site.name] = [[0.0, 0.0] for _ in pattern_objs]  # per pattern: sum (Y - Y')^2, sum Y^2

    def hook(module, args, output, name):
        # one wrapper per layer (its mitigation prepared once), its pattern switched per candidate:
        # the prepared tensors of the mitigations measured here do not depend on the pattern
        y = output.double()
        reference = y.square().sum().item()
        wrapper = wrappers[name]
        for pattern_obj, acc in zip(pattern_objs, sums[name]):
            wrapper.pattern = pattern_obj
            acc[0] += (y - wrapper(args[0]).double()).square().sum().item()
            acc[1] += reference

    handles = [
        model.get_submodule(s.name).register_forward_hook(lambda m, a, o, name=s.name: hook(m, a, o, name)) for s in chosen
    ]
    try:
        run_windows(model, windows, bos_id=bos_id, desc="sensitivity", progress=progress)
    finally:
        for handle in handles:
            handle.remove()
    out = {}
    for position, pattern_obj in enumerate(pattern_objs):
        scores = {name: math.sqrt(acc[position][0]) / (math.sqrt(acc[position][1]) + eps) for name, acc in sums.items()}
        settings = {
            "pattern": str(pattern_obj),
            "criterion": criterion,
            "mitigation": mitigation,
            "windows": len(windows),
            "eps": eps,
        }
        out[str(pattern_obj)] = Sensitivity(sites=sites, scores=scores, settings=settings)
    return out
